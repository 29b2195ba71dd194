//! The backward pass: gradients of a scalar loss through the operator, as the
//! adjoint recurrence run backwards in time. Generic over the real type like
//! the forward; in `f64` it is the oracle for every backward kernel.
//!
//! ## The convention for complex tensors
//!
//! A complex input z = x + i·y is treated as the pair of real numbers (x, y),
//! exactly as when differentiating through a real view of the buffer. Its
//! gradient is returned as the complex number
//!
//! ```text
//! ∂L/∂z := ∂L/∂x + i·∂L/∂y        (dlog_gate.re = ∂L/∂Re g, dlog_gate.im = ∂L/∂Im g)
//! ```
//!
//! which is 2·∂L/∂z̄ in Wirtinger terms. (Differentiating with respect to a
//! real `[..., 2]` view gives these numbers directly; `jax.grad` on a complex
//! input returns their complex conjugate instead.) The upstream gradient of
//! the complex output `h_final` is read the same way: `dh_final.re` is
//! ∂L/∂Re h_final and `dh_final.im` is ∂L/∂Im h_final, so the loss whose
//! gradient [`backward`] returns is, for any upstream (dy, dh_final),
//!
//! ```text
//! L = Σ dy ⊙ y + Σ (dh_final.re ⊙ Re h_final + dh_final.im ⊙ Im h_final).
//! ```
//!
//! Two rules follow from the definition, with G = ∂L/∂w in this convention:
//!
//! - **product** w = c·z (c constant): ∂L/∂z = conj(c)·G. (Write out
//!   Re w = c_r x − c_i y, Im w = c_r y + c_i x and collect.) More generally,
//!   for holomorphic w = f(z): ∂L/∂z = conj(f′(z))·G.
//! - **real part** w = Re z: ∂L/∂z = G (purely real); and a real input r that
//!   enters as the complex r + 0i receives Re G.
//!
//! ## The derivation, per (b, h)
//!
//! Forward: h_t = a_t ⊙ h_{t−1} + k_tᵀ v_t with a_t = exp(g_t) broadcast along
//! V, y_t\[v\] = Σ_k q_t\[k\]·Re h_t\[k, v\], h_{−1} = h0 (or 0), h_final = h_{L−1}.
//!
//! Let δ_t = ∂L/∂h_t (complex K×V, this convention) be the *total* gradient of
//! h_t, through y_t, through h_{t+1} and (for t = L−1) through h_final. By the
//! two rules, h_{t+1} = a_{t+1} h_t + … contributes conj(a_{t+1}) ⊙ δ_{t+1}, and
//! y_t contributes the real q_t\[k\]·dy_t\[v\]:
//!
//! ```text
//! δ_{L−1} = dh_final + q_{L−1}ᵀ dy_{L−1}
//! δ_t     = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t                  (t < L−1)
//! ```
//!
//! the same recurrence as the forward, backwards in time, with conjugated
//! gates. Then, for each t:
//!
//! ```text
//! dq_t[k]   = Σ_v dy_t[v] · Re h_t[k, v]
//! dk_t[k]   = Σ_v Re δ_t[k, v] · v_t[v]          (k_tᵀ v_t enters as a real matrix)
//! dv_t[v]   = Σ_k Re δ_t[k, v] · k_t[k]
//! ∂L/∂a_t[k] = Σ_v conj(h_{t−1}[k, v]) · δ_t[k, v]              (product rule, c = h_{t−1})
//! dg_t[k]   = conj(a_t[k]) · ∂L/∂a_t[k]                          (holomorphic rule, exp′ = exp)
//!           = Σ_v conj(a_t[k] h_{t−1}[k, v]) · δ_t[k, v]
//! dh0       = conj(a_0) ⊙ δ_0
//! ```
//!
//! so dg.re = ∂L/∂Re g and dg.im = ∂L/∂Im g. With a per-head gate
//! (`[B, L, H, 1]`) the one g_t multiplies all K rows, and its gradient is the
//! sum over k of the per-channel expression.
//!
//! **Resets.** Re g = −∞ means a = 0: then h_t = k_tᵀ v_t does not depend on
//! g_t at all (nor on its phase), and the one-sided limit of ∂L/∂Re g as
//! Re g → −∞ is conj(a)·(…) → 0. The gradient of a reset gate is therefore
//! defined as exactly 0 (both parts), and the code writes 0 there without
//! evaluating the product, so no 0·∞ can make a NaN. The reset also stops δ:
//! conj(a_t) ⊙ δ_t = 0 flows to h_{t−1} (and to dh0 when t = 0).
//!
//! **|a| = 1.** At Re g = 0 the domain Re g ≤ 0 has a boundary; the formula is
//! the two-sided derivative of the (analytic) loss, which is what autodiff
//! gives and what a one-sided difference from inside the domain converges to.
//!
//! ## Memory: checkpoints
//!
//! The backward pass needs h_t and h_{t−1} in reverse order. Each head first
//! runs the forward recurrence keeping only the state before every
//! [`CHECKPOINT_EVERY`]-th step, then walks the blocks backwards, recomputing a
//! block's states from its checkpoint (with the same arithmetic as
//! [`super::recurrent`], so the states are bit-identical to the forward's)
//! and running the adjoint recurrence through it. Per head in flight that is
//! (⌈L/64⌉ + 65)·K·V complex numbers instead of L·K·V, at the cost of one
//! extra forward. Heads run in parallel with rayon, as in the forward.
//!
//! ## Inputs
//!
//! `dy` is `[B, L, H, V]`, `dh_final` (optional, zero when absent) is
//! `[B, H, K, V]` complex. The outputs have the layouts of the inputs they
//! differentiate: `dq`, `dk` `[B, L, H, K]`, `dv` `[B, L, H, V]`, `dlog_gate`
//! `[B, L, H, K]` or `[B, L, H, 1]` complex, `dh0` `[B, H, K, V]` complex.

