//! The chunked f32 CPU path: surrogate attention inside chunks, the recurrence
//! between them. It is the CPU mirror of the GPU chunked kernel: the same
//! chunking, anchors, masks and f32 accumulation, written as the three
//! launches a GPU would make.
//!
//! # Algorithm
//!
//! Per (b, h) the sequence is cut into chunks of `C = chunk_len` steps (the
//! last one may be shorter), each cut into sub-chunks of `S = sub_chunk_len`.
//!
//! **Chunk-local segmented log gates.** In each chunk, per gate channel,
//! `G_t = Σ g_s` over the steps s ≤ t of the chunk since the last reset, and
//! `R_t` = the chunk-local index of the last reset at or before t (−1 when
//! none). A step is a *reset* when `Re g < −110` (−∞ included): in f32,
//! `exp(g)` is then exactly 0 (e^{−110} ≈ 1.7·10⁻⁴⁸ is far below half the
//! smallest subnormal, 7·10⁻⁴⁶), so the f32 recurrence itself sees `a = 0`
//! exactly; a reset contributes 0 to `G` and restarts the segment. Thus every
//! `G` is finite (|Re G| ≤ 110·C) and never −∞ − (−∞). The phases are kept
//! in [−π, π]: each step's phase is reduced mod 2π (Cody–Waite, 3-part 2π)
//! and the running sum is wrapped after every addition, so phases ≫ 2π per
//! step and long chunks lose nothing (a global f32 cumulative phase at
//! L = 65536 would have an ulp of ~0.01 rad; here nothing is global).
//!
//! For `late ≥ early` (early = −1 meaning "before the chunk") the factor is
//!
//! ```text
//! E(late, early) = 0                          if R_late > early (a reset in (early, late])
//!                = exp(G_late − G_early)       otherwise (G_{−1} = 0)
//! ```
//!
//! Both indices then lie in one segment, so `Re(G_late − G_early) ≤ 0` (the
//! f32 partial sums of non-positive numbers are monotone): **every factor
//! exponentiated has modulus ≤ 1**. No cumulative product of gates, nor of
//! their inverses, is ever formed.
//!
//! **Pass 1 (parallel over (b, h, chunk)): chunk states.**
//! `U_c = (K ⊙ E(last, ·))ᵀ V` — one real GEMM `[Re K̃ | Im K̃]ᵀ (2K × C) · V
//! (C × V)` into a planar complex state (rows 0..K real, K..2K imaginary) —
//! and the chunk decay `A_c = E(last, −1)` (0 if the chunk holds a reset).
//!
//! **Pass 2 (parallel over (b, h, key row)): carry.** Sequential over chunks:
//! `S_in(0) = h0`, `S_in(c+1) = diag(A_c) S_in(c) + U_c`; `S_in(c)` overwrites
//! `U_c` in place, and `h_final = S_in(n_chunks)`. Every row of the state is
//! independent, so even B·H = 1 uses all cores.
//!
//! **Pass 3 (parallel over (b, h, chunk)): outputs.**
//! - Inter-chunk: `y += Re((Q ⊙ E(·, −1)) S_in)`, one real GEMM with inner
//!   dimension 2K: `[Re Q̃ | −Im Q̃] (C × 2K) · [Re S; Im S] (2K × V)`.
//! - Off-diagonal sub-chunk pairs (query sub-chunk i > key sub-chunk j): the
//!   anchor `r` is the last step of sub-chunk j, so `m ≤ r < n` and
//!   `E(n, m) = E(n, r) · E(r, m)`, both factors of modulus ≤ 1 (a reset in
//!   (m, n] lies in (m, r] or in (r, n], zeroing one of them). With
//!   `q̃_n = q_n ⊙ E(n, r)` and `k̃_m = k_m ⊙ E(r, m)`,
//!   `score_nm = Re Σ_d q̃_nd k̃_md = Σ_d Re q̃ Re k̃ − Im q̃ Im k̃`, i.e. ONE
//!   real GEMM with inner dimension 2K: `[Re q̃, −Im q̃] · [Re k̃, Im k̃]ᵀ`,
//!   for all later queries against sub-chunk j at once.
//! - Diagonal sub-chunks, pairwise (m ≤ n): `score_nm = Σ_d q_nd k_md Re
//!   E(n, m)_d`, each exponent a direct difference `G_n − G_m`.
//! - `y += P V` with the block lower-triangular score matrix P (C × C), a
//!   GEMM whose inner loop stops at the diagonal.
//!
//! All arithmetic is f32. GEMMs are a small register-blocked kernel (4 rows ×
//! 16/8/4/1 columns); exp and sincos are branch-free polynomials (Cephes
//! coefficients, Cody–Waite reduction) so the loops over channels vectorize.
//! On x86-64 with AVX2+FMA (detected at run time) the passes are compiled a
//! second time for that target with fused multiply-adds.

