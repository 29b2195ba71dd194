//! Helpers of the f16/bf16 and decode tests (tests/gpu_dtypes.rs,
//! tests/gpu_decode.rs, and the kernel emulator's tests/cpu_kernels_emu.rs,
//! tests/cpu_attention.rs, tests/cpu_chunked_emu.rs).
//!
//! ## The bounds
//!
//! The kernel sees q, k, v rounded to the element type T; the f64 reference
//! is run on exactly those rounded values (and on the same f32 log_gate and
//! h0), so input rounding is not an error here. What remains:
//!
//! - the f32 computation: relative L2 ≤ [`REL_F32`] = 1e-4 and max-abs ≤
//!   [`ABS_FRAC_F32`] = 1e-3 · max|ref|, the bounds of tests/gpu_recurrent.rs;
//!   they apply unchanged to h_final, which stays f32 for every T;
//! - the rounding of y to T, once, at the end: round-to-nearest gives
//!   |round(x) − x| ≤ u|x| element by element (u = 2^−11 ≈ 4.9e-4 for f16,
//!   2^−8 ≈ 3.9e-3 for bf16; normal range, and f16 subnormals below 6.1e-5
//!   add at most 2^−25 absolute, negligible against these norms), hence
//!   ‖round(y32) − y32‖ ≤ u‖y32‖ ≤ u(1 + 1e-4)‖ref‖.
//!
//! By the triangle inequality y's relative L2 error is ≤ 1e-4 + u(1 + 1e-4):
//! 5.9e-4 for f16, 4.0e-3 for bf16 (max-abs likewise ≤ (1e-3 + u(1 + 1e-3)) ·
//! max|ref|). These are worst-case bounds; uniformly distributed rounding
//! errors give about u/√3 in practice.

#![allow(dead_code)]

use gateloop::cuda::chunk::ChunkPrecision;
use gateloop::cuda::{Dtype, Element};
use gateloop::testing::OwnedProblem;
use gateloop::{Dims, ErrorStats};

/// Relative L2 bound of the f32 computation (tests/gpu_recurrent.rs).
pub const REL_F32: f64 = 1e-4;
/// Max-abs bound of the f32 computation, as a fraction of max|ref|.
pub const ABS_FRAC_F32: f64 = 1e-3;

/// (relative L2, max-abs fraction) bounds of y for element type `t` (module doc).
pub fn y_bounds(t: Dtype) -> (f64, f64) {
    let u = if t == Dtype::F32 { 0.0 } else { t.unit_roundoff() };
    (REL_F32 + u * (1.0 + REL_F32), ABS_FRAC_F32 + u * (1.0 + ABS_FRAC_F32))
}

/// Whether `y`'s errors are within the bounds of `t`.
pub fn y_ok(t: Dtype, e: &ErrorStats) -> bool {
    let (rel, abs) = y_bounds(t);
    e.within(rel, abs)
}

/// Whether a state's errors are within the f32 bounds, the relative one
/// scaled by `rel_scale` (1 up to L = 4096; see `common::rel_at_len`).
pub fn state_ok(e: &ErrorStats, rel_scale: f64) -> bool {
    e.within(REL_F32 * rel_scale, ABS_FRAC_F32)
}

/// `p` with every input rounded to f32, then q, k, v rounded on to `T`
/// (log_gate and h0 stay f32): exactly what a `T` kernel sees, in f64.
pub fn rounded_to<T: Element>(p: &OwnedProblem<f64>) -> OwnedProblem<f64> {
    p.rounded_to_f32().map_qkv(|x| f64::from(T::from_f32(x as f32).to_f32()))
}

/// Writes `[B, n, H, dim]` `piece` into rows [t0, t0 + n) of `[B, L, H, dim]` `x`.
pub fn put_window<X: Copy>(x: &mut [X], d: &Dims, dim: usize, t0: usize, n: usize, piece: &[X]) {
    let row = d.heads * dim;
    for b in 0..d.batch {
        let start = (b * d.len + t0) * row;
        x[start..start + n * row].copy_from_slice(&piece[b * n * row..(b + 1) * n * row]);
    }
}

/// Widens a `T` download to f64.
pub fn widen<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&x| x.to_f32() as f64).collect()
}

/// Asserts that `y` (a `T` kernel's output, widened to f32) is `y32` (the
/// f32 kernel's output on the same inputs) rounded to `T`, bit for bit,
/// element by element; else panics naming `label`, how many elements differ
/// and the first one.
pub fn assert_is_rounded_f32<T: Element>(label: &str, y: &[f32], y32: &[f32]) {
    assert_eq!(y.len(), y32.len(), "{label}");
    let rounded = |x: f32| T::from_f32(x).to_f32();
    let differ = |i: &usize| y[*i].to_bits() != rounded(y32[*i]).to_bits();
    if let Some(first) = (0..y.len()).find(differ) {
        let n = (0..y.len()).filter(differ).count();
        panic!(
            "{label}: y differs from the f32 kernel's rounded to {:?} at {n} elements, first y[{first}] = {:e} vs {:e}",
            T::DTYPE,
            y[first],
            rounded(y32[first])
        );
    }
}

/// (relative L2, max-abs fraction) bounds of y and of h_final of the chunked
/// tensor-core kernels (tests/gpu_chunked.rs, tests/cpu_chunked_emu.rs): Exact
/// as the other f32 kernels; Fast one TF32/f16/bf16 product per operand pair.
pub fn chunk_bounds(t: Dtype, precision: ChunkPrecision) -> ((f64, f64), (f64, f64)) {
    match precision {
        ChunkPrecision::Exact => (y_bounds(t), (1e-4, 1e-3)),
        ChunkPrecision::Fast => {
            let u_op = if t == Dtype::Bf16 { 2f64.powi(-8) } else { 2f64.powi(-11) };
            let u_out = if t == Dtype::F32 { 0.0 } else { t.unit_roundoff() };
            let state = (4.0 * u_op, 16.0 * u_op);
            ((state.0 + u_out * (1.0 + state.0), state.1 + u_out * (1.0 + state.1)), state)
        }
    }
}
