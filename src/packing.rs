//! Variable-length sequences packed into one batch row, as fla's
//! `cu_seqlens`: sequence i occupies steps `cu_seqlens[i] .. cu_seqlens[i + 1]`
//! of a `B = 1` problem.
//!
//! GateLoop needs no kernel of its own for this: a reset gate (Re log_gate =
//! −∞, so a_t = 0) at the first step of every sequence but the first makes
//! h_{t−1} drop out of h_t = a_t ⊙ h_{t−1} + k_tᵀ v_t, so no state crosses a
//! sequence boundary, and every mode (and every backward) computes each
//! sequence as if it ran alone: the same y, and the same dq, dk, dv and
//! dlog_gate, since a sequence's first gate multiplies a zero state there
//! too and so has a zero gradient, as a reset does. Every kernel handles
//! resets exactly (as segment boundaries, never as −∞ − (−∞)), so nothing of
//! one sequence leaks into the next, in any precision (`tests/packing.rs`).
//!
//! [`reset_sequence_starts`] writes those resets into a packed `log_gate`
//! (`[1, L, H, K or 1]`, complex), [`reset_sequence_starts_real`] into a
//! real one (the real-gate kernels' `log_gate`), and
//! [`crate::cuda::packing`] into one on the device. The gates the caller
//! computed for those steps are overwritten (they multiply the state a
//! sequence starts from, which is zero when it runs alone).
//!
//! What resets do not give: per-sequence initial and final states. `h0` is
//! the first sequence's initial state, `h_final` the last sequence's final
//! state (`dh0` and `dh_final` likewise); the states of the others start at
//! zero and are not returned. For a state per sequence (prefilling a batch
//! of prompts, then decoding each; fla's `initial_state` and `final_state`
//! `[N, H, K, V]` with `cu_seqlens`), the recurrent kernel takes the offsets
//! itself: [`crate::cuda::recurrent::forward_varlen_into`] runs every
//! sequence from its own h0 to its own h_final in one launch,
//! [`crate::cuda::recurrent::decode_into`] with one batch row per sequence
//! continues them, and [`crate::cuda::recurrent_grad::backward_varlen_into`]
//! is the backward (every sequence's dh0 from its own dh_final); the chunked
//! kernels too: [`crate::cuda::chunk::forward_varlen_into`] and
//! [`crate::cuda::chunk_grad::backward_varlen_into`] (every sequence's
//! chunks from its first step). On the host, [`forward_varlen`] and [`backward_varlen`]
//! do the same with any mode (the f64 reference, the CPU chunked path, a
//! CUDA host launcher), one run per sequence, views into the packed
//! buffers.
//!
//! ```
//! use gateloop::cpu::chunked::{self, ChunkParams};
//! use gateloop::{Complex, Dims, Problem, compare, packing};
//!
//! # fn main() -> Result<(), gateloop::InputError> {
//! // Two sequences of 100 and 40 steps, 2 heads, K = 8, V = 4, packed.
//! let (lens, cu_seqlens) = ([100, 40], [0, 100, 140]);
//! let dims = |len| Dims::new(1, len, 2, 8, 4);
//! let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (f * i as f32).sin()).collect() };
//! let (d, c) = (dims(140), ChunkParams::default());
//! let (q, k, v) = (wave(d.qk_len(), 0.37), wave(d.qk_len(), 0.71), wave(d.v_len(), 0.13));
//! let mut log_gate: Vec<Complex<f32>> =
//!     (0..d.gate_len()).map(|i| Complex::new(-0.1 * (i % 3) as f32, 0.5)).collect();
//! packing::reset_sequence_starts(&d, &cu_seqlens, &mut log_gate)?;
//! let packed = chunked::forward(&Problem::new(d, &q, &k, &v, &log_gate, None)?, &c)?;
//!
//! // The second sequence alone: the same y, to rounding.
//! let (t0, n) = (lens[0], lens[1]);
//! let rows = |x: &[f32], dim: usize| x[t0 * 2 * dim..(t0 + n) * 2 * dim].to_vec();
//! let g = log_gate[t0 * 2 * 8..(t0 + n) * 2 * 8].to_vec();
//! let (q1, k1, v1) = (rows(&q, 8), rows(&k, 8), rows(&v, 4));
//! let alone = Problem::new(dims(n), &q1, &k1, &v1, &g, None)?;
//! let y = chunked::forward(&alone, &c)?.y;
//! assert!(compare(&packed.y[t0 * 2 * 4..], &y).rel_l2 < 1e-5);
//! # Ok(())
//! # }
//! ```

