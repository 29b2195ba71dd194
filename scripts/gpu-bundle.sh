#!/usr/bin/env bash
# Builds the GPU bundle: the GPU test binaries (every tests/gpu_*.rs) and the
# `gateloop` binary, in release with the CUDA kernels compiled in, packed with
# the runner scripts/gpu-bundle-run.sh (as run.sh) into bundle/ (gitignored).
#
# The bundle runs on a GPU machine that has an NVIDIA driver but no Rust
# toolchain, no nvcc requirement and no network:
#
#     bash bundle/run.sh            # results in $OUT, else ./results
#
# With the workplace's device tool, from the checkout the session runs in
# (bundle/ is ignored by git, so it must be carried):
#
#     run(command="bash bundle/run.sh", carry=["bundle"], timeout_s=540)
#     run(command="bash bundle/run.sh carry profile fuzz", carry=["bundle"], ...)
#
# and then, here, `python3 scripts/gpu-results.py <files_at>` files what came
# back under benches/results/ with the targets' verdicts (verdict.md).
#
# The peer benchmark (benches/peers/, run by bundle/run.sh after `gateloop
# bench`) is bundled as bundle/peers/ with the pure-Python wheels it needs on
# a machine without network, pinned by name, version and sha256 in
# benches/peers/wheels.sha256 (fla-core, which holds fla.ops, plus einops and
# packaging, which fla.ops imports); they are fetched once with `pip download
# --no-deps` into ~/.cache/gateloop/wheels and checked against the pins. When
# they cannot be fetched the bundle is still built, without them (the peer
# step then reports fla unavailable), and MANIFEST.txt says so.
#
# Only the GPU test binaries are bundled: they read no files (this script
# refuses one that mentions CARGO_MANIFEST_DIR or tests/fixtures), so they run
# from any working directory. The CPU tests stay with `scripts/test.sh`/CI.
#
# Environment: GATELOOP_CUDA_ARCHS (default here: 90, the H200's sm_90 SASS
# plus compute_90 PTX; set e.g. 80,90 for other GPUs), NVCC (default: the
# toolchain of scripts/provision-nvcc.sh), CARGO_TARGET_DIR (as usual).
# The bundle must stay under 60 MB (checked).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
max_bytes=$((60 * 1000 * 1000))

if [[ -z "${NVCC:-}" ]]; then
    NVCC=$(bash scripts/provision-nvcc.sh | tail -n 1)
fi
export NVCC
export GATELOOP_REQUIRE_NVCC=1
export GATELOOP_CUDA_ARCHS="${GATELOOP_CUDA_ARCHS:-90}"
echo "gpu-bundle: nvcc = $NVCC; GATELOOP_CUDA_ARCHS = $GATELOOP_CUDA_ARCHS" >&2

# The GPU test targets.
gpu_tests=()
for f in tests/gpu_*.rs; do
    gpu_tests+=("$(basename "$f" .rs)")
