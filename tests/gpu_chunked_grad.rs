//! The chunked CUDA backward (`cuda::chunk_grad`) against the f64 adjoint
//! reference (`reference::grad::backward`) on the same rounded inputs, and
//! against its CPU mirror (`cpu::chunked_grad`).
//!
//! Bounds (exact precision):
//! - dlog_gate and dh0 (complex f32 for every element type): relative L2 ≤
//!   1e-4 and max-abs ≤ 1e-3 · max|ref|, the bounds of every f32 kernel;
//! - dq, dk, dv (stored in the element type T, rounded once): the f32 bounds
//!   plus that rounding, as y in tests/dtype_support/mod.rs: relative L2 ≤
//!   1e-4 + u(1 + 1e-4) = 5.9e-4 for f16, 4.0e-3 for bf16 (≤ 5e-3, the
//!   issue's bound), max-abs ≤ (1e-3 + u(1 + 1e-3)) · max|ref|;
//! - L = 65536 with |a| = 1: relative L2 ≤ 1e-3 (as the forward's).
//!
//! The kernels see q, k, v and dy rounded to T (log_gate, h0, dh_final f32);
//! the reference runs on exactly those values. Every launch gets NaN-poisoned
//! gradients and workspace, so an element the kernels forget fails the
//! comparison. Real gates (`backward_real_into`, gated linear attention) are
//! checked the same way against the reference run on the same real problem
//! (log_gate, h0 and dh_final with Im = 0), whose gradients' real parts are
//! the real-gate gradients. Without a usable GPU every test prints
//! `SKIPPED (no GPU): <reason>` and passes (`GATELOOP_REQUIRE_GPU=1` makes
//! that a failure).

mod common;
mod dtype_support;

use common::{ALL_REGIMES, Case, assert_within, flat, gpu_or_skip, regime_matrix, shape_sweep, upload};
use dtype_support::{rounded_to, y_bounds};
use gateloop::cpu::chunked::ChunkParams;
use gateloop::cuda::chunk::{self, ChunkCarry, ChunkConfig, ChunkPrecision, ChunkStateBlocks, Gates};
use gateloop::cuda::chunk_grad::{
    DeviceGradInputs, DeviceGrads, DeviceInputs, SavedForward, backward_into, backward_real_host_as,
    backward_real_into, backward_saved_into, backward_varlen_saved_into, forward_saving_into, plan, plan_with,
};
use gateloop::cuda::{Dtype, Element, Gpu};
use gateloop::reference::grad::Grads;
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, compare, compare_complex, cpu, reference};
use half::{bf16, f16};

/// Upstream gradients of a case: dy `[B, L, H, V]` and, when asked,
/// dh_final, random (never zero), from their own seed.
#[derive(Clone)]
struct Upstream {
    dy: Vec<f64>,
    dh_final: Option<Vec<Complex<f64>>>,
}

fn upstream(d: Dims, with_dh_final: bool, seed: u64) -> Upstream {
    let u = random_problem(d, GateRegime::Random, true, seed ^ 0x5eed_0fd7);
    Upstream { dy: u.v, dh_final: with_dh_final.then(|| u.h0.expect("h0")) }
}

/// What a `T` kernel sees: the problem rounded (tests/dtype_support), dy
/// rounded to f32 then to T, dh_final rounded to f32.
fn rounded<T: Element>(p: &OwnedProblem<f64>, up: &Upstream) -> (OwnedProblem<f64>, Upstream) {
    let r = |x: f64| T::from_f32(x as f32).to_f32() as f64;
    let rc = |z: &Complex<f64>| Complex::new(z.re as f32 as f64, z.im as f32 as f64);
    let dy = up.dy.iter().map(|&x| r(x)).collect();
    let dh_final = up.dh_final.as_ref().map(|h| h.iter().map(rc).collect());
    (rounded_to::<T>(p), Upstream { dy, dh_final })
}

/// One backward call on a fresh stream: uploads the (already T-representable)
/// inputs, poisons every gradient and the workspace with NaN, launches,
/// downloads (widened to f32) and synchronizes.
fn run<T: Element>(gpu: &Gpu, p: &OwnedProblem<f64>, up: &Upstream, precision: ChunkPrecision) -> Grads<f32> {
    run_gates::<T>(gpu, p, up, precision.into(), Gates::Complex, 0)
}

/// [`run`] for real gates (`backward_real_into`, exact): `p`'s log_gate and
/// h0 and `up`'s dh_final must be real; the real gradients come back as
/// complex numbers with Im = 0.
fn run_real<T: Element>(gpu: &Gpu, p: &OwnedProblem<f64>, up: &Upstream) -> Grads<f32> {
    run_gates::<T>(gpu, p, up, ChunkPrecision::Exact.into(), Gates::Real, 0)
}

/// [`run`] at `config` and `gates`, v, dy and dv `offset` elements into
/// their buffers (common::run_backward).
fn run_gates<T: Element>(
    gpu: &Gpu,
    p: &OwnedProblem<f64>,
    up: &Upstream,
    config: ChunkConfig,
    gates: Gates,
    offset: usize,
) -> Grads<f32> {
    run_with::<T>(gpu, p, up, config, gates, offset, false)
}

/// [`run_gates`] through the training pair: the forward
/// (`forward_saving_into`, complex or real gates) into the
/// NaN-poisoned backward workspace, then `backward_saved_into` reading the
/// chunk states it left (no state launches of its own).
fn run_saved<T: Element>(
    gpu: &Gpu,
    p: &OwnedProblem<f64>,
    up: &Upstream,
    config: ChunkConfig,
    gates: Gates,
) -> Grads<f32> {
    run_with::<T>(gpu, p, up, config, gates, 0, true)
}

