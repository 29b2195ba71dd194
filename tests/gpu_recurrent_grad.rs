//! The recurrent backward CUDA kernels (`cuda::recurrent_grad`) against the
//! f64 reference backward (`reference::grad::backward`) on the same rounded
//! inputs.
//!
//! Bounds (those of tests/gpu_scan_grad.rs):
//! - f32: relative L2 ≤ 1e-4 and max-abs ≤ 1e-3 · max|ref| for dq, dk, dv,
//!   dlog_gate and dh0 (1e-3 at L = 65536 with |a| = 1);
//! - f16 / bf16: dlog_gate and dh0 the f32 bounds; dq, dk, dv the f32 bounds
//!   plus their single rounding to T (tests/dtype_support). The reference
//!   runs on exactly the T-rounded q, k, v, dy, and the T kernels must
//!   return exactly the f32 kernels' gradients on those inputs, dq, dk, dv
//!   rounded to T.
//!
//! Every gradient buffer and the workspace are poisoned with NaN before each
//! launch, so an element the kernels forget fails the test; two runs must
//! agree bit for bit.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::grad::{
    GradCase, GradInputsF32, Worst, assert_deterministic, assert_equals_f32_rounded, check_case, check_case_as,
    compare_grads, half_type_regimes,
};
use dtype_support::y_bounds;
use gateloop::cuda::recurrent_grad::{
    DeviceGradInputs, DeviceGrads, DeviceInputs, MAX_KEY_DIM, backward_host, backward_host_as, backward_into,
    backward_real_host_as, backward_real_into, plan,
};
use gateloop::cuda::{Dtype, Element, Gpu, GpuError};
use gateloop::reference::grad::Grads;
use gateloop::testing::{GateRegime, dims};
use gateloop::{Dims, InputError};
use half::{bf16, f16};

/// One `backward_into` call in element type `T` on a fresh stream, every
/// gradient and the workspace poisoned with NaN (common::run_backward).
fn run_gpu<T: Element>(gpu: &Gpu, inp: &GradInputsF32) -> Grads<f32> {
    run_gpu_gates::<T>(gpu, inp, false)
}

/// [`run_gpu`], or with `real`, `backward_real_into` on the real parts of
/// the gate-side inputs (whose imaginary parts must be 0).
fn run_gpu_gates<T: Element>(gpu: &Gpu, inp: &GradInputsF32, real: bool) -> Grads<f32> {
    let d = inp.p.dims;
    let lp = plan(&d).expect("plan");
    common::run_backward::<T>(
        gpu,
        &inp.p,
        &inp.dy,
        inp.dh_final.as_deref(),
        lp.workspace_len,
        real,
        0,
        |s, d, i, u, g, w| {
            let w = w.expect("a workspace");
            if real { backward_real_into(gpu, s, d, i, u, g, w) } else { backward_into(gpu, s, d, i, u, g, w) }
        },
    )
    .unwrap_or_else(|e| panic!("{} {d:?} real={real}: {e}", T::DTYPE))
}

fn grad_bounds(t: Dtype, name: &str) -> (f64, f64) {
    match name {
        "dq" | "dk" | "dv" => y_bounds(t),
        _ => (common::REL, common::ABS_FRAC),
    }
}

fn check_as<T: Element>(gpu: &Gpu, worst: &mut Worst, c: GradCase) {
    check_case_as::<T>(worst, c, |inp| run_gpu::<T>(gpu, inp), |name| grad_bounds(T::DTYPE, name));
}

fn check_with(gpu: &Gpu, worst: &mut Worst, c: GradCase, rel: f64) {
    check_case(worst, c, rel, |inp| run_gpu::<f32>(gpu, inp));
}

fn check(gpu: &Gpu, worst: &mut Worst, c: GradCase) {
    check_with(gpu, worst, c, common::REL)
}

/// L around the segment (64) and the time chunks (16 at K = 64, 64 at small
/// K), every rows-per-thread variant (K = 1, 2, 4, 8, 64, 128), partial value
/// tiles.
#[test]
fn lengths_and_dims() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let mut seed = 0;
    for len in [1usize, 2, 15, 16, 63, 64, 65, 129, 1000, 4096] {
        for (kd, vd) in [(1, 1), (5, 16), (16, 5), (64, 64), (1, 64), (64, 1), (2, 33), (3, 7), (128, 40)] {
            seed += 1;
            let regime = common::ALL_REGIMES_AND_UNDERFLOW[seed as usize % common::ALL_REGIMES_AND_UNDERFLOW.len()];
            let c = GradCase::new(dims(1, len, 2, kd, vd, seed % 2 == 0), regime, seed % 3 != 0, seed % 4 != 0, seed);
            check(gpu, &mut worst, c);
        }
    }
    worst.report("lengths x dims");
}

