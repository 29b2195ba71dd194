//! The chunked f32 CPU path: surrogate attention inside chunks, the recurrence
//! between them. It is the CPU mirror of the GPU chunked kernel: the same
//! chunking, anchors, masks and f32 arithmetic, organised as the launches a
//! GPU would make (one block per (b, h, chunk), then a carry, then a GEMM).
//!
//! # Algorithm
//!
//! Per (b, h) the sequence is cut into chunks of `C = chunk_len` steps (the
//! last one may be shorter), each cut into sub-chunks of `S = sub_chunk_len`.
//!
//! **Chunk-local segmented log gates.** In each chunk, per gate channel,
//! `G_t = Σ g_s` over the steps s ≤ t of the chunk since the last reset, and
//! `R_t` = the chunk-local index of the last reset at or before t (−1 when
//! none). A step is a *reset* when `Re g < −104` (−∞ included): in f32,
//! `exp(g)` is then exactly 0 (e^{−104} ≈ 6.8·10⁻⁴⁶ is below half the
//! smallest subnormal, 7·10⁻⁴⁶), so the f32 recurrence itself sees `a = 0`
//! exactly; a reset contributes 0 to `G` and restarts the segment. Thus every
//! `G` is finite (|Re G| ≤ 104·C) and no −∞ − (−∞) arises. The phases
//! `θ = Im G` are kept in [−π, π]: each step's phase is reduced mod 2π
//! (Cody–Waite, 3-part 2π) and the running sum is wrapped after every
//! addition, so phases ≫ 2π per step lose nothing, and nothing is global (a
//! global f32 cumulative phase at L = 65536 would have an ulp of ~0.01 rad).
//! The real parts are kept as a compensated pair: the f32 running sum plus
//! the running sum of each addition's exact rounding error (`two_sum`), and
//! every difference is formed as `re_diff`, (hi − hi) + (lo − lo). Without
//! it, gates decaying hard but above the reset threshold (Re g ≈ −20 … −104
//! per step) drive |Re G| into the thousands, where the sum's ulp (~2.4e-4)
//! stays in every short difference — a factor near 1 then carries ~1e-4
//! relative error (measured: y up to 2e-5, dlog_gate up to 7.6e-5 relative;
//! ~1e-7 with the compensation, `GateRegime::HardDecay`).
//!
//! For `late ≥ early` (early = −1 meaning "before the chunk") the factor is
//!
//! ```text
//! E(late, early) = 0                                  if R_late > early (a reset in (early, late])
//!                = exp(Re G_late − Re G_early) · e^{iθ_late} · e^{−iθ_early}   otherwise
//! ```
//!
//! Both indices then lie in one segment, so `Re G_late − Re G_early ≤ 0` (f32
//! partial sums of non-positive numbers are monotone): **every modulus
//! exponentiated is ≤ 1** and is one `exp` of a direct difference; a masked
//! factor gets the exponent −100, which the exp maps to exactly 0. No
//! cumulative product of gates or of their inverses is ever formed. The phase
//! factors have modulus exactly 1, so they need no anchor: each chunk
//! tabulates `cos θ_t, sin θ_t` once (one sincos per step and channel) and
//! folds them into `q_t` and `k_t` (`qc = q cos θ`, `qs = q sin θ`, same for
//! k); the angle-addition identities then give every pair's phase at an error
//! of a few ulp.
//!
//! **Chunk-local work (one task per (b, h, chunk)):**
//! - the chunk state `U = (K ⊙ E(last, ·))ᵀ V`, one real GEMM
//!   `[Re K̃ | Im K̃]ᵀ (2K × C) · V (C × V)` into a planar complex state
//!   (rows 0..K real, K..2K imaginary), and the decay `A = E(last, −1)`;
//! - the inter-chunk query rows `Q̃ = [Re | −Im](Q ⊙ E(·, −1))` (C × 2K);
//! - off-diagonal sub-chunk pairs (query sub-chunk i > key sub-chunk j): the
//!   anchor `r` is the last step of sub-chunk j, so `m ≤ r < n` and
//!   `|E(n, m)| = |E(n, r)| · |E(r, m)|`, both ≤ 1 (a reset in (m, n] lies in
//!   (m, r] or in (r, n] and zeroes one of them). With
//!   `q̃_n = q_n |E(n, r)| e^{iθ_n}` and `k̃_m = k_m |E(r, m)| e^{−iθ_m}`
//!   (= q_n E(n, r) e^{iθ_r} and k_m E(r, m) e^{−iθ_r}: the anchor's unit
//!   phase cancels), `score_nm = Re Σ_d q̃_nd k̃_md = Σ_d Re q̃ Re k̃ − Im q̃ Im k̃`,
//!   i.e. ONE real GEMM with inner dimension 2K,
//!   `[Re q̃, −Im q̃] (rows after j × 2K) · [Re k̃, Im k̃]ᵀ (2K × S)`, for all
//!   later queries against sub-chunk j at once;
//! - diagonal sub-chunks in two halves: inside a half pairwise (m ≤ n):
//!   `score_nm = Σ_d exp(Re G_nd − Re G_md) · (qc_n kc_m + qs_n ks_m)_d` =
//!   `Σ_d q_nd k_md Re E(n, m)_d`, each modulus exponent a direct
//!   difference; the second half's queries against the first half's keys
//!   anchored at the first half's last step, as the off-diagonal blocks
//!   (every factor ≤ 1);
//! - `y = P V` with the block lower-triangular score matrix P (C × C), a GEMM
//!   whose inner loop stops at the diagonal.
//!
//! **Between chunks:** `S_in(0) = h0`, `S_in(c+1) = diag(A_c) S_in(c) + U_c`,
//! `y_chunk += Re(Q̃ S_in(c))` — one real GEMM with inner dimension 2K,
//! `[Re Q̃ | −Im Q̃] (C × 2K) · [Re S; Im S] (2K × V)` — and
//! `h_final = S_in(n_chunks)`.
//!
//! # Parallelism
//!
//! When B·H alone fills the threads (B·H a multiple of the thread count, or
//! at least 4× it), one rayon task per (b, h) walks its chunks in order with
//! one running state (no buffers beyond per-thread scratch). Otherwise — down
//! to B·H = 1 at L = 65536 — three passes: (1) the chunk-local work of every
//! (b, h, chunk) in parallel, storing U_c, A_c and Q̃_c; (2) the carry, in
//! parallel over (b, h, key row), each row sequential over the chunks
//! (S_in(c) overwrites U_c); (3) the inter-chunk GEMM of every (b, h, chunk)
//! in parallel. The three-pass buffers take 8·B·L·H·K·(V/C + 1) bytes and are
//! recycled between calls (see `pool`).
//!
//! The chunk-local pieces (`Scratch::load_chunk`, `chunk_keys`,
//! `chunk_decay`, `inter_queries`, `intra_scores`) and the carry
//! (`pass2_row`, forward or adjoint) are shared with the chunked backward,
//! [`super::chunked_grad`], which recomputes exactly these quantities.
//!
//! All arithmetic is f32. GEMMs are a small register-blocked kernel (4 rows ×
//! 16/8/4/1 columns); exp and sincos are branch-free polynomials (Cephes
//! coefficients, Cody–Waite reduction) so the loops over channels vectorize.
//! Input rows of a chunk (H·D apart in `[B, L, H, D]`) are prefetched. On
//! x86-64 with AVX2+FMA (detected at run time) the hot code is compiled a
//! second time for that target with fused multiply-adds; elsewhere the
//! portable compilation runs.

use num_complex::Complex;
use rayon::prelude::*;

use super::{re_diff, two_sum};
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem};

/// Tuning of the chunked algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    /// Steps per chunk (state passed between chunks). Default 64.
    pub chunk_len: usize,
    /// Steps per anchored sub-chunk inside a chunk. Default 16.
    pub sub_chunk_len: usize,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams { chunk_len: 64, sub_chunk_len: 16 }
    }
}

/// The largest `chunk_len` accepted (bounds the per-thread C × C scratch).
pub const MAX_CHUNK_LEN: usize = 1024;

impl ChunkParams {
    /// `sub_chunk_len ≥ 1`, `chunk_len` a positive multiple of it, at most
    /// [`MAX_CHUNK_LEN`].
    pub fn validate(&self) -> Result<(), InputError> {
        if self.sub_chunk_len == 0 {
            return Err(InputError::Param {
                name: "sub_chunk_len",
                value: self.sub_chunk_len.to_string(),
                why: "must be at least 1",
            });
        }
        if self.chunk_len == 0 || !self.chunk_len.is_multiple_of(self.sub_chunk_len) {
            return Err(InputError::Param {
                name: "chunk_len",
                value: self.chunk_len.to_string(),
                why: "must be a positive multiple of sub_chunk_len",
            });
        }
        if self.chunk_len > MAX_CHUNK_LEN {
            return Err(InputError::Param {
                name: "chunk_len",
                value: self.chunk_len.to_string(),
                why: "must be at most 1024",
            });
        }
        Ok(())
    }
}

