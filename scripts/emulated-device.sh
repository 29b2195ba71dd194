#!/usr/bin/env bash
# The GPU half of the project on a machine without a GPU: the GPU test
# binaries (tests/gpu_*.rs), the command line's CUDA paths and the benchmark
# harness run against a fake CUDA driver, tests/kernel_emu/cuda_driver.cpp
# built as libcuda.so (`build.sh libcuda`): every kernel of cuda/*.cu run by
# the CPU kernel emulator, behind the part of the driver API that cudarc
# calls. What runs is the real Rust side, unchanged: Gpu::new, the
# launchers' plans, parameter structs, grids, block shapes, dynamic shared
# memory sizes and attributes, workspaces, uploads and downloads, the typed
# errors of the host checks, the tests' poisoning and bounds. The fake
# driver checks what a GPU's driver checks at a launch (see its header) and
# runs the kernels as the kernel emulator tests do, but with a GPU's
# arithmetic errors at their documented worst (tests/kernel_emu/gpu_arith.h:
# libm and SFU errors, fmad contraction, truncating tensor cores).
#
#     bash scripts/emulated-device.sh      # ~5 min on 2 cores (2026-12-02)
#
# Needs the test binaries built with kernels (scripts/test.sh builds them;
# this script runs `cargo test --release --no-run`, a no-op then) and g++.
# The device is named "gateloop kernel emulator (CPU)"; its timings are the
# emulator's, not a GPU's.
#
# Not covered here, by design: speed, and what only silicon shows (the
# card's own rounding, beyond the model; the memory model across blocks).
# tests/kernel_emu/README.md says what the emulator checks.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/emulated-device
mkdir -p "$out"
rm -rf "$out/lib"
bash tests/kernel_emu/build.sh libcuda "$out/lib" >/dev/null
echo "emulated-device: fake libcuda built in $out/lib"

# The features of the caller's build (scripts/test.sh exports them), so that
# these are no-ops after it instead of a rebuild of the crate and kernels.
read -ra features <<<"${GATELOOP_CARGO_FEATURES:-}"
# The same build also holds the command line, target/release/gateloop (the
# integration tests run it): a `cargo build --bin` would resolve the
# features without the dev-dependencies and rebuild the crate for nothing.
cargo test --release "${features[@]}" --no-run --message-format=json 2>/dev/null >"$out/messages.json"
executables=$(bash scripts/test-executables.sh "$out/messages.json")
exe_of() { awk -F'\t' -v n="$1" '$1 == n { print $2 }' <<<"$executables" | tail -n 1; }

# Every later process loads the fake driver: cudarc dlopens "libcuda.so",
# which LD_LIBRARY_PATH finds before any installed driver.
export LD_LIBRARY_PATH="$PWD/$out/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GATELOOP_REQUIRE_GPU=1

# What runs here is the launchers end to end; the kernels' arithmetic is
# checked case by case by the kernel emulator tests (tests/cpu_*_emu.rs,
# under sanitizers) and on a GPU. So each test runs a sample of its cases
# (tests/common emulated_device_skips: those up to 8 M B·H·L·K·V, about one
# in 8 of them, its first always; GATELOOP_EMULATED_EVERY=1 runs them all,
# for hours), and attention at L = 65536 (O(L²)) is left out, each with a
# printed notice.
export GATELOOP_EMULATED_DEVICE=1

# As many test binaries at a time as there are cores (at most 4), each its
# own process with its own emulated device (launches within one process run
# one at a time), each with two test threads (so the f64 references overlap
# the launches). Each binary's output is printed when it ends.
logs="$out/logs"
rm -rf "$logs"
mkdir -p "$logs"
run_binary() {
    local name=$1 exe
    exe=$(exe_of "$name")
    if [[ -z "$exe" ]]; then
        echo "no test binary $name" >"$logs/$name.log"
        return 1
    fi
    "$exe" --test-threads 2 >"$logs/$name.log" 2>&1
}
# Every tests/gpu_*.rs binary, the longest-running ones started first.
longest=(gpu_chunked gpu_chunked_grad gpu_scan_grad gpu_scan gpu_concurrency)
mapfile -t all_gpu < <(awk -F'\t' '$1 ~ /^gpu_/ { print $1 }' <<<"$executables" | sort -u)
binaries=("${longest[@]}")
for name in "${all_gpu[@]}"; do
    [[ " ${longest[*]} " == *" $name "* ]] || binaries+=("$name")
