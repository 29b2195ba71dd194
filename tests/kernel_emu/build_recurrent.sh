#!/usr/bin/env bash
# Builds the CPU emulation of the recurrent kernel (cuda/recurrent.cu,
# unchanged; see emu.h and recurrent_driver.cpp) into $1 (default:
# target/recurrent_emu). Needs g++ ≥ 12 (C++20, _Float16).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:-$root/target/recurrent_emu}"
mkdir -p "$(dirname "$out")"
source "$here/flags.sh"
flags=("${emu_flags[@]}" -DEMU_DYNAMIC_SHARED)
g++ "${flags[@]}" -x c++ -include "$here/emu.h" -c "$root/cuda/recurrent.cu" -o "$out.recurrent.o"
g++ "${flags[@]}" "$here/runtime.cpp" "$here/recurrent_driver.cpp" "$out.recurrent.o" -o "$out"
rm -f "$out.recurrent.o"
echo "$out"
