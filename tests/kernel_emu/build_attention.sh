#!/usr/bin/env bash
# Builds the CPU emulation of the attention kernels (cuda/attention.cu,
# unchanged; see emu.h and attention_driver.cpp) into $1 (default:
# target/attention_emu). Needs g++ ≥ 11 (C++20).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:-$root/target/attention_emu}"
mkdir -p "$(dirname "$out")"
source "$here/flags.sh"
flags=("${emu_flags[@]}")
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/attention.cu" -o "$out.attention.o"
g++ "${flags[@]}" "$here/runtime.cpp" "$here/attention_driver.cpp" "$out.attention.o" -o "$out"
rm -f "$out.attention.o"
echo "$out"