use num_complex::Complex;
use rayon::prelude::*;

use super::head_h0;
use crate::error::InputError;
use crate::problem::{Dims, Problem, Real};

/// The backward pass stores the forward state before every this many steps
/// and recomputes the states in between.
pub const CHECKPOINT_EVERY: usize = 64;

/// Upstream gradients: of the loss with respect to the forward's outputs.
#[derive(Clone, Copy, Debug)]
pub struct GradInputs<'a, T> {
    /// ∂L/∂y, `[B, L, H, V]`.
    pub dy: &'a [T],
    /// ∂L/∂Re h_final + i·∂L/∂Im h_final, `[B, H, K, V]` complex; zero when absent.
    pub dh_final: Option<&'a [Complex<T>]>,
}

impl<'a, T> GradInputs<'a, T> {
    /// Bundles the upstream gradients, checking their lengths against `dims`.
    pub fn new(dims: &Dims, dy: &'a [T], dh_final: Option<&'a [Complex<T>]>) -> Result<Self, InputError> {
        let g = GradInputs { dy, dh_final };
        g.validate(dims)?;
        Ok(g)
    }

    /// Checks the lengths of `dy` and `dh_final` against `dims`.
    pub fn validate(&self, dims: &Dims) -> Result<(), InputError> {
        dims.check_len("dy", dims.v_shape(), self.dy.len())?;
        if let Some(dh) = self.dh_final {
            dims.check_len("dh_final", dims.state_shape(), dh.len())?;
        }
        Ok(())
    }
}

