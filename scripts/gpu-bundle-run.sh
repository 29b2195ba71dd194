#!/usr/bin/env bash
# The runner of the gateloop GPU bundle (copied to bundle/run.sh by
# scripts/gpu-bundle.sh). Needs an NVIDIA driver; no Rust, no network.
#
#     bash bundle/run.sh                  # the default steps (1-6 below)
#     bash bundle/run.sh peers            # only some: any of warm tests sanitizer bench peers carry profile fuzz
#     GATELOOP_BUNDLE_DEADLINE_S=560 bash bundle/run.sh fuzz   # the GPU fuzz campaign
#
# Steps, each under `timeout`, all under an overall deadline (default 450 s,
# GATELOOP_BUNDLE_DEADLINE_S) so the whole run ends well inside 8 minutes:
#   1. environment: nvidia-smi, the bundle's MANIFEST, that the binaries start;
#   2. every GPU test binary (tests/gpu_*), --test-threads=8;
#   3. compute-sanitizer --tool memcheck, then --tool racecheck, on the small
#      `sanitizer_smoke` test of every GPU test binary that has one (decode:
#      every dtype, forward and in-place; scan; attention; chunked), when
#      compute-sanitizer is installed;
#   4. gateloop bench --json (every kernel of the bench registry);
#   5. the peer benchmark, peers/peers.py (see peers/README.md): ours (every
#      kernel of `gateloop bench --list`) against JAX associative_scan, a
#      torch associative scan and fla chunk_gla / fused_recurrent_gla (from
#      the bundled, sha256-checked wheels, unpacked into a temporary
#      directory on PYTHONPATH), at fla's benchmark shapes, with the time
#      that is left (at most GATELOOP_PEERS_BUDGET_S, default 240 s); the
#      cases it has no time for are reported as skipped, with the reason;
#   6. the bench table, the peers tables, then a summary table (printed last).
# Opt-in steps (named on the command line, not run by default):
#   warm: the peers' compiles in the background of the steps that time
#      nothing (the tests after gpu_concurrency, which runs first: its leak
#      check reads the device's free memory; the sanitizer):
#      `peers/peers.py --compile-only` (each
#      case called once, untimed; GATELOOP_WARM_ARGS, default `--peers
#      fla_chunk_gla`, with GATELOOP_PEERS_FLA_TUNE, default quick here)
#      fills Triton's and JAX's compile caches (TRITON_CACHE_DIR and
#      JAX_COMPILATION_CACHE_DIR, below), which stay on the machine while it
#      is held, so a peers step in a later call on the same machine starts
#      timing at once: on 2026-11-30 fla's compiles took the whole of the
#      peer step's share. Stopped (its workers with it) before the first
#      step that times anything (bench, peers, carry, profile, fuzz), after
#      waiting at most GATELOOP_WARM_WAIT_S (default 45) for it; at most
#      GATELOOP_WARM_LIMIT_S (default 240) in all. Its report:
#      peers-warm/peers.md (status and first-call seconds per case).
#   fuzz: the GPU fuzz campaign of issue 6, `gateloop fuzz --device cuda`
#      (every CUDA forward and backward against the f64 reference;
#      GATELOOP_FUZZ_TARGETS, default forward,grad; GATELOOP_FUZZ_DTYPES,
#      default f32,bf16,f16: the kernels in each input type; every kernel
#      variant beside each default: the chunked sequential carry and fragment
#      output, the recurrent ahead staging), GATELOOP_FUZZ_CASES
#      (default 100000) cases of seed GATELOOP_FUZZ_SEED (default 2026), max
#      length GATELOOP_FUZZ_MAX_LEN (default 64), stopping at the deadline;
#      its summary table goes to fuzz.txt and failing cases to fuzz-failures/.
#   carry: `gateloop bench` of chunked-sequential against chunked-separate
#      (bf16 and f32) over the sequential-grid sweep of 32 to 528 blocks
#      (chunked-sequential's default shapes), into carry.json and carry.txt:
#      what sets SEQUENTIAL_MIN_BLOCKS (src/cuda/chunk.rs); scripts/
#      gpu-results.py reads it. GATELOOP_CARRY_SHAPES="B,L,H,K,V ..." replaces
#      the sweep (a rehearsal on the emulated device).
#   profile: Nsight Compute (ncu, --clock-control none) on the kernels whose
#      speed the issues' targets name (chunked bf16 and f32, chunked-real
#      bf16, chunked-frag bf16 (the register-fragment output), chunked-grad bf16, recurrent, recurrent-ahead and
#      recurrent-rows4 bf16, recurrent-grad bf16 at B8
#      L4096 H16 K=V=64;
#      scan f32 at B1 L65536 H4): speed-of-light, occupancy, launch,
#      warp-state, memory and compute sections of each launch, and the warp
#      stalls per source line (SourceCounters; the kernels are built with
#      -lineinfo), for the tuning that timings alone cannot direct. Into profile/: NAME.ncu-rep (open in Nsight Compute),
#      NAME.txt (the details page) and NAME.sass.csv (the source page: per
#      SASS instruction, executions and stall samples; read here without
#      ncu, as scripts/ncu-opcodes.py reads the report's opcode mix). SKIP when ncu is not installed or
#      cannot read the counters (gVisor). GATELOOP_PROFILE_SHAPE=B,L,H,K,V
#      replaces every case's shape (a rehearsal on the emulated device).
#
# Narrowing a run (a second run in what is left of a device lease):
#   GATELOOP_TESTS="gpu_scan gpu_dtypes"   only these test binaries;
#   GATELOOP_SANITIZER_TOOLS="memcheck"    default "memcheck racecheck";
#   GATELOOP_BENCH_ARGS="--shape ... --dtype bf16"   appended to the bench;
#   GATELOOP_PEERS_ARGS="--peers fla_chunk_gla --ours chunked-real ..."
#                                          appended to peers/peers.py;
#   GATELOOP_PEERS_FLA_TUNE=quick          fla's Triton autotune cut to one
#                                          configuration per kernel (minutes
#                                          less; its times then bound fla's
#                                          from above: peers/fla_tune.py);
#   GATELOOP_PROFILE_CASES="chunked-bf16"  only these profile cases.
#
# GATELOOP_REQUIRE_GPU: defaults to 1 here. This runner exists to run on a GPU
# machine, where a test that skips for want of a GPU means the GPU went
# unused: with 1 such a skip is a test failure and a bench without a GPU is a
# FAIL. Set GATELOOP_REQUIRE_GPU=0 to accept skips (a machine without a GPU,
# e.g. to check the bundle itself): skipped steps are SKIP and do not fail
# the run.
#
# Results go to ./results, or packed into $OUT/results.tar.gz when $OUT is
# set (the device tool returns what is written there; see pack below):
# env.txt, tests.log, sanitizer.log, bench.txt,
# bench.json, summary.txt, summary.json, and peers/ (peers.json, peers.md,
# a log per peer worker, ours-bench-*.json/txt).
#
# Exit status: 0 when every step PASSed or was SKIPped (or, warm, STOPPED:
# cut short before a timing step or at its limit, its compiles kept), else 1
# (FAIL, TIMEOUT, or NOT RUN because the deadline was reached).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
results=${OUT:-$PWD/results}
# The device tool brings back at most 8 files from $OUT, two folders deep at
# most, so with $OUT set the results are written to a working folder and
# packed into $OUT/results.tar.gz (large Nsight reports apart, in
# $OUT/profile-reps.tar.gz, each under the tool's 16 MiB a file), with
# summary.txt beside them to read at once. Packed after every step, so a run
# killed from outside still returns what it finished.
# `python3 scripts/gpu-results.py` unpacks them.
pack_to=""
if [[ -n "${OUT:-}" ]]; then
    pack_to=$OUT
    mkdir -p "$pack_to"
    results=$(mktemp -d)