/// Chunked forward in f32, allocating the outputs.
pub fn forward(p: &Problem<'_, f32>, params: &ChunkParams) -> Result<Outputs<f32>, InputError> {
    Outputs::computed(p, |p, out| forward_into(p, params, out))
}

/// Chunked forward in f32 into caller buffers.
pub fn forward_into(p: &Problem<'_, f32>, params: &ChunkParams, out: OutputsMut<'_, f32>) -> Result<(), InputError> {
    forward_impl(p, params, out, simd_available(), None)
}

/// Which compilation of the passes runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Portable code, separate multiply and add.
    Portable,
    /// x86-64 AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

/// How the work is spread over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    /// One task per (b, h), its chunks in sequence with one running state:
    /// no buffers beyond per-thread scratch. Used when B·H alone fills the
    /// threads.
    PerHead,
    /// Three passes (chunk-local work in parallel over (b, h, chunk), the
    /// carry, the inter-chunk outputs): parallel even for B·H = 1.
    ThreePass,
}

fn choose_strategy(bh_count: usize, n_chunks: usize) -> Strategy {
    let threads = rayon::current_num_threads();
    // Heads fill the threads evenly (every head has the same work), or there
    // are so many that the last round hardly matters.
    let enough = bh_count >= 4 * threads || (bh_count >= threads && bh_count.is_multiple_of(threads));
    if n_chunks == 1 || enough { Strategy::PerHead } else { Strategy::ThreePass }
}

pub(crate) fn simd_available() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
    }
    Isa::Portable
}

// ---------------------------------------------------------------------------
// Arithmetic: multiply-add, exp, sincos, phase reduction.
// ---------------------------------------------------------------------------

pub(crate) trait Arith: Copy + Send + Sync + 'static {
    /// a·b + c
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
pub(crate) struct Plain;
impl Arith for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[derive(Clone, Copy)]
#[cfg(target_arch = "x86_64")]
pub(crate) struct Fused;
#[cfg(target_arch = "x86_64")]
impl Arith for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// 1.5·2²³: adding and subtracting it rounds to the nearest integer
/// (|x| < 2²²), and the integer sits in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The exponent given to a masked factor: [`exp_nonpos`] maps it to exactly 0.
pub(crate) const MASKED: f32 = -1000.0;

/// Below this Re(log_gate) a step is a reset: exp(g) is exactly 0 in f32
/// (the kernels' constant, `GATELOOP_RESET_LOG_GATE` in cuda/gateloop_abi.h).
const RESET_BELOW: f32 = crate::cuda::abi::GATELOOP_RESET_LOG_GATE as f32;
/// Steps per segment of the chunk-local gate prefix (`Scratch::build_prefix`).
pub(crate) const PREFIX_SEG: usize = crate::cuda::abi::GATELOOP_CHUNK_PREFIX_SEG as usize;

#[inline(always)]
fn select(c: bool, a: f32, b: f32) -> f32 {
    if c { a } else { b }
}

/// x − 2π·round(x / 2π) in f32 (Cody–Waite, 3-part 2π; accurate for
/// |x| ≲ 10⁵, beyond which an f32 phase has no fractional radians left).
#[inline(always)]
fn reduce_2pi<F: Arith>(x: f32) -> f32 {
    const INV_2PI: f32 = 0.159_154_94;
    const C1: f32 = 6.281_25; // 201/32, exact in 8 bits: j·C1 is exact
    const C2: f32 = 0.001_935_307_2;
    const C3: f32 = 1.025_313_2e-11;
    let j = (x * INV_2PI + ROUND_MAGIC) - ROUND_MAGIC;
    let r = F::fma(-j, C1, x);
    let r = F::fma(-j, C2, r);
    F::fma(-j, C3, r)
}

