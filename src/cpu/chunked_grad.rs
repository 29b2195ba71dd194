//! The chunked f32 CPU backward: the gradients of the chunked forward
//! ([`super::chunked`]), organised as the launches a GPU chunked backward
//! kernel would make, with the forward's chunks, anchors, masks and f32
//! arithmetic (it reuses the forward's chunk-local machinery rather than a
//! copy of it). The f64 oracle is [`crate::reference::grad`], whose module doc
//! fixes the convention: a complex input z = x + iy gets ∂L/∂x + i·∂L/∂y, and
//! the loss is L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final).
//!
//! # Example
//!
//! Every gradient of a problem with an initial state, against the f64
//! adjoint recurrence on the same values:
//!
//! ```
//! use gateloop::cpu::{chunked::ChunkParams, chunked_grad};
//! use gateloop::{Complex, Dims, Problem, compare, compare_complex, reference};
//!
//! # fn main() -> Result<(), gateloop::InputError> {
//! let dims = Dims::new(2, 300, 2, 8, 8);
//! let wave = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (0.41 * i as f32 + s).sin()).collect() };
//! let (q, k, v, dy) = (wave(dims.qk_len(), 0.0), wave(dims.qk_len(), 1.0), wave(dims.v_len(), 2.0), wave(dims.v_len(), 3.0));
//! let log_gate: Vec<Complex<f32>> =
//!     (0..dims.gate_len()).map(|i| Complex::new(-0.02 * (i % 5) as f32, (0.3 * i as f32).cos())).collect();
//! let h0: Vec<Complex<f32>> = (0..dims.state_len()).map(|i| Complex::new(0.1, -0.05 * (i % 7) as f32)).collect();
//!
//! let p = Problem::new(dims, &q, &k, &v, &log_gate, Some(&h0))?;
//! let grads = chunked_grad::backward(&p, &dy, None, &ChunkParams::default())?;
//!
//! let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&x| x as f64).collect() };
//! let widec = |x: &[Complex<f32>]| -> Vec<Complex<f64>> { x.iter().map(|z| Complex::new(z.re as f64, z.im as f64)).collect() };
//! let (q64, k64, v64, dy64, g64, h064) = (wide(&q), wide(&k), wide(&v), wide(&dy), widec(&log_gate), widec(&h0));
//! let p64 = Problem::new(dims, &q64, &k64, &v64, &g64, Some(&h064))?;
//! let exact = reference::grad::backward(&p64, &dy64, None)?;
//!
//! assert!(compare(&grads.dq, &exact.dq).within(1e-4, 1e-3));
//! assert!(compare(&grads.dk, &exact.dk).within(1e-4, 1e-3));
//! assert!(compare(&grads.dv, &exact.dv).within(1e-4, 1e-3));
//! assert!(compare_complex(&grads.dlog_gate, &exact.dlog_gate).within(1e-4, 1e-3));
//! assert!(compare_complex(grads.dh0.as_deref().unwrap(), exact.dh0.as_deref().unwrap()).within(1e-4, 1e-3));
//! # Ok(())
//! # }
//! ```
//!
//! # Derivation (per (b, h) and key channel d; the forward's notation)
//!
//! With E(n, m) = exp(G_n − G_m) for m ≤ n (0 across a reset; m = −1 is the
//! chunk start) and the real intra-chunk pair weight `s_nm = dy_n · v_m`
//! (the gradient of the forward's score P_nm), write L = Re Φ with Φ
//! holomorphic in the log gates:
//! Φ = Σ_n Σ_{m ≤ n} E(n, m) q_n k_m s_nm + (h0 and dh_final terms). Then
//!
//! ```text
//! dq̂_n = Σ_{m ≤ n} E(n, m) k_m s_nm + E(n, −1) (S_in dy_n)           dq_n = Re dq̂_n
//! dk̂_m = Σ_{n ≥ m} E(n, m) q_n s_nm + E(last, m) (conj(D) v_m)       dk_m = Re dk̂_m
//! dv_m = Σ_{n ≥ m} P_nm dy_n + Σ_d Re(K̃_m conj(D))                  (K̃_m = k_m E(last, m))
//! ```
//!
//! (sums inside the chunk; `S_in` is the state entering the chunk, `D` the
//! state adjoint arriving at its last step from after it, both K × V complex;
//! `(S dy)[d] = Σ_j S[d, j] dy[j]`). Differentiating Φ with respect to the
//! cumulative log gate G_r gives `w_r = q_r dq̂_r − k_r dk̂_r` (every pair
//! (n, m) contributes +1 at r = n and −1 at r = m), and a step's own log gate
//! g_t enters every G_r with r ≥ t up to the next reset, so
//!
//! ```text
//! dlog_gate_t = conj( Σ_{r = t}^{end of t's segment} w_r )
//! ```
//!
//! (the conj turns ∂Φ/∂g into the (∂L/∂Re g, ∂L/∂Im g) convention). The part
//! of the sum beyond the chunk is a chunk-level term: Σ_{r > last} w_r is the
//! derivative of Φ for a common shift of all later G_r, which scales exactly
//! the pairs that cross the chunk end, i.e. `Σ_j S_out[d, j] conj(D[d, j])`
//! with S_out the state after the chunk (for the last chunk D = dh_final,
//! which covers the dh_final term of Φ). Used as it stands, that term and the
//! D-part of `−k_r dk̂_r` for r ≥ t cancel to the pairs that cross both t and
//! the chunk end, which are tiny when the gates decay strongly, while the
//! cancelling terms are not (the pair m = last has E = 1): the f32 result
//! would carry an absolute error of ε·|S_out||D|. So the D-part is split off:
//! with `u_m = k_m E(last, m) (conj(D) v_m)` (k_m times the D-part dk̂ᴰ_m of
//! dk̂_m) and `w'_r = q_r dq̂_r − k_r (dk̂_r − dk̂ᴰ_r)`, per chunk
//!
//! ```text
//! dlog_gate_t = conj( Σ_{r = t}^{last} w'_r + Σ_{m < t} u_m + Σ_j (A ⊙ S_in)[d, j] conj(D[d, j]) )
//! ```
//!
//! where every term of the last two sums is a pair that crosses t (E(last, m)
//! and A are 0 across a reset already, so they need no segment logic); the
//! first sum is restarted at 0 at a reset step (whose own gradient is exactly
//! 0: f32 `exp(g)` is 0 there, see the forward's doc). The remaining
//! cancellation, pairs (n, m) with both n, m ≥ t inside the chunk, is weighted
//! by |E(n, m)|, and the self pairs (E = 1) are left out of w' altogether
//! (they cancel exactly). A per-head gate sums w', u and the through term
//! over its K channels. The state adjoint follows
//!
//! ```text
//! D(last chunk) = dh_final (or 0),   D(c − 1) = conj(A_c) ⊙ D(c) + W_c,   dh0 = D(−1),
//! W_c = Σ_n conj(q_n E(n, −1)) dy_nᵀ = Q̃_cᵀ dY_c
//! ```
//!
//! the forward's carry S_in(c + 1) = A_c S_in(c) + U_c run backwards with
//! conjugated decays (the adjoint of S_in(c+1) = diag(A_c) S_in(c) + U_c,
//! y_c += Re(Q̃_c S_in(c))); with the forward's `[Re Q̃ | −Im Q̃]` rows,
//! `qeᵀ · dY` is W in planar form directly.
//!
//! # Launches
//!
//! 1. **Chunk-local, per (b, h, chunk), in parallel** (the forward's pass 1
//!    without its intra-chunk output): U_c = K̃ᵀ V and A_c as in the forward,
//!    and W_c = Q̃ᵀ dY (one real GEMM, 2K × C × V). Stored: U, W (planar
//!    2K × V each) and A, per chunk.
//! 2. **Carries, per (b, h, key row), in parallel**: the forward carry turns
//!    U_c into S_in(c) and gives h_final; the adjoint carry (reverse order,
//!    conj(A)) turns W_c into D(c) and gives dh0.
//! 3. **Per (b, h, chunk), in parallel**: recompute the chunk's segmented log
//!    gates, phase tables, K̃ and the scores P exactly as the forward does,
//!    plus `s = dY Vᵀ` (GEMMs over the lower-triangular bands of sub-chunk
//!    rows only); then accumulate the complex "pre-phase" rows
//!    `acc_q[n] = e^{−iθ_n} dq̂_n` and `acc_k[m] = e^{iθ_m} dk̂_m` (planar
//!    `[Re | Im]`, C × 2K):
//!    - off-diagonal sub-chunk pairs with the forward's anchor r (last step
//!      of the key sub-chunk, so |E(n, m)| = |E(n, r)|·|E(r, m)|, both ≤ 1):
//!      `acc_q[n] += |E(n, r)| · (s · k̃)_n` and
//!      `acc_k[m] += |E(r, m)| · conj((sᵀ · [Re q̃ | −Im q̃])_m)`, two real
//!      GEMMs of inner dimension = the sub-chunk or the later rows, on the
//!      forward's anchored rows q̃, k̃ (the unit phases folded in);
//!    - diagonal sub-chunks in the forward's two halves: inside a half
//!      pairwise (m < n): `acc_q[n] += s_nm |E(n, m)| k_m e^{−iθ_m}`,
//!      `acc_k[m] += s_nm |E(n, m)| q_n e^{iθ_n}`, each modulus one `exp` of
//!      a direct difference ≤ 0; the second half's rows against the first
//!      half's as one more anchored block (anchor: the first half's last
//!      step, the forward's rows), as above. The self pair (E(n, n) = 1)
//!      adds the real `k_n s_nn` to dq_n and `q_n s_nn` to dk_n only: its
//!      terms in w_n cancel exactly, so they are left out instead of
//!      cancelled in rounding;
//!    - inter-chunk: `acc_q[n] += |E(n, −1)| (S_in dy_n)` (GEMM dY · S_inᵀ,
//!      inner V) and `acc_d[m] = |E(last, m)| e^{iθ_last} conj(D v_m)`
//!      (GEMM V · Dᵀ, inner V; kept apart from acc_k for the gate);
//!    - dv = Pᵀ dY + [Re K̃ | Im K̃] · [Re D; Im D] (two GEMMs, the first
//!      over the upper-triangular bands of Pᵀ only);
//!    - alongside each of these, its terms of w' and u, with the modulus
//!      multiplied LAST (see "Gate terms" below);
//!    - dq̂ = e^{iθ} acc_q, dk̂ = e^{−iθ} acc_k (one complex multiply per
//!      element), dq = Re dq̂, dk = Re dk̂; then the gate: the exclusive
//!      prefix sum of u from the through term (A ⊙ S_in)·conj(D), plus the
//!      reverse running sum of w'. The very first step without h0
//!      multiplies a zero state, so its gate gradient is written as exactly 0
//!      (the sums would give 0 only up to rounding).
//!
//! # Gate terms: the modulus last
//!
//! w'_r = q_r dq̂_r − k_r dk̂_r is not formed from the accumulators acc_q,
//! acc_k: a gate in f32's subnormal range (Re g ∈ (−103.3, −87.3)) makes
//! |E(n, m)| subnormal, and acc_q\[n\] = Σ_m s_nm |E(n, m)| k_m … then holds a
//! subnormal rounded to a few bits (absolute error ~2^-150 per term) that
//! q_n (and k_m) of ~1e3 scale up: dlog_gate was off by 0.1% to 100% on such
//! gates while dq, dk (which nothing scales afterwards) were exact. So each
//! block adds its own terms to w' (and u), every one as the product of its
//! normal-sized factors first and its modulus factor last
//! (`gate_term`), the way the f32 adjoint recurrence multiplies by a last:
//!
//! ```text
//! diagonal pair (m < n):   t = |E(n, m)|·(Σ_d (s_nm q_n e^{iθ_n}) k_m e^{−iθ_m}),  w'_n += t, w'_m −= t
//! anchored block (r):      w'_n += |E(n, r)|·Σ_d q_n e^{iθ_n} (s k̃)_n,  w'_m −= |E(r, m)|·Σ_d k_m e^{−iθ_m} conj(sᵀ q̃)_m
//! through S_in:            w'_n += |E(n, −1)|·Σ_d q_n e^{iθ_n} (S_in dy_n)
//! through D:               u_m  = |E(last, m)|·Σ_d k_m e^{−iθ_m} e^{iθ_last} conj(D v_m)
//! ```
//!
//! (Σ_d over the gate's channels: all K per head, one per channel). The
//! anchored blocks still round k̃_m = k_m |E(r, m)| e^{−iθ_m} (and q̃) before
//! the GEMM, as the forward does; a term whose both anchored factors are tiny
//! is itself far below the others, and the campaigns and
//! `tests/fuzz_regressions.rs` (`chunked_grad_subnormal_gate_sweep`) find no
//! case it decides. The cost is one complex K-dot per diagonal pair and per
//! row of each block (the pairs already were pairwise), O(C²K) like the rest.
//!
//! Every exponentiated real part is ≤ 0, as in the forward; no cumulative
//! product and no global cumulative log or phase is formed. Memory beyond the
//! inputs and gradients: U/S, W/D (8·B·H·⌈L/C⌉·K·V bytes each, recycled
//! through the forward's buffer pool), the decays, a dh0 sink when dh0 is not
//! asked for, and per-thread scratch of O(C² + C·(K + V) + K·V):
//! O(B·H·(L/C)·K·V), never O(L·K·V).
//!
//! All arithmetic is f32; on x86-64 with AVX2+FMA the hot code is compiled a
//! second time with fused multiply-adds, like the forward.

