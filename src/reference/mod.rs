//! The reference implementations of the three modes of the paper, generic over
//! the real type. In `f64` they are the oracle every kernel is checked against;
//! in `f32` they are plain (slow) f32 implementations of the same formulas.
//!
//! - [`recurrent`]: the sequential recurrence, the definition itself.
//! - [`scan`]: the paper's parallel mode, a work-efficient (Blelloch) tree scan
//!   with the operator (a_i, b_i)•(a_j, b_j) = (a_j a_i, a_j b_i + b_j).
//! - [`attention`]: masked surrogate attention, O(L²), in anchored log space.
//! - [`naive`]: the cumprod form of the official notebook, kept only to show
//!   that it fails (it is never used to compute anything).

pub mod attention;
pub mod grad;
pub mod naive;
pub mod recurrent;
pub mod scan;

use num_complex::Complex;
use rayon::prelude::*;

use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem, Real};

/// One head's outputs: `y` as `[L, V]` and the final state as `[K, V]`.
pub(crate) struct HeadOutputs<T> {
    pub y: Vec<T>,
    pub h_final: Vec<Complex<T>>,
}

/// Runs `head(b, h)` for every (batch, head) pair in parallel and scatters
/// the per-head results into the `[B, L, H, V]` / `[B, H, K, V]` outputs.
/// Validates the problem (lengths and gate domain) and the output buffers first.
pub(crate) fn per_head_into<T: Real>(
    p: &Problem<'_, T>,
    out: OutputsMut<'_, T>,
    head: impl Fn(usize, usize) -> HeadOutputs<T> + Sync,
) -> Result<(), InputError> {
    p.validate()?;
    p.check_gate()?;
    out.validate(&p.dims)?;
    let d = p.dims;
    let heads: Vec<HeadOutputs<T>> =
        (0..d.batch * d.heads).into_par_iter().map(|bh| head(bh / d.heads, bh % d.heads)).collect();
    let kv = d.key_dim * d.value_dim;
    for (bh, ho) in heads.into_iter().enumerate() {
        let (b, h) = (bh / d.heads, bh % d.heads);
        for t in 0..d.len {
            let dst = p.row(b, t, h, d.value_dim);
            out.y[dst..dst + d.value_dim].copy_from_slice(&ho.y[t * d.value_dim..(t + 1) * d.value_dim]);
        }
        out.h_final[bh * kv..(bh + 1) * kv].copy_from_slice(&ho.h_final);
    }
    Ok(())
}

/// The initial state of head (b, h) as `[K, V]` (zeros without h0).
pub(crate) fn head_h0<T: Real>(p: &Problem<'_, T>, b: usize, h: usize) -> Vec<Complex<T>> {
    let kv = p.dims.key_dim * p.dims.value_dim;
    match p.h0 {
        Some(h0) => {
            let o = (b * p.dims.heads + h) * kv;
            h0[o..o + kv].to_vec()
        }
        None => vec![Complex::new(T::zero(), T::zero()); kv],
    }
}

/// The three modes of the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefMode {
    /// [`recurrent`]: the sequential loop, the oracle.
    Recurrent,
    /// [`scan`]: the paper's parallel associative scan.
    Scan,
    /// [`attention`]: masked surrogate attention, O(L²).
    Attention,
}

/// Runs one reference mode, allocating the outputs.
pub fn forward<T: Real>(mode: RefMode, p: &Problem<'_, T>) -> Result<Outputs<T>, InputError> {
    Outputs::computed(p, |p, out| forward_into(mode, p, out))
}

/// Runs one reference mode into caller buffers.
pub fn forward_into<T: Real>(mode: RefMode, p: &Problem<'_, T>, out: OutputsMut<'_, T>) -> Result<(), InputError> {
    match mode {
        RefMode::Recurrent => recurrent::forward_into(p, out),
        RefMode::Scan => scan::forward_into(p, out),
        RefMode::Attention => attention::forward_into(p, out),
    }
}
