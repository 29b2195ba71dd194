#!/usr/bin/env bash
# Finds or provisions an nvcc for building gateloop's CUDA kernels.
#
# 1. A system nvcc wins: $NVCC, $CUDA_PATH/bin/nvcc, $CUDA_HOME/bin/nvcc,
#    `nvcc` on PATH, /usr/local/cuda/bin/nvcc.
# 2. Otherwise the NVIDIA PyPI wheels (nvcc, nvvm, cudart, crt headers, cccl)
#    are pip-installed, without dependencies, into a cached directory:
#    ${GATELOOP_TOOLCHAIN_DIR:-$HOME/.cache/gateloop/cuda-13.0.88}
#    which then holds nvidia/cu13/{bin,include,nvvm,lib}. build.rs looks there.
#
# Idempotent: a stamp file is written only after the install succeeded and a
# test compile worked; with the stamp present this returns at once.
# The nvcc path is the last line on stdout; every message goes to stderr.
set -euo pipefail

log() { echo "provision-nvcc: $*" >&2; }

is_exe() { [[ -n "${1:-}" && -x "$1" && ! -d "$1" ]]; }

# --- 1. system nvcc -------------------------------------------------------
if [[ -n "${NVCC:-}" ]] && ! is_exe "$NVCC"; then
    log "NVCC=$NVCC is set but is not an executable file"
    exit 1
fi
for cand in "${NVCC:-}" \
            "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
            "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
            "$(command -v nvcc 2>/dev/null || true)" \
            /usr/local/cuda/bin/nvcc; do
    if is_exe "$cand"; then
        log "using system nvcc"
        echo "$cand"
        exit 0
    fi
done

# --- 2. provisioned toolchain ---------------------------------------------
NVCC_VERSION=13.0.88
DIR="${GATELOOP_TOOLCHAIN_DIR:-$HOME/.cache/gateloop/cuda-$NVCC_VERSION}"
ROOT="$DIR/nvidia/cu13"
NVCC_BIN="$ROOT/bin/nvcc"
STAMP="$DIR/.gateloop-provisioned"
PACKAGES=(
    "nvidia-cuda-nvcc==$NVCC_VERSION"
    "nvidia-nvvm==13.0.*"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-crt==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
)

if [[ -f "$STAMP" ]] && is_exe "$NVCC_BIN"; then
    log "already provisioned in $DIR"
    echo "$NVCC_BIN"
    exit 0
fi

command -v python3 >/dev/null || { log "python3 is required to provision nvcc"; exit 1; }
log "no system nvcc; installing ${PACKAGES[*]} into $DIR"
mkdir -p "$DIR"
# A failed earlier attempt may have left a partial tree: pip --target with
# --upgrade replaces it.
python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$DIR" "${PACKAGES[@]}" >&2

is_exe "$NVCC_BIN" || { log "the wheels did not provide $NVCC_BIN"; exit 1; }

# The wheels ship bin/, nvvm/ and include/ side by side under nvidia/cu13, so
# nvcc's built-in profile (TOP = bin/..) finds cicc, libdevice and the headers.
# Check that by compiling a kernel for every arch build.rs uses by default.
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/probe.cu" <<'CU'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void probe(float* x, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) { float s, c; sincosf(x[i], &s, &c); x[i] = exp2f(s) * c + __half2float(__float2half(1.f)); }
}
CU
if ! "$NVCC_BIN" --fatbin -O3 \
        -gencode arch=compute_80,code=sm_80 \
        -gencode arch=compute_90,code=sm_90 \
        -gencode arch=compute_90,code=compute_90 \
        -o "$TMP/probe.fatbin" "$TMP/probe.cu" >&2; then
    log "the provisioned nvcc failed to compile a test kernel"
    exit 1
fi
log "test compile for sm_80, sm_90 and compute_90 OK"

echo "$NVCC_VERSION ${PACKAGES[*]}" > "$STAMP"
echo "$NVCC_BIN"
