//! Masked surrogate attention, the paper's quadratic mode:
//!
//! y_n = Re Σ_{m≤n} Σ_d q_{n,d} k_{m,d} e^{G_{n,d} − G_{m,d}} v_m  (+ Re(q_n e^{G_n} h0))
//!
//! with G the cumulative sum of log_gate. The naive form divides cumulative
//! products (see [`super::naive`]) and overflows; here each pair's factor is
//! exponentiated from the *difference* G_n − G_m, whose real part is ≤ 0, so
//! every factor has modulus ≤ 1.
//!
//! Resets (Re g = −∞) make G = −∞ and the difference NaN, so G is kept per
//! segment: S_t restarts at 0 on each reset, and a pair whose span (m, n]
//! holds a reset has factor exactly 0. A gate whose exp underflows to 0
//! (Re g ≈ −1e4, say) is a reset too: it is one in the recurrence, and
//! summing it into G would make |G| so large that G_n − G_m of nearby steps
//! loses its precision (found by `gateloop fuzz`). Phases are summed
//! reduced to (−π, π] for the same reason.

use num_complex::Complex;
use rayon::prelude::*;

use super::{HeadOutputs, head_h0, per_head_into};
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem, Real};

/// Surrogate-attention mode, allocating the outputs.
pub fn forward<T: Real>(p: &Problem<'_, T>) -> Result<Outputs<T>, InputError> {
    Outputs::computed(p, forward_into)
}

/// Surrogate-attention mode into caller buffers.
pub fn forward_into<T: Real>(p: &Problem<'_, T>, out: OutputsMut<'_, T>) -> Result<(), InputError> {
    per_head_into(p, out, |b, h| head(p, b, h))
}

/// Segmented cumulative log gate of one head, `[L, gate_dim]`.
struct SegmentedLogGate<T> {
    /// Σ of log_gate since the last reset (0 at the reset itself).
    sum: Vec<Complex<T>>,
    /// Index of the last reset at or before t, or −1.
    last_reset: Vec<isize>,
    gate_dim: usize,
}

/// φ mod 2π in (−π, π], reduced in f64: e^{iφ} is unchanged, and the
/// cumulative phase stays a random walk of steps ≤ π instead of growing with
/// |φ| (in f32, phases of hundreds of radians per step summed over a few
/// dozen steps lose ~1e-4 rad to rounding; found by `gateloop fuzz`).
fn reduce_phase<T: Real>(phi: T) -> T {
    use std::f64::consts::{PI, TAU};
    let Some(x) = phi.to_f64() else { return phi };
    if x.abs() <= PI {
        return phi;
    }
    let r = x.rem_euclid(TAU);
    T::from(if r > PI { r - TAU } else { r }).unwrap_or(phi)
}

impl<T: Real> SegmentedLogGate<T> {
    fn new(p: &Problem<'_, T>, b: usize, h: usize) -> Self {
        let (len, gd) = (p.dims.len, p.dims.gate_dim());
        let mut sum = vec![Complex::new(T::zero(), T::zero()); len * gd];
        let mut last_reset = vec![-1isize; len * gd];
        for c in 0..gd {
            let (mut s, mut r) = (Complex::new(T::zero(), T::zero()), -1isize);
            for t in 0..len {
                let g = p.gate(b, t, h, c);
                // exp(Re g) = 0 (−∞, or an underflow such as Re g < −745.2
                // in f64, < −103.98 in f32) is a reset: the recurrence's
                // a = exp(g) is exactly 0 there. Restarting the segment keeps
                // G small, so differences G_n − G_m stay accurate.
                if g.re.exp() == T::zero() {
                    s = Complex::new(T::zero(), T::zero());
                    r = t as isize;
                } else {
                    s = s + Complex::new(g.re, reduce_phase(g.im));
                }
                sum[t * gd + c] = s;
                last_reset[t * gd + c] = r;
            }
        }
        SegmentedLogGate { sum, last_reset, gate_dim: gd }
    }

    /// e^{G_n − G_m} for m ≤ n, channel `kk`: 0 if a reset lies in (m, n].
    #[inline]
    fn factor(&self, n: usize, m: usize, kk: usize) -> Complex<T> {
        let c = if self.gate_dim == 1 { 0 } else { kk };
        if self.last_reset[n * self.gate_dim + c] > m as isize {
            return Complex::new(T::zero(), T::zero());
        }
        (self.sum[n * self.gate_dim + c] - self.sum[m * self.gate_dim + c]).exp()
    }

    /// e^{G_n} (the factor applied to h0): 0 if a reset lies in [0, n].
    #[inline]
    fn factor_from_start(&self, n: usize, kk: usize) -> Complex<T> {
        let c = if self.gate_dim == 1 { 0 } else { kk };
        if self.last_reset[n * self.gate_dim + c] >= 0 {
            return Complex::new(T::zero(), T::zero());
        }
        self.sum[n * self.gate_dim + c].exp()
    }
}

fn head<T: Real>(p: &Problem<'_, T>, b: usize, h: usize) -> HeadOutputs<T> {
    let d = p.dims;
    let (kd, vd, len) = (d.key_dim, d.value_dim, d.len);
    let seg = SegmentedLogGate::new(p, b, h);
    let h0 = head_h0(p, b, h);
    let mut y = vec![T::zero(); len * vd];
    y.par_chunks_mut(vd).enumerate().for_each(|(n, yn)| {
        let qn = &p.q[p.row(b, n, h, kd)..][..kd];
        for m in 0..=n {
            let km = &p.k[p.row(b, m, h, kd)..][..kd];
            // Only Re(e^{ΔG}) enters: score = Σ_d q k Re(e^{ΔG_d}).
            let score = (0..kd).fold(T::zero(), |acc, kk| acc + qn[kk] * km[kk] * seg.factor(n, m, kk).re);
            let vm = &p.v[p.row(b, m, h, vd)..][..vd];
            for (yv, &vv) in yn.iter_mut().zip(vm) {
                *yv = *yv + score * vv;
            }
        }
        if p.h0.is_some() {
            for kk in 0..kd {
                let f = seg.factor_from_start(n, kk);
                for (yv, s) in yn.iter_mut().zip(&h0[kk * vd..(kk + 1) * vd]) {
                    *yv = *yv + qn[kk] * (f * s).re;
                }
            }
        }
    });
    // h_final = e^{G_L} h0 + Σ_m e^{G_L − G_m} k_mᵀ v_m
    let last = len - 1;
    let mut h_final = vec![Complex::new(T::zero(), T::zero()); kd * vd];
    for kk in 0..kd {
        let row = &mut h_final[kk * vd..(kk + 1) * vd];
        let f0 = seg.factor_from_start(last, kk);
        for (s, &x) in row.iter_mut().zip(&h0[kk * vd..(kk + 1) * vd]) {
            *s = f0 * x;
        }
        for m in 0..len {
            let f = seg.factor(last, m, kk) * p.k[p.row(b, m, h, kd) + kk];
            for (s, &vv) in row.iter_mut().zip(&p.v[p.row(b, m, h, vd)..][..vd]) {
                *s = *s + f * vv;
            }
        }
    }
    HeadOutputs { y, h_final }
}
