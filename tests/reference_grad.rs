//! The reference backward against finite differences of the f64 forward.
//!
//! The loss is L = Σ dy ⊙ y + Σ (dh_final.re ⊙ Re h_final + dh_final.im ⊙ Im h_final),
//! whose gradient `grad::backward` returns (complex inputs as (re, im) pairs).
//!
//! Finite differences, and why they are this accurate:
//! - L is affine in each single element of q, k, v and h0 (y and h_final are
//!   linear in each of them with the others fixed), so a central difference
//!   has no truncation error at any step; the step is 1e-2·max(1, |x|), large
//!   so that rounding is small.
//! - L is affine in each single gate a_t (per channel or per head), hence of
//!   the form c + Re(C·e^g) in that g: every derivative is bounded by |C e^g|.
//!   The gate uses the 4th-order central stencil with h = 1e-4 (truncation
//!   ≈ h⁴/30 relative), and for Re g > −2h — |a| = 1, where Re g + h would leave
//!   the domain Re g ≤ 0 that the checked forward enforces — the 4th-order
//!   one-sided stencil that only steps down (x, x−h, …, x−4h).
//! - The loss differences are taken element by element (Σ dy ⊙ (y₊ − y₋)), so
//!   the outputs a perturbation does not reach cancel exactly.
//! - Re g = −∞ (a reset) is never perturbed: its gradient is defined as 0 and
//!   checked to be exactly 0; its phase is perturbed and the difference must
//!   be exactly 0 too (a = 0 whatever the phase).
//!
//! The error of an element is |fd − analytic| / max(|analytic|, 1e-3·max|grad|)
//! over that gradient tensor (pure relative error unless the element is tiny
//! compared with its tensor), and must be ≤ 1e-6.

use gateloop::reference::grad::{self, GradInputs, Grads, GradsMut};
use gateloop::reference::{self, RefMode};
use gateloop::testing::{GateRegime, OwnedProblem, dims, random_problem};
use gateloop::{Complex, Dims, InputError, Outputs, compare, compare_complex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Param {
    Q,
    K,
    V,
    GateRe,
    GateIm,
    H0Re,
    H0Im,
}

const PARAMS: [Param; 7] = [Param::Q, Param::K, Param::V, Param::GateRe, Param::GateIm, Param::H0Re, Param::H0Im];

struct Case {
    name: String,
    p: OwnedProblem<f64>,
    dy: Vec<f64>,
    dh_final: Option<Vec<Complex<f64>>>,
}

fn case(name: &str, d: Dims, regime: GateRegime, with_h0: bool, with_dh_final: bool, seed: u64) -> Case {
    let p = random_problem(d, regime, with_h0, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd);
    let dy = (0..d.v_len()).map(|_| rng.random_range(-1.0..1.0)).collect();
    let dh_final = with_dh_final.then(|| {
        (0..d.state_len()).map(|_| Complex::new(rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0))).collect()
    });
    Case { name: format!("{name} {d:?} {regime:?} h0={with_h0} dh_final={with_dh_final}"), p, dy, dh_final }
}

fn param_len(p: &OwnedProblem<f64>, param: Param) -> usize {
    match param {
        Param::Q => p.q.len(),
        Param::K => p.k.len(),
        Param::V => p.v.len(),
        Param::GateRe | Param::GateIm => p.log_gate.len(),
        Param::H0Re | Param::H0Im => p.h0.as_ref().map_or(0, Vec::len),
    }
}

fn slot(p: &mut OwnedProblem<f64>, param: Param, i: usize) -> &mut f64 {
    match param {
        Param::Q => &mut p.q[i],
        Param::K => &mut p.k[i],
        Param::V => &mut p.v[i],
        Param::GateRe => &mut p.log_gate[i].re,
        Param::GateIm => &mut p.log_gate[i].im,
        Param::H0Re => &mut p.h0.as_mut().expect("h0")[i].re,
        Param::H0Im => &mut p.h0.as_mut().expect("h0")[i].im,
    }
}

fn analytic(g: &Grads<f64>, param: Param, i: usize) -> f64 {
    match param {
        Param::Q => g.dq[i],
        Param::K => g.dk[i],
        Param::V => g.dv[i],
        Param::GateRe => g.dlog_gate[i].re,
        Param::GateIm => g.dlog_gate[i].im,
        Param::H0Re => g.dh0.as_ref().expect("dh0")[i].re,
        Param::H0Im => g.dh0.as_ref().expect("dh0")[i].im,
    }
}