/// Every gate regime (resets, |a| = 1, phases ≫ 2π, underflow, hard decay),
/// both gate layouts, with and without h0 and dh_final.
#[test]
fn every_regime_layout_h0_dh_final() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let mut seed = 100;
    for regime in common::ALL_REGIMES_AND_UNDERFLOW {
        for per_head in [false, true] {
            for (with_h0, with_dhf) in [(false, false), (true, true), (true, false), (false, true)] {
                seed += 1;
                check(
                    gpu,
                    &mut worst,
                    GradCase::new(dims(2, 1001, 2, 7, 6, per_head), regime, with_h0, with_dhf, seed),
                );
            }
        }
    }
    worst.report("regimes");
}

/// L = 65536 with |a| = 1: the running sums of the gate gradient restart at
/// every segment, so their error does not grow with L.
#[test]
fn long_sequence() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    for (seed, per_head) in [(300, false), (301, true)] {
        let c = GradCase::new(dims(1, 65536, 1, 4, 4, per_head), GateRegime::UnitModulus, true, true, seed);
        check_with(gpu, &mut worst, c, 1e-3);
    }
    check(gpu, &mut worst, GradCase::new(dims(1, 65536, 1, 16, 16, false), GateRegime::Mixed, true, true, 302));
    worst.report("L = 65536");
}

/// No atomics, a fixed order of every sum: two runs agree bit for bit.
#[test]
fn deterministic() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(2, 500, 3, 16, 70, true), dims(1, 2000, 1, 8, 64, false)].into_iter().enumerate() {
        assert_deterministic(d, 500 + i as u64, |inp| run_gpu::<f32>(gpu, inp), |inp| run_gpu::<bf16>(gpu, inp));
    }
}

#[test]
fn backward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    for (i, d) in [dims(2, 300, 3, 64, 64, false), dims(1, 900, 2, 16, 33, true)].into_iter().enumerate() {
        let c = GradCase::new(d, GateRegime::Mixed, i == 0, true, 600 + i as u64);
        let inp = c.inputs();
        let got = backward_host(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
        worst.check(&format!("{c:?}"), &compare_grads(&got, &inp.reference()), common::REL);
    }
}

/// f16 and bf16 in every regime, partial value tiles, both gate layouts.
#[test]
fn half_types() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(1, 3, 2), (130, 16, 70), (200, 33, 9), (1001, 5, 7)];
    let (mut w16, mut wb16) = (Worst::default(), Worst::default());
    half_type_regimes(&shapes, |c16, cb16| {
        check_as::<f16>(gpu, &mut w16, c16);
        check_as::<bf16>(gpu, &mut wb16, cb16);
    });
    w16.report("f16 regimes");
    wb16.report("bf16 regimes");
}

/// The 16-bit kernels do the f32 kernels' arithmetic in the same order:
/// dq, dk, dv are the f32 kernels' rounded once, the rest bitwise equal.
#[test]
fn half_types_equal_the_f32_kernel_rounded() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let cases = [
        GradCase::new(dims(1, 700, 1, 16, 33, false), GateRegime::Mixed, true, true, 7800),
        GradCase::new(dims(2, 177, 3, 5, 7, true), GateRegime::Random, false, true, 7801),
    ];
    for c in cases {
        if common::emulated_device_skips(&c.dims) {
            continue;
        }
        assert_equals_f32_rounded::<f16>(c, |i| run_gpu::<f32>(gpu, i), |i| run_gpu::<f16>(gpu, i));
        assert_equals_f32_rounded::<bf16>(c, |i| run_gpu::<f32>(gpu, i), |i| run_gpu::<bf16>(gpu, i));
    }
}

#[test]
fn backward_host_as_half_types() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let c = GradCase::new(dims(1, 900, 2, 16, 33, false), GateRegime::Mixed, true, true, 7700);
    let inp = c.inputs().rounded::<bf16>();
    let got = backward_host_as::<bf16>(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
    worst.check_bounds(&format!("bf16 {c:?}"), &compare_grads(&got, &inp.reference()), |n| grad_bounds(Dtype::Bf16, n));
}

#[test]
fn rejects_bad_buffers_and_dims_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d: Dims = dims(1, 200, 1, 2, 3, true);
    let lp = plan(&d).unwrap();
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v, gate) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(2 * d.gate_len()));
    let (dy, short_dy) = (buf(d.v_len()), buf(d.v_len() - 1));
    let (mut dq, mut dk, mut dv, mut dg) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(2 * d.gate_len()));
    let mut ws = buf(lp.workspace_len);
    let mut small_ws = buf(lp.workspace_len - 1);
    let name_of = |e: GpuError| match e {
        GpuError::Input(InputError::Length { name, .. }) => name,
        other => panic!("expected a length error, got {other}"),
    };
    let inputs = || DeviceInputs { q: &q, k: &k, v: &v, log_gate: &gate, h0: None };
    let e = backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &short_dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        &mut ws,
    );
    assert_eq!(name_of(e.unwrap_err()), "dy");
    let e = backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        &mut small_ws,
    );
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    // K above the kernels' 128: a typed error, nothing launched.
    let wide: Dims = dims(1, 2, 1, MAX_KEY_DIM + 1, 1, false);
    let e = backward_into(
        gpu,
        s,
        &wide,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        &mut ws,
    );
    assert!(matches!(e, Err(GpuError::Input(InputError::Param { name: "key_dim", .. }))), "{e:?}");
    backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        &mut ws,
    )
    .unwrap();
    s.synchronize().unwrap();
}

