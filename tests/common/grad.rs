//! Gradient checks shared by the backward tests: a seeded case (problem,
//! upstream gradients), its f64 reference on the same f32-rounded inputs
//! (`reference::grad::backward`), the comparison of every gradient, and the
//! worst errors per gradient over a test.

use gateloop::reference::grad::{self, Grads};
use gateloop::testing::{GateRegime, OwnedProblem, random_problem};
use gateloop::{Complex, Dims, ErrorStats, compare, compare_complex};

use super::{ABS_FRAC, REL};

pub const NAMES: [&str; 5] = ["dq", "dk", "dv", "dlog_gate", "dh0"];

/// One case: gates from `regime`, with or without h0 and dh_final.
#[derive(Clone, Copy, Debug)]
pub struct GradCase {
    pub dims: Dims,
    pub regime: GateRegime,
    pub with_h0: bool,
    pub with_dh_final: bool,
    pub seed: u64,
}

/// The inputs of a case in f32: the problem, dy, dh_final.
pub struct GradInputsF32 {
    pub p: OwnedProblem<f32>,
    pub dy: Vec<f32>,
    pub dh_final: Option<Vec<Complex<f32>>>,
}

impl GradCase {
    pub fn new(dims: Dims, regime: GateRegime, with_h0: bool, with_dh_final: bool, seed: u64) -> GradCase {
        GradCase { dims, regime, with_h0, with_dh_final, seed }
    }

    /// The problem and the upstream gradients (uniform in (−1, 1), independent of the problem).
    pub fn inputs(&self) -> GradInputsF32 {
        let p = random_problem(self.dims, self.regime, self.with_h0, self.seed).to_f32();
        let up = random_problem(self.dims, GateRegime::Random, true, self.seed ^ 0x5eed);
        let dy = up.v.iter().map(|&x| x as f32).collect();
        let dh_final = self
            .with_dh_final
            .then(|| up.h0.as_deref().unwrap().iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
        GradInputsF32 { p, dy, dh_final }
    }
}

impl GradInputsF32 {
    /// The real-gate form of these inputs: Im log_gate = Im h0 = Im
    /// dh_final = 0 (a reset stays a reset).
    pub fn real_gates(mut self) -> GradInputsF32 {
        let zs =
            self.p.log_gate.iter_mut().chain(self.p.h0.iter_mut().flatten()).chain(self.dh_final.iter_mut().flatten());
        zs.for_each(|z| z.im = 0.0);
        self
    }

    /// These inputs with q, k, v and dy rounded to `T` (log_gate, h0 and
    /// dh_final stay f32): exactly what a `T` kernel sees.
    pub fn rounded<T: gateloop::cuda::Element>(&self) -> GradInputsF32 {
        let r = |x: &[f32]| x.iter().map(|&x| T::from_f32(x).to_f32()).collect::<Vec<f32>>();
        let p = &self.p;
        GradInputsF32 {
            p: OwnedProblem { q: r(&p.q), k: r(&p.k), v: r(&p.v), ..p.clone() },
            dy: r(&self.dy),
            dh_final: self.dh_final.clone(),
        }
    }

    /// The f64 reference backward on exactly these (f32) inputs.
    pub fn reference(&self) -> Grads<f64> {
        let p64 = self.p.map(|x| x as f64);
        let dy: Vec<f64> = self.dy.iter().map(|&x| x as f64).collect();
        let dhf: Option<Vec<Complex<f64>>> =
            self.dh_final.as_ref().map(|h| h.iter().map(|z| Complex::new(z.re as f64, z.im as f64)).collect());
        grad::backward(&p64.view(), &dy, dhf.as_deref()).unwrap()
    }
}

/// The gradients of a real gate and a real h0 from those of the complex
/// reference at real inputs: their real parts (∂L/∂Re), Im set to 0 as the
/// real-gate kernels' results carry it.
pub fn real_part_grads(mut g: Grads<f64>) -> Grads<f64> {
    g.dlog_gate.iter_mut().chain(g.dh0.iter_mut().flatten()).for_each(|z| z.im = 0.0);
    g
}

/// Every gradient of `ours` against `want` (dh0 when both have it).
pub fn compare_grads<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    ours: &Grads<A>,
    want: &Grads<B>,
) -> Vec<(&'static str, ErrorStats)> {
    let mut out = vec![
        ("dq", compare(&ours.dq, &want.dq)),
        ("dk", compare(&ours.dk, &want.dk)),
        ("dv", compare(&ours.dv, &want.dv)),
        ("dlog_gate", compare_complex(&ours.dlog_gate, &want.dlog_gate)),
    ];
    assert_eq!(ours.dh0.is_some(), want.dh0.is_some(), "dh0 present in one result only");
    if let (Some(a), Some(b)) = (&ours.dh0, &want.dh0) {
        out.push(("dh0", compare_complex(a, b)));
    }
    out
}