/// The body of [`run_gates`] (`saved` false) and [`run_saved`].
fn run_with<T: Element>(
    gpu: &Gpu,
    p: &OwnedProblem<f64>,
    up: &Upstream,
    config: ChunkConfig,
    gates: Gates,
    offset: usize,
    saved: bool,
) -> Grads<f32> {
    let p32 = p.to_f32();
    let d = p32.dims;
    let dy: Vec<f32> = up.dy.iter().map(|&x| x as f32).collect();
    let dhf: Option<Vec<Complex<f32>>> =
        up.dh_final.as_ref().map(|h| h.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
    let lp = plan_with(&d, T::DTYPE, gates, config.carry).expect("plan");
    let real = gates == Gates::Real;
    // The saved forward's outputs (run_backward's stream is lent as a &CudaStream).
    let outputs = saved.then(|| {
        let y = gpu.stream().alloc_zeros::<T>(d.v_len()).unwrap();
        let h_final = gpu.stream().alloc_zeros::<f32>(gates.parts() * d.state_len()).unwrap();
        gpu.stream().synchronize().unwrap();
        (y, h_final)
    });
    common::run_backward::<T>(gpu, &p32, &dy, dhf.as_deref(), lp.workspace_len, real, offset, |s, d, i, u, g, w| {
        let Some((mut y, mut h_final)) = outputs else {
            return if real {
                backward_real_into(gpu, s, d, i, u, g, w, config)
            } else {
                backward_into(gpu, s, d, i, u, g, w, config)
            };
        };
        let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
        let w = w.expect("the backward's workspace");
        let saved = forward_saving_into(gpu, s, d, gates, i, out, w, config)?;
        assert_eq!((saved.gates(), saved.config()), (gates, config));
        backward_saved_into(gpu, s, d, i, u, g, saved)
    })
    .unwrap_or_else(|e| panic!("{} {gates:?} {d:?} (saved: {saved}): {e}", T::DTYPE))
}

/// The real-gate problem of `case` and its upstream gradients (dh_final
/// real when asked), and the reference gradients of the real gate and h0:
/// the real parts of the complex reference's at those real inputs.
fn real_case<T: Element>(case: &Case, with_dh_final: bool) -> (OwnedProblem<f64>, Upstream, Grads<f64>) {
    let mut up = upstream(case.dims, with_dh_final, case.seed);
    for z in up.dh_final.iter_mut().flatten() {
        z.im = 0.0;
    }
    let (p, up) = rounded::<T>(&common::real_gates(case.problem()), &up);
    let want = reference::grad::backward(&p.view(), &up.dy, up.dh_final.as_deref()).expect("reference");
    (p, up, common::grad::real_part_grads(want))
}

/// The complex-gate counterpart of [`real_case`]: the case's problem and
/// upstream gradients rounded for `T`, and the reference's gradients on them.
fn complex_case<T: Element>(case: &Case, with_dh_final: bool) -> (OwnedProblem<f64>, Upstream, Grads<f64>) {
    let (p, up) = rounded::<T>(&case.problem(), &upstream(case.dims, with_dh_final, case.seed));
    let want = reference::grad::backward(&p.view(), &up.dy, up.dh_final.as_deref()).expect("reference");
    (p, up, want)
}

/// [`check_case`] for real gates.
fn check_real_case<T: Element>(gpu: &Gpu, case: &Case, with_dh_final: bool, state: (f64, f64)) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let (p, up, want) = real_case::<T>(case, with_dh_final);
    let got = run_real::<T>(gpu, &p, &up);
    let seq = if T::DTYPE == Dtype::F32 { state } else { y_bounds(T::DTYPE) };
    let label = format!("{} real {} dh_final={with_dh_final}", T::DTYPE, case.label());
    assert_grads(&label, &got, &want, seq, state);
}

/// Every gradient of `got` against `want`: dq, dk, dv within `seq`,
/// dlog_gate and dh0 within `state` ((relative L2, max-abs fraction) each).
fn assert_grads<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    label: &str,
    got: &Grads<A>,
    want: &Grads<B>,
    seq: (f64, f64),
    state: (f64, f64),
) {
    assert_within(label, "dq", &compare(&got.dq, &want.dq), seq.0, seq.1);
    assert_within(label, "dk", &compare(&got.dk, &want.dk), seq.0, seq.1);
    assert_within(label, "dv", &compare(&got.dv, &want.dv), seq.0, seq.1);
    assert_within(label, "dlog_gate", &compare_complex(&got.dlog_gate, &want.dlog_gate), state.0, state.1);
    match (&got.dh0, &want.dh0) {
        (Some(a), Some(b)) => assert_within(label, "dh0", &compare_complex(a, b), state.0, state.1),
        (None, None) => {}
        _ => panic!("{label}: dh0 present in one result only"),
    }
}

const STATE_BOUNDS: (f64, f64) = (1e-4, 1e-3);

/// Runs `case` (with dh_final when asked) in `T` against the f64 reference.
fn check_case<T: Element>(gpu: &Gpu, case: &Case, with_dh_final: bool, state: (f64, f64)) {
    check_case_carry::<T>(gpu, case, with_dh_final, state, ChunkCarry::Auto)
}

/// [`check_case`] with the forward part's carry chosen.
fn check_case_carry<T: Element>(gpu: &Gpu, case: &Case, with_dh_final: bool, state: (f64, f64), carry: ChunkCarry) {
    if common::emulated_device_skips(&case.dims) {
        return;
    }
    let (p, up, want) = complex_case::<T>(case, with_dh_final);
    let config = ChunkConfig { carry, ..ChunkConfig::default() };
    let got = run_gates::<T>(gpu, &p, &up, config, Gates::Complex, 0);
    let seq = if T::DTYPE == Dtype::F32 { state } else { y_bounds(T::DTYPE) };
    let label = format!("{} {} dh_final={with_dh_final}", T::DTYPE, case.label());
    assert_grads(&label, &got, &want, seq, state);
}

/// The shapes of the forward tests: L ∈ {1, 2, 63, 64, 65, 1000},
/// K, V ∈ {1, 5, 16, 64, 128}, per-head / per-channel gates and h0 alternating
/// (common::shape_sweep), dh_final on every other case.
#[test]
fn shapes_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut i = 0;
    shape_sweep(&[1, 2, 63, 64, 65, 1000], &[1, 5, 16, 64, 128], &[1, 5, 16, 64, 128], 100, |case| {
        i += 1;
        check_case::<f32>(gpu, &case, i % 2 == 0, STATE_BOUNDS);
    });
}

