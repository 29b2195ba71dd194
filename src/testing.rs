//! Random problems for tests, the demo, benchmarks and fuzzing: reproducible
//! from a seed, with the adversarial gate regimes the kernels must survive.

use num_complex::Complex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::problem::{Dims, GateLayout, Problem, Real};

/// How log_gate is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateRegime {
    /// Re ∈ [−0.3, 0], phase ∈ (−π, π).
    Random,
    /// Like `Random`, with each step a full reset (Re = −∞) with this probability.
    Resets(f64),
    /// |a| = 1 exactly (Re = 0), phase ∈ (−π, π): nothing decays.
    UnitModulus,
    /// Re ∈ [−0.3, 0], phase ∈ (−`max_phase`, `max_phase`) rad per step.
    LargePhase(f64),
    /// Re ∈ [−`max_decay`, 0], phase ∈ (−π, π): strong decay, tiny products.
    StrongDecay(f64),
    /// Each element drawn from one of the regimes above, plus exact zeros.
    Mixed,
    /// |a| → 0 through the floating-point underflow ranges, each element one
    /// of (equally likely): Re ∈ [−103.9, −87.4] (a is an f32 subnormal),
    /// Re ∈ [−745.1, −708.4] (a is an f64 subnormal, 0 in f32),
    /// Re ∈ [−1e4, −746] (a = 0 in both, but not a −∞ reset), or `Random`
    /// (so state survives between the near-resets). Phases ∈ (−π, π).
    Underflow,
    /// Hard decay just above the reset threshold: with probability `p` a step
    /// has Re ∈ [−103.9, −20] (a chunk- or tile-local cumulative log reaches
    /// thousands, where an f32 sum's ulp is ~1e-4), else `Random` (so a short
    /// difference of two such sums carries factors near 1). Phases ∈ (−π, π).
    HardDecay(f64),
}

/// An owned problem (see [`Problem`] for the layout).
#[derive(Clone, Debug)]
pub struct OwnedProblem<T> {
    /// The shape, and the gate layout (per channel or per head).
    pub dims: Dims,
    /// `[B, L, H, K]`
    pub q: Vec<T>,
    /// `[B, L, H, K]`
    pub k: Vec<T>,
    /// `[B, L, H, V]`
    pub v: Vec<T>,
    /// `[B, L, H, K]` (per channel) or `[B, L, H, 1]` (per head) complex:
    /// a = exp(log_gate).
    pub log_gate: Vec<Complex<T>>,
    /// `[B, H, K, V]` complex initial state; `None` starts from zero.
    pub h0: Option<Vec<Complex<T>>>,
}

impl<T: Real> OwnedProblem<T> {
    /// Borrows as a [`Problem`].
    pub fn view(&self) -> Problem<'_, T> {
        Problem {
            dims: self.dims,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            log_gate: &self.log_gate,
            h0: self.h0.as_deref(),
        }
    }

    /// Steps [t0, t0 + n) of the problem as a problem of length n (no h0):
    /// the inputs of one decode call, or of one piece of a split sequence.
    /// Panics when the range is outside the problem (test helper).
    pub fn steps(&self, t0: usize, n: usize) -> OwnedProblem<T> {
        let d = self.dims;
        assert!(t0 + n <= d.len, "steps {t0}..{} of a problem of length {}", t0 + n, d.len);
        fn rows<X: Copy>(x: &[X], d: &Dims, dim: usize, t0: usize, n: usize) -> Vec<X> {
            let row = d.heads * dim;
            (0..d.batch).flat_map(|b| x[(b * d.len + t0) * row..(b * d.len + t0 + n) * row].iter().copied()).collect()
        }
        OwnedProblem {
            dims: Dims { len: n, ..d },
            q: rows(&self.q, &d, d.key_dim, t0, n),
            k: rows(&self.k, &d, d.key_dim, t0, n),
            v: rows(&self.v, &d, d.value_dim, t0, n),
            log_gate: rows(&self.log_gate, &d, d.gate_dim(), t0, n),
            h0: None,
        }
    }

    /// Converts every element with `f`.
    pub fn map<U: Real>(&self, f: impl Fn(T) -> U) -> OwnedProblem<U> {
        let c = |z: &Complex<T>| Complex::new(f(z.re), f(z.im));
        OwnedProblem {
            dims: self.dims,
            q: self.q.iter().map(|&x| f(x)).collect(),
            k: self.k.iter().map(|&x| f(x)).collect(),
            v: self.v.iter().map(|&x| f(x)).collect(),
            log_gate: self.log_gate.iter().map(c).collect(),
            h0: self.h0.as_ref().map(|h| h.iter().map(c).collect()),
        }
    }

    /// `f` applied to q, k and v only (log_gate and h0 unchanged): the
    /// inputs a kernel with a narrower element type than its gates sees.
    pub fn map_qkv(&self, f: impl Fn(T) -> T) -> OwnedProblem<T> {
        let m = |x: &[T]| -> Vec<T> { x.iter().map(|&x| f(x)).collect() };
        let (log_gate, h0) = (self.log_gate.clone(), self.h0.clone());
        OwnedProblem { dims: self.dims, q: m(&self.q), k: m(&self.k), v: m(&self.v), log_gate, h0 }
    }
}