use num_complex::Complex;

use crate::error::InputError;
use crate::problem::{Dims, Outputs, Problem, Real};
use crate::reference::grad::Grads;

/// Checks `cu_seqlens` against `dims`: a packed problem has one batch row
/// (`dims.batch == 1`), and the offsets start at 0, increase strictly (no
/// empty sequence) and end at `dims.len`. Returns the steps where a
/// sequence other than the first starts.
pub fn sequence_starts<'c>(dims: &Dims, cu_seqlens: &'c [usize]) -> Result<&'c [usize], InputError> {
    dims.validate()?;
    if dims.batch != 1 {
        return Err(InputError::Param {
            name: "batch",
            value: dims.batch.to_string(),
            why: "packed sequences share one batch row (B = 1), as with fla's cu_seqlens",
        });
    }
    let bad = |index: usize, why: &'static str| InputError::Value {
        name: "cu_seqlens",
        index,
        value: cu_seqlens.get(index).map_or_else(|| "missing".into(), |x| x.to_string()),
        why,
    };
    match cu_seqlens {
        [] | [_] => return Err(bad(cu_seqlens.len(), "cu_seqlens needs at least two offsets: 0 and L")),
        [first, ..] if *first != 0 => return Err(bad(0, "the first offset must be 0")),
        [.., last] if *last != dims.len => {
            return Err(bad(cu_seqlens.len() - 1, "the last offset must be L, the packed length"));
        }
        _ => {}
    }
    if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] <= w[0]) {
        return Err(bad(i + 1, "offsets must increase strictly (every sequence has at least one step)"));
    }
    Ok(&cu_seqlens[1..cu_seqlens.len() - 1])
}

/// A batched problem's B rows of L steps read as B packed sequences: the
/// packed dims `[1, B·L, H, *]` (the same buffers, the same memory order)
/// and cu_seqlens 0, L, .., B·L. The recurrent kernels' packed variants
/// (`dispatch::Variant::Packed`, the bench's `recurrent-varlen`) run a
/// batch through their packed launches this way.
pub(crate) fn rows_as_sequences(dims: &Dims) -> (Dims, Vec<usize>) {
    let packed = Dims { batch: 1, len: dims.batch * dims.len, ..*dims };
    (packed, (0..=dims.batch).map(|b| b * dims.len).collect())
}

/// Writes a reset gate (−∞ + 0i) for every head and channel at the first
/// step of every sequence but the first, into a packed complex `log_gate`
/// `[1, L, H, K or 1]`. Validates everything before writing anything.
pub fn reset_sequence_starts<T: Real>(
    dims: &Dims,
    cu_seqlens: &[usize],
    log_gate: &mut [Complex<T>],
) -> Result<(), InputError> {
    let reset = Complex::new(T::neg_infinity(), T::zero());
    write_resets(dims, cu_seqlens, log_gate, reset)
}

/// [`reset_sequence_starts`] for real gates: `log_gate` `[1, L, H, K or 1]`
/// real (the real-gate kernels' layout), −∞ at every start.
pub fn reset_sequence_starts_real<T: Real>(
    dims: &Dims,
    cu_seqlens: &[usize],
    log_gate: &mut [T],
) -> Result<(), InputError> {
    write_resets(dims, cu_seqlens, log_gate, T::neg_infinity())
}