/// L = 4096 (64 chunks), a few shapes.
#[test]
fn long_4096() {
    let Some(gpu) = gpu_or_skip() else { return };
    shape_sweep(&[4096], &[16, 64], &[5, 64], 900, |case| check_case::<f32>(gpu, &case, true, STATE_BOUNDS));
}

/// Every gate regime (resets, |a| = 1, phases ±50, strong decay, underflow,
/// mixed) × per-channel / per-head × without / with h0 × without / with
/// dh_final, partial chunks and K, V not multiples of the tiles.
fn regime_cases(gpu: &Gpu, regime: GateRegime, seed0: u64) {
    let shapes = [(1, 3, 2), (65, 5, 7), (130, 16, 70), (300, 40, 9)];
    let mut i = 0;
    regime_matrix(2, 2, &shapes, regime, seed0, |case| {
        i += 1;
        check_case::<f32>(gpu, &case, i % 2 == 1, STATE_BOUNDS);
    });
}

#[test]
fn every_regime_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (i, regime) in common::ALL_REGIMES_AND_UNDERFLOW.into_iter().enumerate() {
        regime_cases(gpu, regime, 1000 + 100 * i as u64);
    }
}

/// Hard decay just above the reset threshold: the compensated chunk-local
/// prefix (cuda/common.cuh: two_sum, re_diff) keeps every short
/// difference exact, so every gradient stays 20× inside the usual bound
/// (relative L2 ≤ 5e-6; the emulated kernels measure ≤ 7.6e-7, the CPU
/// mirror's dlog_gate was up to 7.6e-5 without the compensation).
#[test]
fn hard_decay_keeps_short_differences() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [(150, 40, 7), (700, 16, 8), (65, 128, 64)];
    for (i, p_hard) in [0.2, 0.5, 0.95].into_iter().enumerate() {
        let mut j = 0;
        regime_matrix(1, 2, &shapes, GateRegime::HardDecay(p_hard), 8000 + 100 * i as u64, |case| {
            j += 1;
            check_case::<f32>(gpu, &case, j % 2 == 0, (5e-6, 1e-3));
        });
    }
}

/// dh0 when the first gates' product is an f32 subnormal (found by the
/// emulated `gateloop fuzz --device cuda --targets grad`, seed 2032, cases
/// 33 and 281: dh0 = 0 against 3.4e-37 in f32, f16 and bf16). Every term of
/// dh0 carries E(n, −1) = a_0 ⋯ a_n; with Re g_0 = −90.26 or −88
/// (|a_0| = 6.4e-40, 6.1e-39), the tensor-core operand q_n E(n, −1) of W_0
/// (or its low split part) is subnormal (flushed on the emulated device, as
/// a tensor core may), while dh0 = Σ conj(q_n E(n, −1)) dy_n + conj(A_0) D(0),
/// with q ×500 and dy ×100 (f16: ×20, ×5, within its range), is a normal
/// number. dh0 now comes from grad_dh0 on CUDA cores (its power
/// of two applied last): every gradient within the usual bounds, complex
/// and real gates, one chunk and several, both carries.
#[test]
fn dh0_after_a_subnormal_first_gate() {
    let Some(gpu) = gpu_or_skip() else { return };
    let first_gates: [&[f64]; 2] = [&[-90.26], &[-88.0, -0.5]];
    let shapes = [
        dims(1, 1, 1, 1, 1, true),
        dims(2, 37, 2, 5, 7, false),
        dims(1, 130, 1, 16, 70, true),
        // The sequential carry for bf16 (B·H·slabs ≥ 512).
        dims(8, 70, 64, 16, 8, true),
    ];
    for (i, d) in shapes.into_iter().enumerate() {
        for (j, first) in first_gates.iter().enumerate() {
            let seed = 9300 + 10 * i as u64 + j as u64;
            let mut p = Case::new(d, GateRegime::Random, true, seed).problem();
            // The first steps' gates, every batch element, head and channel.
            let (b_len, l, h_len, g) = (d.batch, d.len, d.heads, d.gate_dim());
            for b in 0..b_len {
                for (t, &re) in first.iter().enumerate().take(l) {
                    for h in 0..h_len {
                        for c in 0..g {
                            p.log_gate[((b * l + t) * h_len + h) * g + c].re = re;
                        }
                    }
                }
            }
            let up = upstream(d, j == 1, seed);
            let label = format!("{d:?} first gates {first:?}");
            let check = |name: &str, got: &Grads<f32>, want: &Grads<f64>, seq: (f64, f64)| {
                assert_grads(&format!("{name} {label}"), got, want, seq, STATE_BOUNDS);
                let (a, b) = (got.dh0.as_ref().unwrap(), want.dh0.as_ref().unwrap());
                let max = b.iter().fold(0.0f64, |m, z| m.max(z.norm()));
                assert!(max > 1.2e-38 && max < 1e-30, "{name} {label}: |dh0| ≤ {max:e}, not the case meant");
                assert!(a.iter().any(|z| z.norm() > 0.0), "{name} {label}: dh0 = 0");
            };
            if common::emulated_device_skips(&d) {
                continue;
            }
            macro_rules! complex_and_real {
                ($t:ty, $q_scale:expr, $dy_scale:expr) => {{
                    let mut p = p.clone();
                    p.q.iter_mut().for_each(|x| *x *= $q_scale);
                    let mut up = up.clone();
                    up.dy.iter_mut().for_each(|x| *x *= $dy_scale);
                    let (pt, ut) = rounded::<$t>(&p, &up);
                    let want = reference::grad::backward(&pt.view(), &ut.dy, ut.dh_final.as_deref()).unwrap();
                    let seq = if <$t>::DTYPE == Dtype::F32 { STATE_BOUNDS } else { y_bounds(<$t>::DTYPE) };
                    check(<$t>::DTYPE.name(), &run::<$t>(gpu, &pt, &ut, ChunkPrecision::Exact), &want, seq);
                    let mut ur = ut.clone();
                    ur.dh_final.iter_mut().flatten().for_each(|z| z.im = 0.0);
                    let pr = common::real_gates(pt.clone());
                    let want = reference::grad::backward(&pr.view(), &ur.dy, ur.dh_final.as_deref()).unwrap();
                    let want = common::grad::real_part_grads(want);
                    check(&format!("{} real", <$t>::DTYPE.name()), &run_real::<$t>(gpu, &pr, &ur), &want, seq);
                }};
            }
            complex_and_real!(f32, 500.0, 100.0);
            complex_and_real!(f16, 20.0, 5.0);
            complex_and_real!(bf16, 500.0, 100.0);
        }
    }
}