/// The small case `scripts/gpu-bundle-run.sh` runs under compute-sanitizer:
/// several segments and chunks with a partial last one, K and V that fill
/// no tile exactly, with h0 and dh_final; per-head gates without h0; bf16.
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    check(gpu, &mut worst, GradCase::new(dims(1, 301, 1, 5, 37, false), GateRegime::Mixed, true, true, 31_000));
    check(gpu, &mut worst, GradCase::new(dims(1, 70, 2, 3, 9, true), GateRegime::Random, false, true, 31_001));
    check_as::<bf16>(
        gpu,
        &mut worst,
        GradCase::new(dims(1, 130, 2, 9, 9, false), GateRegime::Mixed, true, true, 31_003),
    );
}

/// Real gates (`backward_real_into`, the backward of the real-gate
/// recurrence): in every regime with a real form, both gate layouts, with
/// and without h0 and dh_final, every R (K = 1 to 128), f32 and bf16, the
/// gradients equal the complex kernels' on the same gates (phase 0) as
/// real numbers (dlog_gate and dh0 their real parts; ∂L/∂Im g is 0 there),
/// and in f32 they are within the bounds of the real parts of the
/// reference's. The host convenience and `dispatch` give the same; complex
/// data is refused by the real-gate convenience, naming the tensor.
#[test]
fn real_gates_equal_the_complex_kernels() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let shapes = [(1, 1, 1), (65, 5, 7), (130, 16, 40), (200, 64, 64), (77, 128, 33), (64, 2, 70)];
    let cases = common::REAL_REGIMES.iter().cycle().zip(shapes.iter().cycle()).take(10).enumerate();
    for (i, (&regime, &(l, k, v))) in cases {
        let d = dims(1 + i % 2, l, 1 + i % 3, k, v, i % 2 == 1);
        if common::emulated_device_skips(&d) {
            continue;
        }
        let c = GradCase::new(d, regime, i % 3 != 1, i % 2 == 0, 8800 + i as u64);
        let inp = c.inputs().real_gates();
        let label = format!("{c:?}");
        let want = common::grad::real_part_grads(inp.reference());
        let real = run_gpu_gates::<f32>(gpu, &inp, true);
        worst.check_bounds(&label, &compare_grads(&real, &want), |name| grad_bounds(Dtype::F32, name));
        assert_same_values(&label, &real, &run_gpu_gates::<f32>(gpu, &inp, false));
        let inp16 = inp.rounded::<bf16>();
        let real16 = run_gpu_gates::<bf16>(gpu, &inp16, true);
        assert_same_values(&format!("{label} bf16"), &real16, &run_gpu_gates::<bf16>(gpu, &inp16, false));
        if i == 3 {
            let host = backward_real_host_as::<f32>(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
            assert_same_values(&format!("{label} host"), &host, &real);
            let via = gateloop::dispatch::cuda_grad(
                gpu,
                gateloop::Mode::Recurrent,
                &inp.p.view(),
                &inp.dy,
                inp.dh_final.as_deref(),
            )
            .unwrap();
            assert_same_values(&format!("{label} dispatch"), &via, &real);
        }
    }
    worst.report("real gates");
    let c = GradCase::new(dims(1, 70, 1, 4, 6, false), GateRegime::Random, true, false, 8900);
    let inp = c.inputs();
    match backward_real_host_as::<f32>(gpu, &inp.p.view(), &inp.dy, None) {
        Err(GpuError::Input(InputError::Value { name: "log_gate", .. })) => {}
        other => panic!("complex log_gate in the real-gate backward: {other:?}"),
    }
}

/// Every gradient of `got` equal to `want`'s as real numbers (`==`: the
/// signs of zeros may differ), dlog_gate and dh0 with Im 0 in `got`.
fn assert_same_values(label: &str, got: &Grads<f32>, want: &Grads<f32>) {
    assert!(got.dq == want.dq, "{label}: dq differs");
    assert!(got.dk == want.dk, "{label}: dk differs");
    assert!(got.dv == want.dv, "{label}: dv differs");
    let re = |z: &[gateloop::Complex<f32>]| z.iter().map(|z| z.re).collect::<Vec<f32>>();
    let im_zero = |z: &[gateloop::Complex<f32>]| z.iter().all(|z| z.im == 0.0);
    assert!(re(&got.dlog_gate) == re(&want.dlog_gate) && im_zero(&got.dlog_gate), "{label}: dlog_gate differs");
    assert_eq!(got.dh0.is_some(), want.dh0.is_some(), "{label}");
    if let (Some(g), Some(w)) = (&got.dh0, &want.dh0) {
        assert!(re(g) == re(w) && im_zero(g), "{label}: dh0 differs");
    }
}