fn analytic_all(g: &Grads<f64>, param: Param) -> Vec<f64> {
    let n = match param {
        Param::Q | Param::K => g.dq.len(),
        Param::V => g.dv.len(),
        Param::GateRe | Param::GateIm => g.dlog_gate.len(),
        Param::H0Re | Param::H0Im => g.dh0.as_ref().map_or(0, Vec::len),
    };
    (0..n).map(|i| analytic(g, param, i)).collect()
}

/// The forward of `mode` with one element set to `x`.
fn outputs_at(mode: RefMode, c: &mut Case, param: Param, i: usize, x: f64) -> Outputs<f64> {
    let old = std::mem::replace(slot(&mut c.p, param, i), x);
    let out = reference::forward(mode, &c.p.view()).expect("forward of a perturbed problem");
    *slot(&mut c.p, param, i) = old;
    out
}

/// L(o1) − L(o2), element by element.
fn loss_diff(c: &Case, o1: &Outputs<f64>, o2: &Outputs<f64>) -> f64 {
    let mut s: f64 = c.dy.iter().zip(o1.y.iter().zip(&o2.y)).map(|(d, (a, b))| d * (a - b)).sum();
    if let Some(dh) = &c.dh_final {
        s += dh
            .iter()
            .zip(o1.h_final.iter().zip(&o2.h_final))
            .map(|(d, (a, b))| d.re * (a.re - b.re) + d.im * (a.im - b.im))
            .sum::<f64>();
    }
    s
}

/// The finite-difference derivative of L in one element (None: Re of a reset).
fn finite_difference(mode: RefMode, c: &mut Case, param: Param, i: usize) -> Option<f64> {
    let x = *slot(&mut c.p, param, i);
    match param {
        Param::GateRe if x == f64::NEG_INFINITY => None,
        Param::GateRe | Param::GateIm => {
            let h = 1e-4;
            if param == Param::GateRe && x + 2.0 * h > 0.0 {
                // One-sided, 4th order: f′ ≈ (48 D₁ − 36 D₂ + 16 D₃ − 3 D₄) / 12h,
                // D_j = f(x) − f(x − j h).
                let f0 = outputs_at(mode, c, param, i, x);
                let d = |c: &mut Case, j: f64| {
                    let fj = outputs_at(mode, c, param, i, x - j * h);
                    loss_diff(c, &f0, &fj)
                };
                let (d1, d2, d3, d4) = (d(c, 1.0), d(c, 2.0), d(c, 3.0), d(c, 4.0));
                Some((48.0 * d1 - 36.0 * d2 + 16.0 * d3 - 3.0 * d4) / (12.0 * h))
            } else {
                // Central, 4th order: f′ ≈ (8 (f₁ − f₋₁) − (f₂ − f₋₂)) / 12h.
                let mut pair = |j: f64| {
                    let (p, m) = (outputs_at(mode, c, param, i, x + j * h), outputs_at(mode, c, param, i, x - j * h));
                    loss_diff(c, &p, &m)
                };
                let (d1, d2) = (pair(1.0), pair(2.0));
                Some((8.0 * d1 - d2) / (12.0 * h))
            }
        }
        _ => {
            // Affine in this element: the central difference is exact.
            let h = 1e-2 * x.abs().max(1.0);
            let (p, m) = (outputs_at(mode, c, param, i, x + h), outputs_at(mode, c, param, i, x - h));
            Some(loss_diff(c, &p, &m) / (2.0 * h))
        }
    }
}