/// f16 and bf16 inputs (dq, dk, dv in the input type), every regime on a
/// smaller matrix.
#[test]
fn half_types() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [(1, 3, 2), (130, 16, 70), (200, 33, 9)];
    for (i, regime) in ALL_REGIMES.into_iter().enumerate() {
        let mut j = 0;
        regime_matrix(1, 2, &shapes, regime, 7000 + 100 * i as u64, |case| {
            j += 1;
            check_case::<f16>(gpu, &case, j % 2 == 0, STATE_BOUNDS);
            check_case::<bf16>(gpu, &case, j % 2 == 1, STATE_BOUNDS);
        });
    }
}

/// B·H = 1 at L = 65536 (1024 chunks of both carries), |a| = 1: ≤ 1e-3.
#[test]
fn l65536_unit_modulus() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (seed, per_head) in [(31, false), (32, true)] {
        let case = Case::new(dims(1, 65536, 1, 16, 16, per_head), GateRegime::UnitModulus, true, seed);
        check_case::<f32>(gpu, &case, true, (1e-3, 1e-2));
    }
}

/// A grid where the forward's plan can take the sequential carry (16-bit
/// inputs, B·H·slabs ≥ 512: the forward part is state_seq alone, five
/// launches; `Auto` takes it for real gates, and complex gates force it):
/// every gradient within the bounds, with and without h0 and dh_final, both
/// gate layouts (the emulator shows it bitwise equal to the separate carry).
#[test]
fn sequential_forward_part() {
    let Some(gpu) = gpu_or_skip() else { return };
    // The second shape is the emulated device's (under its work cap):
    // B·H = 512 blocks of one slab and one value tile, two chunks.
    for (i, d) in [dims(8, 200, 16, 64, 64, false), dims(8, 70, 64, 16, 8, true)].into_iter().enumerate() {
        assert_eq!(chunk::plan(&d, Dtype::Bf16, Gates::Real).unwrap().carry, ChunkCarry::Sequential);
        assert_eq!(chunk::plan(&d, Dtype::Bf16, Gates::Complex).unwrap().carry, ChunkCarry::Separate);
        assert_eq!(chunk::plan(&d, Dtype::F32, Gates::Complex).unwrap().carry, ChunkCarry::Separate);
        let case = Case::new(d, GateRegime::Mixed, i == 0, 8400 + i as u64);
        check_case_carry::<bf16>(gpu, &case, i == 1, STATE_BOUNDS, ChunkCarry::Sequential);
    }
}

/// The carries in segments (`LaunchPlan::carry_segments` > 1: few state
/// elements, many chunks; the forward carry and the adjoint carry each in
/// two launches): every gradient within the bounds, complex and real gates,
/// with h0 (dh0 from the adjoint carry's last segment, and grad_dh0) and
/// dh_final, resets and |a| = 1.
#[test]
fn segmented_carries() {
    let Some(gpu) = gpu_or_skip() else { return };
    let cases =
        [(dims(1, 2048, 1, 4, 4, false), GateRegime::Mixed), (dims(2, 4100, 1, 3, 5, true), GateRegime::Resets(0.05))];
    for (i, (d, regime)) in cases.into_iter().enumerate() {
        assert!(chunk::plan(&d, Dtype::F32, Gates::Complex).unwrap().carry_segments > 1, "{d:?}");
        let case = Case::new(d, regime, true, 8600 + i as u64);
        check_case::<f32>(gpu, &case, i == 0, STATE_BOUNDS);
        check_real_case::<f32>(gpu, &case, i == 1, STATE_BOUNDS);
    }
    let unit = Case::new(dims(1, 4096, 2, 8, 8, false), GateRegime::UnitModulus, true, 8610);
    check_case::<bf16>(gpu, &unit, true, STATE_BOUNDS);
}

/// The kernels and their CPU mirror on the same f32 inputs: each is within
/// 1e-4 of the reference, so within 2e-4 of each other.
#[test]
fn agrees_with_the_cpu_mirror() {
    let Some(gpu) = gpu_or_skip() else { return };
    for (i, regime) in ALL_REGIMES.into_iter().enumerate() {
        let case = Case::new(dims(2, 200, 2, 24, 40, i % 2 == 1), regime, i % 3 != 0, 8000 + i as u64);
        if common::emulated_device_skips(&case.dims) {
            continue;
        }
        let up = upstream(case.dims, i % 2 == 0, case.seed);
        let (p, up) = rounded::<f32>(&case.problem(), &up);
        let got = run::<f32>(gpu, &p, &up, ChunkPrecision::Exact);
        let p32 = p.to_f32();
        let dy: Vec<f32> = up.dy.iter().map(|&x| x as f32).collect();
        let dhf: Option<Vec<Complex<f32>>> =
            up.dh_final.as_ref().map(|h| h.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
        let mirror = cpu::chunked_grad::backward(&p32.view(), &dy, dhf.as_deref(), &ChunkParams::default()).unwrap();
        assert_grads(&format!("mirror {}", case.label()), &got, &mirror, (2e-4, 2e-3), (2e-4, 2e-3));
    }
}

/// Fast precision (the forward state kernel on one tensor-core product):
/// the forward's fast state bound, 4·u_op relative (u_op = 2^-11 TF32).
#[test]
fn fast_precision_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    let u_op = 2f64.powi(-11);
    let case = Case::new(dims(1, 300, 2, 40, 70, false), GateRegime::Mixed, true, 8100);
    let up = upstream(case.dims, true, case.seed);
    let (p, up) = rounded::<f32>(&case.problem(), &up);
    let want = reference::grad::backward(&p.view(), &up.dy, up.dh_final.as_deref()).unwrap();
    let got = run::<f32>(gpu, &p, &up, ChunkPrecision::Fast);
    assert_grads("fast", &got, &want, (4.0 * u_op, 16.0 * u_op), (4.0 * u_op, 16.0 * u_op));
}

