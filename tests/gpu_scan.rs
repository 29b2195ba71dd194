//! The fused scan CUDA kernels (`cuda::scan`) against the f64 reference
//! (`reference::recurrent`) on the same f32-rounded inputs, and against their
//! CPU mirror (`cpu::scan`, same plan). Bounds: relative L2 ≤ 1e-4 and
//! max-abs ≤ 1e-3 · max|ref| for y and h_final; the relative bound grows
//! as L/4096 past L = 4096 up to 1e-3 at L = 65536 (`common::rel_at_len`). Outputs
//! are poisoned with NaN before each launch (and the workspace too), so an
//! element the kernels forget fails the test.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;

use common::{
    ABS_FRAC, Case, REL, adversarial_regime_tests, assert_outputs, regime_matrix, regime_tests, rel_at_len, run_forward,
};
use gateloop::cpu;
use gateloop::cuda::scan::{DeviceInputs, DeviceOutputs, forward_host, forward_into, plan_for};
use gateloop::cuda::{Gpu, GpuError};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError};

/// Runs one case through `forward_into` on a fresh stream (workspace of the
/// plan's size, poisoned too); returns (y, h_final).
fn run_gpu(gpu: &Gpu, p32: &gateloop::testing::OwnedProblem<f32>) -> (Vec<f32>, Vec<Complex<f32>>) {
    let d = p32.dims;
    let lp = plan_for(gpu, &d).expect("plan");
    run_forward::<f32>(gpu, p32, lp.workspace_len, |s, d, i, o, ws| forward_into(gpu, s, d, i, o, ws))
        .unwrap_or_else(|e| panic!("{d:?}: {e}"))
}

fn check_with(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64, rel: f64, abs_frac: f64) {
    if common::emulated_device_skips(&d) {
        return;
    }
    let case = Case::new(d, regime, with_h0, seed);
    let (p32, want) = case.with_reference();
    let (y, h_final) = run_gpu(gpu, &p32);
    assert_outputs(&case.label(), &y, &h_final, &want, rel, abs_frac);
}

/// At the bounds, the relative one grown with L past 4096
/// (`common::rel_at_len`).
fn check(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    check_with(gpu, d, regime, with_h0, seed, rel_at_len(REL, d.len), ABS_FRAC);
}

fn check_case(gpu: &Gpu, c: Case) {
    check(gpu, c.dims, c.regime, c.with_h0, c.seed);
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    common::shape_sweep(&[1, 2, 63, 64, 65, 1000, 4096], &[1, 5, 16, 64], &[1, 2, 5, 16, 64], 0, |c| {
        check_case(gpu, c)
    });
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(65, 16, 5), (1000, 64, 16), (4096, 5, 64), (300, 1, 1), (20_000, 16, 16)];
    regime_matrix(1, 2, &shapes, regime, seed, |c| check_case(gpu, c));
}

regime_tests! { regime_cases:
    random => GateRegime::Random, 500;
}
adversarial_regime_tests!(regime_cases);

/// B·H = 1 at L = 65536 (64 chunks of carries), |a| = 1 and random gates.
#[test]
fn long_sequence() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check_with(gpu, dims(1, 65536, 1, 4, 8, false), GateRegime::UnitModulus, true, 9000, 1e-3, 1e-3);
    check_with(gpu, dims(1, 65536, 1, 3, 2, true), GateRegime::UnitModulus, false, 9001, 1e-3, 1e-3);
    check(gpu, dims(1, 65536, 1, 64, 64, false), GateRegime::Mixed, true, 9002);
}

/// B·H from 1 to 256: the (b, h) decomposition of the grid and the plan's
/// switch between 4, 2 and 1 warps.
#[test]
fn batch_heads_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 9100;
    for (b, h) in [(1, 1), (1, 3), (2, 2), (4, 8), (8, 16), (16, 16), (1, 256)] {
        seed += 1;
        check(gpu, dims(b, 3000, h, 8, 12, seed % 2 == 0), GateRegime::Mixed, seed % 3 != 0, seed);
    }
}

/// The kernels and the CPU mirror run the same algorithm with the same plan:
/// they agree far more tightly than either agrees with the reference (only
/// exp2f/sincosf rounding differs).
#[test]
fn matches_cpu_mirror() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(1, 5000, 1, 16, 16, false), dims(2, 777, 3, 5, 7, true), dims(1, 65536, 1, 2, 2, false)]
        .into_iter()
        .enumerate()
    {
        let p32 = random_problem(d, GateRegime::Mixed, true, 9200 + i as u64).to_f32();
        let sp = plan_for(gpu, &d).unwrap().scan_params();
        let cpu = cpu::scan::forward(&p32.view(), &sp).unwrap();
        let (y, h_final) = run_gpu(gpu, &p32);
        assert_outputs(&format!("{d:?} vs the CPU mirror"), &y, &h_final, &cpu, 1e-5, 1e-4);
    }
}

#[test]
fn forward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for d in [dims(2, 300, 3, 64, 64, false), dims(1, 9000, 2, 16, 33, true)] {
        let case = Case::new(d, GateRegime::Mixed, true, 7000);
        let (p32, want) = case.with_reference();
        let got = forward_host(gpu, &p32.view()).unwrap();
        assert_outputs(&case.label(), &got.y, &got.h_final, &want, REL, ABS_FRAC);
    }
}

#[test]
fn rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    // Long enough for several chunks on any GPU, so a workspace is needed.
    let d = dims(1, 20_000, 1, 2, 3, true);
    let lp = plan_for(gpu, &d).unwrap();
    assert!(lp.num_chunks > 1 && lp.workspace_len > 0, "{lp:?}");
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()));
    let gate = buf(2 * d.gate_len());
    let short = buf(d.qk_len() - 1);
    let (mut y, mut h_final) = (buf(d.v_len()), buf(2 * d.state_len()));
    let mut ws = buf(lp.workspace_len);
    let mut small_ws = buf(lp.workspace_len - 1);
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let inputs = |q| DeviceInputs { q, k: &k, v: &v, log_gate: &gate, h0: None };
    let e = forward_into(gpu, s, &d, inputs(&short), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut ws));
    assert_eq!(name_of(e.unwrap_err()), "q");
    let e = forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, None);
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    let e =
        forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut small_ws));
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    let mut short_h = buf(d.state_len());
    let e = forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut short_h }, Some(&mut ws));
    assert_eq!(name_of(e.unwrap_err()), "h_final");
    forward_into(gpu, s, &d, inputs(&q), DeviceOutputs { y: &mut y, h_final: &mut h_final }, Some(&mut ws)).unwrap();
    s.synchronize().unwrap();
}

/// The small case `bundle/run.sh` runs under compute-sanitizer memcheck and
/// racecheck: several time chunks (B·H = 1 splits the sequence to fill the
/// GPU, so the carry kernels run), a partial last chunk, K and V that fill
/// no tile exactly, with h0; then per-head gates without h0.
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check(gpu, dims(1, 3001, 1, 5, 7, false), GateRegime::Mixed, true, 31_000);
    check(gpu, dims(1, 777, 2, 3, 9, true), GateRegime::Random, false, 31_001);
}
