//! The fused-scan backward CUDA kernels (`cuda::scan_grad`) against the f64
//! reference backward (`reference::grad::backward`) on the same rounded
//! inputs, and against their CPU mirror (`cpu::scan_grad`, same plan).
//!
//! Bounds:
//! - f32: relative L2 ≤ 1e-4 and max-abs ≤ 1e-3 · max|ref| for dq, dk, dv,
//!   dlog_gate and dh0 (1e-3 at L = 65536);
//! - f16 / bf16 (q, k, v, dy and dq, dk, dv in the element type T; log_gate,
//!   h0, dh_final, dlog_gate, dh0 complex f32): dlog_gate and dh0 the f32
//!   bounds; dq, dk, dv the f32 bounds plus their single rounding to T
//!   (tests/dtype_support: relative L2 ≤ 5.9e-4 for f16, 4.0e-3 for bf16),
//!   the bounds of tests/gpu_chunked_grad.rs. The reference runs on exactly
//!   the T-rounded q, k, v, dy; and the T kernels must return exactly the
//!   f32 kernels' gradients on those inputs, dq, dk, dv rounded to T.
//!
//! Every gradient buffer and the workspace are poisoned with NaN before each
//! launch, so an element the kernels forget fails the test; two runs must
//! agree bit for bit.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::ALL_REGIMES;
use common::grad::{
    GradCase, GradInputsF32, Worst, assert_deterministic, assert_equals_f32_rounded, check_case, check_case_as,
    compare_grads, half_type_regimes,
};
use dtype_support::y_bounds;
use gateloop::cpu::scan_grad;
use gateloop::cuda::scan_grad::{
    DeviceGradInputs, DeviceGrads, DeviceInputs, backward_host, backward_host_as, backward_into, plan_for,
};
use gateloop::cuda::{Dtype, Element, Gpu, GpuError};
use gateloop::reference::grad::Grads;
use gateloop::testing::{GateRegime, dims};
use gateloop::{Dims, InputError};
use half::{bf16, f16};

/// One `backward_into` call in element type `T` on a fresh stream: inputs
/// uploaded (q, k, v, dy converted to T: exact when `inp` is already
/// T-representable), every gradient and the workspace (of the plan's size)
/// poisoned with NaN; a dh0 buffer exactly when the problem has h0. dq, dk,
/// dv come back widened to f32 (exactly).
fn run_gpu<T: Element>(gpu: &Gpu, inp: &GradInputsF32) -> Grads<f32> {
    let d = inp.p.dims;
    let lp = plan_for(gpu, &d, T::DTYPE).expect("plan");
    common::run_backward::<T>(
        gpu,
        &inp.p,
        &inp.dy,
        inp.dh_final.as_deref(),
        lp.workspace_len,
        false,
        0,
        |s, d, i, u, g, w| backward_into(gpu, s, d, i, u, g, w),
    )
    .unwrap_or_else(|e| panic!("{} {d:?}: {e}", T::DTYPE))
}

/// (relative L2, max-abs fraction) of gradient `name` in element type `t`:
/// dq, dk, dv as y (rounded once to t), dlog_gate and dh0 the f32 bounds.
fn grad_bounds(t: Dtype, name: &str) -> (f64, f64) {
    match name {
        "dq" | "dk" | "dv" => y_bounds(t),
        _ => (common::REL, common::ABS_FRAC),
    }
}

/// Case `c` in element type `T` against the f64 reference on the T-rounded inputs.
fn check_as<T: Element>(gpu: &Gpu, worst: &mut Worst, c: GradCase) {
    check_case_as::<T>(worst, c, |inp| run_gpu::<T>(gpu, inp), |name| grad_bounds(T::DTYPE, name));
}

fn check_with(gpu: &Gpu, worst: &mut Worst, c: GradCase, rel: f64) {
    check_case(worst, c, rel, |inp| run_gpu::<f32>(gpu, inp));
}

fn check(gpu: &Gpu, worst: &mut Worst, c: GradCase) {
    check_with(gpu, worst, c, common::REL)
}

#[test]
fn lengths_and_dims() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let mut seed = 0;
    for len in [1usize, 2, 63, 64, 65, 1000, 4096] {
        for (kd, vd) in [(1, 1), (5, 16), (16, 5), (64, 64), (1, 64), (64, 1)] {
            seed += 1;
            let regime = common::ALL_REGIMES_AND_UNDERFLOW[seed as usize % common::ALL_REGIMES_AND_UNDERFLOW.len()];
            let c = GradCase::new(dims(1, len, 2, kd, vd, seed % 2 == 0), regime, seed % 3 != 0, seed % 4 != 0, seed);
            check(gpu, &mut worst, c);
        }
    }
    worst.report("lengths x dims");
}

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
                    GradCase::new(dims(2, 3001, 2, 7, 6, per_head), regime, with_h0, with_dhf, seed),
                );
            }
        }
    }
    worst.report("regimes");
}