/// The bounds, except where the whole reference lies below f32's normal
/// range (every path underflows, e.g. through e^−90 gates): there f32 has no
/// relative precision left, and arithmetic that flushes subnormals to zero
/// (a GPU's tensor cores may; so does any `-ftz` code) returns 0 for all of
/// it, so any answer within the smallest normal f32 of the reference passes.
pub fn within(e: &ErrorStats, rel: f64) -> bool {
    within_bounds(e, rel, ABS_FRAC)
}

/// [`within`] with the max-abs fraction `abs_frac` instead of [`ABS_FRAC`].
pub fn within_bounds(e: &ErrorStats, rel: f64, abs_frac: f64) -> bool {
    let smallest_normal = f64::from(f32::MIN_POSITIVE);
    e.within(rel, abs_frac) || (e.max_ref < smallest_normal && e.max_abs <= smallest_normal)
}

/// The worst (relative L2, max-abs / max|ref|) per gradient over a test's
/// cases, printed at its end (visible with `--nocapture`). References
/// entirely below f32's normal range are left out.
#[derive(Default)]
pub struct Worst(pub [(f64, f64); 5]);

impl Worst {
    /// Checks every gradient of `errors` (of case `label`) against the
    /// relative L2 bound `rel` and records them.
    pub fn check(&mut self, label: &str, errors: &[(&'static str, ErrorStats)], rel: f64) {
        self.check_bounds(label, errors, |_| (rel, ABS_FRAC))
    }

    /// [`Worst::check`] with per-gradient bounds: `bounds(name)` is the
    /// (relative L2, max-abs fraction) of gradient `name`.
    pub fn check_bounds(
        &mut self,
        label: &str,
        errors: &[(&'static str, ErrorStats)],
        bounds: impl Fn(&str) -> (f64, f64),
    ) {
        for (name, e) in errors {
            let i = NAMES.iter().position(|n| n == name).unwrap();
            if e.max_ref >= f64::from(f32::MIN_POSITIVE) {
                self.0[i].0 = self.0[i].0.max(e.rel_l2);
                self.0[i].1 = self.0[i].1.max(e.max_abs / e.max_ref);
            }
            let (rel, abs) = bounds(name);
            assert!(within_bounds(e, rel, abs), "{label}: {name} {e:?} (bounds rel {rel:e}, abs {abs:e}·max|ref|)");
        }
    }

    /// [`Worst::check`] with the default bound [`REL`].
    pub fn check_rel(&mut self, label: &str, errors: &[(&'static str, ErrorStats)]) {
        self.check(label, errors, REL)
    }

    pub fn report(&self, test: &str) {
        let line: Vec<String> =
            NAMES.iter().zip(&self.0).map(|(n, (r, a))| format!("{n} rel {r:.1e} abs/max {a:.1e}")).collect();
        println!("worst errors, {test}: {}", line.join(", "));
    }
}

/// Asserts that every reset step (Re log_gate = −∞) got a gate gradient of
/// exactly 0 and every gate gradient is finite; returns the number of resets.
pub fn assert_resets_have_zero_gradient(log_gate: &[Complex<f32>], dlog_gate: &[Complex<f32>]) -> usize {
    let mut resets = 0;
    for (gate, dg) in log_gate.iter().zip(dlog_gate) {
        if gate.re == f32::NEG_INFINITY {
            resets += 1;
            assert_eq!(*dg, Complex::new(0.0, 0.0));
        }
        assert!(dg.re.is_finite() && dg.im.is_finite());
    }
    resets
}

/// Case `c` through a backward kernel in element type `T` (`run` on the
/// T-rounded inputs) against the f64 reference on those inputs, with
/// `bounds(name)` per gradient; left out where the emulated device leaves it
/// out.
pub fn check_case_as<T: gateloop::cuda::Element>(
    worst: &mut Worst,
    c: GradCase,
    run: impl FnOnce(&GradInputsF32) -> Grads<f32>,
    bounds: impl Fn(&str) -> (f64, f64),
) {
    if super::emulated_device_skips(&c.dims) {
        return;
    }
    let inp = c.inputs().rounded::<T>();
    let got = run(&inp);
    worst.check_bounds(&format!("{} {c:?}", T::DTYPE), &compare_grads(&got, &inp.reference()), bounds);
}

/// Case `c` through an f32 backward kernel (`run`) against the f64
/// reference, relative L2 bound `rel`; left out where the emulated device
/// leaves it out.
pub fn check_case(worst: &mut Worst, c: GradCase, rel: f64, run: impl FnOnce(&GradInputsF32) -> Grads<f32>) {
    if super::emulated_device_skips(&c.dims) {
        return;
    }
    let inp = c.inputs();
    let got = run(&inp);
    worst.check(&format!("{c:?}"), &compare_grads(&got, &inp.reference()), rel);
}

/// A `T` backward kernel does its f32 twin's arithmetic in the same order on
/// the same (T-representable) inputs: dq, dk, dv are exactly the f32
/// kernel's rounded once to T, dlog_gate and dh0 bitwise the f32 kernel's.
pub fn assert_equals_f32_rounded<T: gateloop::cuda::Element>(
    c: GradCase,
    run_f32: impl FnOnce(&GradInputsF32) -> Grads<f32>,
    run_t: impl FnOnce(&GradInputsF32) -> Grads<f32>,
) {
    let inp = c.inputs().rounded::<T>();
    let (want, got) = (run_f32(&inp), run_t(&inp));
    let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let rounded_bits = |x: &[f32]| x.iter().map(|&x| T::from_f32(x).to_f32().to_bits()).collect::<Vec<_>>();
    let label = format!("{} {c:?}", T::DTYPE);
    assert_eq!(bits(&got.dq), rounded_bits(&want.dq), "{label}: dq");
    assert_eq!(bits(&got.dk), rounded_bits(&want.dk), "{label}: dk");
    assert_eq!(bits(&got.dv), rounded_bits(&want.dv), "{label}: dv");
    assert_eq!(got.dlog_gate, want.dlog_gate, "{label}: dlog_gate");
    assert_eq!(got.dh0, want.dh0, "{label}: dh0");
}

/// No atomics, a fixed order of every sum: two runs of a backward kernel on
/// case `(d, Mixed gates, h0, dh_final, seed)` agree bit for bit, in f32
/// (`run_f32`) and in bf16 (`run_bf16`, on the bf16-rounded inputs); left
/// out where the emulated device leaves it out.
pub fn assert_deterministic(
    d: Dims,
    seed: u64,
    run_f32: impl Fn(&GradInputsF32) -> Grads<f32>,
    run_bf16: impl Fn(&GradInputsF32) -> Grads<f32>,
) {
    if super::emulated_device_skips(&d) {
        return;
    }
    let inp = GradCase::new(d, GateRegime::Mixed, true, true, seed).inputs();
    assert_eq!(run_f32(&inp), run_f32(&inp), "{d:?}");
    let inp = inp.rounded::<half::bf16>();
    assert_eq!(run_bf16(&inp), run_bf16(&inp), "bf16 {d:?}");
}

/// Every regime of [`super::ALL_REGIMES`] over `shapes` ([`super::regime_matrix`]),
/// each case once in f16 and once in bf16 (`check(f16 case, bf16 case)`),
/// dh_final on alternate ones.
pub fn half_type_regimes(shapes: &[(usize, usize, usize)], mut check: impl FnMut(GradCase, GradCase)) {
    for (i, regime) in super::ALL_REGIMES.into_iter().enumerate() {
        let mut j = 0;
        super::regime_matrix(1, 2, shapes, regime, 7000 + 100 * i as u64, |case| {
            j += 1;
            let c = |with_dhf: bool| GradCase::new(case.dims, case.regime, case.with_h0, with_dhf, case.seed);
            check(c(j % 2 == 0), c(j % 2 == 1));
        });
    }
}
