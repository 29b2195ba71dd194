//! Masked surrogate attention in f32, O(L²): the CPU mirror of
//! `cuda/attention.cu`. Same tiles, same anchors, same tile-to-tile offset
//! carry (phase reduced mod 2π on every addition), same accumulation order;
//! parallel over (batch, head, query tile) with rayon. See the kernel file
//! for the derivation; in short, per (b, h) and tiles of `tile_len` steps:
//!
//! - prep (per tile and gate channel): S_t, the tile-local prefix of log_gate
//!   since the last reset (0 at a reset), its real part compensated (below);
//!   r_t, the tile-local index of the last reset ≤ t (−1: none); B_t, the
//!   tile-local suffix over (t, tile end] (Re = −∞ when a reset lies in it).
//!   Phases are reduced to (−π, π].
//! - diagonal tile: factor(n, m) = 0 if r_n > m, else e^{S_n − S_m} with
//!   Re(S_n − S_m) = (hi_n − hi_m) + (lo_n − lo_m).
//! - off-diagonal pair J < I: e^{G_n − G_m} = e^{A_n + Δ} · e^{B_m} with
//!   A_n = S_n (−∞ if r_n ≥ 0) and Δ = Σ_{J<P<I} T_P (T_P = A at the end of
//!   tile P), carried from J to J − 1; score = [Re q̃, −Im q̃]·[Re k̃, Im k̃]ᵀ.
//! - h0: the same with Δ = Σ_{P<I} T_P; h_final: Δ' = Σ_{P>J} T_P.
//! - early exit once Re Δ < −110 for every channel (every later factor is 0).
//!
//! Why the compensated prefix: after hard-decaying steps (Re g ∈ [−104, −20],
//! just above the reset threshold) |Re S| reaches thousands, where an f32
//! running sum's ulp is ~2.4e-4 and each later small step loses up to half of
//! it; the diagonal's short differences S_n − S_m (factors near 1) then carry
//! that absolute error (measured in tests/cpu_attention.rs: y rel-L2 up to
//! 1.9e-5 and max-abs up to 9.8e-5·max|ref|, against ≤ 4.1e-7 for Random
//! gates; ≤ 1.9e-7 and 3.8e-7·max|ref| compensated). So Re S is summed with
//! TwoSum: hi the f32 sum, lo the running sum of its rounding errors
//! (`TileSums::prefix_lo`, the kernel's ws_prefix_lo). hi_n − hi_m is exact
//! (Sterbenz) whenever the two are within a factor 2, which is exactly the
//! dangerous case; otherwise the difference is itself large (Re ≤ −|hi_n|/2)
//! and its relative rounding is harmless. The off-diagonal factors use S_n
//! (uncompensated) only as A_n: a large |A_n| makes e^{A_n + Δ} tiny, so the
//! same absolute error there is harmless.
//!
//! Only `tile_len` = 64 ([`GPU_TILE`]) mirrors the GPU; other lengths compute
//! the same function (tests use them to exercise tile boundaries).

use num_complex::Complex;
use rayon::prelude::*;

use super::{re_diff, two_sum};
use crate::cuda::abi::GATELOOP_RESET_LOG_GATE;
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem};

/// Re(log_gate) below which a step is a reset in f32 (see the ABI header).
const RESET_LOG_GATE: f32 = GATELOOP_RESET_LOG_GATE as f32;

/// The GPU kernel's tile length.
pub const GPU_TILE: usize = 64;

/// Tuning of the tiled attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionParams {
    /// Time steps per tile (query and key tiles alike). Default 64, the GPU's.
    pub tile_len: usize,
}

impl Default for AttentionParams {
    fn default() -> Self {
        AttentionParams { tile_len: GPU_TILE }
    }
}

/// Below this Re Δ every factor is exactly 0 in f32 (e^{−103.3} is the
/// smallest subnormal).
const DEAD: f32 = -110.0;
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 1.935_307_2e-3;
const INV_TWO_PI: f32 = 0.159_154_94;

/// x mod 2π into [−π, π], Cody–Waite with two constants (as the kernel).
#[inline]
pub fn reduce_phase(x: f32) -> f32 {
    let k = (x * INV_TWO_PI).round_ties_even();
    let x = (-k).mul_add(TWO_PI_HI, x);
    (-k).mul_add(TWO_PI_LO, x)
}

#[inline]
fn cexp(z: Complex<f32>) -> Complex<f32> {
    let mag = z.re.exp();
    let (s, c) = z.im.sin_cos();
    Complex::new(mag * c, mag * s)
}