/// Two runs on the same inputs are bitwise equal (no atomics; fixed-order
/// sums, per-head gates included).
#[test]
fn deterministic() {
    let Some(gpu) = gpu_or_skip() else { return };
    for per_head in [false, true] {
        let case = Case::new(dims(2, 700, 3, 48, 80, per_head), GateRegime::Mixed, true, 8200);
        if common::emulated_device_skips(&case.dims) {
            continue;
        }
        let up = upstream(case.dims, true, case.seed);
        let (p, up) = rounded::<f32>(&case.problem(), &up);
        let a = run::<f32>(gpu, &p, &up, ChunkPrecision::Exact);
        let b = run::<f32>(gpu, &p, &up, ChunkPrecision::Exact);
        assert_grads_bitwise(&format!("f32 {}", case.label()), &a, &b, "two runs");
    }
}

/// Every gradient of `a` and `b` equal to the last bit (dh0 present in both
/// or neither).
fn assert_grads_bitwise(label: &str, a: &Grads<f32>, b: &Grads<f32>, what: &str) {
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let cbits = |x: &[Complex<f32>]| x.iter().map(|z| (z.re.to_bits(), z.im.to_bits())).collect::<Vec<_>>();
    assert!(bits(&a.dq) == bits(&b.dq), "{label}: dq differs between {what}");
    assert!(bits(&a.dk) == bits(&b.dk), "{label}: dk differs between {what}");
    assert!(bits(&a.dv) == bits(&b.dv), "{label}: dv differs between {what}");
    assert!(cbits(&a.dlog_gate) == cbits(&b.dlog_gate), "{label}: dlog_gate differs between {what}");
    assert!(a.dh0.as_deref().map(cbits) == b.dh0.as_deref().map(cbits), "{label}: dh0 differs between {what}");
}

/// bf16 dY and V tiles whose rows all start 16-byte aligned are staged 16
/// bytes a load (Block::load_tile's vector staging: grad_w and its walk,
/// the dv launch, grad_qk's s = dY Vᵀ and its inter-chunk products) and dv
/// stored 16 bytes a store (the dv launch's grouped drain), and the real
/// walks' state update in groups of four columns where the workspace's
/// rows are 16-byte aligned, and q and k four channels a load in the dv
/// launch and grad_qk where their rows are 8-byte aligned (key quads),
/// others an element at a time: the same bits. Each case runs with q, k,
/// v, dy and dv as allocated and one element into their buffers, the
/// workspace two (misaligned; dv's element before the
/// tensor must stay unwritten), complex and real gates, the separate and
/// the sequential carry, V = 64 and 128 (the wide dv launch and walks), K
/// cut short, partial chunks, h0 and dh_final, resets; the aligned run
/// within the reference's bounds.
#[test]
fn vector_staging_is_bitwise_the_elementwise_staging() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [dims(1, 200, 2, 40, 64, true), dims(2, 130, 1, 16, 128, false)];
    for (i, d) in shapes.into_iter().enumerate() {
        let case = Case::new(d, GateRegime::Resets(0.1), i == 0, 8300 + i as u64);
        if common::emulated_device_skips(&case.dims) {
            continue;
        }
        for gates in Gates::ALL {
            let (p, up, want) = if gates == Gates::Real {
                real_case::<bf16>(&case, true)
            } else {
                let (p, up) = rounded::<bf16>(&case.problem(), &upstream(case.dims, true, case.seed));
                let want = reference::grad::backward(&p.view(), &up.dy, up.dh_final.as_deref()).expect("reference");
                (p, up, want)
            };
            for carry in [ChunkCarry::Separate, ChunkCarry::Sequential] {
                let config = ChunkConfig { carry, ..ChunkConfig::default() };
                let a = run_gates::<bf16>(gpu, &p, &up, config, gates, 0);
                let b = run_gates::<bf16>(gpu, &p, &up, config, gates, 1);
                let label = format!("bf16 {gates:?} {carry:?} {}", case.label());
                assert_grads_bitwise(&label, &a, &b, "aligned and misaligned q, k, v, dy, dv");
                assert_grads(&label, &a, &want, y_bounds(Dtype::Bf16), STATE_BOUNDS);
            }
        }
    }
}

/// The backward's state launches in wide blocks (`ChunkStateBlocks::Auto`,
/// V > 64, 16-bit inputs: the recomputed forward walk
/// `gateloop_chunk_state_seq_wide` and `gateloop_chunk_grad_w_seq_wide` with
/// real gates, the separate carry's `gateloop_chunk_state_wide` and
/// `gateloop_chunk_grad_w_wide` with complex and real gates) give the
/// narrow blocks' (`ChunkStateBlocks::Narrow`) gradients bit for bit, and
/// within the reference's bounds; bf16 and f16, Exact and Fast, V = 128 and
/// 200 (a part-filled wide block), K = 16 and 40 (part-filled slabs), h0
/// and dh_final, resets.
#[test]
fn wide_state_blocks_are_bitwise_the_narrow_ones() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [dims(2, 130, 1, 16, 128, false), dims(1, 150, 1, 40, 200, true)];
    for (i, d) in shapes.into_iter().enumerate() {
        let case = Case::new(d, GateRegime::Resets(0.1), i == 0, 8350 + i as u64);
        if common::emulated_device_skips(&case.dims) {
            continue;
        }
        let inputs = [
            (Gates::Real, ChunkCarry::Sequential, real_case::<bf16>(&case, true), real_case::<f16>(&case, true)),
            (Gates::Real, ChunkCarry::Separate, real_case::<bf16>(&case, true), real_case::<f16>(&case, true)),
            (Gates::Complex, ChunkCarry::Separate, complex_case::<bf16>(&case, true), complex_case::<f16>(&case, true)),
        ];
        for (gates, carry, (p16, up16, want), (ph, uph, _)) in inputs {
            for precision in ChunkPrecision::ALL {
                let with = |state_blocks| ChunkConfig { precision, carry, state_blocks, ..ChunkConfig::default() };
                let label = format!("{gates:?} {carry:?} {precision:?} {}", case.label());
                let what = "the narrow and the wide state blocks";
                let a = run_gates::<bf16>(gpu, &p16, &up16, with(ChunkStateBlocks::Narrow), gates, 0);
                let b = run_gates::<bf16>(gpu, &p16, &up16, with(ChunkStateBlocks::Auto), gates, 0);
                assert_grads_bitwise(&format!("bf16 {label}"), &a, &b, what);
                if precision == ChunkPrecision::Exact {
                    assert_grads(&format!("bf16 {label}"), &b, &want, y_bounds(Dtype::Bf16), STATE_BOUNDS);
                }
                let a = run_gates::<f16>(gpu, &ph, &uph, with(ChunkStateBlocks::Narrow), gates, 0);
                let b = run_gates::<f16>(gpu, &ph, &uph, with(ChunkStateBlocks::Auto), gates, 0);
                assert_grads_bitwise(&format!("f16 {label}"), &a, &b, what);
            }
        }
    }
}

