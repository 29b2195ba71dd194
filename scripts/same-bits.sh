#!/usr/bin/env bash
# Whether this tree's chunked kernels (cuda/chunk.cu, cuda/chunk_grad.cu
# and what they include) compute what BASE's computed, bit for bit: builds
# BASE's chunk emulator (its cuda/ and tests/kernel_emu, build.sh chunk),
# then runs tests/cpu_chunked_emu.rs with GATELOOP_CHUNK_EMU_BASELINE
# pointing at it, so that every emulator run of that file also runs BASE's
# kernels (with BASE's launch sizes: the inputs' copy has no shared.txt) on
# the same inputs and asserts every output file byte-equal (its `run`),
# besides the file's own checks. For a kernel change meant to keep every
# value: a schedule, a staging, a layout, a refactor. It needs no GPU and
# no CUDA toolkit (g++ ≥ 12), and takes about as long as the test file (10
# to 15 minutes on 2 cores).
#
#   scripts/same-bits.sh [BASE]     BASE: a commit (default HEAD)
#
# BASE's driver must read this tree's test inputs (its arguments and
# files); where it cannot, its runs fail and say so.
# The baseline build is kept in target/same-bits/ (one per commit).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-HEAD}"
rev="$(git -C "$root" rev-parse --short=12 "$base^{commit}")"
out="$root/target/same-bits/chunk_emu_$rev"
if [[ ! -x "$out" ]]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    git -C "$root" archive "$rev" cuda tests/kernel_emu | tar -x -C "$work"
    mkdir -p "$(dirname "$out")"
    if ! bash "$work/tests/kernel_emu/build.sh" chunk "$out.partial" >/dev/null; then
        echo "same-bits: $rev's chunk emulator did not build" >&2
        exit 1
    fi
    mv "$out.partial" "$out"
fi
echo "same-bits: every emulator run of tests/cpu_chunked_emu.rs against $rev's kernels ($out)"
cd "$root"
# scripts/test.sh's features, so that its build of the crate serves here.
features=()
if ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so'; then
    features=(--features bindgen)
fi
log="$root/target/same-bits/last.log"
GATELOOP_CHUNK_EMU_BASELINE="$out" cargo test --release "${features[@]}" --test cpu_chunked_emu -- --nocapture 2>&1 |
    tee "$log"
n="$(grep -c '^same bits as the baseline' "$log" || true)"
echo "same-bits: $n emulator runs byte-equal to $rev's"
[[ "$n" -gt 0 ]]
