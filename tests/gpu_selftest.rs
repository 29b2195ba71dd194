//! The device self-tests (`gateloop::cuda::selftest`): the tensor-core
//! register-fragment layouts of `cuda/mma.cuh` (mma.sync m16n8k16 in bf16
//! and f16, m16n8k8 in TF32, ldmatrix .x4/.x2 with and without .trans)
//! against the exact products, on the card. On the emulated device the
//! same check tests the emulator's implementation of those instructions
//! (`tests/kernel_emu/include/mma.h`) against the same layout functions.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use gateloop::cuda::selftest::{MMA_PRODUCTS, MMA_TRIALS, mma_fragments};

fn check_on_a_fresh_stream() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let stream = gpu.context().new_stream().expect("stream");
    let check = mma_fragments(gpu, &stream).expect("gateloop_selftest_mma");
    eprint!("{check}");
    assert_eq!(check.products.len(), MMA_PRODUCTS.len());
    assert!(check.products.iter().all(|p| p.elements == MMA_TRIALS * 16 * 8));
    assert!(check.passed(), "the fragment layouts of cuda/mma.cuh differ from the device's:\n{check}");
}

#[test]
fn mma_fragment_layouts_match_the_device() {
    check_on_a_fresh_stream();
}

/// The bundle's compute-sanitizer step runs every `sanitizer_smoke`: here
/// the warp's shared staging and ldmatrix reads under racecheck.
#[test]
fn sanitizer_smoke() {
    check_on_a_fresh_stream();
}