/// Run under compute-sanitizer by the GPU bundle: 3 chunks with a partial
/// one, K = 40, V = 70 (partial slabs and value tiles), every dtype, both
/// gate layouts, h0 and dh_final.
#[test]
fn sanitizer_smoke() {
    let Some(gpu) = gpu_or_skip() else { return };
    for per_head in [false, true] {
        let case = Case::new(dims(1, 150, 2, 40, 70, per_head), GateRegime::Mixed, true, 8300);
        check_case::<f32>(gpu, &case, true, STATE_BOUNDS);
        check_case::<f16>(gpu, &case, true, STATE_BOUNDS);
        check_case::<bf16>(gpu, &case, true, STATE_BOUNDS);
        check_real_case::<f32>(gpu, &case, true, STATE_BOUNDS);
        check_real_case::<bf16>(gpu, &case, true, STATE_BOUNDS);
    }
}

/// The backward of a saved forward (`forward_saving_into` then
/// `backward_saved_into`: the chunk states read from the forward's
/// workspace, not recomputed) gives the recomputing backward's gradients
/// bit for bit: complex and real gates, the separate carry (in segments
/// too) and the sequential one, f32 and bf16, both gate layouts, with and
/// without h0 and dh_final, resets and |a| = 1; the workspace NaN-poisoned,
/// so a state the forward left unwritten would show.
#[test]
fn saved_forward_is_bitwise_the_recomputing_backward() {
    let Some(gpu) = gpu_or_skip() else { return };
    let cases = [
        (dims(1, 200, 2, 40, 70, false), GateRegime::Resets(0.05), true),
        (dims(2, 130, 1, 16, 128, true), GateRegime::Mixed, false),
        (dims(1, 2048, 1, 4, 4, false), GateRegime::UnitModulus, true),
    ];
    for (i, (d, regime, with_h0)) in cases.into_iter().enumerate() {
        let case = Case::new(d, regime, with_h0, 8700 + i as u64);
        if common::emulated_device_skips(&case.dims) {
            continue;
        }
        for gates in Gates::ALL {
            for carry in [ChunkCarry::Separate, ChunkCarry::Sequential] {
                let config = ChunkConfig { carry, ..ChunkConfig::default() };
                let label = format!("{gates:?} {carry:?} {}", case.label());
                let (p, up) = if gates == Gates::Real {
                    let (p, up, _) = real_case::<f32>(&case, i != 1);
                    (p, up)
                } else {
                    rounded::<f32>(&case.problem(), &upstream(case.dims, i != 1, case.seed))
                };
                let want = run_gates::<f32>(gpu, &p, &up, config, gates, 0);
                assert_grads_bitwise(
                    &format!("f32 {label}"),
                    &run_saved::<f32>(gpu, &p, &up, config, gates),
                    &want,
                    "saved and recomputed states",
                );
                if i == 0 {
                    let (p, up) = if gates == Gates::Real {
                        let (p, up, _) = real_case::<bf16>(&case, true);
                        (p, up)
                    } else {
                        rounded::<bf16>(&case.problem(), &upstream(case.dims, true, case.seed))
                    };
                    let config = ChunkConfig { precision: ChunkPrecision::Fast, ..config };
                    let want = run_gates::<bf16>(gpu, &p, &up, config, gates, 0);
                    let got = run_saved::<bf16>(gpu, &p, &up, config, gates);
                    assert_grads_bitwise(&format!("bf16 fast {label}"), &got, &want, "saved and recomputed states");
                }
            }
        }
    }
}