done
if ((${#gpu_tests[@]} == 0)); then
    echo "gpu-bundle: no tests/gpu_*.rs" >&2
    exit 1
fi
if grep -nE 'CARGO_MANIFEST_DIR|fixtures' tests/gpu_*.rs tests/common/*.rs tests/dtype_support/*.rs >&2; then
    echo "gpu-bundle: a GPU test reads files by path (above); the bundle has no source tree" >&2
    exit 1
fi
test_args=()
for t in "${gpu_tests[@]}"; do
    test_args+=(--test "$t")
done

# No separate `cargo build --bin gateloop`: building the integration tests
# builds the crate's binary too (target/release/gateloop), and a bin-only
# build resolves features without the dev-dependencies, rebuilding the crate.
messages=$(mktemp)
trap 'rm -f "$messages"' EXIT
cargo test --release --no-run --message-format=json "${test_args[@]}" >"$messages"
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

# "name<TAB>executable" of each test target built above.
pairs=$(bash "$(dirname "$0")/test-executables.sh" "$messages")

rm -rf bundle
mkdir -p bundle/bin bundle/tests
cp "$target_dir/release/gateloop" bundle/bin/gateloop
found=0
while IFS=$'\t' read -r name exe; do
    [[ -n "$name" ]] || continue
    cp "$exe" "bundle/tests/$name"
    found=$((found + 1))
done <<<"$pairs"
if ((found != ${#gpu_tests[@]})); then
    echo "gpu-bundle: expected ${#gpu_tests[@]} test executables (${gpu_tests[*]}), found $found" >&2
    exit 1
fi
if command -v strip >/dev/null; then
    strip bundle/bin/* bundle/tests/*
fi
cp scripts/gpu-bundle-run.sh bundle/run.sh
chmod +x bundle/run.sh bundle/bin/* bundle/tests/*

# The peer benchmark and its pinned wheels.
mkdir -p bundle/peers/wheels
cp benches/peers/*.py benches/peers/README.md bundle/peers/
wheel_cache="${GATELOOP_WHEEL_CACHE:-$HOME/.cache/gateloop/wheels}"
mkdir -p "$wheel_cache"
wheels_note="pinned in benches/peers/wheels.sha256, verified"
while read -r sum file; do
    [[ -n "$sum" ]] || continue
    if [[ ! -f "$wheel_cache/$file" ]]; then
        # fla_core-0.6.0-py3-none-any.whl -> fla_core==0.6.0
        spec=$(sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' <<<"$file")
        python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheel_cache" "$spec" >&2 ||
            echo "gpu-bundle: warning: cannot download $spec" >&2
    fi
    if [[ -f "$wheel_cache/$file" ]] && echo "$sum  $wheel_cache/$file" | sha256sum --check --status; then
        cp "$wheel_cache/$file" bundle/peers/wheels/
        echo "$sum  $file" >>bundle/peers/wheels/SHA256SUMS
    elif [[ -f "$wheel_cache/$file" ]]; then
        echo "gpu-bundle: $file does not match its pinned sha256 $sum" >&2
        exit 1
    else
        wheels_note="INCOMPLETE: $file could not be fetched (the peer step reports what is missing)"
    fi
done <benches/peers/wheels.sha256

{
    echo "gateloop GPU bundle"
    echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version 2>/dev/null | head -n 1)"
    echo "nvcc: $("$NVCC" --version | tail -n 1)"
    echo "GATELOOP_CUDA_ARCHS: $GATELOOP_CUDA_ARCHS"
    echo "tests: ${gpu_tests[*]}"
    echo "peers: benches/peers -> peers/; wheels: $(cd bundle/peers/wheels && ls *.whl 2>/dev/null | tr '\n' ' ')($wheels_note)"
    echo "max GLIBC symbol version needed: $(objdump -T bundle/bin/* bundle/tests/* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2,2n -k3,3n -u | tail -n 1)"
} >bundle/MANIFEST.txt

# The binaries as one xz archive (run.sh unpacks it): they all embed the same
# kernels, which a solid archive with a dictionary larger than one binary
# stores once (116 MB as files, about 10 MB packed on 2026-12-04; the device tool carries at
# most 64 MiB).
if command -v xz >/dev/null; then
    tar -cf - -C bundle bin tests | xz -9 -T2 --lzma2=dict=64MiB >bundle/binaries.tar.xz
    rm -rf bundle/bin bundle/tests
    echo "binaries: bin/ and tests/ packed in binaries.tar.xz (run.sh unpacks them)" >>bundle/MANIFEST.txt
fi

bytes=$(du -sb bundle | cut -f1)
cat bundle/MANIFEST.txt >&2
echo "gpu-bundle: bundle/ is $((bytes / 1000)) kB:" >&2
ls -l bundle bundle/peers bundle/peers/wheels >&2
if [[ -f bundle/binaries.tar.xz ]]; then
    tar -tvJf bundle/binaries.tar.xz >&2
fi
if ((bytes >= max_bytes)); then
    echo "gpu-bundle: bundle/ is $bytes bytes, over the $max_bytes limit" >&2
    exit 1
fi
echo "gpu-bundle: ready; run it with: bash bundle/run.sh   (device tool: carry [\"bundle\"])" >&2