use num_complex::Complex;
use rayon::prelude::*;

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
        if self.chunk_len == 0 || self.chunk_len % self.sub_chunk_len != 0 {
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
    p.validate()?;
    let mut out = Outputs::zeros(&p.dims);
    forward_into(p, params, out.as_mut())?;
    Ok(out)
}

/// Chunked forward in f32 into caller buffers.
pub fn forward_into(p: &Problem<'_, f32>, params: &ChunkParams, out: OutputsMut<'_, f32>) -> Result<(), InputError> {
    forward_impl(p, params, out, simd_available())
}

/// Which compilation of the passes runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// Portable code, separate multiply and add.
    Portable,
    /// x86-64 AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

fn simd_available() -> Isa {
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

trait Arith: Copy + Send + Sync + 'static {
    /// a·b + c
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
struct Plain;
impl Arith for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[derive(Clone, Copy)]
#[cfg(target_arch = "x86_64")]
struct Fused;
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

/// Below this Re(log_gate) a step is a reset: exp(g) is exactly 0 in f32.
const RESET_BELOW: f32 = -110.0;

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

/// e^x for x ≤ 0 (clamped to [−88, 0]; e^x < e^{−87} flushes to 0).
#[inline(always)]
fn exp_nonpos<F: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = select(x < -88.0, -88.0, select(x > 0.0, 0.0, x));
    let t = F::fma(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = F::fma(-n, LN2_HI, xc);
    let r = F::fma(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = F::fma(p, r, 1.398_199_9e-3);
    p = F::fma(p, r, 8.333_452e-3);
    p = F::fma(p, r, 4.166_579_6e-2);
    p = F::fma(p, r, 1.666_666_5e-1);
    p = F::fma(p, r, 5.000_000_1e-1);
    let e = F::fma(p, r * r, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    select(x < -87.0, 0.0, e * scale)
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

/// e^{re + i·im} for re ≤ 0.
#[inline(always)]
fn cexp<F: Arith>(re: f32, im: f32) -> (f32, f32) {
    let m = exp_nonpos::<F>(re);
    let (s, c) = sincos::<F>(im);
    (m * c, m * s)
}

/// Re e^{re + i·im} for re ≤ 0.
#[inline(always)]
fn cexp_re<F: Arith>(re: f32, im: f32) -> f32 {
    exp_nonpos::<F>(re) * sincos::<F>(im).1
}

// ---------------------------------------------------------------------------
// Small dense kernels.
// ---------------------------------------------------------------------------

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
        for j in 0..NR {
            crow[j] += row[j];
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
) {
    let mut j = 0;
    while j + 16 <= n {
        micro::<F, MR, 16>(kc, a, ars, acs, i0, b, ldb, j, c, ldc);
        j += 16;
    }
    if j + 8 <= n {
        micro::<F, MR, 8>(kc, a, ars, acs, i0, b, ldb, j, c, ldc);
        j += 8;
    }
    if j + 4 <= n {
        micro::<F, MR, 4>(kc, a, ars, acs, i0, b, ldb, j, c, ldc);
        j += 4;
    }
    while j < n {
        micro::<F, MR, 1>(kc, a, ars, acs, i0, b, ldb, j, c, ldc);
        j += 1;
    }
}

/// C (m × n) += A (m × kd) · B (kd × n), with A(i, p) = `a[i·ars + p·acs]`,
/// B row-major with row stride `ldb`, C row-major with row stride `ldc`.
/// With `lower`, rows `i0..i0+MR` only use inner indices `< i0 + MR` (A is
/// zero beyond its diagonal: the causal score matrix).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm<F: Arith>(
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
) {
    const MR: usize = 4;
    let kc = |end: usize| if lower { kd.min(end) } else { kd };
    let mut i = 0;
    while i + MR <= m {
        row_block::<F, MR>(n, kc(i + MR), a, ars, acs, i, b, ldb, c, ldc);
        i += MR;
    }
    while i < m {
        row_block::<F, 1>(n, kc(i + 1), a, ars, acs, i, b, ldb, c, ldc);
        i += 1;
    }
}

// ---------------------------------------------------------------------------
// Chunk-local segmented log gates.
// ---------------------------------------------------------------------------

/// Sizes and inputs shared by every task of one call.
struct Ctx<'a> {
    p: &'a Problem<'a, f32>,
    chunk: usize,
    sub: usize,
    kd: usize,
    vd: usize,
    gd: usize,
    heads: usize,
    len: usize,
}

impl Ctx<'_> {
    /// (b, h, first step, steps) of task (bh, c).
    #[inline]
    fn chunk_of(&self, bh: usize, c: usize) -> (usize, usize, usize, usize) {
        let t0 = c * self.chunk;
        (bh / self.heads, bh % self.heads, t0, self.chunk.min(self.len - t0))
    }
}

/// Per-thread scratch, allocated once per rayon split.
struct Scratch {
    /// Segmented chunk-local Σ Re g, `[t][channel]`.
    gre: Vec<f32>,
    /// Segmented chunk-local Σ Im g wrapped to [−π, π], `[t][channel]`.
    gim: Vec<f32>,
    /// Chunk-local index of the last reset at or before t, or −1.
    rst: Vec<i32>,
    /// A row of zeros (G_{−1}).
    zeros: Vec<f32>,
    /// `[C][2K]`: K̃ (pass 1) or the inter-chunk Q̃ (pass 3).
    wide: Vec<f32>,
    /// `[C][2K]`: anchored queries.
    qa: Vec<f32>,
    /// `[S][2K]` anchored keys and their transpose `[2K][S]`.
    ka: Vec<f32>,
    kat: Vec<f32>,
    /// `[C][C]` causal scores.
    scores: Vec<f32>,
    /// `[C][V]` output block.
    yblk: Vec<f32>,
    /// `[K]`
    tmp: Vec<f32>,
}

impl Scratch {
    fn new(ctx: &Ctx<'_>) -> Self {
        let (c, s, k, v, g) = (ctx.chunk, ctx.sub, ctx.kd, ctx.vd, ctx.gd);
        Scratch {
            gre: vec![0.0; c * g],
            gim: vec![0.0; c * g],
            rst: vec![-1; c * g],
            zeros: vec![0.0; g],
            wide: vec![0.0; c * 2 * k],
            qa: vec![0.0; c * 2 * k],
            ka: vec![0.0; s * 2 * k],
            kat: vec![0.0; s * 2 * k],
            scores: vec![0.0; c * c],
            yblk: vec![0.0; c * v],
            tmp: vec![0.0; k],
        }
    }

    /// Builds G and R for steps `t0..t0+clen` of head (b, h).
    #[inline(always)]
    fn build_prefix<F: Arith>(&mut self, ctx: &Ctx<'_>, b: usize, h: usize, t0: usize, clen: usize) {
        let gd = ctx.gd;
        let p = ctx.p;
        for t in 0..clen {
            let g = &p.log_gate[p.row(b, t0 + t, h, gd)..][..gd];
            let (gre, rest_re) = self.gre.split_at_mut(t * gd);
            let (gim, rest_im) = self.gim.split_at_mut(t * gd);
            let (rst, rest_rst) = self.rst.split_at_mut(t * gd);
            let (cur_re, cur_im, cur_rst) = (&mut rest_re[..gd], &mut rest_im[..gd], &mut rest_rst[..gd]);
            let first = t == 0;
            let (prev_re, prev_im, prev_rst): (&[f32], &[f32], &[i32]) = if first {
                (&self.zeros, &self.zeros, &[])
            } else {
                (&gre[(t - 1) * gd..], &gim[(t - 1) * gd..], &rst[(t - 1) * gd..])
            };
            for ch in 0..gd {
                let z = g[ch];
                let reset = z.re < RESET_BELOW;
                let s_re = prev_re[ch] + z.re;
                let s_im = reduce_2pi::<F>(prev_im[ch] + reduce_2pi::<F>(z.im));
                cur_re[ch] = select(reset, 0.0, s_re);
                cur_im[ch] = select(reset, 0.0, s_im);
                let pr = if first { -1 } else { prev_rst[ch] };
                cur_rst[ch] = if reset { t as i32 } else { pr };
            }
        }
    }

    /// E(late, early) of channel `ch` (early = −1: from the chunk start).
    #[inline(always)]
    fn factor<F: Arith>(&self, gd: usize, late: usize, early: isize, ch: usize) -> (f32, f32) {
        let l = late * gd + ch;
        if self.rst[l] as isize > early {
            return (0.0, 0.0);
        }
        let (er, ei) = if early < 0 {
            (0.0, 0.0)
        } else {
            let e = early as usize * gd + ch;
            (self.gre[e], self.gim[e])
        };
        cexp::<F>(self.gre[l] - er, self.gim[l] - ei)
    }
}

/// `out[d] = x[d]·Re E(late, early)_d`, `out[K + d] = im_sign·x[d]·Im E(late, early)_d`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn factor_row<F: Arith>(
    gre: &[f32],
    gim: &[f32],
    rst: &[i32],
    zeros: &[f32],
    gd: usize,
    x: &[f32],
    late: usize,
    early: isize,
    im_sign: f32,
    out: &mut [f32],
) {
    let kd = x.len();
    let (out_re, out_im) = out[..2 * kd].split_at_mut(kd);
    if gd == 1 {
        let (er, ei) = if rst[late] as isize > early {
            (0.0, 0.0)
        } else {
            let (pr, pi) = if early < 0 { (0.0, 0.0) } else { (gre[early as usize], gim[early as usize]) };
            cexp::<F>(gre[late] - pr, gim[late] - pi)
        };
        let ei = ei * im_sign;
        for ((o_re, o_im), &xv) in out_re.iter_mut().zip(out_im.iter_mut()).zip(x) {
            *o_re = xv * er;
            *o_im = xv * ei;
        }
    } else {
        let (l_re, l_im, l_rst) = (&gre[late * gd..][..kd], &gim[late * gd..][..kd], &rst[late * gd..][..kd]);
        let (e_re, e_im) = if early < 0 {
            (&zeros[..kd], &zeros[..kd])
        } else {
            let e = early as usize * gd;
            (&gre[e..e + kd], &gim[e..e + kd])
        };
        let early = early as i32;
        for d in 0..kd {
            let (er, ei) = cexp::<F>(l_re[d] - e_re[d], l_im[d] - e_im[d]);
            let keep = l_rst[d] <= early;
            out_re[d] = select(keep, x[d] * er, 0.0);
            out_im[d] = select(keep, x[d] * ei * im_sign, 0.0);
        }
    }
}