fi
mkdir -p "$results"
pack() { # [final]: packs $results into $pack_to (a no-op without $OUT)
    [[ -n "$pack_to" ]] || return 0
    # The Nsight reports travel inside results.tar.gz at the end when they
    # are small (a file must stay under the tool's 16 MiB), else apart.
    local reps_kb=0 exclude=(--exclude='*.ncu-rep')
    if [[ ${1:-} == final ]] && compgen -G "$results/profile/*.ncu-rep" >/dev/null; then
        reps_kb=$(du -skc "$results"/profile/*.ncu-rep | tail -n 1 | cut -f1)
        if ((reps_kb < 12000)); then
            exclude=()
        else
            tar -czf "$pack_to/profile-reps.tar.gz" -C "$results" profile --exclude='*.txt' --exclude='*.log' 2>/dev/null
        fi
    fi
    tar -czf "$pack_to/results.tar.gz.part" -C "$results" "${exclude[@]}" . 2>/dev/null &&
        mv -f "$pack_to/results.tar.gz.part" "$pack_to/results.tar.gz"
    [[ -f "$results/summary.txt" ]] && cp -f "$results/summary.txt" "$pack_to/summary.txt"
    return 0
}
export GATELOOP_REQUIRE_GPU="${GATELOOP_REQUIRE_GPU-1}"
require=0
[[ -n "$GATELOOP_REQUIRE_GPU" && "$GATELOOP_REQUIRE_GPU" != 0 ]] && require=1
deadline_s=${GATELOOP_BUNDLE_DEADLINE_S:-450}
peers_budget_s=${GATELOOP_PEERS_BUDGET_S:-240}
t_start=$(date +%s)
all_steps="warm tests sanitizer bench peers carry profile fuzz"
default_steps="tests sanitizer bench peers"
steps="${*:-$default_steps}"
for s in $steps; do
    if [[ " $all_steps " != *" $s "* ]]; then
        echo "run.sh: unknown step '$s' (steps: $all_steps)" >&2
        exit 2
    fi
done
want() { [[ " $steps " == *" $1 "* ]]; }
export RUST_BACKTRACE=1
# The peers' compile caches, outside $results and the bundle (a device call
# that carries bundle/ again replaces it): kept while the machine is.
# Left to Triton's and JAX's defaults when the directory cannot be made
# (Triton fails to compile into a cache it cannot write).
cache_root=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/gateloop-bundle
if [[ -z "${TRITON_CACHE_DIR:-}" ]] && mkdir -p "$cache_root/triton" 2>/dev/null; then
    export TRITON_CACHE_DIR=$cache_root/triton
fi
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]] && mkdir -p "$cache_root/jax" 2>/dev/null; then
    export JAX_COMPILATION_CACHE_DIR=$cache_root/jax
fi

# The binaries travel as one xz archive, binaries.tar.xz (eleven binaries
# that each embed the same kernels: 116 MB as files, 10 MB packed on 2026-12-04): unpacked
# here on first use, or into a temporary directory when this one is
# read-only; tar -J, else python3's tarfile.
bins=$here
if [[ ! -x "$bins/bin/gateloop" && -f "$here/binaries.tar.xz" ]]; then
    [[ -w "$here" ]] || bins=$(mktemp -d)
    if ! tar -xJf "$here/binaries.tar.xz" -C "$bins" 2>/dev/null; then
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$here/binaries.tar.xz" "$bins" || {
            echo "run.sh: cannot unpack $here/binaries.tar.xz (needs tar with xz, or python3 with lzma)" >&2
            exit 1
        }
    fi
fi

env_txt=$results/env.txt
tests_log=$results/tests.log
san_log=$results/sanitizer.log
bench_txt=$results/bench.txt
bench_json=$results/bench.json
: >"$env_txt"
: >"$tests_log"
: >"$san_log"
: >"$bench_txt"

names=()
statuses=()
seconds=()
notes=()
record() { # name status seconds note
    names+=("$1")
    statuses+=("$2")
    seconds+=("$3")
    notes+=("$4")
    printf '[run.sh] %-36s %-8s %4ss  %s\n' "$1" "$2" "$3" "$4"
    pack
}

# Seconds a step may take: its own limit, cut to what the deadline leaves
# (minus 15 s for the summary); 0 when nothing is left.
budget() {
    local left=$((deadline_s - ($(date +%s) - t_start) - 15))
    ((left < 0)) && left=0
    ((left < $1)) && echo "$left" || echo "$1"
}

# run_step NAME LIMIT_S LOG -- command...: runs it under timeout, appends its
# output (with a header) to LOG, leaves rc in $rc, output in $step_out, time
# in $dt, and not_run=1 (rc 125) when the deadline left no time for it.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 4
    step_out=$(mktemp)
    not_run=0
    local lim
    lim=$(budget "$limit")
    if ((lim < 5)); then
        rc=125
        not_run=1
        dt=0
        echo "(not run: the ${deadline_s}s deadline is reached)" >"$step_out"
        return
    fi
    local t0
    t0=$(date +%s)
    {
        echo "===== $name: $* (limit ${lim}s)"
    } >>"$log"
    timeout --kill-after=10 "$lim" "$@" >"$step_out" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    cat "$step_out" >>"$log"
    echo "===== $name: exit $rc after ${dt}s" >>"$log"
}

timed_out() { [[ $1 == 124 || $1 == 137 ]]; }

# bench_budget LIMIT_S: the --time-budget of a `gateloop bench` step of
# LIMIT_S, so it stops starting cases in time to write its table and JSON of
# those it ran (a timeout would lose them all).
bench_budget() {
    local lim
    lim=$(budget "$1")
    echo $((lim > 50 ? lim - 30 : lim / 2))
}

# find_tool NAME PATH...: NAME on the PATH, else the first executable PATH
# (the CUDA toolkit's and Nsight's usual places); empty when none.
find_tool() {
    local c
    c=$(command -v "$1" 2>/dev/null) && { echo "$c"; return; }
    shift
    for c in "$@"; do
        [[ -x "$c" ]] && { echo "$c"; return; }
    done
    return 0
}

# record_cli NAME NO_GPU PASS_NOTE FAIL_NOTE TIMEOUT_NOTE: records a step that
# ran a `gateloop` subcommand, from run_step's results: PASS with PASS_NOTE;
# no GPU (exit 2 with the NO_GPU message) a FAIL when a GPU is required, else
# a SKIP; TIMEOUT; NOT RUN; any other exit a FAIL with FAIL_NOTE.
record_cli() {
    local name=$1 no_gpu=$2 pass_note=$3 fail_note=$4 timeout_note=$5
    if ((not_run)); then
        record "$name" "NOT RUN" 0 "deadline reached"
    elif timed_out "$rc"; then
        record "$name" TIMEOUT "$dt" "$timeout_note"
    elif ((rc == 0)); then
        record "$name" PASS "$dt" "$pass_note"
    elif ((rc == 2)) && grep -q "$no_gpu" "$step_out"; then
        if ((require)); then
            record "$name" FAIL "$dt" "no GPU: $(grep -m 1 "$no_gpu" "$step_out" | cut -c1-160)"
        else
            record "$name" SKIP "$dt" "no GPU (exit 2)"
        fi
    else
        record "$name" FAIL "$dt" "exit $rc: $fail_note"
    fi
}
# record_bench NAME LOG PASS_NOTE: a `gateloop bench` step.
record_bench() {
    record_cli "$1" 'needs a GPU' "$3" "$(grep -m 1 '^error' "$step_out" | cut -c1-160)" "see $2"
}

# ---- 1. environment --------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "GATELOOP_REQUIRE_GPU=$GATELOOP_REQUIRE_GPU deadline ${deadline_s}s results $results"
    echo "----- MANIFEST"
    cat "$here/MANIFEST.txt" 2>/dev/null
    echo "----- nvidia-smi"
    timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi unavailable)"
    echo "----- ldd bin/gateloop"
    ldd "$bins/bin/gateloop" 2>&1
} >>"$env_txt"
run_step "binaries start" 20 "$env_txt" -- "$bins/bin/gateloop" --version
if ((not_run)); then
    record "binaries start" "NOT RUN" 0 "deadline reached"
elif ((rc == 0)); then
    record "binaries start" PASS "$dt" "$(head -n 1 "$step_out")"
else
    record "binaries start" FAIL "$dt" "gateloop --version exit $rc: $(tail -n 1 "$step_out") (a glibc mismatch? see env.txt)"
fi

# ---- the peers' Python: one unpack of the pinned wheels ----------------------
py=$(command -v python3 || command -v python)
site=""
wheel_note=""
# peers_site LOG: the pinned wheels, checked and unpacked (pure Python: no pip
# needed) into $site, once; wheel_note says what went wrong, if anything.
peers_site() {
    [[ -n "$site" ]] && return 0
    site=$(mktemp -d)
    if [[ -f "$here/peers/wheels/SHA256SUMS" ]] &&
        (cd "$here/peers/wheels" && sha256sum --check --quiet SHA256SUMS) >>"$1" 2>&1; then
        for w in "$here"/peers/wheels/*.whl; do
            "$py" -m zipfile -e "$w" "$site" >>"$1" 2>&1 || wheel_note="cannot unpack $(basename "$w")"
        done
        GATELOOP_FLA_WHEEL="$(grep -h 'fla_core' "$here/peers/wheels/SHA256SUMS" | awk '{print $2 " sha256 " $1}')"
        export GATELOOP_FLA_WHEEL
    else
        wheel_note="wheels missing or not matching SHA256SUMS (fla reported unavailable)"
    fi
}

# peers_counts PEERS_JSON: one line for a step's note: the cases by status,
# ours' status and rows (when ours ran), the Triton cache's entries at the start.
peers_counts() {
    "$py" -c '
import collections, json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no peers.json ({type(e).__name__})"); sys.exit()
c = collections.Counter(x["status"] for x in d["cases"])
ours = d["ours"]
line = "peer cases: " + (", ".join("%d %s" % (n, s) for s, n in sorted(c.items())) or "none")
if not d.get("compile_only"):
    line += "; ours: %s (%d rows)" % (ours["status"], len(ours["results"]))
line += "; Triton cache: %s entries at the start" % d.get("caches", {}).get("triton", {}).get("entries", "?")
print(line)
' "$1" 2>&1 | tail -n 1
}

# python_step NAME LOG: starts a Python step's LOG; false, with the step
# recorded (FAIL when a GPU is required, else SKIP), when there is no python3;
# else true, the wheels unpacked (peers_site).
python_step() {
    : >"$2"
    if [[ -z "$py" ]]; then
        record "$1" "$([[ $require == 1 ]] && echo FAIL || echo SKIP)" 0 "no python3 on this machine"
        return 1
    fi
    peers_site "$2"
    return 0
}

# ---- warm (opt-in): the peers' compiles, in the background -------------------
# warm_start: starts it, once (called before the first GPU test that does not
# read device-wide numbers, or after the tests: gpu_concurrency's leak check
# compares the device's free memory before and after its launches, which
# another process allocating on the GPU would change).
warm_pid=""
warm_started=0
warm_dir=$results/peers-warm
warm_start() {
    want warm && ((warm_started == 0)) || return 0
    warm_started=1
    mkdir -p "$warm_dir"
    warm_log=$warm_dir/warm-run.log
    if python_step warm "$warm_log"; then
        warm_lim=$(budget "${GATELOOP_WARM_LIMIT_S:-240}")
        warm_t0=$(date +%s)
        echo "===== warm: limit ${warm_lim}s; caches ${TRITON_CACHE_DIR:-the Triton default}, ${JAX_COMPILATION_CACHE_DIR:-none for JAX}" >>"$warm_log"
        # shellcheck disable=SC2086 # GATELOOP_WARM_ARGS is split into arguments
        timeout --kill-after=10 "$warm_lim" env PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
            GATELOOP_PEERS_FLA_TUNE="${GATELOOP_PEERS_FLA_TUNE:-quick}" \
            "$py" "$here/peers/peers.py" --compile-only --out "$warm_dir" \
            --budget-s "$((warm_lim > 15 ? warm_lim - 10 : 5))" ${GATELOOP_WARM_ARGS:---peers fla_chunk_gla} \
            >>"$warm_log" 2>&1 &
        warm_pid=$!
    fi
}
# warm_join WHY: before a step that times anything (or at the end), waits at
# most GATELOOP_WARM_WAIT_S for the warm-up, stops it if still running
# (SIGTERM: timeout passes it on, peers.py kills its workers), and records
# the step.
warm_join() {
    [[ -n "$warm_pid" ]] || return 0
    local waited=0 wait_s=${GATELOOP_WARM_WAIT_S:-45} rc_w stopped=""
    while kill -0 "$warm_pid" 2>/dev/null && ((waited < wait_s)); do
        sleep 1
        waited=$((waited + 1))
    done
    if kill -0 "$warm_pid" 2>/dev/null; then
        kill -TERM "$warm_pid" 2>/dev/null
        stopped=" (stopped: $1)"
    fi
    wait "$warm_pid"
    rc_w=$?
    warm_pid=""
    local dt_w=$(($(date +%s) - warm_t0)) counts
    echo "===== warm: exit $rc_w after ${dt_w}s$stopped" >>"$warm_log"
    counts=$(peers_counts "$warm_dir/peers.json")
    local note="$counts$stopped${wheel_note:+; $wheel_note}; peers-warm/peers.md"
    if ((rc_w == 0)); then
        record "warm" PASS "$dt_w" "$note"
    elif ((rc_w == 3)); then
        record "warm" "$([[ $require == 1 ]] && echo FAIL || echo SKIP)" "$dt_w" "no GPU present; $note"
    elif [[ -n "$stopped" ]] || timed_out "$rc_w"; then
        # Cut short, by design: not a failure, and what it compiled is cached.
        record "warm" STOPPED "$dt_w" "$note"
    else
        record "warm" FAIL "$dt_w" "exit $rc_w: $note"
    fi
}

# ---- 2. GPU tests ----------------------------------------------------------
# gpu_concurrency first: its leak check reads the device's free memory, so it
# runs before the warm-up (another process on the GPU) starts.
test_bins=()
for t in "$bins"/tests/gpu_concurrency "$bins"/tests/gpu_*; do
    [[ -e "$t" ]] || continue
    [[ " ${test_bins[*]} " == *" $t "* ]] || test_bins+=("$t")
done
for t in "${test_bins[@]}"; do
    want tests || break
    name=$(basename "$t")
    [[ -z "${GATELOOP_TESTS:-}" || " $GATELOOP_TESTS " == *" $name "* ]] || continue
    [[ $name == gpu_concurrency ]] || warm_start
    run_step "test $name" 100 "$tests_log" -- "$t" --test-threads=8
    passed=$(grep -o '[0-9]* passed' "$step_out" | awk '{s += $1} END {print s + 0}')
    failed=$(grep -o '[0-9]* failed' "$step_out" | awk '{s += $1} END {print s + 0}')
    skipped=$(grep -c 'SKIPPED (no GPU)' "$step_out")
    note="$passed passed, $failed failed, $skipped skipped (no GPU)"
    if ((not_run)); then
        record "test $name" "NOT RUN" 0 "deadline reached"
    elif timed_out "$rc"; then
        record "test $name" TIMEOUT "$dt" "$note"
    elif ((rc != 0)); then
        record "test $name" FAIL "$dt" "$note; first: $(grep -m 1 -A 1 'panicked at' "$step_out" | tail -n 1 | cut -c1-160)"
    elif ((skipped > 0)); then
        record "test $name" SKIP "$dt" "$note"
    else
        record "test $name" PASS "$dt" "$note"
    fi
done

warm_start  # no GPU tests ran (or only gpu_concurrency)

# ---- 3. compute-sanitizer --------------------------------------------------
sanitizer=$(find_tool compute-sanitizer /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    /opt/nvidia/*/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer)
# Every GPU test binary with a `sanitizer_smoke` test (decode, scan,
# attention, chunked: each kernel family on a small case), under each tool.
smokes=()
for t in "$bins"/tests/gpu_*; do
    "$t" --list 2>/dev/null | grep -q '^sanitizer_smoke: test' && smokes+=("$t")
done
sanitizer_unsupported=0
for tool in ${GATELOOP_SANITIZER_TOOLS:-memcheck racecheck}; do
    want sanitizer || break
    limit=40
    [[ $tool == racecheck ]] && limit=60
    if [[ -z "$sanitizer" ]]; then
        record "sanitizer $tool" SKIP 0 "compute-sanitizer not found"
        continue
    fi
    if ((${#smokes[@]} == 0)); then
        record "sanitizer $tool" FAIL 0 "no test binary in the bundle has a sanitizer_smoke test"
        continue
    fi
    for smoke in "${smokes[@]}"; do
        step="sanitizer $tool $(basename "$smoke")"
        if ((sanitizer_unsupported)); then
            record "$step" SKIP 0 "compute-sanitizer cannot attach on this machine (see the first sanitizer step)"
            continue
        fi
        # GATELOOP_REQUIRE_GPU=1 so the smoke test cannot pass by skipping.
        run_step "$step" "$limit" "$san_log" -- env GATELOOP_REQUIRE_GPU=1 "$sanitizer" --tool "$tool" \
            --error-exitcode 86 --print-limit 50 "$smoke" --exact sanitizer_smoke --test-threads=1
        summary_line=$(grep -m 1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$step_out")
        if ((not_run)); then
            record "$step" "NOT RUN" 0 "deadline reached"
        elif timed_out "$rc"; then
            record "$step" TIMEOUT "$dt" "$summary_line"
        elif ((rc == 0)); then
            record "$step" PASS "$dt" "$summary_line"
        elif grep -q 'Device not supported' "$step_out" && ! grep -qE 'no GPU is usable|no CUDA driver' "$step_out"; then
            # The tool, not the GPU: compute-sanitizer refuses the device under
            # gVisor (KINDS.md, 2026-11-04) while the kernels run there.
            record "$step" SKIP "$dt" "compute-sanitizer cannot attach on this machine (Device not supported; gVisor?)"
            sanitizer_unsupported=1
        elif grep -qE 'Device not supported|no GPU is usable|no CUDA driver' "$step_out" && ((require == 0)); then
            record "$step" SKIP "$dt" "no supported GPU: $(grep -oE 'Device not supported|no GPU is usable|no CUDA driver' "$step_out" | head -n 1)"
        else
            record "$step" FAIL "$dt" "exit $rc; ${summary_line:-$(tail -n 1 "$step_out" | cut -c1-160)}"
        fi
    done
done

# ---- 4. benchmark ----------------------------------------------------------
# Every step from here on times something (or loads the GPU): the warm-up ends first.
if want bench || want peers || want carry || want profile || want fuzz; then
    warm_join "a timing step was next"
fi
if want bench; then
    # shellcheck disable=SC2086 # GATELOOP_BENCH_ARGS is split into arguments
    run_step "bench" 180 "$bench_txt" -- "$bins/bin/gateloop" bench --json "$bench_json" \
        --time-budget "$(bench_budget 180)" ${GATELOOP_BENCH_ARGS:-}
    record_bench "bench" bench.txt "$(grep -c '^recurrent' "$step_out") rows; bench.json"
fi

# ---- 5. peer benchmark -----------------------------------------------------
peers_dir=$results/peers
if want peers; then
    mkdir -p "$peers_dir"
    peers_log=$peers_dir/peers-run.log
    if python_step peers "$peers_log"; then
        lim=$(budget "$peers_budget_s")
        run_step "peers" "$peers_budget_s" "$peers_log" -- env PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
            "$py" "$here/peers/peers.py" --out "$peers_dir" --budget-s "$((lim > 15 ? lim - 10 : 5))" \
            --gateloop "$bins/bin/gateloop" ${GATELOOP_PEERS_ARGS:-}
        counts=$(peers_counts "$peers_dir/peers.json")
        note="$counts${wheel_note:+; $wheel_note}"
        if ((not_run)); then
            record "peers" "NOT RUN" 0 "deadline reached"
        elif timed_out "$rc"; then
            record "peers" TIMEOUT "$dt" "$note (results so far in peers/peers.json)"
        elif ((rc == 0)); then
            record "peers" PASS "$dt" "$note"
        elif ((rc == 3)); then
            if ((require)); then
                record "peers" FAIL "$dt" "no GPU present; $note"
            else
                record "peers" SKIP "$dt" "no GPU present; $note"
            fi
        else
            record "peers" FAIL "$dt" "exit $rc: $(tail -n 1 "$step_out" | cut -c1-160)"
        fi
    fi
fi

# ---- carry sweep (opt-in) --------------------------------------------------
if want carry; then
    carry_txt=$results/carry.txt
    : >"$carry_txt"
    sweep=()
    for s in $("$bins/bin/gateloop" bench --list 2>/dev/null |
        awk '/^chunked-sequential /{on=1; next} /^[^ ]/{on=0} on && /B=/{print}' |
        sed -E 's/.*B=([0-9]+) L=([0-9]+) H=([0-9]+) K=([0-9]+) V=([0-9]+) ([a-z]+).*/\1,\2,\3,\4,\5,\6/'); do
        sweep+=(--shape "$s")
    done
    # GATELOOP_CARRY_SHAPES="B,L,H,K,V ...": other shapes (a rehearsal on the
    # emulated device).
    if [[ -n "${GATELOOP_CARRY_SHAPES:-}" ]]; then
        sweep=()
        for s in $GATELOOP_CARRY_SHAPES; do sweep+=(--shape "$s"); done
    fi
    if ((${#sweep[@]} == 0)); then
        record "carry" FAIL 0 "no chunked-sequential shapes in \`gateloop bench --list\`"
    else
        run_step "carry" 120 "$carry_txt" -- "$bins/bin/gateloop" bench --json "$results/carry.json" \
            --time-budget "$(bench_budget 120)" --kernel chunked-sequential --kernel chunked-separate --dtype bf16 --dtype f32 "${sweep[@]}" --runs 20
        record_bench "carry" carry.txt "$((${#sweep[@]} / 2)) shapes; carry.json (scripts/gpu-results.py reads it)"
    fi
fi

# ---- profile (opt-in) ------------------------------------------------------
# Before fuzz when both are named: it is short, and what it records (hardware
# counters) nothing else in the bundle can.
if want profile; then
    prof_dir=$results/profile
    mkdir -p "$prof_dir"
    prof_log=$prof_dir/profile.log
    : >"$prof_log"
    ncu=$(find_tool ncu /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu)
    # name kernel dtype shape: every gateloop_* launch of one bench case
    # (--runs 1 --warmup 0: the case's launches once; the fwd+bwd case has
    # the most, nine).
    cases=(
        "chunked-bf16 chunked bf16 8,4096,16,64,64"
        "chunked-f32 chunked f32 8,4096,16,64,64"
        "chunked-real-bf16 chunked-real bf16 8,4096,16,64,64"
        "chunked-frag-bf16 chunked-frag bf16 8,4096,16,64,64"
        "chunked-grad-bf16 chunked-grad bf16 8,4096,16,64,64"
        "scan-f32 scan f32 1,65536,4,64,64"
        "recurrent-bf16 recurrent bf16 8,4096,16,64,64"
        "recurrent-ahead-bf16 recurrent-ahead bf16 8,4096,16,64,64"
        "recurrent-rows4-bf16 recurrent-rows4 bf16 8,4096,16,64,64"
        "recurrent-grad-bf16 recurrent-grad bf16 8,4096,16,64,64"
    )
    if [[ -n "${GATELOOP_PROFILE_CASES:-}" ]]; then
        wanted=()
        for c in "${cases[@]}"; do
            [[ " $GATELOOP_PROFILE_CASES " == *" ${c%% *} "* ]] && wanted+=("$c")
        done
        cases=("${wanted[@]}")
    fi
    if [[ -z "$ncu" ]]; then
        record "profile" SKIP 0 "ncu (Nsight Compute) not found"
    else
        profiled=0
        prof_fail=""
        prof_t0=$(date +%s)
        for c in "${cases[@]}"; do
            read -r name kernel dtype shape <<<"$c"
            shape=${GATELOOP_PROFILE_SHAPE:-$shape}
            run_step "profile $name" 90 "$prof_log" -- "$ncu" --clock-control none --target-processes all \
                --kernel-name regex:'^gateloop_' --launch-count 12 \
                --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
                --section SourceCounters \
                --export "$prof_dir/$name" --force-overwrite \
                "$bins/bin/gateloop" bench --kernel "$kernel" --dtype "$dtype" --shape "$shape" --runs 1 --warmup 0
            if ((not_run)); then
                prof_fail="${prof_fail:+$prof_fail; }$name not run (deadline)"
                break
            fi
            if ((rc == 0)) && [[ -f "$prof_dir/$name.ncu-rep" ]]; then
                "$ncu" --import "$prof_dir/$name.ncu-rep" --page details >"$prof_dir/$name.txt" 2>&1
                # Per SASS instruction: executions and warp-stall samples, as
                # text a machine without ncu reads (best effort: a flag an
                # older ncu lacks only loses this file).
                "$ncu" --import "$prof_dir/$name.ncu-rep" --page source --print-source sass --csv \
                    >"$prof_dir/$name.sass.csv" 2>>"$prof_log" || rm -f "$prof_dir/$name.sass.csv"
                profiled=$((profiled + 1))
            else
                why=$(grep -m 1 -E '==ERROR==|error' "$step_out" | cut -c1-100)
                timed_out "$rc" && why="timed out after ${dt}s"
                prof_fail="${prof_fail:+$prof_fail; }$name exit $rc: $why"
                # No counters (gVisor: "LibraryNotLoaded", ERR_NVGPUCTRPERM): the
                # other cases would fail the same way.
                grep -qE 'LibraryNotLoaded|ERR_NVGPUCTRPERM|not supported' "$step_out" && break
            fi
        done
        launches=$(cat "$prof_dir"/*.txt 2>/dev/null | grep -cE '^  gateloop_')
        prof_dt=$(($(date +%s) - prof_t0))
        if ((profiled == ${#cases[@]})); then
            record "profile" PASS "$prof_dt" "$profiled cases, $launches launches; profile/*.ncu-rep, *.txt"
        elif ((profiled == 0)) && grep -qE 'LibraryNotLoaded|ERR_NVGPUCTRPERM' "$prof_log"; then
            record "profile" SKIP "$prof_dt" "ncu cannot read the hardware counters here: $prof_fail"
        else
            record "profile" FAIL "$prof_dt" "$profiled of ${#cases[@]} cases; $prof_fail"
        fi
    fi
fi

# ---- fuzz (opt-in) ---------------------------------------------------------
if want fuzz; then
    fuzz_txt=$results/fuzz.txt
    : >"$fuzz_txt"
    fuzz_cases=${GATELOOP_FUZZ_CASES:-100000}
    lim=$(budget 100000)
    run_step "fuzz" 100000 "$fuzz_txt" -- "$bins/bin/gateloop" fuzz --device cuda --cases "$fuzz_cases" \
        --seed "${GATELOOP_FUZZ_SEED:-2026}" --max-len "${GATELOOP_FUZZ_MAX_LEN:-64}" \
        --targets "${GATELOOP_FUZZ_TARGETS:-forward,grad}" --dtypes "${GATELOOP_FUZZ_DTYPES:-f32,bf16,f16}" \
        --time-budget "$((lim > 20 ? lim - 15 : 5))" --out "$results/fuzz-failures" --max-failures 5
    ran=$(grep -m 1 -oE '\([0-9]+ run\)' "$step_out" | tr -d '()')
    record_cli "fuzz" 'cannot use the GPU' "${ran:-?} of $fuzz_cases cases, no disagreement; fuzz.txt" \
        "${ran:-?}; disagreements in fuzz-failures/ (replay commands in fuzz.txt)" "${ran:-?}; see fuzz.txt"
fi

# ---- 6. summary ------------------------------------------------------------
warm_join "the run ended"  # a run of warm with only untimed steps (or none) beside it
[[ -n "$site" ]] && rm -rf "$site"
total=$(($(date +%s) - t_start))
bad=0
for s in "${statuses[@]}"; do
    [[ $s == FAIL || $s == TIMEOUT || $s == "NOT RUN" ]] && bad=1
done
verdict=$([[ $bad == 0 ]] && echo OK || echo FAILED)

json_escape() { sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/ /g' | tr -d '\000-\037'; }
{
    echo "{"
    echo "  \"schema\": \"gateloop-bundle/1\","
    echo "  \"verdict\": \"$verdict\","
    echo "  \"require_gpu\": $require,"
    echo "  \"total_s\": $total,"
    echo "  \"steps\": ["
    for i in "${!names[@]}"; do
        sep=","
        ((i == ${#names[@]} - 1)) && sep=""
        printf '    {"step": "%s", "status": "%s", "seconds": %s, "note": "%s"}%s\n' \
            "$(printf '%s' "${names[$i]}" | json_escape)" "${statuses[$i]}" "${seconds[$i]}" \
            "$(printf '%s' "${notes[$i]}" | json_escape)" "$sep"
    done
    echo "  ]"
    echo "}"
} >"$results/summary.json"

{
    echo
    echo "================ gateloop bench"
    if grep -q '^device:' "$bench_txt"; then
        grep -vE '^(bench:|=====)' "$bench_txt" | sed -n '/^device:/,$p'
    else
        echo "(no bench table: see bench.txt)"
    fi
    if [[ -f "$peers_dir/peers.md" ]]; then
        echo
        echo "================ peer benchmark ($peers_dir/peers.md)"
        sed -n '/^## Forward$/,/^## Ours, every kernel$/p' "$peers_dir/peers.md" | sed '$d'
    fi
    echo
    echo "================ gateloop GPU bundle summary (GATELOOP_REQUIRE_GPU=$GATELOOP_REQUIRE_GPU, ${total}s, results in $results)"
    printf '%-36s %-8s %6s  %s\n' step status seconds note
    for i in "${!names[@]}"; do
        printf '%-36s %-8s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${notes[$i]}"
    done
    echo "verdict: $verdict"
} | tee "$results/summary.txt"
pack final

[[ $bad == 0 ]]