/// A saved forward serves only its own backward: another stream, dims or
/// input buffer (h0 given to one call only included), or a packed backward
/// of a batched forward, is a typed error naming `saved`, before any
/// launch; a workspace too short for the backward is refused by the
/// forward (`workspace`).
#[test]
fn saved_forward_misuse_is_a_typed_error() {
    use gateloop::InputError;
    use gateloop::cuda::GpuError;
    let Some(gpu) = gpu_or_skip() else { return };
    let d = dims(1, 70, 1, 4, 6, false);
    let p = random_problem(d, GateRegime::Random, true, 8800).to_f32();
    let s = gpu.context().new_stream().unwrap();
    let other_stream = gpu.context().new_stream().unwrap();
    let u = upload::<f32>(&s, &p);
    let q2 = s.clone_htod(&p.q).unwrap();
    let h0 = s.clone_htod(&flat(p.h0.as_ref().unwrap())).unwrap();
    let dy = s.clone_htod(&vec![1f32; d.v_len()]).unwrap();
    let gp = plan(&d, Dtype::F32, Gates::Complex).unwrap();
    let mut y = s.alloc_zeros::<f32>(d.v_len()).unwrap();
    let mut h_final = s.alloc_zeros::<f32>(2 * d.state_len()).unwrap();
    let mut dq = s.alloc_zeros::<f32>(d.qk_len()).unwrap();
    let mut dk = s.alloc_zeros::<f32>(d.qk_len()).unwrap();
    let mut dv = s.alloc_zeros::<f32>(d.v_len()).unwrap();
    let mut dg = s.alloc_zeros::<f32>(2 * d.gate_len()).unwrap();
    let mut ws = s.alloc_zeros::<f32>(gp.workspace_len).unwrap();
    let inputs = DeviceInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &u.log_gate, h0: None };
    // The forward's own workspace is too short for the backward.
    let mut short = s.alloc_zeros::<f32>(gp.forward.workspace_len).unwrap();
    let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
    assert!(matches!(
        forward_saving_into(gpu, &s, &d, Gates::Complex, inputs, out, &mut short, ChunkPrecision::Exact),
        Err(GpuError::Input(InputError::Length { name: "workspace", .. }))
    ));
    let mut backward =
        |stream: &cudarc::driver::CudaStream, dims: &Dims, inputs: DeviceInputs<'_, f32>, saved: SavedForward<'_>| {
            let grads = DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None };
            backward_saved_into(gpu, stream, dims, inputs, DeviceGradInputs { dy: &dy, dh_final: None }, grads, saved)
        };
    let is_saved_error =
        |r: Result<(), GpuError>| matches!(r, Err(GpuError::Input(InputError::Param { name: "saved", .. })));
    let shorter = dims(1, 69, 1, 4, 6, false);
    let with_h0 = DeviceInputs { h0: Some(&h0), ..inputs };
    let wrong_q = DeviceInputs { q: &q2, ..inputs };
    let calls: [(&_, &Dims, DeviceInputs<'_, f32>); 4] =
        [(&s, &d, wrong_q), (&s, &d, with_h0), (&other_stream, &d, inputs), (&s, &shorter, inputs)];
    for (stream, dims, backward_inputs) in calls {
        let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
        let saved =
            forward_saving_into(gpu, &s, &d, Gates::Complex, inputs, out, &mut ws, ChunkPrecision::Exact).unwrap();
        assert!(is_saved_error(backward(stream, dims, backward_inputs, saved)), "{dims:?}");
    }
    let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
    let saved = forward_saving_into(gpu, &s, &d, Gates::Complex, inputs, out, &mut ws, ChunkPrecision::Exact).unwrap();
    backward(&s, &d, inputs, saved).unwrap();
    // A batched forward's states serve no packed backward (one sequence of
    // the same steps included: its workspace rows differ).
    let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
    let saved = forward_saving_into(gpu, &s, &d, Gates::Complex, inputs, out, &mut ws, ChunkPrecision::Exact).unwrap();
    let grads = DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None };
    let upstream = DeviceGradInputs { dy: &dy, dh_final: None };
    let packed = backward_varlen_saved_into(gpu, &s, &d, &[0, d.len], inputs, upstream, grads, saved);
    assert!(is_saved_error(packed), "a batched forward's states in a packed backward");
    s.synchronize().unwrap();
}

/// Misuse that needs a device: a missing dh0 buffer when h0 is given, a
/// short workspace and wrong gradient lengths are typed errors naming the
/// argument, before any launch.
#[test]
fn misuse_is_a_typed_error() {
    use gateloop::InputError;
    use gateloop::cuda::GpuError;
    let Some(gpu) = gpu_or_skip() else { return };
    let d = dims(1, 70, 1, 4, 6, false);
    let p = random_problem(d, GateRegime::Random, true, 8400).to_f32();
    let s = gpu.context().new_stream().unwrap();
    let u = upload::<f32>(&s, &p);
    let h0 = s.clone_htod(&flat(p.h0.as_ref().unwrap())).unwrap();
    let dy = s.clone_htod(&vec![1f32; d.v_len()]).unwrap();
    let lp = plan(&d, Dtype::F32, Gates::Complex).unwrap();
    let call = |dq_len: usize, dh0: bool, ws_len: usize| {
        let mut dq = s.alloc_zeros::<f32>(dq_len).unwrap();
        let mut dk = s.alloc_zeros::<f32>(d.qk_len()).unwrap();
        let mut dv = s.alloc_zeros::<f32>(d.v_len()).unwrap();
        let mut dg = s.alloc_zeros::<f32>(2 * d.gate_len()).unwrap();
        let mut dh0_buf = dh0.then(|| s.alloc_zeros::<f32>(2 * d.state_len()).unwrap());
        let mut ws = s.alloc_zeros::<f32>(ws_len).unwrap();
        backward_into(
            gpu,
            &s,
            &d,
            DeviceInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &u.log_gate, h0: Some(&h0) },
            DeviceGradInputs { dy: &dy, dh_final: None },
            DeviceGrads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                dlog_gate: &mut dg,
                dh0: dh0_buf.as_mut().map(|h| h as _),
            },
            Some(&mut ws),
            ChunkPrecision::Exact,
        )
    };
    assert!(matches!(
        call(d.qk_len() - 1, true, lp.workspace_len),
        Err(GpuError::Input(InputError::Length { name: "dq", .. }))
    ));
    assert!(matches!(
        call(d.qk_len(), false, lp.workspace_len),
        Err(GpuError::Input(InputError::Param { name: "dh0", .. }))
    ));
    assert!(matches!(
        call(d.qk_len(), true, lp.workspace_len - 1),
        Err(GpuError::Input(InputError::Length { name: "workspace", .. }))
    ));
    call(d.qk_len(), true, lp.workspace_len).unwrap();
    s.synchronize().unwrap();
}

/// Real gates (gated linear attention, `backward_real_into`): the shapes of
/// `shapes_f32` (L ∈ {1, 2, 63, 64, 65, 1000}, K, V ∈ {1, 5, 16, 64, 128})
/// and every gate regime that has a real form, both gate layouts, with and
/// without h0 and dh_final, in f32.
#[test]
fn real_gates_f32() {
    let Some(gpu) = gpu_or_skip() else { return };
    let mut i = 0;
    shape_sweep(&[1, 2, 63, 64, 65, 1000], &[1, 5, 16, 64, 128], &[1, 5, 16, 64, 128], 9100, |case| {
        i += 1;
        check_real_case::<f32>(gpu, &case, i % 2 == 1, STATE_BOUNDS);
    });
    let shapes = [(1, 3, 2), (65, 5, 7), (130, 16, 70), (300, 40, 9)];
    for (r, regime) in common::REAL_REGIMES.into_iter().enumerate() {
        let mut j = 0;
        regime_matrix(1, 2, &shapes, regime, 9200 + 100 * r as u64, |case| {
            j += 1;
            check_real_case::<f32>(gpu, &case, j % 2 == 0, STATE_BOUNDS);
        });
    }
}