#[inline]
fn cadd_reduced(a: Complex<f32>, b: Complex<f32>) -> Complex<f32> {
    Complex::new(a.re + b.re, reduce_phase(a.im + b.im))
}

/// The workspace of the prep kernel for one head: `[L, gate_dim]` each.
struct TileSums {
    /// S_t: Re the f32 (TwoSum high) sum, Im reduced mod 2π.
    prefix: Vec<Complex<f32>>,
    /// The TwoSum compensation of Re S_t: Re S_t ≈ prefix.re + prefix_lo.
    prefix_lo: Vec<f32>,
    suffix: Vec<Complex<f32>>,
    reset: Vec<i32>,
    gd: usize,
}

impl TileSums {
    fn new(p: &Problem<'_, f32>, b: usize, h: usize, tl: usize) -> TileSums {
        let (len, gd) = (p.dims.len, p.dims.gate_dim());
        let zero = Complex::new(0.0f32, 0.0);
        let mut ts = TileSums {
            prefix: vec![zero; len * gd],
            prefix_lo: vec![0.0; len * gd],
            suffix: vec![zero; len * gd],
            reset: vec![-1; len * gd],
            gd,
        };
        // The kernel's load_log_gate: a reset-class step (exp(g) exactly 0 in
        // f32) reads as Re = −∞.
        let gate = |t: usize, c: usize| {
            let g = p.gate(b, t, h, c);
            if g.re < RESET_LOG_GATE { Complex::new(f32::NEG_INFINITY, g.im) } else { g }
        };
        let reduced = |g: Complex<f32>| Complex::new(g.re, reduce_phase(g.im));
        for t0 in (0..len).step_by(tl) {
            let n = tl.min(len - t0);
            for c in 0..gd {
                let (mut s, mut lo, mut r) = (zero, 0.0f32, -1i32);
                for j in 0..n {
                    let g = gate(t0 + j, c);
                    if g.re == f32::NEG_INFINITY {
                        (s, lo) = (zero, 0.0);
                        r = j as i32;
                    } else {
                        let (hi, err) = two_sum(s.re, g.re);
                        s = Complex::new(hi, reduce_phase(s.im + reduce_phase(g.im)));
                        lo += err;
                    }
                    ts.prefix[(t0 + j) * gd + c] = s;
                    ts.prefix_lo[(t0 + j) * gd + c] = lo;
                    ts.reset[(t0 + j) * gd + c] = r;
                }
                let mut bsum = zero;
                ts.suffix[(t0 + n - 1) * gd + c] = bsum;
                for j in (1..n).rev() {
                    bsum = cadd_reduced(bsum, reduced(gate(t0 + j, c)));
                    ts.suffix[(t0 + j - 1) * gd + c] = bsum;
                }
            }
        }
        ts
    }

    /// A_t: the tile prefix up to t, Re = −∞ when a reset lies in it.
    #[inline]
    fn prefix_or_dead(&self, t: usize, c: usize) -> Complex<f32> {
        let mut a = self.prefix[t * self.gd + c];
        if self.reset[t * self.gd + c] >= 0 {
            a.re = f32::NEG_INFINITY;
        }
        a
    }
}

/// Tiled attention in f32, allocating the outputs.
pub fn forward(p: &Problem<'_, f32>, params: &AttentionParams) -> Result<Outputs<f32>, InputError> {
    p.validate()?;
    let mut out = Outputs::zeros(&p.dims);
    forward_into(p, params, out.as_mut())?;
    Ok(out)
}

/// Tiled attention in f32 into caller buffers. Validates as the reference
/// does (lengths, gate domain, output lengths) and `tile_len ≥ 1`.
pub fn forward_into(
    p: &Problem<'_, f32>,
    params: &AttentionParams,
    out: OutputsMut<'_, f32>,
) -> Result<(), InputError> {
    p.validate()?;
    p.check_gate()?;
    out.validate(&p.dims)?;
    let tl = params.tile_len;
    if tl == 0 {
        return Err(InputError::Param { name: "tile_len", value: "0".into(), why: "must be at least 1" });
    }
    let d = p.dims;
    let bh = d.batch * d.heads;
    let tiles = d.len.div_ceil(tl);
    let sums: Vec<TileSums> = (0..bh).into_par_iter().map(|x| TileSums::new(p, x / d.heads, x % d.heads, tl)).collect();
    let ys: Vec<Vec<f32>> = (0..bh * tiles)
        .into_par_iter()
        .map(|x| {
            let (head, i) = (x / tiles, x % tiles);
            query_tile(p, &sums[head], head / d.heads, head % d.heads, i, tl)
        })
        .collect();
    let states: Vec<Vec<Complex<f32>>> =
        (0..bh).into_par_iter().map(|x| state(p, &sums[x], x / d.heads, x % d.heads, tl)).collect();
    let vd = d.value_dim;
    for (x, yt) in ys.iter().enumerate() {
        let (head, i) = (x / tiles, x % tiles);
        let (b, h) = (head / d.heads, head % d.heads);
        for (n, row) in yt.chunks_exact(vd).enumerate() {
            let o = p.row(b, i * tl + n, h, vd);
            out.y[o..o + vd].copy_from_slice(row);
        }
    }
    let kv = d.key_dim * vd;
    for (x, s) in states.iter().enumerate() {
        out.h_final[x * kv..(x + 1) * kv].copy_from_slice(s);
    }
    Ok(())
}