/// Checks `samples` random elements (plus the first and the last) of every
/// gradient against finite differences through each of `modes`; returns
/// the worst error.
fn check(c: &mut Case, modes: &[RefMode], samples: usize, seed: u64) -> f64 {
    let g = grad::backward(&c.p.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
    assert_eq!(g.dh0.is_some(), c.p.h0.is_some(), "{}: dh0 present iff h0 is", c.name);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut worst = 0.0f64;
    for param in PARAMS {
        let n = param_len(&c.p, param);
        if n == 0 {
            continue;
        }
        let all = analytic_all(&g, param);
        assert!(all.iter().all(|x| x.is_finite()), "{}: non-finite {param:?} gradient", c.name);
        let floor = 1e-3 * all.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let mut idx: Vec<usize> = (0..samples).map(|_| rng.random_range(0..n)).collect();
        idx.extend([0, n - 1]);
        for &mode in modes {
            for &i in &idx {
                let an = all[i];
                match finite_difference(mode, c, param, i) {
                    None => assert_eq!(an, 0.0, "{}: gradient of a reset gate must be 0", c.name),
                    Some(fd) => {
                        if param == Param::GateIm && c.p.log_gate[i].re == f64::NEG_INFINITY {
                            assert!(fd == 0.0 && an == 0.0, "{}: phase of reset {i}: fd {fd}, analytic {an}", c.name);
                        }
                        let err = (fd - an).abs() / an.abs().max(floor).max(f64::MIN_POSITIVE);
                        worst = worst.max(err);
                        assert!(
                            err <= TOL,
                            "{}: {mode:?} {param:?}[{i}]: finite difference {fd:e}, analytic {an:e}, error {err:e}",
                            c.name
                        );
                    }
                }
            }
        }
    }
    println!("{}: worst error {worst:.2e}", c.name);
    worst
}

const RECURRENT: [RefMode; 1] = [RefMode::Recurrent];

#[test]
fn random_gates() {
    check(&mut case("random", dims(2, 150, 2, 3, 4, false), GateRegime::Random, true, true, 1), &RECURRENT, 12, 1);
}

#[test]
fn resets() {
    let mut c = case("resets", dims(1, 300, 2, 3, 4, false), GateRegime::Resets(0.1), true, true, 2);
    assert!(c.p.log_gate.iter().any(|g| g.re == f64::NEG_INFINITY));
    check(&mut c, &RECURRENT, 12, 2);
    // Every reset element, both parts: exactly 0, and its phase does not matter.
    let g = grad::backward(&c.p.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
    let resets: Vec<usize> = (0..c.p.log_gate.len()).filter(|&i| c.p.log_gate[i].re == f64::NEG_INFINITY).collect();
    for &i in &resets {
        assert_eq!(g.dlog_gate[i], Complex::new(0.0, 0.0));
    }
    for &i in resets.iter().take(5) {
        assert_eq!(finite_difference(RefMode::Recurrent, &mut c, Param::GateIm, i), Some(0.0));
    }
}

#[test]
fn all_resets_and_reset_at_first_step() {
    // Every step a reset: h_t = k_tᵀ v_t, nothing reaches h0, every gate gradient 0.
    let mut c = case("all resets", dims(1, 40, 2, 2, 3, false), GateRegime::Resets(1.0), true, true, 3);
    let g = grad::backward(&c.p.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
    assert!(g.dlog_gate.iter().all(|z| *z == Complex::new(0.0, 0.0)));
    assert!(g.dh0.as_ref().expect("dh0").iter().all(|z| z.re == 0.0 && z.im == 0.0));
    check(&mut c, &RECURRENT, 6, 3);
}

#[test]
fn unit_modulus() {
    // Re g = 0 exactly: Re is differenced one-sided (steps down only).
    check(
        &mut case("|a| = 1", dims(1, 200, 2, 3, 2, false), GateRegime::UnitModulus, true, true, 4),
        &RECURRENT,
        12,
        4,
    );
}

#[test]
fn large_phase() {
    check(
        &mut case("phase 50", dims(1, 300, 2, 3, 4, false), GateRegime::LargePhase(50.0), true, true, 5),
        &RECURRENT,
        12,
        5,
    );
    check(
        &mut case("phase 50", dims(1, 100, 1, 4, 2, false), GateRegime::LargePhase(50.0), false, true, 6),
        &RECURRENT,
        8,
        6,
    );
}

#[test]
fn per_head_gate() {
    check(
        &mut case("per head", dims(2, 129, 2, 4, 3, true), GateRegime::Resets(0.05), true, true, 7),
        &RECURRENT,
        12,
        7,
    );
    check(
        &mut case("per head", dims(1, 70, 3, 2, 5, true), GateRegime::UnitModulus, false, false, 8),
        &RECURRENT,
        8,
        8,
    );
}

#[test]
fn mixed_regimes_and_k_v_1() {
    check(&mut case("mixed", dims(1, 200, 2, 3, 5, false), GateRegime::Mixed, true, true, 9), &RECURRENT, 12, 9);
    check(&mut case("K=V=1", dims(3, 100, 1, 1, 1, false), GateRegime::Mixed, true, true, 10), &RECURRENT, 10, 10);
    check(&mut case("K=V=1", dims(2, 50, 2, 1, 1, true), GateRegime::Random, false, true, 11), &RECURRENT, 10, 11);
}

#[test]
fn length_one() {
    check(&mut case("L=1", dims(2, 1, 2, 3, 2, false), GateRegime::Random, true, true, 12), &RECURRENT, 6, 12);
    check(
        &mut case("L=1", dims(1, 1, 1, 1, 1, false), GateRegime::LargePhase(50.0), true, false, 13),
        &RECURRENT,
        2,
        13,
    );
    check(&mut case("L=1", dims(1, 1, 2, 2, 3, true), GateRegime::Random, false, false, 14), &RECURRENT, 4, 14);
}

#[test]
fn with_and_without_h0_and_dh_final() {
    for (i, (h0, dhf)) in [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate() {
        let seed = 20 + i as u64;
        check(
            &mut case("h0/dh_final", dims(1, 80, 2, 2, 3, false), GateRegime::Random, h0, dhf, seed),
            &RECURRENT,
            6,
            seed,
        );
    }
}

#[test]
fn checkpoint_block_boundaries() {
    // Lengths around the checkpoint interval, and a long one: the gradient
    // at t = 0 has travelled back through every block.
    let c_len = grad::CHECKPOINT_EVERY;
    for (i, len) in [c_len - 1, c_len, c_len + 1, 2 * c_len, 4096].into_iter().enumerate() {
        let seed = 30 + i as u64;
        let regime = if len > 1000 { GateRegime::UnitModulus } else { GateRegime::Random };
        check(&mut case("blocks", dims(1, len, 1, 2, 2, false), regime, true, true, seed), &RECURRENT, 4, seed);
    }
}

#[test]
fn every_forward_mode_gives_the_same_gradient() {
    // Finite differences through the scan and the surrogate attention agree
    // with the one backward (derived from the recurrence).
    let modes = [RefMode::Recurrent, RefMode::Scan, RefMode::Attention];
    check(&mut case("modes", dims(1, 100, 2, 3, 2, false), GateRegime::Resets(0.1), true, true, 40), &modes, 4, 40);
    check(&mut case("modes", dims(1, 65, 1, 2, 3, true), GateRegime::LargePhase(50.0), true, true, 41), &modes, 4, 41);
    check(&mut case("modes", dims(1, 64, 2, 2, 2, false), GateRegime::Mixed, true, true, 42), &modes, 4, 42);
}

#[test]
fn f32_backward_agrees_with_f64() {
    for (i, regime) in
        [GateRegime::Mixed, GateRegime::LargePhase(50.0), GateRegime::Resets(0.1)].into_iter().enumerate()
    {
        let c = case("f32", dims(2, 300, 2, 4, 3, i == 1), regime, true, true, 50 + i as u64);
        let rounded = c.p.rounded_to_f32();
        let dy32: Vec<f32> = c.dy.iter().map(|&x| x as f32).collect();
        let dh32: Vec<Complex<f32>> =
            c.dh_final.as_ref().expect("dh_final").iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect();
        let dy_r: Vec<f64> = dy32.iter().map(|&x| x.into()).collect();
        let dh_r: Vec<Complex<f64>> = dh32.iter().map(|z| Complex::new(z.re.into(), z.im.into())).collect();
        let ours = grad::backward(&c.p.to_f32().view(), &dy32, Some(&dh32)).expect("f32 backward");
        let oracle = grad::backward(&rounded.view(), &dy_r, Some(&dh_r)).expect("f64 backward");
        let errs = [
            ("dq", compare(&ours.dq, &oracle.dq)),
            ("dk", compare(&ours.dk, &oracle.dk)),
            ("dv", compare(&ours.dv, &oracle.dv)),
            ("dlog_gate", compare_complex(&ours.dlog_gate, &oracle.dlog_gate)),
            ("dh0", compare_complex(ours.dh0.as_deref().expect("dh0"), oracle.dh0.as_deref().expect("dh0"))),
        ];
        for (name, e) in errs {
            assert!(e.within(1e-4, 1e-4), "{regime:?}: f32 {name} {e:?}");
        }
    }
}

#[test]
fn dh0_buffer_without_h0_is_the_gradient_at_a_zero_state() {
    let c = case("dh0", dims(2, 90, 2, 3, 2, false), GateRegime::Random, false, true, 60);
    let mut out = Grads::zeros(&c.p.dims, true);
    let g = GradInputs::new(&c.p.dims, &c.dy, c.dh_final.as_deref()).expect("upstream");
    grad::backward_into(&c.p.view(), &g, out.as_mut()).expect("backward_into");
    let mut with_zero = c.p.clone();
    with_zero.h0 = Some(vec![Complex::new(0.0, 0.0); c.p.dims.state_len()]);
    let expected = grad::backward(&with_zero.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
    assert_eq!(out, expected);
    // And without a dh0 buffer the rest is the same.
    let plain = grad::backward(&c.p.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
    assert!(plain.dh0.is_none());
    assert_eq!((plain.dq, plain.dk, plain.dv, plain.dlog_gate), (out.dq, out.dk, out.dv, out.dlog_gate));
}

fn length_error_name(e: InputError) -> &'static str {
    match e {
        InputError::Length { name, .. } => name,
        other => panic!("expected a length error, got {other:?}"),
    }
}

#[test]
fn typed_errors_name_the_argument() {
    let c = case("errors", dims(1, 10, 2, 3, 2, false), GateRegime::Random, true, true, 70);
    let d = c.p.dims;
    let p = c.p.view();
    let dhf = c.dh_final.as_deref();
    assert_eq!(length_error_name(grad::backward(&p, &c.dy[1..], dhf).unwrap_err()), "dy");
    let short = &dhf.expect("dh_final")[1..];
    assert_eq!(length_error_name(grad::backward(&p, &c.dy, Some(short)).unwrap_err()), "dh_final");
    let mut bad = p;
    bad.q = &c.p.q[1..];
    assert_eq!(length_error_name(grad::backward(&bad, &c.dy, dhf).unwrap_err()), "q");
    let mut bad = p;
    let h0_short = &c.p.h0.as_deref().expect("h0")[1..];
    bad.h0 = Some(h0_short);
    assert_eq!(length_error_name(grad::backward(&bad, &c.dy, dhf).unwrap_err()), "h0");

    // Output buffers.
    let g = GradInputs::new(&d, &c.dy, dhf).expect("upstream");
    let mut out = Grads::zeros(&d, true);
    for (name, cut) in [("dq", 0), ("dk", 1), ("dv", 2), ("dlog_gate", 3), ("dh0", 4)] {
        let Grads { dq, dk, dv, dlog_gate, dh0 } = &mut out;
        let dh0 = dh0.as_deref_mut().expect("dh0");
        let n = |len: usize, i: usize| if i == cut { len - 1 } else { len };
        let (lq, lk, lv, lg, lh) =
            (n(dq.len(), 0), n(dk.len(), 1), n(dv.len(), 2), n(dlog_gate.len(), 3), n(dh0.len(), 4));
        let bufs = GradsMut {
            dq: &mut dq[..lq],
            dk: &mut dk[..lk],
            dv: &mut dv[..lv],
            dlog_gate: &mut dlog_gate[..lg],
            dh0: Some(&mut dh0[..lh]),
        };
        assert_eq!(length_error_name(grad::backward_into(&p, &g, bufs).unwrap_err()), name);
    }
    assert_eq!(length_error_name(GradInputs::new(&d, &c.dy[..3], None).unwrap_err()), "dy");

    // The gate domain.
    let mut up = c.p.clone();
    up.log_gate[3].re = 0.5;
    match grad::backward(&up.view(), &c.dy, dhf).unwrap_err() {
        InputError::Value { name, index, .. } => assert_eq!((name, index), ("log_gate", 3)),
        other => panic!("expected a value error, got {other:?}"),
    }
}

#[test]
fn gradients_stay_finite_in_extreme_regimes() {
    for (i, regime) in
        [GateRegime::StrongDecay(40.0), GateRegime::Resets(0.5), GateRegime::Mixed, GateRegime::UnitModulus]
            .into_iter()
            .enumerate()
    {
        let c = case("finite", dims(1, 2000, 2, 3, 3, i % 2 == 1), regime, true, true, 80 + i as u64);
        let g = grad::backward(&c.p.view(), &c.dy, c.dh_final.as_deref()).expect("backward");
        let finite = g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite())
            && g.dlog_gate.iter().chain(g.dh0.as_deref().expect("dh0")).all(|z| z.re.is_finite() && z.im.is_finite());
        assert!(finite, "{regime:?}: non-finite gradient");
    }
}