// ---------------------------------------------------------------------------
// The three passes.
// ---------------------------------------------------------------------------

/// Pass 1 for chunk (bh, c): U_c (planar 2K × V) and the decay A_c (gd).
#[inline(always)]
fn pass1_chunk<F: Arith>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    bh: usize,
    c: usize,
    state: &mut [f32],
    decay: &mut [Complex<f32>],
) {
    let (b, h, t0, clen) = ctx.chunk_of(bh, c);
    let (kd, vd, gd) = (ctx.kd, ctx.vd, ctx.gd);
    let p = ctx.p;
    let k2 = 2 * kd;
    s.build_prefix::<F>(ctx, b, h, t0, clen);
    let last = clen - 1;
    let (ks, vs) = (ctx.heads * kd, ctx.heads * vd);
    let k = &p.k[p.row(b, t0, h, kd)..];
    let v = &p.v[p.row(b, t0, h, vd)..];
    for m in 0..clen {
        factor_row::<F>(
            &s.gre,
            &s.gim,
            &s.rst,
            &s.zeros,
            gd,
            &k[m * ks..m * ks + kd],
            last,
            m as isize,
            1.0,
            &mut s.wide[m * k2..(m + 1) * k2],
        );
    }
    state.fill(0.0);
    // U (2K × V) = K̃ᵀ (2K × clen) · V (clen × V); K̃ᵀ(i, m) = wide[m·2K + i].
    gemm::<F>(k2, vd, clen, &s.wide, 1, k2, v, vs, state, vd, false);
    for (ch, a) in decay.iter_mut().enumerate() {
        let (re, im) = s.factor::<F>(gd, last, -1, ch);
        *a = Complex::new(re, im);
    }
}