/// `[Re q̃, −Im q̃]` of the query tile with offset Δ, as `[n][2K]`.
fn stage_query(
    p: &Problem<'_, f32>,
    ts: &TileSums,
    b: usize,
    h: usize,
    t0: usize,
    ni: usize,
    delta: &[Complex<f32>],
) -> Vec<f32> {
    let kd = p.dims.key_dim;
    let per_head = ts.gd == 1;
    let mut qt = vec![0.0f32; ni * 2 * kd];
    for n in 0..ni {
        let q = &p.q[p.row(b, t0 + n, h, kd)..][..kd];
        for d in 0..kd {
            let c = if per_head { 0 } else { d };
            let a = ts.prefix_or_dead(t0 + n, c);
            let e = cexp(Complex::new(a.re + delta[c].re, a.im + delta[c].im));
            qt[n * 2 * kd + 2 * d] = q[d] * e.re;
            qt[n * 2 * kd + 2 * d + 1] = -(q[d] * e.im);
        }
    }
    qt
}

/// `acc[n][v] += Σ_m sc[n][m] v[m][v]`, m ascending (as the kernel's P·V).
#[allow(clippy::too_many_arguments)]
fn score_times_v(
    p: &Problem<'_, f32>,
    b: usize,
    h: usize,
    t0j: usize,
    nj: usize,
    tl: usize,
    sc: &[f32],
    acc: &mut [f32],
) {
    let vd = p.dims.value_dim;
    for (n, a_row) in acc.chunks_exact_mut(vd).enumerate() {
        for m in 0..nj {
            let s = sc[n * tl + m];
            let vm = &p.v[p.row(b, t0j + m, h, vd)..][..vd];
            for (a, &vv) in a_row.iter_mut().zip(vm) {
                *a = s.mul_add(vv, *a);
            }
        }
    }
}

