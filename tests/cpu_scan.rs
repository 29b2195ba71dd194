//! The f32 CPU mirror of the fused scan kernel (`gateloop::cpu::scan`, the
//! kernel's algorithm operation for operation) against the f64 recurrent
//! reference on the same f32-rounded inputs. Bounds: relative L2 ≤ 1e-4 and
//! max-abs ≤ 1e-3 · max|ref| for y and h_final (1e-3 for both at L = 65536).
//!
//! The chunk geometry is varied (warps 1, 2, 4, 8: chunks of 256..2048 steps
//! at the kernel's 8 steps per thread), so multi-chunk carries, warp and lane
//! boundaries and partial last chunks all occur.

mod common;

use common::{ABS_FRAC, Case, REL, adversarial_regime_tests, assert_outputs, regime_matrix, regime_tests};
use gateloop::cpu::scan::{self, MAX_WARPS, STEPS_PER_THREAD, ScanParams};
use gateloop::testing::{GateRegime, dims, random_problem};
use gateloop::{Complex, Dims, InputError, Outputs};

fn params(warps: usize) -> ScanParams {
    ScanParams { steps_per_thread: STEPS_PER_THREAD, warps }
}

fn check_with(d: Dims, regime: GateRegime, with_h0: bool, seed: u64, sp: ScanParams, rel: f64, abs_frac: f64) {
    let case = Case::new(d, regime, with_h0, seed);
    let label = format!("{} {sp:?}", case.label());
    let (p32, want) = case.with_reference();
    let got = scan::forward(&p32.view(), &sp).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_outputs(&label, &got.y, &got.h_final, &want, rel, abs_frac);
}

fn check(d: Dims, regime: GateRegime, with_h0: bool, seed: u64, sp: ScanParams) {
    check_with(d, regime, with_h0, seed, sp, REL, ABS_FRAC);
}

#[test]
fn shape_sweep() {
    // The chunk geometry alternates too, so every combination meets every
    // size class.
    common::shape_sweep(&[1, 2, 63, 64, 65, 1000, 4096], &[1, 5, 16, 64], &[1, 5, 16, 64], 0, |c| {
        let warps = [1, 2, 4, 8][(c.seed / 4) as usize % 4];
        check(c.dims, c.regime, c.with_h0, c.seed, params(warps));
    });
}

fn regime_cases(regime: GateRegime, seed: u64) {
    let shapes = [(65, 16, 5), (1000, 64, 16), (4096, 5, 64), (300, 1, 1), (2049, 16, 16)];
    regime_matrix(1, 2, &shapes, regime, seed, |c| {
        let warps = [1, 2, 4, 8][c.seed as usize % 4];
        check(c.dims, c.regime, c.with_h0, c.seed, params(warps));
    });
}

regime_tests! { regime_cases:
    random => GateRegime::Random, 500;
}
adversarial_regime_tests!(regime_cases);

/// B·H = 1 at L = 65536 with |a| = 1: 64 chunks (default) or 256 (one warp)
/// of carries, nothing decays.
#[test]
fn long_unit_modulus() {
    let d = dims(1, 65536, 1, 2, 3, false);
    check_with(d, GateRegime::UnitModulus, true, 9000, ScanParams::default(), 1e-3, 1e-3);
    let d = dims(1, 65536, 1, 3, 2, true);
    check_with(d, GateRegime::UnitModulus, false, 9001, params(1), 1e-3, 1e-3);
}

/// Batches and heads are independent and land in the right places.
#[test]
fn batches_and_heads() {
    check(dims(3, 700, 4, 5, 7, false), GateRegime::Mixed, true, 9100, params(1));
    check(dims(2, 33, 5, 3, 2, true), GateRegime::Resets(0.3), false, 9101, params(2));
}

/// Other segment lengths (the mirror accepts any; the kernel's is fixed):
/// the same algorithm must hold for every S.
#[test]
fn other_steps_per_thread() {
    let mut seed = 9200;
    for s in [1, 2, 3, 5, 16] {
        for warps in [1, MAX_WARPS] {
            seed += 1;
            let sp = ScanParams { steps_per_thread: s, warps };
            check(dims(1, 3000, 1, 4, 6, seed % 2 == 0), GateRegime::Mixed, true, seed, sp);
        }
    }
}

/// A full reset at t zeroes all dependence on h0 and on earlier steps: the
/// outputs after it are bitwise those of the problem started at t.
#[test]
fn reset_is_exact() {
    let d = dims(1, 1500, 1, 3, 4, false);
    let mut p = random_problem(d, GateRegime::Random, true, 9300).to_f32();
    let cut = 777;
    for kk in 0..3 {
        p.log_gate[cut * 3 + kk].re = f32::NEG_INFINITY;
    }
    let sp = params(1);
    let full = scan::forward(&p.view(), &sp).unwrap();
    // Perturb everything before the cut (and h0): nothing after it may change.
    let mut q = p.clone();
    for x in &mut q.v[..cut * 4] {
        *x = -*x * 0.5;
    }
    for x in q.h0.as_mut().unwrap() {
        *x = Complex::new(3.0, -2.0);
    }
    let other = scan::forward(&q.view(), &sp).unwrap();
    assert_eq!(full.y[cut * 4..], other.y[cut * 4..]);
    assert_eq!(full.h_final, other.h_final);
}

#[test]
fn validates_inputs_params_and_outputs() {
    let d = dims(1, 10, 1, 2, 3, false);
    let mut p = random_problem(d, GateRegime::Random, false, 1).to_f32();
    let bad = ScanParams { steps_per_thread: 8, warps: 0 };
    assert!(matches!(scan::forward(&p.view(), &bad), Err(InputError::Param { name: "warps", .. })));
    p.log_gate[3].re = 0.5;
    assert!(matches!(
        scan::forward(&p.view(), &ScanParams::default()),
        Err(InputError::Value { name: "log_gate", index: 3, .. })
    ));
    p.log_gate[3].re = -0.5;
    let mut out = Outputs::<f32>::zeros(&d);
    out.y.pop();
    assert!(matches!(
        scan::forward_into(&p.view(), &ScanParams::default(), out.as_mut()),
        Err(InputError::Length { name: "y", .. })
    ));
    let mut short = p.view();
    short.q = &p.q[1..];
    assert!(matches!(scan::forward(&short, &ScanParams::default()), Err(InputError::Length { name: "q", .. })));
}