/// e^x for x ≤ 0, down into f32's subnormal range: x is clamped to
/// [RESET_BELOW, 0] and e^x for x < RESET_BELOW is 0 (it rounds to 0 in f32
/// anyway). The power of two 2^n is built as 2^(n+64) · 2^−64, so results
/// between e^−104 and e^−87 come out as correctly scaled subnormals (one
/// rounding, at the final exact power-of-two multiply), like the f32
/// recurrence's own exp: `gateloop fuzz` found a case (a gate of e^−90.4
/// applied to a state of 165) where flushing them to 0 lost 10% of an output.
#[inline(always)]
pub(crate) fn exp_nonpos<F: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const TWO_POW_MINUS_64: f32 = f32::from_bits((127 - 64) << 23); // exactly 2^-64
    let xc = select(x < RESET_BELOW, RESET_BELOW, select(x > 0.0, 0.0, x));
    let t = F::fma(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = F::fma(-n, LN2_HI, xc);
    let r = F::fma(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = F::fma(p, r, 1.398_199_9e-3);
    p = F::fma(p, r, 8.333_452e-3);
    p = F::fma(p, r, 4.166_579_6e-2);
    p = F::fma(p, r, 1.666_666_5e-1);
    p = F::fma(p, r, 0.5);
    let e = F::fma(p, r * r, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    // n ≥ −151 here, so n + 64 + 127 ≥ 40: a normal exponent.
    let scale_hi = f32::from_bits((ni.wrapping_add(64 + 127) << 23) as u32);
    select(x < RESET_BELOW, 0.0, (e * scale_hi) * TWO_POW_MINUS_64)
}

/// (sin x, cos x) for moderate |x| (here |x| ≤ 2π): quadrant reduction by
/// π/2 in three parts, minimax polynomials on [−π/4, π/4].
#[inline(always)]
fn sincos<F: Arith>(x: f32) -> (f32, f32) {
    const TWO_OVER_PI: f32 = std::f32::consts::FRAC_2_PI;
    const P1: f32 = 1.570_312_5;
    const P2: f32 = 4.837_513e-4;
    const P3: f32 = 7.549_79e-8;
    let t = x * TWO_OVER_PI + ROUND_MAGIC;
    let j = t - ROUND_MAGIC;
    let q = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = F::fma(-j, P1, x);
    let r = F::fma(-j, P2, r);
    let r = F::fma(-j, P3, r);
    let r2 = r * r;
    let mut ps = -1.951_529_6e-4;
    ps = F::fma(ps, r2, 8.332_161e-3);
    ps = F::fma(ps, r2, -1.666_665_5e-1);
    let s = F::fma(ps * r2, r, r);
    let mut pc = 2.443_315_7e-5;
    pc = F::fma(pc, r2, -1.388_731_6e-3);
    pc = F::fma(pc, r2, 4.166_664_6e-2);
    let c = F::fma(pc * r2, r2, F::fma(-0.5, r2, 1.0));
    let swap = (q & 1) != 0;
    let sv = select(swap, c, s);
    let cv = select(swap, s, c);
    let sin = f32::from_bits(sv.to_bits() ^ (((q & 2) as u32) << 30));
    let cos = f32::from_bits(cv.to_bits() ^ (((q.wrapping_add(1) & 2) as u32) << 30));
    (sin, cos)
}

// ---------------------------------------------------------------------------
// Small dense kernels.
// ---------------------------------------------------------------------------

/// Prefetches `rows` rows of `row_len` elements, `stride` apart, from `x`
/// (into L1 with `near`, else into L2). In the `[B, L, H, D]` layout the rows
/// of one head are H·D apart, often a page or more, where hardware
/// prefetchers stop; a chunk's rows are requested ahead so their misses
/// overlap.
#[inline(always)]
fn prefetch_rows<T>(x: &[T], stride: usize, rows: usize, row_len: usize, near: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let bytes = row_len * std::mem::size_of::<T>();
        for r in 0..rows {
            let row = x[r * stride..r * stride + row_len].as_ptr() as *const i8;
            let mut off = 0;
            while off < bytes {
                // SAFETY: a prefetch never faults; the address is inside `x`.
                unsafe {
                    if near {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(off))
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(off))
                    }
                };
                off += 64;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, stride, rows, row_len, near);
}

/// Prefetches the q, k, v and gate rows of steps `t0..t0+n` of head (b, h).
#[inline(always)]
fn prefetch_chunk(ctx: &Ctx<'_>, b: usize, h: usize, t0: usize, n: usize, near: bool) {
    let p = ctx.p;
    let (kd, vd, gd, hs) = (ctx.kd, ctx.vd, ctx.gd, ctx.heads);
    prefetch_rows(&p.log_gate[p.row(b, t0, h, gd)..], hs * gd, n, gd, near);
    prefetch_rows(&p.q[p.row(b, t0, h, kd)..], hs * kd, n, kd, near);
    prefetch_rows(&p.k[p.row(b, t0, h, kd)..], hs * kd, n, kd, near);
    prefetch_rows(&p.v[p.row(b, t0, h, vd)..], hs * vd, n, vd, near);
}

#[inline(always)]
fn dot<F: Arith>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = F::fma(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail = F::fma(*x, *y, tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One register block: rows `i0..i0+MR`, columns `j0..j0+NR` of
/// C += A·B over inner indices `0..kc`. A(i, p) = `a[i·ars + p·acs]`,
/// B(p, j) = `b[p·ldb + j]`, C(i, j) = `c[i·ldc + j]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro<F: Arith, const MR: usize, const NR: usize>(
    kc: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    i0: usize,
    b: &[f32],
    ldb: usize,
    j0: usize,
    c: &mut [f32],
    ldc: usize,
    add: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let brow: &[f32; NR] = b[p * ldb + j0..p * ldb + j0 + NR].try_into().unwrap();
        for (i, row) in acc.iter_mut().enumerate() {
            let av = a[(i0 + i) * ars + p * acs];
            for j in 0..NR {
                row[j] = F::fma(av, brow[j], row[j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let crow: &mut [f32; NR] = (&mut c[(i0 + i) * ldc + j0..(i0 + i) * ldc + j0 + NR]).try_into().unwrap();
        if add {
            for j in 0..NR {
                crow[j] += row[j];
            }
        } else {
            *crow = *row;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_block<F: Arith, const MR: usize>(
    n: usize,
    kc: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    i0: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    add: bool,
) {
    let mut j = 0;
    while j + 16 <= n {
        micro::<F, MR, 16>(kc, a, ars, acs, i0, b, ldb, j, c, ldc, add);
        j += 16;
    }
    if j + 8 <= n {
        micro::<F, MR, 8>(kc, a, ars, acs, i0, b, ldb, j, c, ldc, add);
        j += 8;
    }
    if j + 4 <= n {
        micro::<F, MR, 4>(kc, a, ars, acs, i0, b, ldb, j, c, ldc, add);
        j += 4;
    }
    while j < n {
        micro::<F, MR, 1>(kc, a, ars, acs, i0, b, ldb, j, c, ldc, add);
        j += 1;
    }
}

/// C (m × n) += A (m × kd) · B (kd × n), with A(i, p) = `a[i·ars + p·acs]`,
/// B row-major with row stride `ldb`, C row-major with row stride `ldc`.
/// With `lower`, rows `i0..i0+MR` only use inner indices `< i0 + MR` (A is
/// zero beyond its diagonal: the causal score matrix). Without `add`, C is
/// overwritten (C = A·B).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<F: Arith>(
    m: usize,
    n: usize,
    kd: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    lower: bool,
    add: bool,
) {
    const MR: usize = 4;
    let kc = |end: usize| if lower { kd.min(end) } else { kd };
    let mut i = 0;
    while i + MR <= m {
        row_block::<F, MR>(n, kc(i + MR), a, ars, acs, i, b, ldb, c, ldc, add);
        i += MR;
    }
    while i < m {
        row_block::<F, 1>(n, kc(i + 1), a, ars, acs, i, b, ldb, c, ldc, add);
        i += 1;
    }
}

// ---------------------------------------------------------------------------
// Chunk-local segmented log gates.
// ---------------------------------------------------------------------------

/// Sizes and inputs shared by every task of one call.
pub(crate) struct Ctx<'a> {
    pub(crate) p: &'a Problem<'a, f32>,
    pub(crate) chunk: usize,
    pub(crate) sub: usize,
    pub(crate) kd: usize,
    pub(crate) vd: usize,
    pub(crate) gd: usize,
    pub(crate) heads: usize,
    pub(crate) len: usize,
}

impl Ctx<'_> {
    /// (b, h, first step, steps) of task (bh, c).
    #[inline]
    pub(crate) fn chunk_of(&self, bh: usize, c: usize) -> (usize, usize, usize, usize) {
        let t0 = c * self.chunk;
        (bh / self.heads, bh % self.heads, t0, self.chunk.min(self.len - t0))
    }
}

/// Per-thread scratch, allocated once per rayon split.
pub(crate) struct Scratch {
    /// Segmented chunk-local Σ Re g, `[t][channel]`, as the f32 running sum
    /// `gre` plus its compensation `gre_lo` (the running sum of every
    /// addition's exact rounding error, [`two_sum`]). Every difference is
    /// formed as `re_diff`: after hard-decaying steps |Re G| reaches
    /// thousands (ulp ~2.4e-4), and a short difference — a factor near 1 —
    /// would otherwise carry that absolute error (1e-5 … 8e-5 relative on
    /// y and the gradients for `GateRegime::HardDecay`, ~1e-7 with it).
    pub(crate) gre: Vec<f32>,
    pub(crate) gre_lo: Vec<f32>,
    /// Segmented chunk-local Σ Im g wrapped to [−π, π], `[t][channel]`.
    pub(crate) gim: Vec<f32>,
    /// Chunk-local index of the last reset at or before t, or −1.
    pub(crate) rst: Vec<i32>,
    /// cos and sin of `gim`, `[t][channel]`.
    pub(crate) pc: Vec<f32>,
    pub(crate) ps: Vec<f32>,
    /// One step's log gate, deinterleaved.
    pub(crate) g_re: Vec<f32>,
    pub(crate) g_im: Vec<f32>,
    /// A row of zeros (Re G_{−1}).
    pub(crate) zeros: Vec<f32>,
    /// Moduli of one row of factors, `[channel]`.
    pub(crate) w: Vec<f32>,
    /// `[K]`
    pub(crate) tmp: Vec<f32>,
    /// `[C][K]`: k ⊙ cos θ, k ⊙ sin θ.
    pub(crate) kc: Vec<f32>,
    pub(crate) ks: Vec<f32>,
    /// `[C][K]`: q ⊙ cos θ, q ⊙ sin θ.
    pub(crate) qc: Vec<f32>,
    pub(crate) qs: Vec<f32>,
    /// `[C][2K]`: K̃ (pass 1) or the inter-chunk Q̃ (pass 3).
    pub(crate) wide: Vec<f32>,
    /// `[C][2K]`: anchored queries.
    pub(crate) qa: Vec<f32>,
    /// `[S][2K]` anchored keys and their transpose `[2K][S]`.
    pub(crate) ka: Vec<f32>,
    pub(crate) kat: Vec<f32>,
    /// `[C][C]` causal scores.
    pub(crate) scores: Vec<f32>,
    /// Moduli of the anchored rows of the current off-diagonal block:
    /// `[C][channel]` queries, `[S][channel]` keys (see `intra_scores`).
    pub(crate) wq: Vec<f32>,
    pub(crate) wk: Vec<f32>,
    /// `[C][V]` output block.
    pub(crate) yblk: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(ctx: &Ctx<'_>) -> Self {
        let (c, s, k, v, g) = (ctx.chunk, ctx.sub, ctx.kd, ctx.vd, ctx.gd);
        Scratch {
            gre: vec![0.0; c * g],
            gre_lo: vec![0.0; c * g],
            gim: vec![0.0; c * g],
            rst: vec![-1; c * g],
            pc: vec![0.0; c * g],
            ps: vec![0.0; c * g],
            g_re: vec![0.0; g],
            g_im: vec![0.0; g],
            zeros: vec![0.0; g],
            w: vec![0.0; g],
            tmp: vec![0.0; k],
            kc: vec![0.0; c * k],
            ks: vec![0.0; c * k],
            qc: vec![0.0; c * k],
            qs: vec![0.0; c * k],
            wide: vec![0.0; c * 2 * k],
            qa: vec![0.0; c * 2 * k],
            ka: vec![0.0; s * 2 * k],
            kat: vec![0.0; s * 2 * k],
            scores: vec![0.0; c * c],
            wq: vec![0.0; c * g],
            wk: vec![0.0; s * g],
            yblk: vec![0.0; c * v],
        }
    }

    /// Builds G, R and the phase table for steps `t0..t0+clen` of head (b, h),
    /// in the kernels' order (cuda/chunk_common.cuh `build_prefix`): every
    /// segment of [`PREFIX_SEG`] steps is scanned from zero (one GPU thread
    /// per segment and channel), then each segment's last step is joined to
    /// the carry of the segments before it, in order, and then every other
    /// step to its segment's carry ([`Scratch::join_prefix`]). The serial
    /// chain is 8 + 8 steps instead of 64; the values are those of a
    /// sequential walk up to the association of the compensated sums.
    #[inline(always)]
    fn build_prefix<F: Arith>(&mut self, ctx: &Ctx<'_>, b: usize, h: usize, t0: usize, clen: usize) {
        let gd = ctx.gd;
        let p = ctx.p;
        for t in 0..clen {
            let g = &p.log_gate[p.row(b, t0 + t, h, gd)..][..gd];
            let (g_re, g_im) = (&mut self.g_re[..gd], &mut self.g_im[..gd]);
            for ((r, i), z) in g_re.iter_mut().zip(g_im.iter_mut()).zip(g) {
                *r = z.re;
                *i = z.im;
            }
            let o = t * gd;
            let ti = t as i32;
            if t % PREFIX_SEG == 0 {
                let (cur_re, cur_im, cur_rst) =
                    (&mut self.gre[o..o + gd], &mut self.gim[o..o + gd], &mut self.rst[o..o + gd]);
                self.gre_lo[o..o + gd].fill(0.0);
                for ch in 0..gd {
                    let keep = g_re[ch] >= RESET_BELOW;
                    cur_re[ch] = if keep { g_re[ch] } else { 0.0 };
                    // The walk's step from a zero phase (reduce(0 + reduce(g))), as the kernels take it.
                    cur_im[ch] = if keep { reduce_2pi::<F>(reduce_2pi::<F>(g_im[ch])) } else { 0.0 };
                    cur_rst[ch] = if keep { -1 } else { ti };
                }
            } else {
                let (prev_re, cur_re) = self.gre[o - gd..o + gd].split_at_mut(gd);
                let (prev_lo, cur_lo) = self.gre_lo[o - gd..o + gd].split_at_mut(gd);
                let (prev_im, cur_im) = self.gim[o - gd..o + gd].split_at_mut(gd);
                let (prev_rst, cur_rst) = self.rst[o - gd..o + gd].split_at_mut(gd);
                for ch in 0..gd {
                    let keep = g_re[ch] >= RESET_BELOW;
                    let (s_re, err) = two_sum(prev_re[ch], g_re[ch]);
                    let s_im = reduce_2pi::<F>(prev_im[ch] + reduce_2pi::<F>(g_im[ch]));
                    cur_re[ch] = if keep { s_re } else { 0.0 };
                    cur_lo[ch] = if keep { prev_lo[ch] + err } else { 0.0 };
                    cur_im[ch] = if keep { s_im } else { 0.0 };
                    // The reset index only grows: max(previous, t if reset).
                    cur_rst[ch] = prev_rst[ch].max(if keep { -1 } else { ti });
                }
            }
        }
        let segs = clen.div_ceil(PREFIX_SEG);
        for seg in 1..segs {
            let last = (seg * PREFIX_SEG + PREFIX_SEG - 1).min(clen - 1);
            self.join_prefix::<F>(gd, seg * PREFIX_SEG - 1, last);
        }
        for seg in 1..segs {
            let last = (seg * PREFIX_SEG + PREFIX_SEG - 1).min(clen - 1);
            for t in seg * PREFIX_SEG..last {
                self.join_prefix::<F>(gd, seg * PREFIX_SEG - 1, t);
            }
        }
        let n = clen * gd;
        for ((c, s), &th) in self.pc[..n].iter_mut().zip(self.ps[..n].iter_mut()).zip(&self.gim[..n]) {
            (*s, *c) = sincos::<F>(th);
        }
    }

    /// Joins step `t`'s segment-local prefix to the final prefix at `carry`
    /// (the step before its segment), in place: unchanged after a reset
    /// inside the segment; else the compensated sums joined by one TwoSum
    /// (lo = (lo_carry + lo_t) + its error), the phases added and reduced, the
    /// carry's reset index. The kernels' twin: `Block::join_prefix`.
    #[inline(always)]
    fn join_prefix<F: Arith>(&mut self, gd: usize, carry: usize, t: usize) {
        let (c, o) = (carry * gd, t * gd);
        for ch in 0..gd {
            if self.rst[o + ch] >= 0 {
                continue;
            }
            let (s, err) = two_sum(self.gre[c + ch], self.gre[o + ch]);
            self.gre[o + ch] = s;
            self.gre_lo[o + ch] = (self.gre_lo[c + ch] + self.gre_lo[o + ch]) + err;
            self.gim[o + ch] = reduce_2pi::<F>(self.gim[c + ch] + self.gim[o + ch]);
            self.rst[o + ch] = self.rst[c + ch];
        }
    }

    /// `w[ch] = |E(late, early)_ch| = exp(Re G_late − Re G_early)`, exactly 0
    /// across a reset (early = −1: from the chunk start).
    #[inline(always)]
    pub(crate) fn modulus_row<F: Arith>(&mut self, gd: usize, late: usize, early: isize) {
        let (l_re, l_lo, l_rst) = (row(&self.gre, late, gd), row(&self.gre_lo, late, gd), &self.rst[late * gd..][..gd]);
        let (e_re, e_lo) = if early < 0 {
            (&self.zeros[..gd], &self.zeros[..gd])
        } else {
            (row(&self.gre, early as usize, gd), row(&self.gre_lo, early as usize, gd))
        };
        let e = early as i32;
        for ((((w, &a), &al), (&b, &bl)), &r) in
            self.w[..gd].iter_mut().zip(l_re).zip(l_lo).zip(e_re.iter().zip(e_lo)).zip(l_rst)
        {
            // A masked factor gets exponent MASKED: exp_nonpos returns exactly 0.
            *w = exp_nonpos::<F>(if r <= e { re_diff(a, al, b, bl) } else { MASKED });
        }
    }

    /// `xc[t][d] = x_t[d]·cos θ_t`, `xs[t][d] = x_t[d]·sin θ_t` for the chunk.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn phase_scale(&self, gd: usize, x: &[f32], stride: usize, clen: usize, kd: usize, xc: &mut [f32], xs: &mut [f32]) {
        for t in 0..clen {
            let xr = &x[t * stride..t * stride + kd];
            let (oc, os) = (&mut xc[t * kd..(t + 1) * kd], &mut xs[t * kd..(t + 1) * kd]);
            if gd == 1 {
                let (c, s) = (self.pc[t], self.ps[t]);
                for ((oc, os), &v) in oc.iter_mut().zip(os.iter_mut()).zip(xr) {
                    *oc = v * c;
                    *os = v * s;
                }
            } else {
                let (pc, ps) = (&self.pc[t * gd..][..kd], &self.ps[t * gd..][..kd]);
                for ((((oc, os), &v), &c), &s) in oc.iter_mut().zip(os.iter_mut()).zip(xr).zip(pc).zip(ps) {
                    *oc = v * c;
                    *os = v * s;
                }
            }
        }
    }
}

/// `out[d] = w_d·xc[d]`, `out[K + d] = −w_d·xs[d]` (w broadcast when per head):
/// a row of `[Re z, −Im z]` for z = w·x·e^{iθ}, or of `[Re z, Im z]` for
/// z = w·x·e^{−iθ}.
#[inline(always)]
fn scaled_row(w: &[f32], xc: &[f32], xs: &[f32], out: &mut [f32]) {
    let kd = xc.len();
    let (o_re, o_im) = out[..2 * kd].split_at_mut(kd);
    let xs = &xs[..kd];
    if w.len() == 1 {
        let w = w[0];
        for (((a, b), &c), &s) in o_re.iter_mut().zip(o_im.iter_mut()).zip(xc).zip(xs) {
            *a = w * c;
            *b = -(w * s);
        }
    } else {
        let w = &w[..kd];
        for ((((a, b), &c), &s), &w) in o_re.iter_mut().zip(o_im.iter_mut()).zip(xc).zip(xs).zip(w) {
            *a = w * c;
            *b = -(w * s);
        }
    }
}

/// Σ_d exp(Re G_n − Re G_m)_d · (qc_n kc_m + qs_n ks_m)_d, masked across
/// resets: the per-channel diagonal score. Two vectorizable stages: the terms
/// into `tmp`, then a lane-blocked sum.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn diag_score<F: Arith>(
    (n_re, n_lo): (&[f32], &[f32]),
    (m_re, m_lo): (&[f32], &[f32]),
    n_rst: &[i32],
    mi: i32,
    qc: &[f32],
    qs: &[f32],
    kc: &[f32],
    ks: &[f32],
    tmp: &mut [f32],
) -> f32 {
    let kd = qc.len();
    let (n_re, n_lo, m_re, m_lo, n_rst) = (&n_re[..kd], &n_lo[..kd], &m_re[..kd], &m_lo[..kd], &n_rst[..kd]);
    let (qs, kc, ks, tmp) = (&qs[..kd], &kc[..kd], &ks[..kd], &mut tmp[..kd]);
    for d in 0..kd {
        let w = exp_nonpos::<F>(if n_rst[d] <= mi { re_diff(n_re[d], n_lo[d], m_re[d], m_lo[d]) } else { MASKED });
        tmp[d] = w * F::fma(qc[d], kc[d], qs[d] * ks[d]);
    }
    lane_sum(tmp)
}

/// Σ x, eight lanes at a time (a shape the vectorizer turns into SIMD adds).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[f32; 8] = c.try_into().unwrap();
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    let mut tail = 0.0;
    for &v in rest {
        tail += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

// ---------------------------------------------------------------------------
// The three passes.
// ---------------------------------------------------------------------------

/// The phase-scaled query and key rows of one chunk, `[C][K]` each:
/// `qc = q cos θ`, `qs = q sin θ`, `kc = k cos θ`, `ks = k sin θ`. Taken out
/// of the [`Scratch`] by [`Scratch::load_chunk`] (so the scratch can be
/// borrowed while they are read) and given back with [`Scratch::restore`].
pub(crate) struct PhaseRows {
    pub qc: Vec<f32>,
    pub qs: Vec<f32>,
    pub kc: Vec<f32>,
    pub ks: Vec<f32>,
}

/// Row `t` of a `[C][K]` table.
#[inline(always)]
pub(crate) fn row(x: &[f32], t: usize, kd: usize) -> &[f32] {
    &x[t * kd..(t + 1) * kd]
}

impl Scratch {
    /// Prefetches the chunk, builds G, R and the phase table for steps
    /// `t0..t0+clen` of head (b, h), and returns the phase-scaled q and k rows.
    #[inline(always)]
    pub(crate) fn load_chunk<F: Arith>(
        &mut self,
        ctx: &Ctx<'_>,
        b: usize,
        h: usize,
        t0: usize,
        clen: usize,
    ) -> PhaseRows {
        let (kd, gd) = (ctx.kd, ctx.gd);
        let p = ctx.p;
        let ks = ctx.heads * kd;
        // This chunk's rows into L1, the next chunk's (usually this thread's
        // next task) into L2.
        prefetch_chunk(ctx, b, h, t0, clen, true);
        let next = t0 + clen;
        if next < ctx.len {
            prefetch_chunk(ctx, b, h, next, ctx.chunk.min(ctx.len - next), false);
        }
        self.build_prefix::<F>(ctx, b, h, t0, clen);
        let mut r = PhaseRows {
            qc: std::mem::take(&mut self.qc),
            qs: std::mem::take(&mut self.qs),
            kc: std::mem::take(&mut self.kc),
            ks: std::mem::take(&mut self.ks),
        };
        self.phase_scale(gd, &p.q[p.row(b, t0, h, kd)..], ks, clen, kd, &mut r.qc, &mut r.qs);
        self.phase_scale(gd, &p.k[p.row(b, t0, h, kd)..], ks, clen, kd, &mut r.kc, &mut r.ks);
        r
    }

    /// Gives the buffers of [`Scratch::load_chunk`] back.
    pub(crate) fn restore(&mut self, r: PhaseRows) {
        (self.qc, self.qs, self.kc, self.ks) = (r.qc, r.qs, r.kc, r.ks);
    }

    /// The chunk's decayed keys K̃_m = k_m E(last, m) into `self.wide` as rows
    /// `[Re K̃ | Im K̃]` (clen × 2K): |E(last, m)| · e^{iθ_last} · (kc − i ks)_m.
    #[inline(always)]
    pub(crate) fn chunk_keys<F: Arith>(&mut self, kd: usize, gd: usize, clen: usize, r: &PhaseRows) {
        let (k2, last) = (2 * kd, clen - 1);
        for m in 0..clen {
            self.modulus_row::<F>(gd, last, m as isize);
            let (kcm, ksm) = (row(&r.kc, m, kd), row(&r.ks, m, kd));
            let (o_re, o_im) = self.wide[m * k2..(m + 1) * k2].split_at_mut(kd);
            if gd == 1 {
                let (w, cl, sl) = (self.w[0], self.pc[last], self.ps[last]);
                for (((a, b), &c), &sn) in o_re.iter_mut().zip(o_im.iter_mut()).zip(kcm).zip(ksm) {
                    *a = w * F::fma(cl, c, sl * sn);
                    *b = w * F::fma(sl, c, -(cl * sn));
                }
            } else {
                let (w, cl, sl) = (&self.w[..kd], &self.pc[last * gd..][..kd], &self.ps[last * gd..][..kd]);
                for d in 0..kd {
                    o_re[d] = w[d] * F::fma(cl[d], kcm[d], sl[d] * ksm[d]);
                    o_im[d] = w[d] * F::fma(sl[d], kcm[d], -(cl[d] * ksm[d]));
                }
            }
        }
    }

    /// The chunk's decay A = E(last, −1), one complex number per gate channel.
    #[inline(always)]
    pub(crate) fn chunk_decay<F: Arith>(&mut self, gd: usize, clen: usize, decay: &mut [Complex<f32>]) {
        let last = clen - 1;
        self.modulus_row::<F>(gd, last, -1);
        for (ch, a) in decay.iter_mut().enumerate() {
            let w = self.w[ch];
            *a = Complex::new(w * self.pc[last * gd + ch], w * self.ps[last * gd + ch]);
        }
    }

    /// The inter-chunk query rows Q̃_n = q_n |E(n, −1)| e^{iθ_n} as
    /// `[Re Q̃ | −Im Q̃]` (clen × 2K).
    #[inline(always)]
    pub(crate) fn inter_queries<F: Arith>(&mut self, kd: usize, gd: usize, clen: usize, r: &PhaseRows, qe: &mut [f32]) {
        let k2 = 2 * kd;
        for n in 0..clen {
            self.modulus_row::<F>(gd, n, -1);
            scaled_row(&self.w[..gd], row(&r.qc, n, kd), row(&r.qs, n, kd), &mut qe[n * k2..(n + 1) * k2]);
        }
    }

    /// The anchored rows of one block, keys `s0..s1` against queries
    /// `s1..e`, anchor r = s1 − 1 (every factor ≤ 1): `qa` rows `n − s1`
    /// `[Re q̃ | −Im q̃]`, q̃_n = q_n |E(n, r)| e^{iθ_n}, moduli in `wq`;
    /// `ka` rows `m − s0` `[Re k̃ | Im k̃]`, k̃_m = k_m |E(r, m)| e^{−iθ_m},
    /// moduli in `wk` (see [`Scratch::intra_scores`]).
    #[inline(always)]
    fn anchored_rows<F: Arith>(&mut self, kd: usize, gd: usize, r: &PhaseRows, s0: usize, s1: usize, e: usize) {
        let (k2, anchor) = (2 * kd, s1 - 1);
        for n in s1..e {
            self.modulus_row::<F>(gd, n, anchor as isize);
            let (o, i) = ((n - s1) * k2, n - s1);
            self.wq[i * gd..(i + 1) * gd].copy_from_slice(&self.w[..gd]);
            scaled_row(&self.w[..gd], row(&r.qc, n, kd), row(&r.qs, n, kd), &mut self.qa[o..o + k2]);
        }
        for m in s0..s1 {
            self.modulus_row::<F>(gd, anchor, m as isize);
            let (o, i) = ((m - s0) * k2, m - s0);
            self.wk[i * gd..(i + 1) * gd].copy_from_slice(&self.w[..gd]);
            scaled_row(&self.w[..gd], row(&r.kc, m, kd), row(&r.ks, m, kd), &mut self.ka[o..o + k2]);
        }
    }

    /// The intra-chunk scores P (clen × clen, row stride clen, block
    /// lower-triangular, zero above the diagonal) of the chunk loaded by
    /// [`Scratch::load_chunk`]; `q`, `k` start at the chunk's first row.
    ///
    /// After each anchored block, keys `s0..s1` against queries `s1..e`, is
    /// computed, `on_block(self, s0, s1, e)` runs with the block's anchored
    /// rows in the scratch (anchor r = s1 − 1): `qa` rows `n − s1` for
    /// s1 ≤ n < e hold `[Re q̃ | −Im q̃]`, q̃_n = q_n |E(n, r)| e^{iθ_n}, with
    /// the moduli in `wq` (`[n − s1][gd]`); `ka` rows `m − s0` hold
    /// `[Re k̃ | Im k̃]`, k̃_m = k_m |E(r, m)| e^{−iθ_m}, with the moduli in
    /// `wk` (`[m − s0][gd]`). The blocks: each diagonal sub-chunk's second
    /// half against its first (s1 = h1, e = the sub-chunk's end), then each
    /// key sub-chunk against every later query (e = clen).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn intra_scores<F: Arith>(
        &mut self,
        ctx: &Ctx<'_>,
        q: &[f32],
        k: &[f32],
        clen: usize,
        r: &PhaseRows,
        sc: &mut [f32],
        mut on_block: impl FnMut(&Scratch, usize, usize, usize),
    ) {
        let (kd, gd, sub) = (ctx.kd, ctx.gd, ctx.sub);
        let (k2, ks) = (2 * kd, ctx.heads * kd);
        sc[..clen * clen].fill(0.0);
        let mut s0 = 0;
        while s0 < clen {
            let s1 = (s0 + sub).min(clen);
            // Diagonal sub-chunk, in halves (the kernels' add_diagonal_pairs
            // and add_diagonal_cross): the second half starts at h1. Inside
            // a half pairwise, each modulus a direct difference
            // exp(Re G_n − Re G_m); the unit phases e^{iθ_n}, e^{−iθ_m} are
            // folded into (qc, qs) and (kc, ks).
            let h1 = (s0 + (sub / 2).max(1)).min(s1);
            for n in s0..s1 {
                let lo = if n < h1 { s0 } else { h1 };
                let srow = &mut sc[n * clen..n * clen + clen];
                if gd == 1 {
                    let qn = &q[n * ks..n * ks + kd];
                    for m in lo..=n {
                        let w = exp_nonpos::<F>(if self.rst[n] <= m as i32 {
                            re_diff(self.gre[n], self.gre_lo[n], self.gre[m], self.gre_lo[m])
                        } else {
                            MASKED
                        });
                        let cosd = F::fma(self.pc[n], self.pc[m], self.ps[n] * self.ps[m]);
                        srow[m] = w * cosd * dot::<F>(qn, &k[m * ks..m * ks + kd]);
                    }
                } else {
                    let n_rst = &self.rst[n * gd..][..kd];
                    for (m, sv) in srow.iter_mut().enumerate().take(n + 1).skip(lo) {
                        *sv = diag_score::<F>(
                            (row(&self.gre, n, gd), row(&self.gre_lo, n, gd)),
                            (row(&self.gre, m, gd), row(&self.gre_lo, m, gd)),
                            n_rst,
                            m as i32,
                            row(&r.qc, n, kd),
                            row(&r.qs, n, kd),
                            row(&r.kc, m, kd),
                            row(&r.ks, m, kd),
                            &mut self.tmp,
                        );
                    }
                }
            }
            // The second half's queries against the first half's keys,
            // anchored at the first half's last step r (every factor ≤ 1):
            // [Re q̃, −Im q̃] · [Re k̃, Im k̃] in the scratch rows the
            // off-diagonal block below fills after.
            if h1 < s1 {
                self.anchored_rows::<F>(kd, gd, r, s0, h1, s1);
                for n in h1..s1 {
                    let qrow = &self.qa[(n - h1) * k2..][..k2];
                    for m in s0..h1 {
                        sc[n * clen + m] = dot::<F>(qrow, &self.ka[(m - s0) * k2..][..k2]);
                    }
                }
                on_block(self, s0, h1, s1);
            }
            // Later queries against this key sub-chunk, anchored at its last
            // step r: q̃_n = q_n |E(n, r)| e^{iθ_n}, k̃_m = k_m |E(r, m)| e^{−iθ_m}.
            if s1 < clen {
                let (rows, cols) = (clen - s1, s1 - s0);
                self.anchored_rows::<F>(kd, gd, r, s0, s1, clen);
                for (i, krow_a) in self.ka[..cols * k2].chunks_exact(k2).enumerate() {
                    for (dd, &x) in krow_a.iter().enumerate() {
                        self.kat[dd * cols + i] = x;
                    }
                }
                // scores[n][s0..s1] = [Re q̃, −Im q̃] · [Re k̃, Im k̃]ᵀ (inner 2K)
                gemm::<F>(
                    rows,
                    cols,
                    k2,
                    &self.qa,
                    k2,
                    1,
                    &self.kat,
                    cols,
                    &mut sc[s1 * clen + s0..],
                    clen,
                    false,
                    false,
                );
                on_block(self, s0, s1, clen);
            }
            s0 = s1;
        }
    }
}

/// Pass 1 for chunk (bh, c), everything that is local to the chunk: the
/// chunk state U_c (planar 2K × V), the decay A_c (gd), the inter-chunk query
/// rows Q̃ = [Re | −Im](Q ⊙ E(·, −1)) (clen × 2K, only when `qe` is given),
/// and the intra-chunk output (clen × V) into `s.yblk`.
#[inline(always)]
fn pass1_chunk<F: Arith>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    bh: usize,
    c: usize,
    state: &mut [f32],
    decay: &mut [Complex<f32>],
    qe: Option<&mut [f32]>,
) {
    let (b, h, t0, clen) = ctx.chunk_of(bh, c);
    let (kd, vd, gd) = (ctx.kd, ctx.vd, ctx.gd);
    let p = ctx.p;
    let k2 = 2 * kd;
    let vs = ctx.heads * vd;
    let q = &p.q[p.row(b, t0, h, kd)..];
    let k = &p.k[p.row(b, t0, h, kd)..];
    let v = &p.v[p.row(b, t0, h, vd)..];
    let r = s.load_chunk::<F>(ctx, b, h, t0, clen);

    // Chunk state U = K̃ᵀ V as one real GEMM (2K × clen) · (clen × V);
    // K̃ᵀ(i, m) = wide[m·2K + i].
    s.chunk_keys::<F>(kd, gd, clen, &r);
    gemm::<F>(k2, vd, clen, &s.wide, 1, k2, v, vs, state, vd, false, false);
    s.chunk_decay::<F>(gd, clen, decay);

    // Inter-chunk query rows, consumed by pass 3.
    if let Some(qe) = qe {
        s.inter_queries::<F>(kd, gd, clen, &r, qe);
    }

    let mut sc = std::mem::take(&mut s.scores);
    s.intra_scores::<F>(ctx, q, k, clen, &r, &mut sc, |_, _, _, _| {});
    // y = P · V (causal: row n stops at inner index n).
    gemm::<F>(clen, vd, clen, &sc, clen, 1, v, vs, &mut s.yblk[..clen * vd], vd, true, false);
    s.scores = sc;
    s.restore(r);
}

/// Which way [`pass2_row`] carries a state over the chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carry {
    /// The forward state: chunks in order, S ← A_c S + U_c (slot c ends up
    /// holding S_in(c), the state entering chunk c).
    Forward,
    /// The state adjoint of the backward pass: chunks in reverse order,
    /// D ← conj(A_c) D + W_c (slot c ends up holding the adjoint arriving at
    /// the end of chunk c from after it).
    Adjoint,
}

/// Pass 2 for key row `d` of head `bh`: carry the state over the chunks.
/// `states` points at this head's `[n_chunks][2K][V]` block; only rows d and
/// K + d of each chunk are touched. Each slot holds a chunk's own
/// contribution (U_c or W_c) and is overwritten with the carried state that
/// reaches the chunk; `init_row` (h0, or dh_final for the adjoint; zero when
/// absent) starts the carry and `out_row` receives its end (h_final, or dh0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pass2_row(
    direction: Carry,
    n_chunks: usize,
    kd: usize,
    vd: usize,
    gd: usize,
    d: usize,
    states: SyncPtr,
    state_base: usize,
    decay: &[Complex<f32>],
    init_row: Option<&[Complex<f32>]>,
    out_row: &mut [Complex<f32>],
    s_re: &mut [f32],
    s_im: &mut [f32],
) {
    match init_row {
        Some(h0) => {
            for ((r, i), z) in s_re.iter_mut().zip(s_im.iter_mut()).zip(h0) {
                *r = z.re;
                *i = z.im;
            }
        }
        None => {
            s_re.fill(0.0);
            s_im.fill(0.0);
        }
    }
    let ch = if gd == 1 { 0 } else { d };
    let blk = 2 * kd * vd;
    for i in 0..n_chunks {
        let (c, a) = match direction {
            Carry::Forward => (i, decay[i * gd + ch]),
            Carry::Adjoint => (n_chunks - 1 - i, decay[(n_chunks - 1 - i) * gd + ch].conj()),
        };
        let re_off = state_base + c * blk + d * vd;
        let im_off = state_base + c * blk + (kd + d) * vd;
        // SAFETY: rows (c, d) and (c, K + d) of this head belong to this task
        // alone (tasks are distinct (head, d) pairs), and `states` outlives the
        // pass; the ranges are in bounds by construction of the buffer.
        let (u_re, u_im) = unsafe {
            (
                std::slice::from_raw_parts_mut(states.get().add(re_off), vd),
                std::slice::from_raw_parts_mut(states.get().add(im_off), vd),
            )
        };
        for v in 0..vd {
            let (sr, si) = (s_re[v], s_im[v]);
            let (ur, ui) = (u_re[v], u_im[v]);
            u_re[v] = sr;
            u_im[v] = si;
            s_re[v] = a.re * sr - a.im * si + ur;
            s_im[v] = a.re * si + a.im * sr + ui;
        }
    }
    for ((z, &r), &i) in out_row.iter_mut().zip(s_re.iter()).zip(s_im.iter()) {
        *z = Complex::new(r, i);
    }
}

