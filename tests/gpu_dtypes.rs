//! The recurrent, scan and attention CUDA kernels with q, k, v and y in f16
//! and bf16 (and f32 through the same generic path) against the f64 reference
//! (`reference::recurrent`) on the same ROUNDED inputs: q, k, v rounded to
//! the element type, log_gate and h0 to f32 (they are f32 for every type).
//!
//! Bounds (derivation in tests/dtype_support/mod.rs): h_final, f32 for every
//! type, relative L2 ≤ 1e-4 (the scan's growing past L = 4096 as L/4096, see
//! common::rel_at_len) and max-abs ≤ 1e-3 · max|ref| as for f32; y,
//! rounded once to the element type, relative L2 ≤ 1e-4 + u: 5.9e-4 for f16,
//! 4.0e-3 for bf16. A second check is exact in kind: the f16/bf16 kernel's y
//! is, element by element, the f32 kernel's y (same inputs) rounded to the
//! type. Outputs are poisoned with NaN before every launch.
//!
//! Without a usable GPU every test prints `SKIPPED (no GPU): <reason>` and
//! passes (`GATELOOP_REQUIRE_GPU=1` makes that a failure).

mod common;
mod dtype_support;

use common::run_forward;
use dtype_support::{rounded_to, state_ok, widen, y_bounds, y_ok};
use gateloop::cuda::{Dtype, Element, Gpu, attention, recurrent, scan};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, compare, compare_complex, reference};
use half::{bf16, f16};

/// The kernels with an element-type parameter.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    Recurrent,
    Scan,
    Attention,
}
const KERNELS: [Kernel; 3] = [Kernel::Recurrent, Kernel::Scan, Kernel::Attention];

/// Runs `kernel` in `T` on `p32` (representable in `T`) through its
/// `forward_into` on a fresh stream, outputs and workspace poisoned with NaN
/// first; returns (y, h_final).
fn run_kernel<T: Element>(
    gpu: &Gpu,
    kernel: Kernel,
    p32: &gateloop::testing::OwnedProblem<f32>,
) -> (Vec<T>, Vec<Complex<f32>>) {
    let d = p32.dims;
    let got = match kernel {
        Kernel::Recurrent => run_forward::<T>(gpu, p32, 0, |s, d, i, o, _| recurrent::forward_into(gpu, s, d, i, o)),
        Kernel::Scan => {
            let ws = scan::plan_for(gpu, &d).expect("plan").workspace_len;
            run_forward::<T>(gpu, p32, ws, |s, d, i, o, w| scan::forward_into(gpu, s, d, i, o, w))
        }
        Kernel::Attention => {
            let ws = attention::plan(&d).expect("plan").workspace_len;
            run_forward::<T>(gpu, p32, ws, |s, d, i, o, w| attention::forward_into(gpu, s, d, i, o, w))
        }
    };
    got.unwrap_or_else(|e| panic!("{kernel:?} {} {d:?}: {e}", T::DTYPE))
}

/// One case in element type `T` against the f64 reference.
fn check<T: Element>(gpu: &Gpu, kernel: Kernel, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    let t = T::DTYPE;
    let label = format!("{kernel:?} {t} {d:?} {regime:?} h0={with_h0} seed={seed}");
    let p64 = rounded_to::<T>(&random_problem(d, regime, with_h0, seed));
    let want = reference::recurrent::forward(&p64.view()).expect("reference");
    let (y, h_final) = run_kernel::<T>(gpu, kernel, &p64.to_f32());
    let ey = compare(&widen(&y), &want.y);
    let eh = compare_complex(&h_final, &want.h_final);
    assert!(y_ok(t, &ey), "{label}: y {ey:?}, bounds {:?}", y_bounds(t));
    // The scan's state is a chain of products: its bound grows with L past
    // 4096 (common::rel_at_len); the other kernels keep 1e-4.
    let rel_scale = if matches!(kernel, Kernel::Scan) { common::rel_at_len(1.0, d.len) } else { 1.0 };
    assert!(state_ok(&eh, rel_scale), "{label}: h_final {eh:?}");
}

/// Every kernel in every type.
fn check_all_types(gpu: &Gpu, d: Dims, regime: GateRegime, with_h0: bool, seed: u64) {
    if common::emulated_device_skips(&d) {
        return;
    }
    for kernel in KERNELS {
        check::<f16>(gpu, kernel, d, regime, with_h0, seed);
        check::<bf16>(gpu, kernel, d, regime, with_h0, seed);
        check::<f32>(gpu, kernel, d, regime, with_h0, seed);
    }
}

#[test]
fn shape_sweep() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    common::shape_sweep(&[1, 64, 65, 300], &[1, 16, 64, 128], &[5, 64], 10_000, |c| {
        check_all_types(gpu, c.dims, c.regime, c.with_h0, c.seed)
    });
}

#[test]
fn gate_regimes() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let mut seed = 11_000;
    for regime in [
        GateRegime::Resets(0.2),
        GateRegime::Resets(1.0),
        GateRegime::UnitModulus,
        GateRegime::LargePhase(50.0),
        GateRegime::StrongDecay(30.0),
        GateRegime::Mixed,
        GateRegime::HardDecay(0.5),
    ] {
        for (len, key_dim, value_dim) in [(200, 64, 33), (65, 5, 64)] {
            for per_head in [false, true] {
                seed += 1;
                check_all_types(gpu, dims(2, len, 3, key_dim, value_dim, per_head), regime, seed % 3 != 0, seed);
            }
        }
    }
}

