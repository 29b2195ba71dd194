#!/usr/bin/env bash
# Prints the path of an nvdisasm for the SASS tools (scripts/sass-lines.sh,
# scripts/sass-diff.sh): the one beside NVCC (the nvcc that
# scripts/provision-nvcc.sh finds or provisions, passed as $1), else one on
# PATH, else PyPI's nvidia-cuda-nvdisasm 13.2 (the oldest 13.x there; it
# reads nvcc 13.0's sm_90 cubins), installed without dependencies into a
# cached directory. A development tool: the build and the tests never call it.
#
#   scripts/find-nvdisasm.sh NVCC
set -euo pipefail
nvcc="${1:?usage: find-nvdisasm.sh NVCC}"
nvdisasm="$(dirname "$nvcc")/nvdisasm"
if [[ ! -x "$nvdisasm" ]]; then nvdisasm="$(command -v nvdisasm || true)"; fi
if [[ -z "$nvdisasm" ]]; then
    dir="${GATELOOP_TOOLCHAIN_DIR:-$HOME/.cache/gateloop}/nvdisasm-13.2.51"
    if [[ ! -x "$dir/nvidia/cu13/bin/nvdisasm" ]]; then
        echo "find-nvdisasm: installing nvidia-cuda-nvdisasm==13.2.51 into $dir" >&2
        python3 -m pip install --quiet --no-deps --target "$dir" "nvidia-cuda-nvdisasm==13.2.51" >&2
    fi
    nvdisasm="$dir/nvidia/cu13/bin/nvdisasm"
fi
echo "$nvdisasm"