use num_complex::Complex;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::chunked::Fused;
use super::chunked::{
    Arith, Carry, ChunkParams, Ctx, Isa, MASKED, PhaseRows, Plain, Scratch, SyncPtr, exp_nonpos, gemm, pass2_row, pool,
    row, simd_available,
};
use super::re_diff;
use crate::error::InputError;
use crate::problem::Problem;
use crate::reference::grad::{GradInputs, Grads, GradsMut};

/// Gradients of L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final) with respect to
/// every input, by the chunked f32 algorithm, allocating them; `dh0` is
/// `Some` exactly when `p.h0` is. Same contract as
/// [`crate::reference::grad::backward`].
pub fn backward(
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    params: &ChunkParams,
) -> Result<Grads<f32>, InputError> {
    crate::reference::grad::allocating(p, dy, dh_final, |g, out| backward_into(p, g, params, out))
}

/// [`backward`] into caller buffers (every element is overwritten). Validates
/// the parameters, the problem (lengths and gate domain), the upstream
/// gradients and the output buffers before writing.
pub fn backward_into(
    p: &Problem<'_, f32>,
    g: &GradInputs<'_, f32>,
    params: &ChunkParams,
    out: GradsMut<'_, f32>,
) -> Result<(), InputError> {
    backward_impl(p, g, params, out, simd_available())
}