/// The one body of both: `log_gate` holds one `G` a gate.
fn write_resets<G: Copy>(dims: &Dims, cu_seqlens: &[usize], log_gate: &mut [G], reset: G) -> Result<(), InputError> {
    let starts = sequence_starts(dims, cu_seqlens)?;
    dims.check_len("log_gate", dims.gate_shape(), log_gate.len())?;
    let step = gates_per_step(dims);
    for &s in starts {
        log_gate[s * step..(s + 1) * step].fill(reset);
    }
    Ok(())
}

/// The gates of one time step of a one-row problem: H · (K or 1), contiguous
/// in the `[1, L, H, K or 1]` layout.
pub(crate) fn gates_per_step(dims: &Dims) -> usize {
    dims.heads * dims.gate_dim()
}

/// Sequence `i` of a packed problem as a problem of its own: views into
/// `p`'s buffers (no copy), steps `cu_seqlens[i] .. cu_seqlens[i + 1]`,
/// starting from `h0` (`[1, H, K, V]`) or from zero. `p.h0` is not used
/// (a packed problem's initial states are per sequence). `cu_seqlens` must
/// have passed [`sequence_starts`] for `p.dims`.
fn sequence<'a, T: Real>(
    p: &Problem<'a, T>,
    cu_seqlens: &[usize],
    i: usize,
    h0: Option<&'a [Complex<T>]>,
) -> Result<Problem<'a, T>, InputError> {
    let d = &p.dims;
    let (t0, t1) = (cu_seqlens[i], cu_seqlens[i + 1]);
    let (qk, v, g) = (d.heads * d.key_dim, d.heads * d.value_dim, gates_per_step(d));
    let dims = Dims { len: t1 - t0, ..*d };
    Problem::new(
        dims,
        &p.q[t0 * qk..t1 * qk],
        &p.k[t0 * qk..t1 * qk],
        &p.v[t0 * v..t1 * v],
        &p.log_gate[t0 * g..t1 * g],
        h0,
    )
}

/// State `i` of `[N, H, K, V]` states (`state` = H·K·V elements each).
fn nth<C>(states: Option<&[C]>, i: usize, state: usize) -> Option<&[C]> {
    states.map(|s| &s[i * state..(i + 1) * state])
}

/// The checks shared by [`forward_varlen`] and [`backward_varlen`]: `p` is
/// a valid packed problem without an h0 of its own, `cu_seqlens` its
/// offsets, `h0` (when given) N states. Returns N.
pub(crate) fn check_varlen<T: Real>(
    p: &Problem<'_, T>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<T>]>,
) -> Result<usize, InputError> {
    p.validate()?;
    sequence_starts(&p.dims, cu_seqlens)?;
    if p.h0.is_some() {
        return Err(InputError::Param {
            name: "h0",
            value: "in the packed problem".into(),
            why: "packed sequences start from a state each: pass them, [N, H, K, V], as `h0`",
        });
    }
    let n = cu_seqlens.len() - 1;
    let states = Dims { batch: n, ..p.dims };
    if let Some(h0) = h0 {
        states.check_len("h0", states.state_shape(), h0.len())?;
    }
    Ok(n)
}