/// Owned gradients of the forward's inputs (layouts as the inputs).
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    /// ∂L/∂q, `[B, L, H, K]`.
    pub dq: Vec<T>,
    /// ∂L/∂k, `[B, L, H, K]`.
    pub dk: Vec<T>,
    /// ∂L/∂v, `[B, L, H, V]`.
    pub dv: Vec<T>,
    /// ∂L/∂Re g + i·∂L/∂Im g, the layout of `log_gate`.
    pub dlog_gate: Vec<Complex<T>>,
    /// ∂L/∂Re h0 + i·∂L/∂Im h0, `[B, H, K, V]`: present when h0 was given.
    pub dh0: Option<Vec<Complex<T>>>,
}

impl<T: Real> Grads<T> {
    /// Zero-filled gradients for `dims`, with a `dh0` buffer if asked.
    pub fn zeros(dims: &Dims, with_dh0: bool) -> Self {
        let zero = Complex::new(T::zero(), T::zero());
        Grads {
            dq: vec![T::zero(); dims.qk_len()],
            dk: vec![T::zero(); dims.qk_len()],
            dv: vec![T::zero(); dims.v_len()],
            dlog_gate: vec![zero; dims.gate_len()],
            dh0: with_dh0.then(|| vec![zero; dims.state_len()]),
        }
    }

    /// Borrows as caller buffers for [`backward_into`].
    pub fn as_mut(&mut self) -> GradsMut<'_, T> {
        GradsMut {
            dq: &mut self.dq,
            dk: &mut self.dk,
            dv: &mut self.dv,
            dlog_gate: &mut self.dlog_gate,
            dh0: self.dh0.as_deref_mut(),
        }
    }
}

/// Caller-owned gradient buffers for [`backward_into`]. Every element is
/// overwritten.
#[derive(Debug)]
pub struct GradsMut<'a, T> {
    /// `[B, L, H, K]`
    pub dq: &'a mut [T],
    /// `[B, L, H, K]`
    pub dk: &'a mut [T],
    /// `[B, L, H, V]`
    pub dv: &'a mut [T],
    /// The layout of `log_gate`, complex.
    pub dlog_gate: &'a mut [Complex<T>],
    /// `[B, H, K, V]` complex. When given without an h0 in the problem it
    /// receives the gradient with respect to the implicit zero initial state;
    /// when absent the gradient of h0 is not written.
    pub dh0: Option<&'a mut [Complex<T>]>,
}

impl<T> GradsMut<'_, T> {
    /// Checks every buffer length against `dims`.
    pub fn validate(&self, dims: &Dims) -> Result<(), InputError> {
        dims.check_len("dq", dims.qk_shape(), self.dq.len())?;
        dims.check_len("dk", dims.qk_shape(), self.dk.len())?;
        dims.check_len("dv", dims.v_shape(), self.dv.len())?;
        dims.check_len("dlog_gate", dims.gate_shape(), self.dlog_gate.len())?;
        if let Some(dh0) = &self.dh0 {
            dims.check_len("dh0", dims.state_shape(), dh0.len())?;
        }
        Ok(())
    }
}

/// Gradients of L = Σ dy ⊙ y + Σ (dh_final.re ⊙ Re h_final + dh_final.im ⊙ Im h_final)
/// with respect to every input, allocating them; `dh0` is `Some` exactly
/// when `p.h0` is. See the module documentation for the formulas.
pub fn backward<T: Real>(
    p: &Problem<'_, T>,
    dy: &[T],
    dh_final: Option<&[Complex<T>]>,
) -> Result<Grads<T>, InputError> {
    allocating(p, dy, dh_final, |g, out| backward_into(p, g, out))
}

/// The allocating form of a `*_into` backward (this module's and every
/// mirror's): validates `p` and the upstream gradients, allocates the
/// gradients (`dh0` exactly when `p.h0` is given) and runs `into` on them.
pub fn allocating<T: Real>(
    p: &Problem<'_, T>,
    dy: &[T],
    dh_final: Option<&[Complex<T>]>,
    into: impl FnOnce(&GradInputs<'_, T>, GradsMut<'_, T>) -> Result<(), InputError>,
) -> Result<Grads<T>, InputError> {
    p.validate()?;
    let g = GradInputs::new(&p.dims, dy, dh_final)?;
    let mut out = Grads::zeros(&p.dims, p.h0.is_some());
    into(&g, out.as_mut())?;
    Ok(out)
}