/// B·H from 1 to 256: the plan's switch between 1, 2 and 4 warps per block
/// (the warp prefixes of both block scans).
#[test]
fn batch_heads_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let mut seed = 200;
    for (b, h) in [(1, 1), (1, 3), (4, 8), (8, 16), (16, 16), (1, 256)] {
        seed += 1;
        let c = GradCase::new(dims(b, 3000, h, 8, 12, seed % 2 == 0), GateRegime::Mixed, seed % 3 != 0, true, seed);
        check(gpu, &mut worst, c);
    }
    worst.report("batch x heads");
}

/// B·H = 1 at L = 65536, |a| = 1: 256 chunks of carries in both directions.
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

/// The kernels and the CPU mirror run the same algorithm with the same plan:
/// they agree far more tightly than either agrees with the reference (only
/// exp2f/sincosf rounding differs).
#[test]
fn matches_cpu_mirror() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(1, 5000, 1, 16, 16, false), dims(2, 777, 3, 5, 7, true), dims(8, 3000, 16, 4, 3, false)]
        .into_iter()
        .enumerate()
    {
        if common::emulated_device_skips(&d) {
            continue;
        }
        let c = GradCase::new(d, GateRegime::Mixed, true, true, 400 + i as u64);
        let inp = c.inputs();
        let params = plan_for(gpu, &d, Dtype::F32).unwrap().grad_params();
        let cpu = scan_grad::backward(&inp.p.view(), &inp.dy, inp.dh_final.as_deref(), &params).unwrap();
        let got = run_gpu::<f32>(gpu, &inp);
        for (name, e) in compare_grads(&got, &cpu) {
            assert!(e.within(1e-5, 1e-4), "{d:?} vs the CPU mirror: {name} {e:?}");
        }
    }
}

/// No atomics, a fixed order of every sum: two runs agree bit for bit.
#[test]
fn deterministic() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(2, 5000, 3, 16, 33, true), dims(1, 20_000, 1, 8, 64, false)].into_iter().enumerate() {
        assert_deterministic(d, 500 + i as u64, |inp| run_gpu::<f32>(gpu, inp), |inp| run_gpu::<bf16>(gpu, inp));
    }
}

#[test]
fn backward_host_matches_reference() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    for (i, d) in [dims(2, 300, 3, 64, 64, false), dims(1, 9000, 2, 16, 33, true)].into_iter().enumerate() {
        let c = GradCase::new(d, GateRegime::Mixed, i == 0, true, 600 + i as u64);
        let inp = c.inputs();
        let got = backward_host(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
        worst.check(&format!("{c:?}"), &compare_grads(&got, &inp.reference()), common::REL);
    }
}

/// f16 and bf16 (dq, dk, dv in the element type) in every regime: partial
/// value tiles (V = 7, 9, 70: the f32 running sums of dq, dk in the
/// workspace), one tile (V = 2), one and several time chunks (L = 3001),
/// both gate layouts, without / with h0, dh_final on every other case.
#[test]
fn half_types() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let shapes = [(1, 3, 2), (130, 16, 70), (200, 33, 9), (3001, 5, 7)];
    let (mut w16, mut wb16) = (Worst::default(), Worst::default());
    half_type_regimes(&shapes, |c16, cb16| {
        check_as::<f16>(gpu, &mut w16, c16);
        check_as::<bf16>(gpu, &mut wb16, cb16);
    });
    w16.report("f16 regimes");
    wb16.report("bf16 regimes");
}

/// The f32 `lengths_and_dims` sweep in f16 and bf16 (alternating): L from 1
/// to 4096, K, V ∈ {1, 5, 16, 64} (T = 1 for V = 1, one tile for V = 2).
#[test]
fn half_types_lengths_and_dims() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let (mut w16, mut wb16) = (Worst::default(), Worst::default());
    let mut seed = 7900;
    for len in [1usize, 2, 65, 1000, 4096] {
        for (kd, vd) in [(1, 1), (5, 16), (16, 5), (64, 64), (1, 64), (64, 1), (3, 2)] {
            seed += 1;
            let regime = ALL_REGIMES[seed as usize % ALL_REGIMES.len()];
            let c = GradCase::new(dims(1, len, 2, kd, vd, seed % 2 == 0), regime, seed % 3 != 0, seed % 4 != 0, seed);
            if seed % 2 == 0 {
                check_as::<f16>(gpu, &mut w16, c);
            } else {
                check_as::<bf16>(gpu, &mut wb16, c);
            }
        }
    }
    w16.report("f16 lengths x dims");
    wb16.report("bf16 lengths x dims");
}