/// Per-thread buffers of launch 3 (beyond the forward's [`Scratch`]).
struct GradScratch {
    /// `[C][C]` (row stride clen): s_nm = dy_n · v_m.
    ds: Vec<f32>,
    /// `[V][C]`: the chunk's v, transposed.
    vt: Vec<f32>,
    /// `[C][2K]`: e^{−iθ_n} dq̂_n, planar `[Re | Im]`.
    acc_q: Vec<f32>,
    /// `[C][2K]`: e^{iθ_m} dk̂_m, planar `[Re | Im]`.
    acc_k: Vec<f32>,
    /// `[C][2K]`: one GEMM's product.
    prod: Vec<f32>,
    /// `[C][2K]`: e^{iθ_m} dk̂_m^D, the part of dk̂_m through D, planar.
    acc_d: Vec<f32>,
    /// `[V][2K]`: S_in or D transposed.
    state_t: Vec<f32>,
    /// `[C][V]`: dv of the chunk.
    dv: Vec<f32>,
    /// `[gd]`: moduli times s_nm of one pair.
    wpair: Vec<f32>,
    /// `[gd]`: the moduli |E| of one pair (or row), applied last to a gate term.
    wmod: Vec<f32>,
    /// `[gd]`: one pair's (or row's) gate term.
    gterm: Vec<Complex<f32>>,
    /// `[C][gd]`: w_n, then the gate gradient.
    wg: Vec<Complex<f32>>,
    /// `[C][gd]`: u_n = k_n dk̂_n^D, then its exclusive prefix sums plus the
    /// term through the whole chunk.
    ug: Vec<Complex<f32>>,
    /// `[gd]`: the chunk decay A, then a running sum.
    run: Vec<Complex<f32>>,
    /// `[gd]`: Σ_j S_in conj(D) per gate channel.
    through: Vec<Complex<f32>>,
}

impl GradScratch {
    fn new(ctx: &Ctx<'_>) -> Self {
        let (c, k, v, g) = (ctx.chunk, ctx.kd, ctx.vd, ctx.gd);
        let zero = Complex::new(0.0, 0.0);
        GradScratch {
            ds: vec![0.0; c * c],
            vt: vec![0.0; v * c],
            acc_q: vec![0.0; c * 2 * k],
            acc_k: vec![0.0; c * 2 * k],
            prod: vec![0.0; c * 2 * k],
            acc_d: vec![0.0; c * 2 * k],
            state_t: vec![0.0; v * 2 * k],
            dv: vec![0.0; c * v],
            wpair: vec![0.0; g],
            wmod: vec![0.0; g],
            gterm: vec![zero; g],
            wg: vec![zero; c * g],
            ug: vec![zero; c * g],
            run: vec![zero; g],
            through: vec![zero; g],
        }
    }
}

/// Where launch 3 writes: the gradient buffers (`dlog_gate` as interleaved
/// reals), shared by tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct GradPtrs {
    dq: SyncPtr,
    dk: SyncPtr,
    dv: SyncPtr,
    dg: SyncPtr,
}

/// `a_re += w ⊙ x_re`, `a_im += sign · w ⊙ x_im` over a complex K-vector in
/// planar halves (w broadcast when it has one element, i.e. per head): adds
/// w·x, or w·conj(x) with `sign = −1`.
#[inline(always)]
fn add_scaled<F: Arith>(w: &[f32], x_re: &[f32], x_im: &[f32], a_re: &mut [f32], a_im: &mut [f32], sign: f32) {
    let kd = x_re.len();
    let (x_im, a_re, a_im) = (&x_im[..kd], &mut a_re[..kd], &mut a_im[..kd]);
    if w.len() == 1 {
        let (w, ws) = (w[0], sign * w[0]);
        for (((a, b), &x), &y) in a_re.iter_mut().zip(a_im.iter_mut()).zip(x_re).zip(x_im) {
            *a = F::fma(w, x, *a);
            *b = F::fma(ws, y, *b);
        }
    } else {
        for ((((a, b), &x), &y), &w) in a_re.iter_mut().zip(a_im.iter_mut()).zip(x_re).zip(x_im).zip(&w[..kd]) {
            *a = F::fma(w, x, *a);
            *b = F::fma(sign * w, y, *b);
        }
    }
}