/// [`backward`] into caller buffers. Validates the problem (lengths and gate
/// domain), the upstream gradients and the output buffers before writing.
pub fn backward_into<T: Real>(
    p: &Problem<'_, T>,
    g: &GradInputs<'_, T>,
    out: GradsMut<'_, T>,
) -> Result<(), InputError> {
    per_head_grads_into(p, g, out, |b, h| head(p, g, b, h))
}

/// Runs `head(b, h)` for every (batch, head) pair in parallel and scatters
/// the per-head gradients into the caller's buffers. Validates the problem
/// (lengths and gate domain), the upstream gradients and the output buffers
/// first.
pub(crate) fn per_head_grads_into<T: Real>(
    p: &Problem<'_, T>,
    g: &GradInputs<'_, T>,
    out: GradsMut<'_, T>,
    head: impl Fn(usize, usize) -> HeadGrads<T> + Sync,
) -> Result<(), InputError> {
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    g.validate(&d)?;
    out.validate(&d)?;
    let heads: Vec<HeadGrads<T>> =
        (0..d.batch * d.heads).into_par_iter().map(|bh| head(bh / d.heads, bh % d.heads)).collect();
    let (kd, vd, gd) = (d.key_dim, d.value_dim, d.gate_dim());
    let kv = kd * vd;
    let GradsMut { dq, dk, dv, dlog_gate, mut dh0 } = out;
    for (bh, hg) in heads.into_iter().enumerate() {
        let (b, h) = (bh / d.heads, bh % d.heads);
        for t in 0..d.len {
            let (ko, vo, go) = (p.row(b, t, h, kd), p.row(b, t, h, vd), p.row(b, t, h, gd));
            dq[ko..ko + kd].copy_from_slice(&hg.dq[t * kd..(t + 1) * kd]);
            dk[ko..ko + kd].copy_from_slice(&hg.dk[t * kd..(t + 1) * kd]);
            dv[vo..vo + vd].copy_from_slice(&hg.dv[t * vd..(t + 1) * vd]);
            dlog_gate[go..go + gd].copy_from_slice(&hg.dg[t * gd..(t + 1) * gd]);
        }
        if let Some(dh0) = dh0.as_deref_mut() {
            dh0[bh * kv..(bh + 1) * kv].copy_from_slice(&hg.dh0);
        }
    }
    Ok(())
}

/// One head's gradients: `[L, K]`, `[L, K]`, `[L, V]`, `[L, gate_dim]`, `[K, V]`.
pub(crate) struct HeadGrads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    pub dg: Vec<Complex<T>>,
    pub dh0: Vec<Complex<T>>,
}

/// One forward step of head (b, h) at time t, in place: exactly the
/// arithmetic of the recurrent reference.
#[inline]
fn step<T: Real>(p: &Problem<'_, T>, b: usize, h: usize, t: usize, state: &mut [Complex<T>]) {
    let (kd, vd) = (p.dims.key_dim, p.dims.value_dim);
    let (ko, vo) = (p.row(b, t, h, kd), p.row(b, t, h, vd));
    let v = &p.v[vo..vo + vd];
    for (kk, row) in state.chunks_exact_mut(vd).enumerate() {
        let a = p.gate(b, t, h, kk).exp();
        let k = p.k[ko + kk];
        for (s, &vv) in row.iter_mut().zip(v) {
            *s = a * *s + Complex::new(k * vv, T::zero());
        }
    }
}