done
# The CPUs this process may use: nproc, capped by a cgroup (v2) CPU quota,
# which nproc does not read; more binaries than CPUs only slows each down.
jobs_max=$(nproc 2>/dev/null || echo 2)
if [[ -r /sys/fs/cgroup/cpu.max ]] && read -r quota period </sys/fs/cgroup/cpu.max && [[ "$quota" =~ ^[0-9]+$ && "$period" =~ ^[1-9][0-9]*$ ]]; then
    quota_cpus=$(((quota + period - 1) / period))
    ((quota_cpus < jobs_max)) && jobs_max=$quota_cpus
fi
((jobs_max > 4)) && jobs_max=4
((jobs_max < 1)) && jobs_max=1
echo "emulated-device: $jobs_max test binaries at a time"
failed=()
declare -A pid_of_name=()
finish() {  # waits for any one binary, prints its log, records a failure
    local done_pid rc name
    wait -n -p done_pid && rc=0 || rc=$?
    for name in "${!pid_of_name[@]}"; do
        if [[ "${pid_of_name[$name]}" == "$done_pid" ]]; then
            echo "==== emulated-device: $name (exit $rc)"
            cat "$logs/$name.log"
            ((rc == 0)) || failed+=("$name")
            unset "pid_of_name[$name]"
        fi
    done
}
for name in "${binaries[@]}"; do
    while ((${#pid_of_name[@]} >= jobs_max)); do finish; done
    run_binary "$name" &
    pid_of_name[$name]=$!
done
while ((${#pid_of_name[@]} > 0)); do finish; done

# The command line's CUDA paths: demo, run and grad on the device, and the
# benchmark harness (CUDA-event timing, input rotation, floors, JSON).
bin=target/release/gateloop
if [[ ! -x "$bin" ]]; then
    echo "emulated-device: $bin was not built by cargo test --no-run" >&2
    exit 1
fi
cli() {
    echo "emulated-device: gateloop $*"
    if ! "$bin" "$@"; then failed+=("gateloop $1"); fi
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# run and grad on files, through the device: the CLI tests that run
# `--device cuda` (f32, F16 and BF16 files), which must not skip here.
cli_test() {
    local binary=$1 exe
    shift
    exe=$(exe_of "$binary")
    echo "emulated-device: $binary $*"
    if [[ -z "$exe" ]] || ! "$exe" --test-threads 2 "$@"; then failed+=("$binary $*"); fi
}
cli_test cli --exact half_inputs_run_in_their_dtype cuda_device_errors_are_clear \
    kernel_variants_run_where_they_exist_and_are_refused_elsewhere demo_runs_and_prints_a_table \
    cu_seqlens_packs_sequences_that_run_as_if_alone
cli_test cli_grad --exact half_grad_files_run_in_their_dtype grad_input_errors_name_the_tensor \
    grad_variants_are_the_default_bit_for_bit_or_refused
cli_test fuzz_campaign --exact variant_failures_name_and_replay_their_variant
cli demo --batch 1 --len 200 --heads 2 --key-dim 8 --value-dim 8
cli fuzz --device cuda --targets forward,grad --dtypes f32,bf16,f16 --cases 30 --max-len 40 --seed 7
cli bench --shape 1,100,1,8,8 --runs 2 --warmup 1 --json "$tmp/bench.json"
if ! grep -q '"gateloop kernel emulator (CPU)"' "$tmp/bench.json"; then
    echo "emulated-device: bench.json does not name the emulated device" >&2
    failed+=("gateloop bench (json)")
fi
# Each launch's time and geometry: the chunked row split into its launches
# (the separate carry at this grid), a one-launch row its one launch; each
# with its grid and the blocks an SM holds (the fake driver's occupancy: the
# shared-memory and thread limits).
if ! python3 -c 'import json, sys; r = {x["kernel"]: x for x in json.load(open(sys.argv[1]))["results"]}
want = ["gateloop_chunk_state", "gateloop_chunk_carry", "gateloop_chunk_output"]
ph = r["chunked"]["phases"]
one = r["recurrent"]["phases"]
sys.exit(not ([p["kernel"] for p in ph] == want and all(p["median_ms"] > 0 for p in ph)
              and [p["kernel"] for p in one] == ["gateloop_recurrent"]
              and all(p["blocks"] >= 1 and p["block_threads"] >= 32 and p["resident_per_sm"] >= 1
                      and p["waves"] > 0 for p in ph + one)))' "$tmp/bench.json"; then
    echo "emulated-device: bench.json must split each row into its launches with their geometry (phases)" >&2
    failed+=("gateloop bench (phases)")
fi
# The fwd+bwd rows run the training pair: the backward reads the chunk
# states the forward saved, so none of the state launches the backward
# recomputes (`... (backward)`) where its -recompute twin runs them.
if ! python3 -c 'import json, sys; r = {(x["kernel"], x["dtype"]): x for x in json.load(open(sys.argv[1]))["results"]}
names = lambda k: [p["kernel"] for p in r[(k, "f32")]["phases"]]
saved, again = names("chunked-real-fwd-bwd"), names("chunked-real-fwd-bwd-recompute")
sys.exit(not (saved == [n for n in again if not n.endswith("(backward)")]
              and len(again) > len(saved) and not any("(backward)" in n for n in names("chunked-fwd-bwd"))))' "$tmp/bench.json"; then
    echo "emulated-device: the saved fwd+bwd rows must leave out the state launches of the backward" >&2
    failed+=("gateloop bench (saved fwd+bwd)")
fi
# The tuning entry runs only when named (the bundle's carry step).
cli bench --kernel chunked-sequential --kernel chunked-separate --dtype bf16 --shape 1,100,1,8,8 --runs 2 \
    --warmup 1 --json "$tmp/carry.json"
if ! grep -q '"chunked-sequential"' "$tmp/carry.json" || grep -q '"chunked-sequential"' "$tmp/bench.json"; then
    echo "emulated-device: chunked-sequential must run when named and only then" >&2
    failed+=("gateloop bench (tuning entry)")
fi
# --dtype filters each kernel's dtypes (the GPU plan's bench step names f32
# and bf16 for every kernel, and the fragment kernels have no f32); a named
# kernel left with none is a usage error (exit 2).
cli bench --kernel chunked-frag --kernel recurrent --dtype f32 --dtype bf16 --shape 1,100,1,8,8 --runs 2 \
    --warmup 1 --json "$tmp/filter.json"
if ! python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))
sys.exit(not sorted((x["kernel"], x["dtype"]) for x in d["results"]) ==
         [("chunked-frag", "bf16"), ("recurrent", "bf16"), ("recurrent", "f32")])' "$tmp/filter.json"; then
    echo "emulated-device: bench --dtype must filter each kernel's dtypes" >&2
    failed+=("gateloop bench (dtype filter)")
fi
"$bin" bench --kernel chunked-frag --dtype f32 --shape 1,100,1,8,8 --runs 2 >/dev/null 2>&1 && rc=0 || rc=$?
if [[ $rc != 2 ]]; then
    echo "emulated-device: bench of a named kernel in none of its dtypes must exit 2 (got $rc)" >&2
    failed+=("gateloop bench (no dtype)")
fi
# --time-budget: a spent budget starts no case, and the JSON lists them.
cli bench --kernel scan --kernel chunked --dtype f32 --shape 1,100,1,8,8 --runs 2 --warmup 1 --time-budget 0 \
    --json "$tmp/budget.json"
if ! python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); sys.exit(not (d["results"] == [] and
        sorted(x["kernel"] for x in d["not_run"]) == ["chunked", "scan"]))' "$tmp/budget.json"; then
    echo "emulated-device: bench --time-budget 0 must run no case and list both as not run" >&2
    failed+=("gateloop bench (time budget)")
fi

# The API documentation's examples: the CUDA one launches the chunked
# kernel on the device (GATELOOP_REQUIRE_GPU=1 makes its no-GPU branch an
# error).
echo "emulated-device: cargo test --doc"
cargo test --release "${features[@]}" --doc || failed+=("doctests")

if ((${#failed[@]})); then
    echo "emulated-device: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "emulated-device: every GPU test binary and CLI path passed on the emulated device"