/// [`add_scaled`] on planar rows `[Re | Im]` of length 2K (`acc` may be longer).
#[inline(always)]
fn add_scaled_row<F: Arith>(w: &[f32], x: &[f32], acc: &mut [f32], sign: f32) {
    let kd = x.len() / 2;
    let (x_re, x_im) = x.split_at(kd);
    let (a_re, a_im) = acc[..2 * kd].split_at_mut(kd);
    add_scaled::<F>(w, x_re, x_im, a_re, a_im, sign);
}

/// One row's or pair's term of the gate gradient, its modulus multiplied LAST:
/// `out[ch] = w[ch] · Σ_{d ∈ ch} (scale·(ac_d + i·sa·as_d))(xr_d + i·sx·xi_d)`
/// (ch = d, or 0 for a per-head gate; `sa`, `sx` = ±1 pick a conjugate). The
/// normal-sized factors (q, k, s_nm, the state products) multiply first, so
/// a modulus |E| in f32's subnormal range rounds the finished term once
/// (absolute error ≤ 2^-150 per component) instead of rounding a small
/// intermediate to a few bits that q and k (≈ 1e3 each) then scale up. For
/// the same reason `scale` (a pair's s_nm) multiplies the `a` side (q e^{iθ})
/// before the `x` side (k e^{−iθ}): a subnormal q times a small k formed
/// first would sit deep in the subnormal range (1e-42: three digits) before
/// s_nm ≈ 5e3 scaled its rounding up (fuzz seed 2028 case 74927:
/// dlog_gate off by 4e-4; the kernels form (s_nm q_n) k_m, as here).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gate_term<F: Arith>(
    ac: &[f32],
    as_: &[f32],
    sa: f32,
    xr: &[f32],
    xi: &[f32],
    sx: f32,
    scale: f32,
    w: &[f32],
    out: &mut [Complex<f32>],
) {
    let kd = ac.len();
    let (as_, xr, xi) = (&as_[..kd], &xr[..kd], &xi[..kd]);
    let term = |d: usize| {
        let (a_re, a_im, x_re, x_im) = (scale * ac[d], scale * (sa * as_[d]), xr[d], sx * xi[d]);
        (F::fma(a_re, x_re, -(a_im * x_im)), F::fma(a_re, x_im, a_im * x_re))
    };
    if w.len() == 1 {
        // Eight lanes at a time (a shape the vectorizer turns into SIMD), as `lane_sum`.
        let (mut re, mut im) = ([0f32; 8], [0f32; 8]);
        let body = kd - kd % 8;
        for d0 in (0..body).step_by(8) {
            for l in 0..8 {
                let (tr, ti) = term(d0 + l);
                re[l] += tr;
                im[l] += ti;
            }
        }
        let (mut tail_re, mut tail_im) = (0f32, 0f32);
        for d in body..kd {
            let (tr, ti) = term(d);
            tail_re += tr;
            tail_im += ti;
        }
        let fold = |x: [f32; 8], tail: f32| ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])) + tail;
        let (re, im) = (fold(re, tail_re), fold(im, tail_im));
        out[0] = Complex::new(w[0] * re, w[0] * im);
    } else {
        for (d, (o, &w)) in out[..kd].iter_mut().zip(&w[..kd]).enumerate() {
            let (tr, ti) = term(d);
            *o = Complex::new(w * tr, w * ti);
        }
    }
}

/// `acc[ch] += sign · t[ch]` over one gate row.
#[inline(always)]
fn add_gate_row(t: &[Complex<f32>], acc: &mut [Complex<f32>], sign: f32) {
    for (a, &t) in acc.iter_mut().zip(t) {
        *a += t * sign;
    }
}

/// Copies `src` to the elements `off..off + src.len()` of the buffer behind `dst`.
///
/// # Safety
/// The range lies inside that buffer, which outlives the call, and no other
/// thread reads or writes it during the call.
#[inline(always)]
unsafe fn write_rows(dst: SyncPtr, off: usize, src: &[f32]) {
    // SAFETY: the caller guarantees the range is in bounds and exclusive.
    unsafe { std::slice::from_raw_parts_mut(dst.get().add(off), src.len()) }.copy_from_slice(src);
}

/// Launch 1 for chunk (bh, c): U_c into `u`, A_c into `decay`, and
/// W_c = Q̃ᵀ dY (planar 2K × V) into `w`, with `qe` (clen × 2K) as scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn launch1_chunk<F: Arith>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    qe: &mut [f32],
    dy: &[f32],
    bh: usize,
    c: usize,
    u: &mut [f32],
    w: &mut [f32],
    decay: &mut [Complex<f32>],
) {
    let (b, h, t0, clen) = ctx.chunk_of(bh, c);
    let (kd, vd, gd) = (ctx.kd, ctx.vd, ctx.gd);
    let (k2, vs) = (2 * kd, ctx.heads * vd);
    let p = ctx.p;
    let v = &p.v[p.row(b, t0, h, vd)..];
    let dyc = &dy[p.row(b, t0, h, vd)..];
    let r = s.load_chunk::<F>(ctx, b, h, t0, clen);
    s.chunk_keys::<F>(kd, gd, clen, &r);
    gemm::<F>(k2, vd, clen, &s.wide, 1, k2, v, vs, u, vd, false, false);
    s.chunk_decay::<F>(gd, clen, decay);
    s.inter_queries::<F>(kd, gd, clen, &r, qe);
    // W = [Re Q̃ | −Im Q̃]ᵀ · dY = [Re W; Im W] with W = Σ_n conj(Q̃_n) dy_nᵀ.
    gemm::<F>(k2, vd, clen, qe, 1, k2, dyc, vs, w, vd, false, false);
    s.restore(r);
}

