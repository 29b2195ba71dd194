#!/usr/bin/env bash
# Barrier audit: removes each __syncthreads() / __syncwarp() call in cuda/
# in turn and runs the race tests of the kernels it belongs to on the
# ThreadSanitizer emulator (tests/kernel_emu/README.md, "Race checking").
#
#   scripts/barrier-audit.sh [PATTERN]    (PATTERN: an ERE over "file:line")
#
# Prints one line per barrier: `caught (race)` when TSan reports a data race,
# `caught (values)` when the run fails otherwise (a wrong or NaN result),
# `NOT CAUGHT` when the tests pass without it. A barrier that is not caught is
# redundant on every path the tests take, or the tests miss a path; either
# way it deserves a look. Works on a scratch git worktree of HEAD with its
# own target directory, so the checkout is never touched: the test binaries
# are built once there (the build compiles the CUDA kernels, so it wants the
# provisioned nvcc: NVCC=$(scripts/provision-nvcc.sh | tail -1)), then each
# mutation only rebuilds the emulator (the tests build it from the worktree's
# sources). Takes about an hour on 2 cores for every barrier.
set -euo pipefail
root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
pattern="${1:-.}"
scratch="$(mktemp -d)"
work="$scratch/audit"
git -C "$root" worktree add --quiet --detach "$work" HEAD
trap 'git -C "$root" worktree remove --force "$work"; rm -rf "$scratch"' EXIT
cd "$work"
export CARGO_TARGET_DIR="$work/target"

# The race test of each test target, and the targets each kernel file feeds.
declare -A race_test=(
    [cpu_kernels_emu]=scan_and_recurrent_kernels_race_free
    [cpu_scan_grad]=kernel_emulation_is_race_free
    [cpu_attention]=kernel_emulation_is_race_free
    [cpu_chunked_emu]=chunk_kernels_race_free
    [cpu_check_emu]=check_kernel_is_race_free
)
targets_of() {
    case "$(basename "$1")" in
        attention.cu) echo cpu_attention ;;
        recurrent.cu) echo cpu_kernels_emu ;;
        scan.cu | scan.cuh) echo cpu_kernels_emu cpu_scan_grad ;;
        scan_grad.cu) echo cpu_scan_grad ;;
        chunk.cu | chunk_grad.cu | chunk_common.cuh) echo cpu_chunked_emu ;;
        check.cu) echo cpu_check_emu ;;
        *) echo "${!race_test[@]}" ;;  # common.cuh: every kernel
    esac
}

messages="$scratch/build.json"
args=()
for t in "${!race_test[@]}"; do args+=(--test "$t"); done
cargo test --release --no-run --message-format=json "${args[@]}" >"$messages"
declare -A bin
while IFS=$'\t' read -r name exe; do bin[$name]="$exe"; done < <(bash scripts/test-executables.sh "$messages")

# Every barrier call outside a comment, as file:line.
sites=$(grep -nE '^[^/]*(__syncthreads|__syncwarp)\(\)' cuda/*.cu cuda/*.cuh | cut -d: -f1,2 | grep -E "$pattern" || true)
[ -n "$sites" ] || { echo "barrier-audit: no barrier matches '$pattern'" >&2; exit 2; }
for site in $sites; do
    file="${site%%:*}" line="${site##*:}"
    cp "$file" "$scratch/keep"
    sed -i -E "${line}s/(__syncthreads|__syncwarp)\(\)/(void)0/" "$file"
    verdict="NOT CAUGHT"
    for t in $(targets_of "$file"); do
        log="$scratch/$t.log"
        if ! timeout 900 "${bin[$t]}" --exact "${race_test[$t]}" >"$log" 2>&1; then
            if grep -q "ThreadSanitizer: data race" "$log"; then verdict="caught (race, $t)"; else verdict="caught (values, $t)"; fi
            break
        fi
    done
    cp "$scratch/keep" "$file"
    printf '%s\t%s\t%s\n' "$site" "$verdict" "$(sed -n "${line}p" "$file" | sed -E 's/^ +//')"
done