impl OwnedProblem<f64> {
    /// Rounds to f32 (the inputs an f32 implementation sees).
    pub fn to_f32(&self) -> OwnedProblem<f32> {
        self.map(|x| x as f32)
    }
    /// Rounds through f32 and back, so an f64 reference sees exactly the
    /// inputs an f32 implementation sees.
    pub fn rounded_to_f32(&self) -> OwnedProblem<f64> {
        self.map(|x| x as f32 as f64)
    }
}

fn draw_gate(rng: &mut StdRng, regime: GateRegime) -> Complex<f64> {
    use std::f64::consts::PI;
    let phase = |rng: &mut StdRng, max: f64| rng.random_range(-max..max);
    match regime {
        GateRegime::Random => Complex::new(-rng.random_range(0.0..0.3), phase(rng, PI)),
        GateRegime::Resets(p) => {
            if rng.random_bool(p) {
                Complex::new(f64::NEG_INFINITY, phase(rng, PI))
            } else {
                draw_gate(rng, GateRegime::Random)
            }
        }
        GateRegime::UnitModulus => Complex::new(0.0, phase(rng, PI)),
        GateRegime::LargePhase(max) => Complex::new(-rng.random_range(0.0..0.3), phase(rng, max)),
        GateRegime::StrongDecay(max) => Complex::new(-rng.random_range(0.0..max), phase(rng, PI)),
        GateRegime::Mixed => match rng.random_range(0..6) {
            0 => draw_gate(rng, GateRegime::Random),
            1 => draw_gate(rng, GateRegime::Resets(0.5)),
            2 => draw_gate(rng, GateRegime::UnitModulus),
            3 => draw_gate(rng, GateRegime::LargePhase(50.0)),
            4 => draw_gate(rng, GateRegime::StrongDecay(30.0)),
            _ => Complex::new(0.0, 0.0),
        },
        GateRegime::Underflow => {
            let re = match rng.random_range(0..4) {
                0 => -rng.random_range(87.4..103.9),
                1 => -rng.random_range(708.4..745.1),
                2 => -rng.random_range(746.0..1e4),
                _ => return draw_gate(rng, GateRegime::Random),
            };
            Complex::new(re, phase(rng, PI))
        }
        GateRegime::HardDecay(p) => {
            if rng.random_bool(p) {
                Complex::new(-rng.random_range(20.0..103.9), phase(rng, PI))
            } else {
                draw_gate(rng, GateRegime::Random)
            }
        }
    }
}

/// A random problem: q, k, v uniform in (−1, 1), h0 (if asked) uniform in the
/// unit square, gates from `regime`. The same seed gives the same problem.
pub fn random_problem(dims: Dims, regime: GateRegime, with_h0: bool, seed: u64) -> OwnedProblem<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut uniform = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let q = uniform(dims.qk_len());
    let k = uniform(dims.qk_len());
    let v = uniform(dims.v_len());
    let h0 = with_h0.then(|| {
        let re = uniform(dims.state_len());
        let im = uniform(dims.state_len());
        re.into_iter().zip(im).map(|(r, i)| Complex::new(r, i)).collect()
    });
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let log_gate = (0..dims.gate_len()).map(|_| draw_gate(&mut rng, regime)).collect();
    OwnedProblem { dims, q, k, v, log_gate, h0 }
}

/// Shorthand for per-channel or per-head dims.
pub fn dims(batch: usize, len: usize, heads: usize, key_dim: usize, value_dim: usize, per_head_gate: bool) -> Dims {
    let g = if per_head_gate { GateLayout::PerHead } else { GateLayout::PerChannel };
    Dims::new(batch, len, heads, key_dim, value_dim).with_gate(g)
}
