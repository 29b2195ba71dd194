//! The opt-in device-side value check `cuda::check::log_gate` against the
//! host's `Problem::check_gate`: for every buffer here the device's answer
//! must EQUAL the host's (same `InputError::Value`: index, value, reason),
//! whether the buffer is clean (resets, Re = −inf, included) or has an
//! offending element (Re > 0, NaN in Re or Im, Im = ±inf) at a chosen index,
//! and when there are several, the first one is reported. Sizes cover one
//! partial block, many blocks, and more elements than the grid has threads
//! (the kernel's grid-stride loop).
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use common::flat;
use gateloop::cuda::{Gpu, GpuError, check};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Dims, InputError};

/// The device check of `p.log_gate` on a fresh stream.
fn device_check(gpu: &Gpu, p: &OwnedProblem<f32>) -> Result<(), InputError> {
    let s = gpu.context().new_stream().expect("stream");
    let buf = s.clone_htod(&flat(&p.log_gate)).unwrap();
    match check::log_gate(gpu, &s, &p.dims, &buf) {
        Ok(()) => Ok(()),
        Err(GpuError::Input(e)) => Err(e),
        Err(e) => panic!("{:?}: driver error {e}", p.dims),
    }
}

/// Asserts that the device and the host agree on `p`, and returns the answer.
fn agree(gpu: &Gpu, p: &OwnedProblem<f32>) -> Result<(), InputError> {
    let host = p.view().check_gate();
    let device = device_check(gpu, p);
    assert_eq!(device, host, "{:?}: device check != host check", p.dims);
    device
}

fn problem(d: Dims, regime: GateRegime, seed: u64) -> OwnedProblem<f32> {
    random_problem(d, regime, false, seed).to_f32()
}

/// Sizes: one partial block; several blocks; more than 1024 blocks × 256
/// threads (grid-stride); per-head gates.
fn shapes() -> [Dims; 4] {
    [
        dims(1, 7, 1, 3, 2, false),
        dims(2, 100, 3, 17, 4, false),
        dims(1, 1100, 4, 64, 1, false),
        dims(3, 333, 5, 8, 2, true),
    ]
}

#[test]
fn clean_buffers_pass() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in shapes().into_iter().enumerate() {
        for regime in [GateRegime::Random, GateRegime::Resets(0.3), GateRegime::Mixed, GateRegime::StrongDecay(200.0)] {
            let p = problem(d, regime, 100 + i as u64);
            agree(gpu, &p).unwrap_or_else(|e| panic!("{d:?} {regime:?}: {e}"));
        }
    }
}

#[test]
fn minus_infinity_and_extremes_pass() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for d in shapes() {
        let mut p = problem(d, GateRegime::Random, 7);
        let n = p.log_gate.len();
        for (i, g) in p.log_gate.iter_mut().enumerate() {
            *g = common::in_domain_extreme(i, *g);
        }
        assert_eq!(agree(gpu, &p), Ok(()), "{d:?}: {n} elements of -inf / extremes");
    }
}

#[test]
fn each_bad_value_is_reported_at_its_index() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in shapes().into_iter().enumerate() {
        let clean = problem(d, GateRegime::Resets(0.2), 200 + i as u64);
        let n = clean.log_gate.len();
        let positions = [0, 1, n / 2, n - 256.min(n - 1), n - 1];
        for (bad, why) in common::bad_log_gates() {
            for &at in &positions {
                let mut p = clean.clone();
                p.log_gate[at] = bad;
                match agree(gpu, &p) {
                    Err(InputError::Value { name: "log_gate", index, why: w, .. }) => {
                        assert_eq!(index, at, "{d:?}: {bad} at {at}");
                        assert!(w.contains(why), "{d:?}: {bad} at {at}: reason {w:?}, expected {why:?}");
                    }
                    other => panic!("{d:?}: {bad} at {at}: {other:?}"),
                }
            }
        }
    }
}

#[test]
fn the_first_of_several_is_reported() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in shapes().into_iter().enumerate() {
        let mut p = problem(d, GateRegime::Mixed, 300 + i as u64);
        let n = p.log_gate.len();
        // Later indices first, in other blocks and other grid-stride rounds.
        let mut first = n;
        for (k, at) in [n - 1, n * 3 / 4, n / 2 + 1, n / 3, 3.min(n - 1)].into_iter().enumerate() {
            let (bad, _) = common::bad_log_gates()[k % 7];
            p.log_gate[at] = bad;
            first = first.min(at);
            match agree(gpu, &p) {
                Err(InputError::Value { index, .. }) => assert_eq!(index, first, "{d:?}"),
                other => panic!("{d:?}: {other:?}"),
            }
        }
    }
}

#[test]
fn rejects_bad_buffers_on_the_host() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 4, 3, 8, 6, false);
    let s = gpu.stream();
    let short = s.alloc_zeros::<f32>(2 * d.gate_len() - 2).unwrap();
    match check::log_gate(gpu, s, &d, &short) {
        Err(GpuError::Input(InputError::Length { name: "log_gate", .. })) => {}
        other => panic!("{other:?}"),
    }
    // An odd start: not 8-byte aligned.
    let buf = s.alloc_zeros::<f32>(2 * d.gate_len() + 1).unwrap();
    match check::log_gate(gpu, s, &d, &buf.slice(1..)) {
        Err(GpuError::Input(InputError::Param { name: "log_gate", .. })) => {}
        other => panic!("{other:?}"),
    }
    let ok = s.alloc_zeros::<f32>(2 * d.gate_len()).unwrap();
    check::log_gate(gpu, s, &d, &ok).unwrap();
}
