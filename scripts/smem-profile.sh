#!/usr/bin/env bash
# Shared-memory wavefronts of the CUDA kernels, counted without a GPU: runs
# `gateloop bench` (the real launchers, grids and shared-memory carvings)
# against the fake CUDA driver built with the bank model
# (tests/kernel_emu/bank_model.cpp, `build.sh banks`), which logs every
# shared-memory access of the first blocks of each launch and counts the
# wavefronts a GPU would take for them; then prints the report per kernel
# and source line (scripts/smem-profile.py).
#
#   scripts/smem-profile.sh REPORT [bench arguments...]
#   e.g. scripts/smem-profile.sh /tmp/k128.txt --kernel chunked-real-fast --dtype bf16 --shape 1,256,1,128,128
#
# REPORT receives the raw counts (smem-profile.py REPORT --against OLD
# compares two). Small shapes suffice: a block's accesses do not depend on
# B, H or L, but for the sequential walks (one block walks every chunk) and
# the launch choices that depend on the grid (ChunkCarry::Auto).
# Environment: GATELOOP_BANKS_BLOCKS (blocks sampled per launch, default 2),
# GATELOOP_BANKS_LIB (a prebuilt library directory; default: built into
# target/banks-lib), GATELOOP_BIN (default target/release/gateloop, which
# must be built: cargo build --release), GATELOOP_BANKS_TRACE (a site's
# address as REPORT lists it, `site KERNEL 0x...`: its first conflicted warp
# instructions to stderr, each lane's word offset, to see which lanes meet
# in a bank; GATELOOP_BANKS_TRACE_COUNT of them a launch, default 8).
# Checked against a GPU: at commit
# 6733f98 the model gave the real bf16 output launch 29 400 wavefronts a
# block and 16 740 ideal, Nsight Compute 28 448 and 15 820 on an H200
# (2026-12-04's profile; docs/speed-log.md item 40).
# A development tool: the build and the tests never call it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
report="${1:?usage: smem-profile.sh REPORT [bench arguments...]}"
shift
lib="${GATELOOP_BANKS_LIB:-}"
if [[ -z "$lib" ]]; then
    lib="$root/target/banks-lib"
    bash "$root/tests/kernel_emu/build.sh" banks "$lib" >/dev/null
fi
bin="${GATELOOP_BIN:-$root/target/release/gateloop}"
LD_LIBRARY_PATH="$lib" GATELOOP_BANKS_OUT="$report" GATELOOP_BANKS_BLOCKS="${GATELOOP_BANKS_BLOCKS:-2}" \
    "$bin" bench --runs 1 --warmup 0 "$@" | grep -E '^ *launches' || true
python3 "$root/scripts/smem-profile.py" "$report"
