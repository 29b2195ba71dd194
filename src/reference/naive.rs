//! The cumulative-product form of surrogate attention, as in the official
//! repository's notebook: y_n = Re Σ_m q_n (Π_{j≤n} a_j) (Π_{j≤m} a_j)⁻¹ k_mᵀ v_m.
//!
//! Kept only so a test can show it failing: Π a_j underflows to 0 once
//! |Π a_j| drops below the smallest float (L ≈ 100 in f32 for |a| ≈ 0.4),
//! after which 0 · ∞ = NaN. Per-channel gates, no h0; never used elsewhere.

use num_complex::Complex;

use crate::problem::{Problem, Real};

/// `y` of the naive form, `[B, L, H, V]`. Inputs are assumed validated.
pub fn surrogate_attention_cumprod<T: Real>(p: &Problem<'_, T>) -> Vec<T> {
    let d = p.dims;
    let (kd, vd, len) = (d.key_dim, d.value_dim, d.len);
    let mut y = vec![T::zero(); d.v_len()];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let mut cumprod = vec![Complex::new(T::one(), T::zero()); len * kd];
            for kk in 0..kd {
                let mut acc = Complex::new(T::one(), T::zero());
                for t in 0..len {
                    acc = acc * p.gate(b, t, h, kk).exp();
                    cumprod[t * kd + kk] = acc;
                }
            }
            for n in 0..len {
                for m in 0..=n {
                    let score = (0..kd).fold(T::zero(), |s, kk| {
                        let f = cumprod[n * kd + kk] * cumprod[m * kd + kk].inv();
                        s + p.q[p.row(b, n, h, kd) + kk] * p.k[p.row(b, m, h, kd) + kk] * f.re
                    });
                    for vv in 0..vd {
                        let o = p.row(b, n, h, vd) + vv;
                        y[o] = y[o] + score * p.v[p.row(b, m, h, vd) + vv];
                    }
                }
            }
        }
    }
    y
}