/// One anchored block, keys `s0..s1` against queries `s1..e` (anchored rows
/// in `s`, see `Scratch::intra_scores`; an off-diagonal key sub-chunk against
/// every later row, or a diagonal sub-chunk's first half against its second):
/// `acc_q[n] += |E(n, r)| Σ_m s_nm k̃_m` for the query rows n,
/// `acc_k[m] += |E(r, m)| conj(Σ_n s_nm [Re q̃_n | −Im q̃_n])`,
/// and their gate terms `wg[n] += |E(n, r)|·(q_n e^{iθ_n} · (s k̃)_n)`,
/// `wg[m] −= |E(r, m)|·(k_m e^{−iθ_m} · conj(sᵀ q̃)_m)` (the part of
/// w_r = q_r dq̂_r − k_r dk̂_r from this block, the modulus applied last).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn anchored_block<F: Arith>(
    s: &Scratch,
    r: &PhaseRows,
    kd: usize,
    gd: usize,
    clen: usize,
    s0: usize,
    s1: usize,
    e: usize,
    ds: &[f32],
    acc_q: &mut [f32],
    acc_k: &mut [f32],
    prod: &mut [f32],
    wg: &mut [Complex<f32>],
    gterm: &mut [Complex<f32>],
) {
    let k2 = 2 * kd;
    let (rows, cols) = (e - s1, s1 - s0);
    let block = &ds[s1 * clen + s0..];
    gemm::<F>(rows, k2, cols, block, clen, 1, &s.ka, k2, prod, k2, false, false);
    for i in 0..rows {
        let n = s1 + i;
        let (wq, x) = (&s.wq[i * gd..(i + 1) * gd], &prod[i * k2..(i + 1) * k2]);
        add_scaled_row::<F>(wq, x, &mut acc_q[n * k2..], 1.0);
        let (x_re, x_im) = x.split_at(kd);
        gate_term::<F>(row(&r.qc, n, kd), row(&r.qs, n, kd), 1.0, x_re, x_im, 1.0, 1.0, wq, gterm);
        add_gate_row(gterm, &mut wg[n * gd..(n + 1) * gd], 1.0);
    }
    // sᵀ of the block: A(i, p) = ds[(s1 + p)·clen + s0 + i].
    gemm::<F>(cols, k2, rows, block, 1, clen, &s.qa, k2, prod, k2, false, false);
    for i in 0..cols {
        let m = s0 + i;
        let (wk, y) = (&s.wk[i * gd..(i + 1) * gd], &prod[i * k2..(i + 1) * k2]);
        add_scaled_row::<F>(wk, y, &mut acc_k[m * k2..], -1.0);
        let (y_re, y_im) = y.split_at(kd);
        gate_term::<F>(row(&r.kc, m, kd), row(&r.ks, m, kd), -1.0, y_re, y_im, -1.0, 1.0, wk, gterm);
        add_gate_row(gterm, &mut wg[m * gd..(m + 1) * gd], -1.0);
    }
}

/// The diagonal sub-chunks' pairs, pairwise (m < n in one half of a
/// sub-chunk, the halves of [`Scratch::intra_scores`]; the block between the
/// halves is formed by `anchored_block`):
/// `acc_q[n] += s_nm |E(n, m)| (kc − i ks)_m`, `acc_k[m] += s_nm |E(n, m)| (qc + i qs)_n`,
/// and the pair's gate term t = |E(n, m)|·(s_nm Σ_d (qc + i qs)_n (kc − i ks)_m)
/// (the modulus last) as `wg[n] += t`, `wg[m] −= t`.
/// The pair (n, n) (E = 1, real) is left out: it adds the real `k_n s_nn` to
/// dq_n and `q_n s_nn` to dk_n, which the caller adds to the real parts, and
/// it cancels exactly from w_n = q_n dq̂_n − k_n dk̂_n, so it is kept out of w
/// rather than cancelled in rounding.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn diagonal_blocks<F: Arith>(
    s: &Scratch,
    r: &PhaseRows,
    ctx: &Ctx<'_>,
    clen: usize,
    ds: &[f32],
    acc_q: &mut [f32],
    acc_k: &mut [f32],
    gs_pair: (&mut [f32], &mut [f32], &mut [Complex<f32>]),
    wg: &mut [Complex<f32>],
) {
    let (kd, gd, sub) = (ctx.kd, ctx.gd, ctx.sub);
    let (wpair, wmod, gterm) = gs_pair;
    let (wpair, wmod, gterm) = (&mut wpair[..gd], &mut wmod[..gd], &mut gterm[..gd]);
    let k2 = 2 * kd;
    let mut s0 = 0;
    while s0 < clen {
        let s1 = (s0 + sub).min(clen);
        let h1 = (s0 + (sub / 2).max(1)).min(s1);
        for n in s0..s1 {
            let (n_re, n_lo, n_rst) = (row(&s.gre, n, gd), row(&s.gre_lo, n, gd), &s.rst[n * gd..(n + 1) * gd]);
            let (qcn, qsn) = (row(&r.qc, n, kd), row(&r.qs, n, kd));
            for m in (if n < h1 { s0 } else { h1 })..n {
                let x = ds[n * clen + m];
                let (m_re, m_lo) = (row(&s.gre, m, gd), row(&s.gre_lo, m, gd));
                let pairs = n_re.iter().zip(n_lo).zip(m_re.iter().zip(m_lo));
                for (((w, e), ((&a, &al), (&b, &bl))), &rn) in
                    wpair.iter_mut().zip(wmod.iter_mut()).zip(pairs).zip(n_rst)
                {
                    *e = exp_nonpos::<F>(if rn <= m as i32 { re_diff(a, al, b, bl) } else { MASKED });
                    *w = x * *e;
                }
                let (kcm, ksm) = (row(&r.kc, m, kd), row(&r.ks, m, kd));
                let (q_re, q_im) = acc_q[n * k2..(n + 1) * k2].split_at_mut(kd);
                add_scaled::<F>(wpair, kcm, ksm, q_re, q_im, -1.0);
                let (k_re, k_im) = acc_k[m * k2..(m + 1) * k2].split_at_mut(kd);
                add_scaled::<F>(wpair, qcn, qsn, k_re, k_im, 1.0);
                gate_term::<F>(qcn, qsn, 1.0, kcm, ksm, -1.0, x, wmod, gterm);
                add_gate_row(gterm, &mut wg[n * gd..(n + 1) * gd], 1.0);
                add_gate_row(gterm, &mut wg[m * gd..(m + 1) * gd], -1.0);
            }
        }
        s0 = s1;
    }
}

/// `out[j·2K + i] = x[i·V + j]`: a planar 2K × V state as V × 2K.
#[inline(always)]
fn transpose(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
}

