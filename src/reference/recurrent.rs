//! The recurrent mode: h_t = a_t ⊙ h_{t−1} + k_tᵀ v_t, y_t = Re(q_t h_t),
//! one step at a time. This is the definition; the other modes are checked
//! against it.

use num_complex::Complex;

use super::{HeadOutputs, head_h0, per_head_into};
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem, Real};

/// Sequential recurrence, allocating the outputs.
pub fn forward<T: Real>(p: &Problem<'_, T>) -> Result<Outputs<T>, InputError> {
    Outputs::computed(p, forward_into)
}

/// Sequential recurrence into caller buffers.
pub fn forward_into<T: Real>(p: &Problem<'_, T>, out: OutputsMut<'_, T>) -> Result<(), InputError> {
    per_head_into(p, out, |b, h| head(p, b, h))
}

fn head<T: Real>(p: &Problem<'_, T>, b: usize, h: usize) -> HeadOutputs<T> {
    let d = p.dims;
    let (kd, vd) = (d.key_dim, d.value_dim);
    let mut state = head_h0(p, b, h);
    let mut y = vec![T::zero(); d.len * vd];
    for t in 0..d.len {
        let (qo, vo) = (p.row(b, t, h, kd), p.row(b, t, h, vd));
        let v = &p.v[vo..vo + vd];
        let yt = &mut y[t * vd..(t + 1) * vd];
        for kk in 0..kd {
            let a = p.gate(b, t, h, kk).exp();
            let (q, k) = (p.q[qo + kk], p.k[qo + kk]);
            let row = &mut state[kk * vd..(kk + 1) * vd];
            for (s, (&vv, yv)) in row.iter_mut().zip(v.iter().zip(yt.iter_mut())) {
                *s = a * *s + Complex::new(k * vv, T::zero());
                *yv = *yv + q * s.re;
            }
        }
    }
    HeadOutputs { y, h_final: state }
}
