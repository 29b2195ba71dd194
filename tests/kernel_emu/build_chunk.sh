#!/usr/bin/env bash
# Builds the CPU emulation of the chunked forward and backward kernels
# (cuda/chunk.cu, cuda/chunk_grad.cu, unchanged; see emu.h, include/mma.h and
# chunk_driver.cpp) into $1 (default:
# target/chunk_emu). Needs g++ ≥ 12 (C++20, _Float16).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:-$root/target/chunk_emu}"
mkdir -p "$(dirname "$out")"
source "$here/flags.sh"
flags=("${emu_flags[@]}" -DEMU_DYNAMIC_SHARED)
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/chunk.cu" -o "$out.chunk.o"
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/chunk_grad.cu" -o "$out.chunk_grad.o"
g++ "${flags[@]}" "$here/runtime.cpp" "$here/chunk_driver.cpp" "$out.chunk.o" "$out.chunk_grad.o" -o "$out"
rm -f "$out.chunk.o" "$out.chunk_grad.o"
echo "$out"