/// Real gates in f16 and bf16 (dq, dk, dv in the input type), on a grid
/// where the forward's plan takes the sequential carry too (bf16, B·H = 512
/// blocks: state_seq and grad_w_seq), and at L = 65536 with |a| = 1 (f32,
/// ≤ 1e-3).
#[test]
fn real_gates_half_types_and_long() {
    let Some(gpu) = gpu_or_skip() else { return };
    let shapes = [(1, 3, 2), (130, 16, 70), (200, 33, 9)];
    for (r, regime) in common::REAL_REGIMES.into_iter().enumerate() {
        let mut j = 0;
        regime_matrix(1, 2, &shapes, regime, 9800 + 100 * r as u64, |case| {
            j += 1;
            check_real_case::<f16>(gpu, &case, j % 2 == 0, STATE_BOUNDS);
            check_real_case::<bf16>(gpu, &case, j % 2 == 1, STATE_BOUNDS);
        });
    }
    let d = dims(8, 70, 64, 16, 8, true);
    assert_eq!(chunk::plan(&d, Dtype::Bf16, Gates::Real).unwrap().carry, ChunkCarry::Sequential);
    check_real_case::<bf16>(gpu, &Case::new(d, GateRegime::Mixed, true, 9900), true, STATE_BOUNDS);
    let long = Case::new(dims(1, 65536, 1, 16, 16, false), GateRegime::UnitModulus, true, 9901);
    check_real_case::<f32>(gpu, &long, true, (1e-3, 1e-2));
}

/// The real-gate host convenience equals the device entry bit for bit (and
/// so is deterministic); complex data is refused, naming the tensor; the
/// real entry takes real-length gate-side buffers only (a complex-length
/// dlog_gate is a typed error naming it).
#[test]
fn real_gates_host_and_misuse() {
    use gateloop::InputError;
    use gateloop::cuda::GpuError;
    let Some(gpu) = gpu_or_skip() else { return };
    let case = Case::new(dims(2, 150, 2, 40, 70, false), GateRegime::Resets(0.05), true, 9950);
    if !common::emulated_device_skips(&case.dims) {
        let (p, up, _) = real_case::<f32>(&case, true);
        let got = run_real::<f32>(gpu, &p, &up);
        let p32 = p.to_f32();
        let dy: Vec<f32> = up.dy.iter().map(|&x| x as f32).collect();
        let dhf: Vec<Complex<f32>> =
            up.dh_final.as_ref().unwrap().iter().map(|z| Complex::new(z.re as f32, 0.0)).collect();
        let host = backward_real_host_as::<f32>(gpu, &p32.view(), &dy, Some(&dhf), ChunkPrecision::Exact).unwrap();
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let cbits = |x: &[Complex<f32>]| x.iter().map(|z| (z.re.to_bits(), z.im.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&got.dq), bits(&host.dq));
        assert_eq!(bits(&got.dk), bits(&host.dk));
        assert_eq!(bits(&got.dv), bits(&host.dv));
        assert_eq!(cbits(&got.dlog_gate), cbits(&host.dlog_gate));
        assert_eq!(got.dh0.as_deref().map(cbits), host.dh0.as_deref().map(cbits));
        // Complex data is refused by the real-gate convenience, naming the tensor.
        let complex = case.problem().rounded_to_f32().to_f32();
        match backward_real_host_as::<f32>(gpu, &complex.view(), &dy, None, ChunkPrecision::Exact) {
            Err(GpuError::Input(InputError::Value { name: "log_gate", .. })) => {}
            other => panic!("complex log_gate in the real-gate backward: {other:?}"),
        }
    }
    let d = dims(1, 70, 1, 4, 6, false);
    let p = random_problem(d, GateRegime::Random, false, 9960).to_f32();
    let s = gpu.context().new_stream().unwrap();
    let u = upload::<f32>(&s, &p);
    let real_gate = s.clone_htod(&vec![-0.1f32; d.gate_len()]).unwrap();
    let dy = s.clone_htod(&vec![1f32; d.v_len()]).unwrap();
    let lp = plan(&d, Dtype::F32, Gates::Real).unwrap();
    // Real states take half the bytes; the chunks' scores (2 chunks of 64 ×
    // 64 f32) come after them, for grad_dv.
    let scores = 2 * 64 * 64;
    assert_eq!(lp.scores_offset, lp.workspace_len - scores);
    assert!(lp.workspace_len - scores < plan(&d, Dtype::F32, Gates::Complex).unwrap().workspace_len);
    let call = |gate_len: usize| {
        let mut dq = s.alloc_zeros::<f32>(d.qk_len()).unwrap();
        let mut dk = s.alloc_zeros::<f32>(d.qk_len()).unwrap();
        let mut dv = s.alloc_zeros::<f32>(d.v_len()).unwrap();
        let mut dg = s.alloc_zeros::<f32>(gate_len).unwrap();
        let mut ws = s.alloc_zeros::<f32>(lp.workspace_len).unwrap();
        backward_real_into(
            gpu,
            &s,
            &d,
            DeviceInputs { q: &u.q, k: &u.k, v: &u.v, log_gate: &real_gate, h0: None },
            DeviceGradInputs { dy: &dy, dh_final: None },
            DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dg, dh0: None },
            Some(&mut ws),
            ChunkPrecision::Exact,
        )
    };
    assert!(matches!(call(2 * d.gate_len()), Err(GpuError::Input(InputError::Length { name: "dlog_gate", .. }))));
    call(d.gate_len()).unwrap();
    s.synchronize().unwrap();
}
