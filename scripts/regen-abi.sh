#!/usr/bin/env bash
# Regenerates src/cuda/abi.rs (the Rust mirror of the kernel ABI) from
# cuda/gateloop_abi.h with bindgen, recording the header's sha256 in its first
# line. Needs libclang (Debian/Ubuntu: apt-get install -y libclang-dev).
#
# The generator is the `bindgen` feature's test in tests/abi.rs; GATELOOP_BLESS=1
# makes it write the file instead of comparing (and lets build.rs accept the
# stale hash for this one build).
set -euo pipefail
cd "$(dirname "$0")/.."
GATELOOP_BLESS=1 cargo test --features bindgen --test abi -- --exact bindgen_output_is_committed >&2
echo "regenerated src/cuda/abi.rs; review and commit it" >&2