#[test]
fn largest_key_dim_and_odd_sizes() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    check_all_types(gpu, dims(1, 100, 2, 256, 40, false), GateRegime::Random, true, 12_000);
    check_all_types(gpu, dims(3, 17, 5, 129, 97, true), GateRegime::Mixed, true, 12_001);
}

/// The f16/bf16 kernel's y is the f32 kernel's y on the same (representable)
/// inputs, rounded once to the type: |y_T − y_f32| ≤ u·|y_f32| element by
/// element (the arithmetic is the same f32 code; only the final store
/// rounds). A slack of 1e-6 relative and 1e-7 absolute (f16 subnormals) is
/// allowed.
fn check_rounded_f32<T: Element>(gpu: &Gpu, kernel: Kernel, d: Dims, seed: u64) {
    let t = T::DTYPE;
    let p32 = rounded_to::<T>(&random_problem(d, GateRegime::Mixed, true, seed)).to_f32();
    let (y_t, h_t) = run_kernel::<T>(gpu, kernel, &p32);
    let (y_32, h_32) = run_kernel::<f32>(gpu, kernel, &p32);
    let u = t.unit_roundoff();
    for (i, (&a, &b)) in y_t.iter().zip(&y_32).enumerate() {
        let (a, b) = (a.to_f32() as f64, b as f64);
        assert!((a - b).abs() <= (u + 1e-6) * b.abs() + 1e-7, "{kernel:?} {t} {d:?}: y[{i}] = {a}, f32 kernel {b}");
    }
    // The state is f32 in both: the same computation.
    let eh = compare_complex(&h_t, &h_32);
    assert!(eh.rel_l2 <= 1e-6, "{kernel:?} {t} {d:?}: h_final differs from the f32 kernel's: {eh:?}");
}

#[test]
fn y_is_the_f32_result_rounded() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for kernel in KERNELS {
        for (i, d) in [dims(2, 300, 3, 64, 64, false), dims(1, 70, 2, 5, 33, true)].into_iter().enumerate() {
            check_rounded_f32::<f16>(gpu, kernel, d, 13_000 + i as u64);
            check_rounded_f32::<bf16>(gpu, kernel, d, 13_100 + i as u64);
        }
    }
}

/// The scan over several chunks (a carry pass) and attention over many tiles
/// in 16-bit types.
#[test]
fn long_sequences() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    for (i, d) in [dims(1, 20_000, 2, 16, 16, false), dims(1, 5000, 1, 64, 64, true)].into_iter().enumerate() {
        for kernel in [Kernel::Scan, Kernel::Attention] {
            check::<f16>(gpu, kernel, d, GateRegime::Mixed, true, 15_000 + i as u64);
            check::<bf16>(gpu, kernel, d, GateRegime::UnitModulus, false, 15_100 + i as u64);
        }
    }
}

#[test]
fn forward_host_as_rounds_on_the_host() {
    let Some(gpu) = common::gpu_or_skip() else { return };
    let d = dims(2, 300, 3, 64, 64, false);
    let raw = random_problem(d, GateRegime::Mixed, true, 14_000);
    // forward_host_as gets unrounded f32 data and rounds q, k, v itself.
    let p32 = raw.to_f32();
    fn one<T: Element>(
        gpu: &Gpu,
        raw: &gateloop::testing::OwnedProblem<f64>,
        p32: &gateloop::testing::OwnedProblem<f32>,
    ) {
        let want = reference::recurrent::forward(&rounded_to::<T>(raw).view()).unwrap();
        for (kernel, got) in [
            ("recurrent", recurrent::forward_host_as::<T>(gpu, &p32.view())),
            ("scan", scan::forward_host_as::<T>(gpu, &p32.view())),
            ("attention", attention::forward_host_as::<T>(gpu, &p32.view())),
        ] {
            let got = got.unwrap();
            let (ey, eh) = (compare(&got.y, &want.y), compare_complex(&got.h_final, &want.h_final));
            assert!(y_ok(T::DTYPE, &ey), "{kernel} {}: y {ey:?}", T::DTYPE);
            assert!(state_ok(&eh, 1.0), "{kernel} {}: h_final {eh:?}", T::DTYPE);
        }
    }
    one::<f16>(gpu, &raw, &p32);
    one::<bf16>(gpu, &raw, &p32);
    one::<f32>(gpu, &raw, &p32);
}

#[test]
fn bounds_are_the_documented_ones() {
    // No GPU needed: pins the numbers quoted in the module docs.
    let (f16_rel, _) = y_bounds(Dtype::F16);
    let (bf16_rel, _) = y_bounds(Dtype::Bf16);
    assert!((f16_rel - 5.9e-4).abs() < 1e-5, "{f16_rel}");
    assert!((bf16_rel - 4.0e-3).abs() < 1e-5, "{bf16_rel}");
    assert_eq!(y_bounds(Dtype::F32), (1e-4, 1e-3));
}