#[test]
fn half_types_equal_the_f32_kernel_rounded() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let cases = [
        GradCase::new(dims(1, 5000, 1, 16, 33, false), GateRegime::Mixed, true, true, 7800),
        GradCase::new(dims(2, 777, 3, 5, 7, true), GateRegime::Random, false, true, 7801),
        GradCase::new(dims(1, 3001, 2, 6, 1, false), GateRegime::UnitModulus, true, false, 7802),
        GradCase::new(dims(2, 300, 2, 4, 2, true), GateRegime::Mixed, true, true, 7803),
    ];
    for c in cases {
        if common::emulated_device_skips(&c.dims) {
            continue;
        }
        assert_equals_f32_rounded::<f16>(c, |i| run_gpu::<f32>(gpu, i), |i| run_gpu::<f16>(gpu, i));
        assert_equals_f32_rounded::<bf16>(c, |i| run_gpu::<f32>(gpu, i), |i| run_gpu::<bf16>(gpu, i));
    }
}

/// `backward_host_as` rounds q, k, v, dy to T itself (given T-representable
/// values here, so the reference sees the same inputs).
#[test]
fn backward_host_as_half_types() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    let c = GradCase::new(dims(1, 9000, 2, 16, 33, false), GateRegime::Mixed, true, true, 7700);
    let inp = c.inputs().rounded::<bf16>();
    let got = backward_host_as::<bf16>(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
    worst.check_bounds(&format!("bf16 {c:?}"), &compare_grads(&got, &inp.reference()), |n| grad_bounds(Dtype::Bf16, n));
    let inp = c.inputs().rounded::<f16>();
    let got = backward_host_as::<f16>(gpu, &inp.p.view(), &inp.dy, inp.dh_final.as_deref()).unwrap();
    worst.check_bounds(&format!("f16 {c:?}"), &compare_grads(&got, &inp.reference()), |n| grad_bounds(Dtype::F16, n));
}

#[test]
fn rejects_bad_buffers_naming_them() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    // Long enough for several chunks on any GPU, so a workspace is needed.
    let d: Dims = dims(1, 20_000, 1, 2, 3, true);
    let lp = plan_for(gpu, &d, Dtype::F32).unwrap();
    assert!(lp.forward.num_chunks > 1 && lp.workspace_len > 0, "{lp:?}");
    let s = gpu.stream();
    let buf = |n: usize| s.alloc_zeros::<f32>(n).unwrap();
    let (q, k, v, gate) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(2 * d.gate_len()));
    let (dy, short_dy) = (buf(d.v_len()), buf(d.v_len() - 1));
    let (mut dq, mut dk, mut dv, mut dg) = (buf(d.qk_len()), buf(d.qk_len()), buf(d.v_len()), buf(2 * d.gate_len()));
    let mut short_dg = buf(d.gate_len());
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
        Some(&mut ws),
    );
    assert_eq!(name_of(e.unwrap_err()), "dy");
    let e = backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut short_dg, dh0: None },
        Some(&mut ws),
    );
    assert_eq!(name_of(e.unwrap_err()), "dlog_gate");
    let e = backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        Some(&mut small_ws),
    );
    assert_eq!(name_of(e.unwrap_err()), "workspace");
    backward_into(
        gpu,
        s,
        &d,
        inputs(),
        DeviceGradInputs { dy: &dy, dh_final: None },
        DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
        Some(&mut ws),
    )
    .unwrap();
    s.synchronize().unwrap();
}

/// The small case `scripts/gpu-bundle-run.sh` runs under compute-sanitizer
/// memcheck and racecheck: several time chunks (B·H = 1 splits the sequence
/// to fill the GPU, so all five kernels run), a partial last chunk, K and V
/// that fill no tile exactly, with h0 and dh_final; then per-head gates
/// without h0 in a single chunk; then both again in f16 / bf16.
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut worst = Worst::default();
    check(gpu, &mut worst, GradCase::new(dims(1, 3001, 1, 5, 7, false), GateRegime::Mixed, true, true, 31_000));
    check(gpu, &mut worst, GradCase::new(dims(1, 200, 2, 3, 9, true), GateRegime::Random, false, true, 31_001));
    // 16-bit: the dq, dk running sums in the workspace, several chunks.
    check_as::<f16>(
        gpu,
        &mut worst,
        GradCase::new(dims(1, 3001, 1, 5, 7, true), GateRegime::Mixed, true, true, 31_002),
    );
    check_as::<bf16>(
        gpu,
        &mut worst,
        GradCase::new(dims(1, 200, 2, 3, 9, false), GateRegime::Random, false, true, 31_003),
    );
}