/// Launch 3 for chunk (bh, c): every gradient row of the chunk. `s_in` is
/// S_in(c) (None when zero: first chunk without h0), `adj` is D(c) (None when
/// zero: last chunk without dh_final).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn launch3_chunk<F: Arith>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    gs: &mut GradScratch,
    dy: &[f32],
    bh: usize,
    c: usize,
    s_in: Option<&[f32]>,
    adj: Option<&[f32]>,
    out: GradPtrs,
) {
    let (b, h, t0, clen) = ctx.chunk_of(bh, c);
    let (kd, vd, gd) = (ctx.kd, ctx.vd, ctx.gd);
    let (k2, ks, vs) = (2 * kd, ctx.heads * kd, ctx.heads * vd);
    let last = clen - 1;
    let p = ctx.p;
    let q = &p.q[p.row(b, t0, h, kd)..];
    let k = &p.k[p.row(b, t0, h, kd)..];
    let v = &p.v[p.row(b, t0, h, vd)..];
    let dyc = &dy[p.row(b, t0, h, vd)..];
    let r = s.load_chunk::<F>(ctx, b, h, t0, clen);
    s.chunk_keys::<F>(kd, gd, clen, &r);

    // s = dY Vᵀ (clen × clen), only where it is read (m ≤ n): per band of
    // sub-chunk rows s0..s1, the columns 0..s1.
    for m in 0..clen {
        for j in 0..vd {
            gs.vt[j * clen + m] = v[m * vs + j];
        }
    }
    for s0 in (0..clen).step_by(ctx.sub) {
        let s1 = (s0 + ctx.sub).min(clen);
        let ds_band = &mut gs.ds[s0 * clen..];
        gemm::<F>(s1 - s0, s1, vd, &dyc[s0 * vs..], vs, 1, &gs.vt, clen, ds_band, clen, false, false);
    }
    gs.acc_q[..clen * k2].fill(0.0);
    gs.acc_k[..clen * k2].fill(0.0);
    let zero = Complex::new(0.0, 0.0);
    gs.wg[..clen * gd].fill(zero);
    gs.ug[..clen * gd].fill(zero);

    // The forward's scores P, and the off-diagonal blocks on its anchored rows.
    let mut sc = std::mem::take(&mut s.scores);
    {
        let (ds, acc_q, acc_k, prod) = (&gs.ds, &mut gs.acc_q, &mut gs.acc_k, &mut gs.prod);
        let (wg, gterm) = (&mut gs.wg, &mut gs.gterm);
        s.intra_scores::<F>(ctx, q, k, clen, &r, &mut sc, |s, s0, s1, e| {
            anchored_block::<F>(s, &r, kd, gd, clen, s0, s1, e, ds, acc_q, acc_k, prod, wg, gterm)
        });
    }
    let pair_scratch = (&mut gs.wpair[..], &mut gs.wmod[..], &mut gs.gterm[..]);
    diagonal_blocks::<F>(s, &r, ctx, clen, &gs.ds, &mut gs.acc_q, &mut gs.acc_k, pair_scratch, &mut gs.wg);
    // dv = Pᵀ dY (Pᵀ(m, n) = sc[n·clen + m], zero for n < m): per band of
    // sub-chunk rows s0..s1, the inner indices s0..clen.
    for s0 in (0..clen).step_by(ctx.sub) {
        let rows = (s0 + ctx.sub).min(clen) - s0;
        let (p_band, dy_band) = (&sc[s0 * clen + s0..], &dyc[s0 * vs..]);
        gemm::<F>(rows, vd, clen - s0, p_band, 1, clen, dy_band, vs, &mut gs.dv[s0 * vd..], vd, false, false);
    }
    s.scores = sc;

    // The state entering the chunk: acc_q[n] += |E(n, −1)| (S_in dy_n), its
    // gate term wg[n] += |E(n, −1)|·(q_n e^{iθ_n} · S_in dy_n).
    if let Some(s_in) = s_in {
        transpose(s_in, k2, vd, &mut gs.state_t);
        gemm::<F>(clen, k2, vd, dyc, vs, 1, &gs.state_t, k2, &mut gs.prod, k2, false, false);
        for n in 0..clen {
            s.modulus_row::<F>(gd, n, -1);
            let x = &gs.prod[n * k2..(n + 1) * k2];
            add_scaled_row::<F>(&s.w[..gd], x, &mut gs.acc_q[n * k2..], 1.0);
            let (x_re, x_im) = x.split_at(kd);
            gate_term::<F>(row(&r.qc, n, kd), row(&r.qs, n, kd), 1.0, x_re, x_im, 1.0, 1.0, &s.w[..gd], &mut gs.gterm);
            add_gate_row(&gs.gterm[..gd], &mut gs.wg[n * gd..(n + 1) * gd], 1.0);
        }
    }
    // The adjoint arriving after the chunk:
    // acc_d[m] = |E(last, m)| e^{iθ_last} conj(D v_m), dv += [Re K̃ | Im K̃] · [Re D; Im D];
    // u_m = k_m dk̂ᴰ_m = |E(last, m)|·(k_m e^{−iθ_m} · e^{iθ_last} conj(D v_m)).
    if let Some(adj) = adj {
        transpose(adj, k2, vd, &mut gs.state_t);
        gemm::<F>(clen, k2, vd, v, vs, 1, &gs.state_t, k2, &mut gs.prod, k2, false, false);
        for m in 0..clen {
            s.modulus_row::<F>(gd, last, m as isize);
            let (x_re, x_im) = gs.prod[m * k2..(m + 1) * k2].split_at(kd);
            let (a_re, a_im) = gs.acc_d[m * k2..(m + 1) * k2].split_at_mut(kd);
            for d in 0..kd {
                let ch = if gd == 1 { 0 } else { d };
                let (cl, sl) = (s.pc[last * gd + ch], s.ps[last * gd + ch]);
                a_re[d] = F::fma(cl, x_re[d], sl * x_im[d]);
                a_im[d] = F::fma(sl, x_re[d], -(cl * x_im[d]));
            }
            gate_term::<F>(row(&r.kc, m, kd), row(&r.ks, m, kd), -1.0, a_re, a_im, 1.0, 1.0, &s.w[..gd], &mut gs.gterm);
            add_gate_row(&gs.gterm[..gd], &mut gs.ug[m * gd..(m + 1) * gd], 1.0);
            for d in 0..kd {
                let w = s.w[if gd == 1 { 0 } else { d }];
                a_re[d] *= w;
                a_im[d] *= w;
            }
        }
        gemm::<F>(clen, vd, k2, &s.wide, k2, 1, adj, vd, &mut gs.dv, vd, false, true);
    }

    // dq̂ = e^{iθ} acc_q, dk̂ = e^{−iθ} acc_k (+ dk̂^D = e^{−iθ} acc_d);
    // dq, dk the real parts plus the self pair's k_n s_nn, q_n s_nn (written
    // in place over the real halves of acc_q, acc_k). (w and u are summed
    // above, term by term, with each modulus applied last.)
    for n in 0..clen {
        let (qn, kn) = (&q[n * ks..n * ks + kd], &k[n * ks..n * ks + kd]);
        let s_nn = gs.ds[n * clen + n];
        let (q_re, q_im) = gs.acc_q[n * k2..(n + 1) * k2].split_at_mut(kd);
        let (k_re, k_im) = gs.acc_k[n * k2..(n + 1) * k2].split_at_mut(kd);
        let (d_re, d_im) = gs.acc_d[n * k2..(n + 1) * k2].split_at(kd);
        for d in 0..kd {
            let ch = if gd == 1 { 0 } else { d };
            let (cn, sn) = (s.pc[n * gd + ch], s.ps[n * gd + ch]);
            let dq_re = F::fma(cn, q_re[d], -(sn * q_im[d]));
            let mut dk_re = F::fma(cn, k_re[d], sn * k_im[d]);
            if adj.is_some() {
                dk_re += F::fma(cn, d_re[d], sn * d_im[d]);
            }
            q_re[d] = F::fma(kn[d], s_nn, dq_re);
            k_re[d] = F::fma(qn[d], s_nn, dk_re);
        }
    }

    // The gate: dlog_gate_t = conj(Σ_{r ≥ t} w_r + Σ_{m < t} u_m + Σ_j (A ⊙ S_in) conj(D)),
    // the first sum restarted at each reset step (whose gradient is exactly 0).
    // The last two are the pairs through D (E(last, m) and A are 0 across a
    // reset already): an exclusive prefix sum of u from the chunk's through term.
    gs.run.fill(zero);
    if let (Some(s_in), Some(adj)) = (s_in, adj) {
        s.chunk_decay::<F>(gd, clen, &mut gs.run);
        let (si_re, si_im) = s_in.split_at(kd * vd);
        let (d_re, d_im) = adj.split_at(kd * vd);
        let through = &mut gs.through[..gd];
        through.fill(zero);
        for d in 0..kd {
            let ch = if gd == 1 { 0 } else { d };
            let (mut t_re, mut t_im) = (0f32, 0f32);
            for j in d * vd..(d + 1) * vd {
                // S_in conj(D)
                t_re = F::fma(si_re[j], d_re[j], F::fma(si_im[j], d_im[j], t_re));
                t_im = F::fma(si_im[j], d_re[j], F::fma(-si_re[j], d_im[j], t_im));
            }
            through[ch] += Complex::new(t_re, t_im);
        }
        for (a, &t) in gs.run.iter_mut().zip(through.iter()) {
            *a *= t;
        }
    }
    if adj.is_some() {
        for n in 0..clen {
            for ch in 0..gd {
                let u = std::mem::replace(&mut gs.ug[n * gd + ch], gs.run[ch]);
                gs.run[ch] += u;
            }
        }
    }
    gs.run.fill(zero);
    for n in (0..clen).rev() {
        for ch in 0..gd {
            let slot = &mut gs.wg[n * gd + ch];
            if s.rst[n * gd + ch] == n as i32 {
                gs.run[ch] = zero;
                *slot = zero;
            } else {
                gs.run[ch] += *slot;
                *slot = (gs.run[ch] + gs.ug[n * gd + ch]).conj();
            }
        }
    }
    if s_in.is_none() {
        // The first step without h0 multiplies the zero state: its gate's
        // gradient is exactly 0 (the terms above cancel only in rounding).
        gs.wg[..gd].fill(zero);
    }

    for n in 0..clen {
        let t = t0 + n;
        // SAFETY: row (b, t, h) of each gradient belongs to this task alone
        // (tasks are distinct (b, h, chunk)); each range lies inside its
        // buffer, whose length was validated, and the buffers outlive launch 3.
        unsafe {
            write_rows(out.dq, p.row(b, t, h, kd), &gs.acc_q[n * k2..n * k2 + kd]);
            write_rows(out.dk, p.row(b, t, h, kd), &gs.acc_k[n * k2..n * k2 + kd]);
            write_rows(out.dv, p.row(b, t, h, vd), &gs.dv[n * vd..(n + 1) * vd]);
            let g = &gs.wg[n * gd..(n + 1) * gd];
            // Complex<f32> is #[repr(C)] (re, im): 2·gd reals, at twice the complex offset.
            let g = std::slice::from_raw_parts(g.as_ptr() as *const f32, 2 * gd);
            write_rows(out.dg, 2 * p.row(b, t, h, gd), g);
        }
    }
    s.restore(r);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn launch1_avx2(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    qe: &mut [f32],
    dy: &[f32],
    bh: usize,
    c: usize,
    u: &mut [f32],
    w: &mut [f32],
    decay: &mut [Complex<f32>],
) {
    launch1_chunk::<Fused>(ctx, s, qe, dy, bh, c, u, w, decay)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn launch3_avx2(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    gs: &mut GradScratch,
    dy: &[f32],
    bh: usize,
    c: usize,
    s_in: Option<&[f32]>,
    adj: Option<&[f32]>,
    out: GradPtrs,
) {
    launch3_chunk::<Fused>(ctx, s, gs, dy, bh, c, s_in, adj, out)
}

fn backward_impl(
    p: &Problem<'_, f32>,
    g: &GradInputs<'_, f32>,
    params: &ChunkParams,
    out: GradsMut<'_, f32>,
    isa: Isa,
) -> Result<(), InputError> {
    params.validate()?;
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    g.validate(&d)?;
    out.validate(&d)?;
    let (kd, vd, gd) = (d.key_dim, d.value_dim, d.gate_dim());
    let n_chunks = d.len.div_ceil(params.chunk_len);
    let ctx = Ctx { p, chunk: params.chunk_len, sub: params.sub_chunk_len, kd, vd, gd, heads: d.heads, len: d.len };
    let bh_count = d.batch * d.heads;
    let (kv, blk) = (kd * vd, 2 * kd * vd);
    let head_states = n_chunks * blk;
    let dy = g.dy;

    // Launch 1: U_c, A_c, W_c for every (b, h, chunk). Every element of the
    // two buffers is written here first, so recycled buffers need no clearing.
    let mut states = pool::take(bh_count * head_states);
    let mut adj = pool::take(bh_count * head_states);
    let mut decay = vec![Complex::new(0f32, 0f32); bh_count * n_chunks * gd];
    states.par_chunks_mut(blk).zip(adj.par_chunks_mut(blk)).zip(decay.par_chunks_mut(gd)).enumerate().for_each_init(
        || (Scratch::new(&ctx), vec![0f32; params.chunk_len * 2 * kd]),
        |(s, qe), (task, ((u, w), dec))| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { launch1_avx2(&ctx, s, qe, dy, bh, c, u, w, dec) },
                Isa::Portable => launch1_chunk::<Plain>(&ctx, s, qe, dy, bh, c, u, w, dec),
            }
        },
    );

    // Launch 2: both carries, per (b, h, key row); the rows are disjoint.
    // (Launch 3 needs S_in(c) and D(c) only: the forward carry's end, h_final,
    // goes to a per-thread row.)
    let GradsMut { dq, dk, dv, dlog_gate, dh0 } = out;
    let mut dh0_unused = Vec::new();
    let dh0 = match dh0 {
        Some(dh0) => dh0,
        None => {
            dh0_unused.resize(bh_count * kv, Complex::new(0f32, 0f32));
            &mut dh0_unused[..]
        }
    };
    let (sptr, aptr) = (SyncPtr(states.as_mut_ptr()), SyncPtr(adj.as_mut_ptr()));
    dh0.par_chunks_mut(vd).enumerate().for_each_init(
        || (vec![0f32; vd], vec![0f32; vd], vec![Complex::new(0f32, 0f32); vd]),
        |(s_re, s_im, h_final_row), (row_i, dh0_row)| {
            let (bh, dd) = (row_i / kd, row_i % kd);
            let dec = &decay[bh * n_chunks * gd..(bh + 1) * n_chunks * gd];
            let rows = row_i * vd..(row_i + 1) * vd;
            let h0_row = p.h0.map(|h0| &h0[rows.clone()]);
            let dhf_row = g.dh_final.map(|dh| &dh[rows]);
            let base = bh * head_states;
            pass2_row(Carry::Forward, n_chunks, kd, vd, gd, dd, sptr, base, dec, h0_row, h_final_row, s_re, s_im);
            pass2_row(Carry::Adjoint, n_chunks, kd, vd, gd, dd, aptr, base, dec, dhf_row, dh0_row, s_re, s_im);
        },
    );

    // Launch 3: every gradient row, per (b, h, chunk).
    let ptrs = GradPtrs {
        dq: SyncPtr(dq.as_mut_ptr()),
        dk: SyncPtr(dk.as_mut_ptr()),
        dv: SyncPtr(dv.as_mut_ptr()),
        dg: SyncPtr(dlog_gate.as_mut_ptr() as *mut f32),
    };
    let (has_h0, has_dhf) = (p.h0.is_some(), g.dh_final.is_some());
    let (states_ref, adj_ref) = (&states, &adj);
    (0..bh_count * n_chunks).into_par_iter().for_each_init(
        || (Scratch::new(&ctx), GradScratch::new(&ctx)),
        |(s, gs), task| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            let last_chunk = c + 1 == n_chunks;
            let s_in = (c > 0 || has_h0).then(|| &states_ref[task * blk..(task + 1) * blk]);
            let adj = (!last_chunk || has_dhf).then(|| &adj_ref[task * blk..(task + 1) * blk]);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { launch3_avx2(&ctx, s, gs, dy, bh, c, s_in, adj, ptrs) },
                Isa::Portable => launch3_chunk::<Plain>(&ctx, s, gs, dy, bh, c, s_in, adj, ptrs),
            }
        },
    );
    pool::give(states);
    pool::give(adj);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{GateRegime, dims, random_problem};

    /// Both compilations against the f64 reference backward.
    #[test]
    fn compilations_match_the_reference() {
        let cases = [
            (dims(1, 300, 1, 9, 7, false), GateRegime::Mixed, true),
            (dims(2, 129, 2, 4, 6, true), GateRegime::Resets(0.1), false),
            (dims(1, 1, 2, 3, 3, false), GateRegime::Random, true),
        ];
        for (i, &(d, regime, with_h0)) in cases.iter().enumerate() {
            let pr = random_problem(d, regime, with_h0, 70 + i as u64);
            let up = random_problem(d, GateRegime::Random, true, 170 + i as u64);
            let (dy, dhf) = (&up.v, up.h0.as_deref());
            let oracle =
                crate::reference::grad::backward(&pr.rounded_to_f32().view(), &round(dy), dhf.map(round_c).as_deref())
                    .unwrap();
            let p32 = pr.to_f32();
            let dy32: Vec<f32> = dy.iter().map(|&x| x as f32).collect();
            let dhf32: Option<Vec<Complex<f32>>> =
                dhf.map(|h| h.iter().map(|z| Complex::new(z.re as f32, z.im as f32)).collect());
            let g = GradInputs::new(&d, &dy32, dhf32.as_deref()).unwrap();
            for isa in [Isa::Portable, simd_available()] {
                let mut o = Grads::zeros(&d, with_h0);
                backward_impl(&p32.view(), &g, &ChunkParams::default(), o.as_mut(), isa).unwrap();
                let checks = [
                    ("dq", crate::compare(&o.dq, &oracle.dq)),
                    ("dk", crate::compare(&o.dk, &oracle.dk)),
                    ("dv", crate::compare(&o.dv, &oracle.dv)),
                    ("dlog_gate", crate::compare_complex(&o.dlog_gate, &oracle.dlog_gate)),
                ];
                for (name, e) in checks {
                    assert!(e.within(1e-4, 1e-3), "{d:?} {isa:?} {name}: {e:?}");
                }
                if let (Some(a), Some(b)) = (&o.dh0, &oracle.dh0) {
                    let e = crate::compare_complex(a, b);
                    assert!(e.within(1e-4, 1e-3), "{d:?} {isa:?} dh0: {e:?}");
                }
            }
        }
    }

    fn round(x: &[f64]) -> Vec<f64> {
        x.iter().map(|&x| x as f32 as f64).collect()
    }
    fn round_c(x: &[Complex<f64>]) -> Vec<Complex<f64>> {
        x.iter().map(|z| Complex::new(z.re as f32 as f64, z.im as f32 as f64)).collect()
    }
}