/// Pass 2 for key row `d` of head `bh`: carry the state over the chunks.
/// `states` points at this head's `[n_chunks][2K][V]` block; only rows d and
/// K + d of each chunk are touched.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pass2_row(
    n_chunks: usize,
    kd: usize,
    vd: usize,
    gd: usize,
    d: usize,
    states: SyncPtr,
    state_base: usize,
    decay: &[Complex<f32>],
    h0_row: Option<&[Complex<f32>]>,
    h_final_row: &mut [Complex<f32>],
    s_re: &mut [f32],
    s_im: &mut [f32],
) {
    match h0_row {
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
    for c in 0..n_chunks {
        let a = decay[c * gd + ch];
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
    for ((z, &r), &i) in h_final_row.iter_mut().zip(s_re.iter()).zip(s_im.iter()) {
        *z = Complex::new(r, i);
    }
}

/// Pass 3 for chunk (bh, c): y rows of the chunk into `s.yblk` (clen × V).
#[inline(always)]
fn pass3_chunk<F: Arith>(ctx: &Ctx<'_>, s: &mut Scratch, bh: usize, c: usize, state_in: Option<&[f32]>) {
    let (b, h, t0, clen) = ctx.chunk_of(bh, c);
    let (kd, vd, gd, sub) = (ctx.kd, ctx.vd, ctx.gd, ctx.sub);
    let p = ctx.p;
    let k2 = 2 * kd;
    s.build_prefix::<F>(ctx, b, h, t0, clen);
    let (ks, vs) = (ctx.heads * kd, ctx.heads * vd);
    let q = &p.q[p.row(b, t0, h, kd)..];
    let k = &p.k[p.row(b, t0, h, kd)..];
    let v = &p.v[p.row(b, t0, h, vd)..];
    let qrow = |n: usize| &q[n * ks..n * ks + kd];
    let krow = |m: usize| &k[m * ks..m * ks + kd];
    let Scratch { gre, gim, rst, zeros, wide, qa, ka, kat, scores, yblk, tmp } = s;
    let (gre, gim, rst, zeros) = (&gre[..], &gim[..], &rst[..], &zeros[..]);
    let yb = &mut yblk[..clen * vd];
    yb.fill(0.0);

    // Inter-chunk: y = [Re Q̃ | −Im Q̃] · [Re S; Im S], Q̃ = Q ⊙ E(·, −1).
    if let Some(st) = state_in {
        for n in 0..clen {
            factor_row::<F>(gre, gim, rst, zeros, gd, qrow(n), n, -1, -1.0, &mut wide[n * k2..(n + 1) * k2]);
        }
        gemm::<F>(clen, vd, k2, wide, k2, 1, st, vd, yb, vd, false);
    }

    // Intra-chunk scores, block lower-triangular, row stride clen.
    let sc = &mut scores[..clen * clen];
    sc.fill(0.0);
    let mut s0 = 0;
    while s0 < clen {
        let s1 = (s0 + sub).min(clen);
        // Diagonal sub-chunk: pairwise, each exponent a direct difference.
        for n in s0..s1 {
            let qn = qrow(n);
            let row = &mut sc[n * clen..n * clen + clen];
            if gd == 1 {
                for m in s0..=n {
                    let w = if rst[n] > m as i32 { 0.0 } else { cexp_re::<F>(gre[n] - gre[m], gim[n] - gim[m]) };
                    row[m] = w * dot::<F>(qn, krow(m));
                }
            } else {
                let (n_re, n_im, n_rst) = (&gre[n * gd..][..kd], &gim[n * gd..][..kd], &rst[n * gd..][..kd]);
                for m in s0..=n {
                    let (m_re, m_im) = (&gre[m * gd..][..kd], &gim[m * gd..][..kd]);
                    let km = krow(m);
                    let mi = m as i32;
                    for d in 0..kd {
                        let w = cexp_re::<F>(n_re[d] - m_re[d], n_im[d] - m_im[d]);
                        tmp[d] = select(n_rst[d] > mi, 0.0, km[d] * w);
                    }
                    row[m] = dot::<F>(qn, tmp);
                }
            }
        }
        // Later queries against this key sub-chunk, anchored at its last step.
        if s1 < clen {
            let r = s1 - 1;
            let (rows, cols) = (clen - s1, s1 - s0);
            for n in s1..clen {
                let o = (n - s1) * k2;
                factor_row::<F>(gre, gim, rst, zeros, gd, qrow(n), n, r as isize, -1.0, &mut qa[o..o + k2]);
            }
            for m in s0..s1 {
                let o = (m - s0) * k2;
                factor_row::<F>(gre, gim, rst, zeros, gd, krow(m), r, m as isize, 1.0, &mut ka[o..o + k2]);
            }
            for (i, krow_a) in ka[..cols * k2].chunks_exact(k2).enumerate() {
                for (dd, &x) in krow_a.iter().enumerate() {
                    kat[dd * cols + i] = x;
                }
            }
            // scores[n][s0..s1] = [Re q̃, −Im q̃] · [Re k̃, Im k̃]ᵀ (inner 2K)
            gemm::<F>(rows, cols, k2, qa, k2, 1, kat, cols, &mut sc[s1 * clen + s0..], clen, false);
        }
        s0 = s1;
    }
    // y += P · V (causal: row n stops at inner index n).
    gemm::<F>(clen, vd, clen, sc, clen, 1, v, vs, yb, vd, true);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pass1_avx2(ctx: &Ctx<'_>, s: &mut Scratch, bh: usize, c: usize, state: &mut [f32], decay: &mut [Complex<f32>]) {
    pass1_chunk::<Fused>(ctx, s, bh, c, state, decay)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn pass3_avx2(ctx: &Ctx<'_>, s: &mut Scratch, bh: usize, c: usize, state_in: Option<&[f32]>) {
    pass3_chunk::<Fused>(ctx, s, bh, c, state_in)
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes (see each use), within one call.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    #[inline(always)]
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn forward_impl(p: &Problem<'_, f32>, params: &ChunkParams, out: OutputsMut<'_, f32>, isa: Isa) -> Result<(), InputError> {
    params.validate()?;
    p.validate()?;
    p.check_gate()?;
    out.validate(&p.dims)?;
    let d = p.dims;
    let (kd, vd, gd) = (d.key_dim, d.value_dim, d.gate_dim());
    let n_chunks = d.len.div_ceil(params.chunk_len);
    let ctx = Ctx {
        p,
        chunk: params.chunk_len,
        sub: params.sub_chunk_len,
        kd,
        vd,
        gd,
        heads: d.heads,
        len: d.len,
    };
    let bh_count = d.batch * d.heads;
    let blk = 2 * kd * vd;
    let mut states = vec![0f32; bh_count * n_chunks * blk];
    let mut decay = vec![Complex::new(0f32, 0f32); bh_count * n_chunks * gd];

    // Pass 1: chunk states and decays, parallel over (b, h, chunk).
    states.par_chunks_mut(blk).zip(decay.par_chunks_mut(gd)).enumerate().for_each_init(
        || Scratch::new(&ctx),
        |s, (task, (state, dec))| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { pass1_avx2(&ctx, s, bh, c, state, dec) },
                Isa::Portable => pass1_chunk::<Plain>(&ctx, s, bh, c, state, dec),
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
            pass2_row(n_chunks, kd, vd, gd, dd, sptr, bh * head_states, dec, h0_row, hf, s_re, s_im);
        },
    );

    // Pass 3: outputs, parallel over (b, h, chunk); each task owns its y rows.
    let states = &states;
    let yptr = SyncPtr(out.y.as_mut_ptr());
    let (heads, len) = (d.heads, d.len);
    (0..bh_count * n_chunks).into_par_iter().for_each_init(
        || Scratch::new(&ctx),
        |s, task| {
            let (bh, c) = (task / n_chunks, task % n_chunks);
            let state_in = (c > 0 || p.h0.is_some()).then(|| &states[task * blk..(task + 1) * blk]);
            match isa {
                // SAFETY: AVX2 and FMA were detected at run time.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { pass3_avx2(&ctx, s, bh, c, state_in) },
                Isa::Portable => pass3_chunk::<Plain>(&ctx, s, bh, c, state_in),
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dims, random_problem, GateRegime};

    #[test]
    fn exp_and_sincos_are_accurate() {
        for i in 0..20000 {
            let x = -(i as f32) * 0.0045;
            let e = exp_nonpos::<Plain>(x) as f64;
            let r = (x as f64).exp();
            assert!((e - r).abs() <= 3e-7 * r + 2e-38, "exp({x}) = {e}, want {r}");
        }
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

    #[test]
    fn portable_and_simd_compilations_agree() {
        for (i, per_head) in [false, true].into_iter().enumerate() {
            let pr = random_problem(dims(2, 200, 2, 9, 7, per_head), GateRegime::Mixed, true, 40 + i as u64).to_f32();
            let mut a = Outputs::zeros(&pr.dims);
            let mut b = Outputs::zeros(&pr.dims);
            forward_impl(&pr.view(), &ChunkParams::default(), a.as_mut(), Isa::Portable).unwrap();
            forward_impl(&pr.view(), &ChunkParams::default(), b.as_mut(), simd_available()).unwrap();
            let e = crate::compare(&a.y, &b.y);
            assert!(e.within(1e-5, 1e-5), "{e:?}");
            let e = crate::compare_complex(&a.h_final, &b.h_final);
            assert!(e.within(1e-5, 1e-5), "{e:?}");
        }
    }
}