fn head<T: Real>(p: &Problem<'_, T>, g: &GradInputs<'_, T>, b: usize, h: usize) -> HeadGrads<T> {
    let d = p.dims;
    let (kd, vd, len, gd) = (d.key_dim, d.value_dim, d.len, d.gate_dim());
    let kv = kd * vd;
    let zero = Complex::new(T::zero(), T::zero());

    // Forward, keeping the state before steps 0, C, 2C, ….
    let blocks = len.div_ceil(CHECKPOINT_EVERY);
    let mut checkpoints = Vec::with_capacity(blocks * kv);
    let mut state = head_h0(p, b, h);
    for t in 0..len {
        if t % CHECKPOINT_EVERY == 0 {
            checkpoints.extend_from_slice(&state);
        }
        step(p, b, h, t, &mut state);
    }

    // carry = the part of ∂L/∂h_t that arrives from after t: dh_final at
    // t = L−1, then conj(a_{t+1}) ⊙ δ_{t+1}.
    let mut carry = match g.dh_final {
        Some(dh) => dh[(b * d.heads + h) * kv..][..kv].to_vec(),
        None => vec![zero; kv],
    };
    let mut out = HeadGrads {
        dq: vec![T::zero(); len * kd],
        dk: vec![T::zero(); len * kd],
        dv: vec![T::zero(); len * vd],
        dg: vec![zero; len * gd],
        dh0: Vec::new(),
    };
    // states[i] = h_{start−1+i}: the checkpoint, then the block's states.
    let mut states = vec![zero; (CHECKPOINT_EVERY + 1) * kv];
    for block in (0..blocks).rev() {
        let start = block * CHECKPOINT_EVERY;
        let end = (start + CHECKPOINT_EVERY).min(len);
        states[..kv].copy_from_slice(&checkpoints[block * kv..(block + 1) * kv]);
        for t in start..end {
            let i = t - start;
            let (done, rest) = states.split_at_mut((i + 1) * kv);
            rest[..kv].copy_from_slice(&done[i * kv..]);
            step(p, b, h, t, &mut rest[..kv]);
        }
        for t in (start..end).rev() {
            let i = t - start;
            let h_prev = &states[i * kv..(i + 1) * kv];
            let h_cur = &states[(i + 1) * kv..(i + 2) * kv];
            let (ko, vo) = (p.row(b, t, h, kd), p.row(b, t, h, vd));
            let (q, k, v) = (&p.q[ko..ko + kd], &p.k[ko..ko + kd], &p.v[vo..vo + vd]);
            let dy = &g.dy[vo..vo + vd];
            let dv = &mut out.dv[t * vd..(t + 1) * vd];
            for kk in 0..kd {
                let gate = p.gate(b, t, h, kk);
                let a = gate.exp();
                let row = kk * vd..(kk + 1) * vd;
                let (mut dq, mut dk, mut da) = (T::zero(), T::zero(), zero);
                for ((((c, &hp), &hc), (&dyv, &vv)), dvv) in carry[row.clone()]
                    .iter_mut()
                    .zip(&h_prev[row.clone()])
                    .zip(&h_cur[row])
                    .zip(dy.iter().zip(v))
                    .zip(dv.iter_mut())
                {
                    // δ_t = carry + q_t[k]·dy_t (real).
                    let delta = Complex::new(c.re + q[kk] * dyv, c.im);
                    dq = dq + dyv * hc.re;
                    dk = dk + delta.re * vv;
                    *dvv = *dvv + delta.re * k[kk];
                    da = da + hp.conj() * delta;
                    *c = a.conj() * delta;
                }
                out.dq[t * kd + kk] = dq;
                out.dk[t * kd + kk] = dk;
                // A reset (a = 0) has gradient exactly 0: see the module doc.
                if gate.re != T::neg_infinity() {
                    let slot = &mut out.dg[t * gd + if gd == 1 { 0 } else { kk }];
                    *slot = *slot + a.conj() * da;
                }
            }
        }
    }
    out.dh0 = carry; // conj(a_0) ⊙ δ_0
    out
}