/// y of query tile `i` of head (b, h), `[ni][V]`.
fn query_tile(p: &Problem<'_, f32>, ts: &TileSums, b: usize, h: usize, i: usize, tl: usize) -> Vec<f32> {
    let d = p.dims;
    let (kd, vd, gd) = (d.key_dim, d.value_dim, ts.gd);
    let per_head = gd == 1;
    let t0i = i * tl;
    let ni = tl.min(d.len - t0i);
    let mut acc = vec![0.0f32; ni * vd];
    let mut sc = vec![0.0f32; ni * tl];

    // Diagonal tile, pairwise.
    for n in 0..ni {
        let q = &p.q[p.row(b, t0i + n, h, kd)..][..kd];
        for m in 0..=n {
            let k = &p.k[p.row(b, t0i + m, h, kd)..][..kd];
            let (mut s, mut f) = (0.0f32, 0.0f32);
            for dd in 0..kd {
                if dd == 0 || !per_head {
                    let c = if per_head { 0 } else { dd };
                    f = 0.0;
                    if ts.reset[(t0i + n) * gd + c] <= m as i32 {
                        let (wn, wm) = ((t0i + n) * gd + c, (t0i + m) * gd + c);
                        let (sn, sm) = (ts.prefix[wn], ts.prefix[wm]);
                        let re = re_diff(sn.re, ts.prefix_lo[wn], sm.re, ts.prefix_lo[wm]);
                        f = re.exp() * (sn.im - sm.im).cos();
                    }
                }
                s = (q[dd] * k[dd]).mul_add(f, s);
            }
            sc[n * tl + m] = s;
        }
    }
    score_times_v(p, b, h, t0i, ni, tl, &sc, &mut acc);

    // Off-diagonal pairs J = I−1 … 0, Δ carried.
    let mut delta = vec![Complex::new(0.0f32, 0.0); gd];
    let mut reached_start = true;
    let mut kt = vec![0.0f32; 2 * kd * tl]; // [2K][m]
    for j in (0..i).rev() {
        if delta.iter().all(|z| z.re < DEAD) {
            reached_start = false;
            break;
        }
        let t0j = j * tl;
        let qt = stage_query(p, ts, b, h, t0i, ni, &delta);
        for m in 0..tl {
            let k = &p.k[p.row(b, t0j + m, h, kd)..][..kd];
            for dd in 0..kd {
                let c = if per_head { 0 } else { dd };
                let e = cexp(ts.suffix[(t0j + m) * gd + c]);
                kt[(2 * dd) * tl + m] = k[dd] * e.re;
                kt[(2 * dd + 1) * tl + m] = k[dd] * e.im;
            }
        }
        sc.fill(0.0);
        for n in 0..ni {
            let row = &mut sc[n * tl..(n + 1) * tl];
            for x in 0..2 * kd {
                let a = qt[n * 2 * kd + x];
                for (s, &kk) in row.iter_mut().zip(&kt[x * tl..(x + 1) * tl]) {
                    *s = a.mul_add(kk, *s);
                }
            }
        }
        for (c, dl) in delta.iter_mut().enumerate() {
            *dl = cadd_reduced(*dl, ts.prefix_or_dead(t0j + tl - 1, c));
        }
        score_times_v(p, b, h, t0j, tl, tl, &sc, &mut acc);
    }

    // h0: acc += [Re q̃, −Im q̃]·[Re h0; Im h0].
    if let (true, Some(h0)) = (reached_start, p.h0) {
        let h0 = &h0[(b * d.heads + h) * kd * vd..][..kd * vd];
        let qt = stage_query(p, ts, b, h, t0i, ni, &delta);
        for (n, a_row) in acc.chunks_exact_mut(vd).enumerate() {
            for dd in 0..kd {
                let (qr, qi) = (qt[n * 2 * kd + 2 * dd], qt[n * 2 * kd + 2 * dd + 1]);
                for (a, z) in a_row.iter_mut().zip(&h0[dd * vd..(dd + 1) * vd]) {
                    *a = qr.mul_add(z.re, *a);
                    *a = qi.mul_add(z.im, *a);
                }
            }
        }
    }
    acc
}

/// h_final of head (b, h), `[K][V]`: tiles from the last, Δ' = Σ_{P>J} T_P.
fn state(p: &Problem<'_, f32>, ts: &TileSums, b: usize, h: usize, tl: usize) -> Vec<Complex<f32>> {
    let d = p.dims;
    let (kd, vd, gd, len) = (d.key_dim, d.value_dim, ts.gd, d.len);
    let per_head = gd == 1;
    let (mut hr, mut hi) = (vec![0.0f32; kd * vd], vec![0.0f32; kd * vd]);
    let mut delta = vec![Complex::new(0.0f32, 0.0); gd];
    let mut reached_start = true;
    for j in (0..len.div_ceil(tl)).rev() {
        if delta.iter().all(|z| z.re < DEAD) {
            reached_start = false;
            break;
        }
        let t0j = j * tl;
        let nj = tl.min(len - t0j);
        for m in 0..nj {
            let k = &p.k[p.row(b, t0j + m, h, kd)..][..kd];
            let vm = &p.v[p.row(b, t0j + m, h, vd)..][..vd];
            for row in 0..kd {
                let c = if per_head { 0 } else { row };
                let bs = ts.suffix[(t0j + m) * gd + c];
                let e = cexp(Complex::new(bs.re + delta[c].re, bs.im + delta[c].im));
                let (kr, ki) = (k[row] * e.re, k[row] * e.im);
                for (col, &vv) in vm.iter().enumerate() {
                    hr[row * vd + col] = kr.mul_add(vv, hr[row * vd + col]);
                    hi[row * vd + col] = ki.mul_add(vv, hi[row * vd + col]);
                }
            }
        }
        for (c, dl) in delta.iter_mut().enumerate() {
            *dl = cadd_reduced(*dl, ts.prefix_or_dead(t0j + nj - 1, c));
        }
    }
    let h0 = p.h0.filter(|_| reached_start).map(|h0| &h0[(b * d.heads + h) * kd * vd..][..kd * vd]);
    (0..kd * vd)
        .map(|x| {
            let (mut re, mut im) = (hr[x], hi[x]);
            if let Some(h0) = h0 {
                let c = if per_head { 0 } else { x / vd };
                let e = cexp(delta[c]);
                let z = h0[x];
                re += e.re * z.re - e.im * z.im;
                im += e.re * z.im + e.im * z.re;
            }
            Complex::new(re, im)
        })
        .collect()
}
