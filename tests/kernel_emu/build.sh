#!/usr/bin/env bash
# Builds the CPU emulation of the fused-scan backward kernels (see emu.h and
# driver.cpp) into $1 (default: target/scan_grad_emu). Needs g++ ≥ 11 (C++20).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:-$root/target/scan_grad_emu}"
mkdir -p "$(dirname "$out")"
source "$here/flags.sh"
flags=("${emu_flags[@]}")
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/scan.cu" -o "$out.scan.o"
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/scan_grad.cu" -o "$out.scan_grad.o"
g++ "${flags[@]}" "$here/runtime.cpp" "$here/driver.cpp" "$out.scan.o" "$out.scan_grad.o" -o "$out"
rm -f "$out.scan.o" "$out.scan_grad.o"
echo "$out"