/// Packed variable-length sequences, each from its own state: every
/// sequence of `p` (`[1, L, H, *]`, no h0 of its own; offsets
/// `cu_seqlens`) run alone by `forward` (any mode's host function: the f64
/// reference, the CPU chunked path, a CUDA `*_host*` launcher), sequence i
/// from `h0[i]` (`[N, H, K, V]`) or from zero. Returns y `[1, L, H, V]`
/// (the sequences' y in order) and h_final `[N, H, K, V]`, each
/// sequence's own. The host twin of
/// [`crate::cuda::recurrent::forward_varlen_into`], which does the same in
/// one launch; unlike resets ([`reset_sequence_starts`]) it returns every
/// sequence's state. Everything is checked before `forward` first runs.
///
/// ```
/// use gateloop::cpu::chunked::{self, ChunkParams};
/// use gateloop::{Complex, Dims, Problem, compare_complex, packing, reference};
///
/// # fn main() -> Result<(), gateloop::InputError> {
/// // Three prompts of 50, 7 and 80 steps, 2 heads, K = 8, V = 4, each with
/// // its own initial state.
/// let (cu_seqlens, d) = ([0, 50, 57, 137], Dims::new(1, 137, 2, 8, 4));
/// let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (f * i as f32).sin()).collect() };
/// let (q, k, v) = (wave(d.qk_len(), 0.37), wave(d.qk_len(), 0.71), wave(d.v_len(), 0.13));
/// let log_gate: Vec<Complex<f32>> = (0..d.gate_len()).map(|i| Complex::new(-0.05 * (i % 4) as f32, 0.3)).collect();
/// let h0: Vec<Complex<f32>> = (0..3 * 2 * 8 * 4).map(|i| Complex::new(0.01 * (i % 7) as f32, -0.02)).collect();
/// let p = Problem::new(d, &q, &k, &v, &log_gate, None)?;
/// let fast = packing::forward_varlen(&p, &cu_seqlens, Some(&h0), |s| chunked::forward(s, &ChunkParams::default()))?;
/// let recurrent = packing::forward_varlen(&p, &cu_seqlens, Some(&h0), reference::recurrent::forward)?;
/// assert_eq!(fast.h_final.len(), 3 * 2 * 8 * 4); // [N, H, K, V]: every prompt's state
/// assert!(compare_complex(&fast.h_final, &recurrent.h_final).rel_l2 < 1e-5);
/// # Ok(())
/// # }
/// ```
pub fn forward_varlen<T: Real, E: From<InputError>>(
    p: &Problem<'_, T>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<T>]>,
    mut forward: impl FnMut(&Problem<'_, T>) -> Result<Outputs<T>, E>,
) -> Result<Outputs<T>, E> {
    let n = check_varlen(p, cu_seqlens, h0)?;
    let state = p.dims.heads * p.dims.key_dim * p.dims.value_dim;
    let mut out = Outputs { y: Vec::with_capacity(p.v.len()), h_final: Vec::with_capacity(n * state) };
    for i in 0..n {
        let o = forward(&sequence(p, cu_seqlens, i, nth(h0, i, state))?)?;
        out.y.extend(o.y);
        out.h_final.extend(o.h_final);
    }
    Ok(out)
}

/// The gradients of [`forward_varlen`]: `dy` `[1, L, H, V]` and
/// `dh_final` (optional) `[N, H, K, V]` split by sequence and each
/// sequence's gradients computed alone by `backward` (any mode's host
/// backward: `dispatch::cpu_grad`, the CPU chunked backward, a CUDA
/// `backward_host*`), sequence i from `h0[i]`. Returns dq, dk, dv, dlog_gate
/// in the packed layout and, when `h0` is given, dh0 `[N, H, K, V]`.
pub fn backward_varlen<T: Real, E: From<InputError>>(
    p: &Problem<'_, T>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<T>]>,
    dy: &[T],
    dh_final: Option<&[Complex<T>]>,
    mut backward: impl FnMut(&Problem<'_, T>, &[T], Option<&[Complex<T>]>) -> Result<Grads<T>, E>,
) -> Result<Grads<T>, E> {
    let n = check_varlen(p, cu_seqlens, h0)?;
    let d = &p.dims;
    d.check_len("dy", d.v_shape(), dy.len())?;
    let states = Dims { batch: n, ..*d };
    if let Some(dh) = dh_final {
        states.check_len("dh_final", states.state_shape(), dh.len())?;
    }
    let (state, v) = (d.heads * d.key_dim * d.value_dim, d.heads * d.value_dim);
    let mut g = Grads {
        dq: Vec::with_capacity(p.q.len()),
        dk: Vec::with_capacity(p.k.len()),
        dv: Vec::with_capacity(p.v.len()),
        dlog_gate: Vec::with_capacity(p.log_gate.len()),
        dh0: h0.map(|_| Vec::with_capacity(n * state)),
    };
    for i in 0..n {
        let (t0, t1) = (cu_seqlens[i], cu_seqlens[i + 1]);
        let gi =
            backward(&sequence(p, cu_seqlens, i, nth(h0, i, state))?, &dy[t0 * v..t1 * v], nth(dh_final, i, state))?;
        g.dq.extend(gi.dq);
        g.dk.extend(gi.dk);
        g.dv.extend(gi.dv);
        g.dlog_gate.extend(gi.dlog_gate);
        if let Some(dh0) = &mut g.dh0 {
            // A backward returns dh0 exactly when its problem has an h0.
            let Some(di) = gi.dh0 else {
                return Err(InputError::Param {
                    name: "backward",
                    value: "no dh0".into(),
                    why: "the backward must return dh0 for a problem with h0",
                }
                .into());
            };
            dh0.extend(di);
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GateLayout;

    #[test]
    fn offsets_are_checked_and_named() {
        let d = Dims::new(1, 10, 2, 3, 4);
        assert_eq!(sequence_starts(&d, &[0, 4, 10]).unwrap(), &[4]);
        assert_eq!(sequence_starts(&d, &[0, 10]).unwrap(), &[] as &[usize]);
        let why = |cu: &[usize]| match sequence_starts(&d, cu) {
            Err(InputError::Value { name: "cu_seqlens", index, why, .. }) => (index, why),
            other => panic!("{cu:?}: {other:?}"),
        };
        assert_eq!(why(&[]).0, 0);
        assert_eq!(why(&[0]).0, 1);
        assert_eq!(why(&[1, 10]), (0, "the first offset must be 0"));
        assert_eq!(why(&[0, 4, 9]).0, 2);
        assert_eq!(why(&[0, 4, 11]).0, 2);
        assert_eq!(why(&[0, 4, 4, 10]), (2, "offsets must increase strictly (every sequence has at least one step)"));
        assert_eq!(why(&[0, 6, 4, 10]).0, 2);
        let batched = Dims::new(2, 10, 2, 3, 4);
        assert!(matches!(sequence_starts(&batched, &[0, 10]), Err(InputError::Param { name: "batch", .. })));
        assert!(matches!(sequence_starts(&Dims::new(1, 0, 1, 1, 1), &[0, 0]), Err(InputError::ZeroDim { .. })));
    }

    #[test]
    fn resets_land_on_every_gate_of_each_start_and_nowhere_else() {
        for gate in [GateLayout::PerChannel, GateLayout::PerHead] {
            let d = Dims::new(1, 7, 2, 3, 4).with_gate(gate);
            let fill = Complex::new(-0.5f64, 2.0);
            let mut g = vec![fill; d.gate_len()];
            reset_sequence_starts(&d, &[0, 1, 5, 7], &mut g).unwrap();
            let per_step = 2 * d.gate_dim();
            for (i, z) in g.iter().enumerate() {
                let t = i / per_step;
                let want = if t == 1 || t == 5 { Complex::new(f64::NEG_INFINITY, 0.0) } else { fill };
                assert_eq!(*z, want, "gate {i} (step {t})");
            }
            let mut r = vec![-0.5f32; d.gate_len()];
            reset_sequence_starts_real(&d, &[0, 1, 5, 7], &mut r).unwrap();
            assert_eq!(r.iter().filter(|x| **x == f32::NEG_INFINITY).count(), 2 * per_step);
            // A wrong length is refused before anything is written.
            let mut short = vec![fill; d.gate_len() - 1];
            assert!(matches!(
                reset_sequence_starts(&d, &[0, 1, 7], &mut short),
                Err(InputError::Length { name: "log_gate", .. })
            ));
            assert!(short.iter().all(|z| *z == fill));
        }
    }
}