/// Pass 3 for one chunk: `yblk` (clen × V) = [Re Q̃ | −Im Q̃] · [Re S_in; Im S_in],
/// one real GEMM with inner dimension 2K.
#[inline(always)]
fn pass3_chunk<F: Arith>(kd: usize, vd: usize, clen: usize, qe: &[f32], state_in: &[f32], yblk: &mut [f32]) {
    gemm::<F>(clen, vd, 2 * kd, qe, 2 * kd, 1, state_in, vd, &mut yblk[..clen * vd], vd, false, false);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pass1_avx2(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    bh: usize,
    c: usize,
    state: &mut [f32],
    decay: &mut [Complex<f32>],
    qe: Option<&mut [f32]>,
) {
    pass1_chunk::<Fused>(ctx, s, bh, c, state, decay, qe)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pass3_avx2(kd: usize, vd: usize, clen: usize, qe: &[f32], state_in: &[f32], yblk: &mut [f32]) {
    pass3_chunk::<Fused>(kd, vd, clen, qe, state_in, yblk)
}

/// Buffers of one head for [`Strategy::PerHead`].
struct HeadScratch {
    /// Running state, planar `[2K][V]`.
    state: Vec<f32>,
    /// One chunk's U, planar `[2K][V]`.
    u: Vec<f32>,
    /// One chunk's decay `[gd]`.
    decay: Vec<Complex<f32>>,
    /// One chunk's Q̃ `[C][2K]`.
    qe: Vec<f32>,
}

/// All chunks of head `bh` in sequence ([`Strategy::PerHead`]): the same
/// chunk-local work as pass 1, then y += Q̃ S and S ← diag(A) S + U.
#[inline(always)]
fn head_fused<F: Arith>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    hs: &mut HeadScratch,
    bh: usize,
    n_chunks: usize,
    y: SyncPtr,
    h_final: &mut [Complex<f32>],
) {
    let (kd, vd, gd) = (ctx.kd, ctx.vd, ctx.gd);
    let p = ctx.p;
    let kv = kd * vd;
    let (st_re, st_im) = hs.state.split_at_mut(kv);
    match p.h0 {
        Some(h0) => {
            for ((r, i), z) in st_re.iter_mut().zip(st_im.iter_mut()).zip(&h0[bh * kv..(bh + 1) * kv]) {
                *r = z.re;
                *i = z.im;
            }
        }
        None => {
            st_re.fill(0.0);
            st_im.fill(0.0);
        }
    }
    for c in 0..n_chunks {
        let inter = c > 0 || p.h0.is_some();
        pass1_chunk::<F>(ctx, s, bh, c, &mut hs.u, &mut hs.decay, inter.then_some(&mut hs.qe[..]));
        let (b, h, t0, clen) = ctx.chunk_of(bh, c);
        if inter {
            gemm::<F>(clen, vd, 2 * kd, &hs.qe, 2 * kd, 1, &hs.state, vd, &mut s.yblk[..clen * vd], vd, false, true);
        }
        for n in 0..clen {
            let off = ((b * ctx.len + t0 + n) * ctx.heads + h) * vd;
            // SAFETY: row (b, t0 + n, h) of y belongs to this head's task
            // alone; it lies inside y, whose length was validated.
            let dst = unsafe { std::slice::from_raw_parts_mut(y.get().add(off), vd) };
            dst.copy_from_slice(&s.yblk[n * vd..(n + 1) * vd]);
        }
        // S ← diag(A) S + U
        let (st_re, st_im) = hs.state.split_at_mut(kv);
        let (u_re, u_im) = hs.u.split_at(kv);
        for d in 0..kd {
            let a = hs.decay[if gd == 1 { 0 } else { d }];
            let r = d * vd..(d + 1) * vd;
            let (sr, si, ur, ui) = (&mut st_re[r.clone()], &mut st_im[r.clone()], &u_re[r.clone()], &u_im[r]);
            for v in 0..vd {
                let (x, yv) = (sr[v], si[v]);
                sr[v] = F::fma(a.re, x, F::fma(-a.im, yv, ur[v]));
                si[v] = F::fma(a.re, yv, F::fma(a.im, x, ui[v]));
            }
        }
    }
    let (st_re, st_im) = hs.state.split_at(kv);
    for ((z, &r), &i) in h_final.iter_mut().zip(st_re).zip(st_im) {
        *z = Complex::new(r, i);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn head_fused_avx2(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    hs: &mut HeadScratch,
    bh: usize,
    n_chunks: usize,
    y: SyncPtr,
    h_final: &mut [Complex<f32>],
) {
    head_fused::<Fused>(ctx, s, hs, bh, n_chunks, y, h_final)
}

/// Recycles the three-pass buffers between calls: at L = 65536 they are tens
/// of MB, and fresh pages cost a page fault and a kernel clear each, ~20 % of
/// a call. At most [`pool::SLOTS`] buffers of at most [`pool::MAX_BYTES`] each
/// are kept.
pub(crate) mod pool {
    use std::sync::Mutex;

    pub const SLOTS: usize = 2;
    pub const MAX_BYTES: usize = 256 << 20;
    static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

    /// A buffer of `n` elements (recycled contents, or zeros).
    pub fn take(n: usize) -> Vec<f32> {
        let recycled = FREE.lock().ok().and_then(|mut free| {
            let i = free.iter().position(|b| b.capacity() >= n)?;
            Some(free.swap_remove(i))
        });
        match recycled {
            Some(mut b) => {
                b.truncate(n);
                b.resize(n, 0.0);
                b
            }
            None => vec![0.0; n],
        }
    }

    /// Returns a buffer for later calls (or drops it).
    pub fn give(b: Vec<f32>) {
        if b.capacity() * std::mem::size_of::<f32>() > MAX_BYTES {
            return;
        }
        if let Ok(mut free) = FREE.lock() {
            free.push(b);
            if free.len() > SLOTS {
                // Keep the largest.
                free.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
                free.truncate(SLOTS);
            }
        }
    }
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: used only for disjoint writes (see each use), within one call.
unsafe impl Send for SyncPtr {}
// SAFETY: as for Send: the tasks sharing one touch disjoint elements (a task
// reads through it only elements it alone writes), so no two threads race.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

fn forward_impl(
    p: &Problem<'_, f32>,
    params: &ChunkParams,
    out: OutputsMut<'_, f32>,
    isa: Isa,
    strategy: Option<Strategy>,
) -> Result<(), InputError> {
    params.validate()?;
    p.validate()?;
    p.check_gate()?;
    out.validate(&p.dims)?;
    let d = p.dims;
    let (kd, vd, gd) = (d.key_dim, d.value_dim, d.gate_dim());
    let n_chunks = d.len.div_ceil(params.chunk_len);
    let ctx = Ctx { p, chunk: params.chunk_len, sub: params.sub_chunk_len, kd, vd, gd, heads: d.heads, len: d.len };
    let bh_count = d.batch * d.heads;
    let blk = 2 * kd * vd;
    if strategy.unwrap_or_else(|| choose_strategy(bh_count, n_chunks)) == Strategy::PerHead {
        let yptr = SyncPtr(out.y.as_mut_ptr());
        out.h_final.par_chunks_mut(kd * vd).enumerate().for_each_init(
            || {
                let hs = HeadScratch {
                    state: vec![0.0; blk],
                    u: vec![0.0; blk],
                    decay: vec![Complex::new(0.0, 0.0); gd],
                    qe: vec![0.0; params.chunk_len * 2 * kd],
                };
                (Scratch::new(&ctx), hs)
            },
            |(s, hs), (bh, hf)| match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { head_fused_avx2(&ctx, s, hs, bh, n_chunks, yptr, hf) },
                Isa::Portable => head_fused::<Plain>(&ctx, s, hs, bh, n_chunks, yptr, hf),
            },
        );
        return Ok(());
    }
    let qe_blk = params.chunk_len * 2 * kd;
    // Every element of `states` and every row of `qe` that is read is written
    // in pass 1 first, so recycled buffers need no clearing.
    let mut states = pool::take(bh_count * n_chunks * blk);
    let mut decay = vec![Complex::new(0f32, 0f32); bh_count * n_chunks * gd];
    let mut qe = pool::take(bh_count * n_chunks * qe_blk);
    let (heads, len) = (d.heads, d.len);
    let yptr = SyncPtr(out.y.as_mut_ptr());
    let has_h0 = p.h0.is_some();

    // Pass 1: everything chunk-local, parallel over (b, h, chunk).
    states.par_chunks_mut(blk).zip(decay.par_chunks_mut(gd)).zip(qe.par_chunks_mut(qe_blk)).enumerate().for_each_init(
        || Scratch::new(&ctx),
        |s, (task, ((state, dec), qe))| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            // The first chunk has no incoming state without h0.
            let qe = (c > 0 || has_h0).then_some(qe);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { pass1_avx2(&ctx, s, bh, c, state, dec, qe) },
                Isa::Portable => pass1_chunk::<Plain>(&ctx, s, bh, c, state, dec, qe),
            }
            let (b, h, t0, clen) = ctx.chunk_of(bh, c);
            for n in 0..clen {
                let off = ((b * len + t0 + n) * heads + h) * vd;
                // SAFETY: row (b, t0 + n, h) of y is written by this task only
                // (tasks are distinct (b, h, chunk)); it lies inside `out.y`,
                // whose length was validated, and `out.y` outlives the pass.
                let dst = unsafe { std::slice::from_raw_parts_mut(yptr.get().add(off), vd) };
                dst.copy_from_slice(&s.yblk[n * vd..(n + 1) * vd]);
            }
        },
    );

    // Pass 2: carry, parallel over (b, h, key row); h_final rows are disjoint.
    let sptr = SyncPtr(states.as_mut_ptr());
    let head_states = n_chunks * blk;
    out.h_final.par_chunks_mut(vd).enumerate().for_each_init(
        || (vec![0f32; vd], vec![0f32; vd]),
        |(s_re, s_im), (row, hf)| {
            let (bh, dd) = (row / kd, row % kd);
            let h0_row = p.h0.map(|h0| &h0[row * vd..(row + 1) * vd]);
            let dec = &decay[bh * n_chunks * gd..(bh + 1) * n_chunks * gd];
            pass2_row(Carry::Forward, n_chunks, kd, vd, gd, dd, sptr, bh * head_states, dec, h0_row, hf, s_re, s_im);
        },
    );

    // Pass 3: y += Q̃ S_in, parallel over (b, h, chunk); each task owns its y rows.
    let (states_ref, qe_ref) = (&states, &qe);
    let first = if has_h0 { 0 } else { 1 };
    (0..bh_count * n_chunks).into_par_iter().filter(|task| task % n_chunks >= first).for_each_init(
        || vec![0f32; params.chunk_len * vd],
        |yblk, task| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            let (b, h, t0, clen) = ctx.chunk_of(bh, c);
            let (qe, st) = (&qe_ref[task * qe_blk..(task + 1) * qe_blk], &states_ref[task * blk..(task + 1) * blk]);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { pass3_avx2(kd, vd, clen, qe, st, yblk) },
                Isa::Portable => pass3_chunk::<Plain>(kd, vd, clen, qe, st, yblk),
            }
            for n in 0..clen {
                let off = ((b * len + t0 + n) * heads + h) * vd;
                // SAFETY: as in pass 1 (disjoint rows per task, in bounds).
                let dst = unsafe { std::slice::from_raw_parts_mut(yptr.get().add(off), vd) };
                for (y, &x) in dst.iter_mut().zip(&yblk[n * vd..(n + 1) * vd]) {
                    *y += x;
                }
            }
        },
    );
    pool::give(states);
    pool::give(qe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{GateRegime, dims, random_problem};

    #[test]
    fn exp_and_sincos_are_accurate() {
        for i in 0..20000 {
            let x = -(i as f32) * 0.0045;
            let e = exp_nonpos::<Plain>(x) as f64;
            let r = (x as f64).exp();
            assert!((e - r).abs() <= 3e-7 * r + 2e-38, "exp({x}) = {e}, want {r}");
        }
        // The subnormal range: within one subnormal spacing (plus the
        // relative error) of the exact value, like f32's own exp.
        for i in 0..=2000 {
            let x = -87.0 - (i as f32) * 0.0085; // down to −104
            let e = exp_nonpos::<Plain>(x) as f64;
            let r = (x as f64).exp();
            let spacing = f64::from(f32::from_bits(1));
            assert!((e - r).abs() <= 3e-7 * r + spacing, "exp({x}) = {e:e}, want {r:e}");
            assert!(e > 0.0 || r < spacing, "exp({x}) flushed to 0, want {r:e}");
        }
        assert_eq!(exp_nonpos::<Plain>(MASKED), 0.0);
        assert_eq!(exp_nonpos::<Plain>(-104.5), 0.0);
        assert_eq!(exp_nonpos::<Plain>(0.0), 1.0);
        assert_eq!(exp_nonpos::<Plain>(f32::NEG_INFINITY), 0.0);
        for i in -20000..=20000 {
            let x = i as f32 * 0.00063;
            let (s, c) = sincos::<Plain>(x);
            assert!((s as f64 - (x as f64).sin()).abs() < 3e-7, "sin({x})");
            assert!((c as f64 - (x as f64).cos()).abs() < 3e-7, "cos({x})");
            let y = x * 100.0;
            let r = reduce_2pi::<Plain>(y) as f64;
            assert!(r.abs() <= std::f64::consts::PI + 1e-6, "reduce({y}) = {r}");
            let diff = (r - y as f64).rem_euclid(std::f64::consts::TAU);
            assert!(diff.min(std::f64::consts::TAU - diff) < 2e-6, "reduce({y}) = {r}");
        }
    }

    /// Both strategies and both compilations against the f64 reference.
    #[test]
    fn strategies_and_compilations_match_the_reference() {
        let cases = [
            (dims(1, 300, 1, 9, 7, false), GateRegime::Mixed, true),
            (dims(3, 129, 2, 4, 6, true), GateRegime::Resets(0.1), false),
            (dims(2, 64, 3, 16, 5, false), GateRegime::LargePhase(50.0), true),
            (dims(1, 1, 2, 3, 3, false), GateRegime::Random, true),
            (dims(2, 1000, 1, 5, 5, false), GateRegime::StrongDecay(40.0), false),
        ];
        for (i, &(d, regime, with_h0)) in cases.iter().enumerate() {
            let pr = random_problem(d, regime, with_h0, 60 + i as u64);
            let oracle = crate::reference::recurrent::forward(&pr.rounded_to_f32().view()).unwrap();
            let p32 = pr.to_f32();
            for isa in [Isa::Portable, simd_available()] {
                for strategy in [Strategy::PerHead, Strategy::ThreePass] {
                    for params in [ChunkParams::default(), ChunkParams { chunk_len: 32, sub_chunk_len: 8 }] {
                        let mut o = Outputs::zeros(&d);
                        forward_impl(&p32.view(), &params, o.as_mut(), isa, Some(strategy)).unwrap();
                        let ey = crate::compare(&o.y, &oracle.y);
                        let eh = crate::compare_complex(&o.h_final, &oracle.h_final);
                        assert!(
                            ey.within(1e-4, 1e-3) && eh.within(1e-4, 1e-3),
                            "{d:?} {isa:?} {strategy:?} {params:?}: y {ey:?} h {eh:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn portable_and_simd_compilations_agree() {
        for (i, per_head) in [false, true].into_iter().enumerate() {
            let pr = random_problem(dims(2, 200, 2, 9, 7, per_head), GateRegime::Mixed, true, 40 + i as u64).to_f32();
            let mut a = Outputs::zeros(&pr.dims);
            let mut b = Outputs::zeros(&pr.dims);
            forward_impl(&pr.view(), &ChunkParams::default(), a.as_mut(), Isa::Portable, None).unwrap();
            forward_impl(&pr.view(), &ChunkParams::default(), b.as_mut(), simd_available(), None).unwrap();
            let e = crate::compare(&a.y, &b.y);
            assert!(e.within(1e-5, 1e-5), "{e:?}");
            let e = crate::compare_complex(&a.h_final, &b.h_final);
            assert!(e.within(1e-5, 1e-5), "{e:?}");
        }
    }
}
