//! The f32 CPU mirror of the fused-scan backward (`cuda/scan_grad.cu`): the
//! same plan, chunking and accumulation order, operation for operation, so
//! that testing it against the f64 oracle ([`crate::reference::grad`], whose
//! module doc fixes the gradient convention) proves the kernel's algorithm
//! without a GPU.
//!
//! # The algorithm
//!
//! The adjoint δ_t = ∂L/∂h_t is itself a linear recurrence, run backwards
//! with conjugated gates:
//!
//! ```text
//! δ_t = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t,      δ_L := dh_final, a_L := 1
//! ```
//!
//! (a_L = 1 makes δ_{L−1} = dh_final + q_{L−1}ᵀ dy_{L−1}, and steps past L are
//! the identity, so the padding of the last chunk carries dh_final through
//! unchanged). Its element at step t is (conj(a_{t+1}), q_t\[k\]·dy_t\[v\]), so it
//! is the forward scan's machinery ([`super::scan`]) on the time-reversed
//! chunk: thread `threads − 1 − th` of the reversed chunk owns the steps of
//! thread `th`, reversed. In the kernel that is a `__shfl_down_sync`
//! Hillis–Steele scan and the earlier-in-reverse warps (w + 1..W, folded from
//! W − 1 down), which is the same arithmetic in the same order.
//!
//! Per step, with h_{t−1} recomputed from chunk-boundary checkpoints:
//!
//! ```text
//! dq_t[k] = Σ_v dy_t[v] · Re h_t[k, v]          dk_t[k] = Σ_v Re δ_t[k, v] · v_t[v]
//! dv_t[v] = Σ_k Re δ_t[k, v] · k_t[k]           dg_t[k] = conj(a_t[k]) · Σ_v conj(h_{t−1}[k, v]) · δ_t[k, v]
//! dh0     = conj(a_0) ⊙ δ_0
//! ```
//!
//! (a per-head gate sums dg over k; a reset a_t = 0 gives dg_t = 0 and stops δ
//! exactly, as in the reference).
//!
//! # Launches (per (b, h); the kernel's chunks of `chunk_len = S · 32 · W` steps)
//!
//! 1. forward reduce + carry: the forward's own kernels
//!    (`cpu::scan`'s `chunk_entering_states`): the state entering every
//!    chunk, the only forward states stored (`[chunks][K][V]`);
//! 2. reverse reduce: the reverse aggregate (A, B) of every chunk but the
//!    first (the block aggregate folds the warp aggregates from W − 1 down);
//! 3. reverse carry, per (k, v): D_{nc−1} = dh_final (or 0),
//!    D_c = A_{c+1} D_{c+1} + B_{c+1}: the adjoint entering each chunk from
//!    its right;
//! 4. the gradients, per chunk, one block; the block loops over value tiles
//!    of `value_tile` columns (outer) and key rows (inner, in order):
//!    - the forward block scan from the chunk's entering state and the serial
//!      re-run of each thread's S steps, keeping h_{t−1} of its steps and
//!      reducing dq over the tile's columns;
//!    - the reverse block scan from D_c and the serial re-run of the thread's
//!      steps backwards, reducing dk and the gate's Σ_v conj(h_{t−1}) δ over
//!      the tile's columns, accumulating dv over k (in order);
//!    - per (t, k) the tile's partial is written by the first tile and added
//!      by the later ones (in order): the thread owning step t owns those
//!      elements in every tile, so no atomics, and the result is
//!      deterministic. A per-head gate sums its K rows of a tile in a
//!      register first.
//!
//! Memory beyond inputs and gradients: 2 · B·H·chunks·K·(V + 1) complex
//! (forward and reverse chunk states and gates), never O(L·K·V).
//!
//! The mirror processes all V columns of a thread together (each column's
//! arithmetic is independent) but groups the sums over V by the kernel's
//! value tiles. Every complex product and sum is the kernel's explicit `fmaf`
//! sequence (`f32::mul_add`); only `exp2f`/`sincosf` differ from the CPU's
//! libm by a few ulp. Parallel with rayon over (b, h) and over chunks.

use num_complex::Complex;
use rayon::prelude::*;

use super::scan::{
    BlockScan, C32, LANES, ScanParams, apply, block_scan, chunk_entering_states, cmul, complex_gate, fold, step,
    thread_entries,
};
use crate::error::InputError;
use crate::problem::Problem;
use crate::reference::grad::{self, GradInputs, Grads, GradsMut, HeadGrads, per_head_grads_into};

/// Tuning of the scan backward: the forward's chunk geometry plus the value
/// tile the gradient kernel's threads own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanGradParams {
    /// Steps per thread and warps per block (the chunk geometry).
    pub scan: ScanParams,
    /// Value columns per thread of the gradient kernel (T): the sums over V
    /// of dq, dk and the gate are grouped by tiles of this many columns.
    pub value_tile: usize,
}

impl Default for ScanGradParams {
    /// The forward's default geometry, tiles of 2 columns.
    fn default() -> Self {
        ScanGradParams { scan: ScanParams::default(), value_tile: 2 }
    }
}

impl ScanGradParams {
    /// Checks the ranges (errors name the parameter).
    pub fn validate(&self) -> Result<(), InputError> {
        self.scan.validate()?;
        if self.value_tile == 0 || self.value_tile > 4096 {
            return Err(InputError::Param {
                name: "value_tile",
                value: self.value_tile.to_string(),
                why: "must be in 1..=4096",
            });
        }
        Ok(())
    }
}

/// conj(x) · y + acc (explicit fmaf, as `cconj_fma` in the kernel).
#[inline(always)]
fn conj_mul_add(x: C32, y: C32, acc: C32) -> C32 {
    C32::new(x.re.mul_add(y.re, x.im.mul_add(y.im, acc.re)), x.re.mul_add(y.im, (-x.im).mul_add(y.re, acc.im)))
}

/// `total` for the first tile, `total + partial` for the later ones.
#[inline(always)]
fn tile_sum<X: std::ops::Add<Output = X> + Copy>(tile: usize, total: &mut X, partial: X) {
    *total = if tile == 0 { partial } else { *total + partial };
}

/// The gradients of one chunk of one head (valid steps only) and, for chunk
/// 0, dh0.
struct ChunkGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dg: Vec<C32>,
    dh0: Option<Vec<C32>>,
}

/// The per-chunk inputs (identity past L), index i = thread · S + s.
struct ChunkData {
    t0: usize,
    n: usize,
    threads: usize,
    s_len: usize,
    /// `[n][V]`
    v: Vec<f32>,
    /// `[n][V]`
    dy: Vec<f32>,
    /// `[n][V]`, time-reversed within the chunk.
    dy_rev: Vec<f32>,
}

/// One key row's per-step inputs of a chunk.
struct RowData {
    /// `[n + 1]`: a_{t0 + i} (identity at and past L).
    a: Vec<C32>,
    /// `[n]`
    kk: Vec<f32>,
    /// `[n]`
    qq: Vec<f32>,
}

struct Head<'p, 'a> {
    p: &'p Problem<'a, f32>,
    dy: &'p [f32],
    b: usize,
    h: usize,
    gp: ScanGradParams,
}

impl Head<'_, '_> {
    fn chunk_data(&self, chunk: usize) -> ChunkData {
        let d = self.p.dims;
        let (s_len, vd) = (self.gp.scan.steps_per_thread, d.value_dim);
        let threads = LANES * self.gp.scan.warps;
        let n = threads * s_len;
        let t0 = chunk * self.gp.scan.chunk_len();
        let mut v = vec![0.0f32; n * vd];
        let mut dy = vec![0.0f32; n * vd];
        for i in 0..n {
            let t = t0 + i;
            if t < d.len {
                let o = self.p.row(self.b, t, self.h, vd);
                v[i * vd..(i + 1) * vd].copy_from_slice(&self.p.v[o..o + vd]);
                dy[i * vd..(i + 1) * vd].copy_from_slice(&self.dy[o..o + vd]);
            }
        }
        let dy_rev = (0..n).rev().flat_map(|i| dy[i * vd..(i + 1) * vd].iter().copied()).collect();
        ChunkData { t0, n, threads, s_len, v, dy, dy_rev }
    }

    #[inline(always)]
    fn row_data(&self, cd: &ChunkData, row: usize) -> RowData {
        let d = self.p.dims;
        let kd = d.key_dim;
        let mut a = vec![C32::new(1.0, 0.0); cd.n + 1];
        let mut kk = vec![0.0f32; cd.n];
        let mut qq = vec![0.0f32; cd.n];
        for (i, ai) in a.iter_mut().enumerate() {
            let t = cd.t0 + i;
            if t < d.len {
                *ai = complex_gate(self.p.gate(self.b, t, self.h, row));
                if i < cd.n {
                    let o = self.p.row(self.b, t, self.h, kd) + row;
                    kk[i] = self.p.k[o];
                    qq[i] = self.p.q[o];
                }
            }
        }
        RowData { a, kk, qq }
    }

    /// The reverse block scan of one row: elements (conj(a_{t+1}), q_t dy_t)
    /// of the time-reversed chunk.
    #[inline(always)]
    fn reverse_scan(&self, cd: &ChunkData, rd: &RowData) -> BlockScan {
        let n = cd.n;
        let a_rev: Vec<C32> = (0..n).map(|r| rd.a[n - r].conj()).collect();
        let q_rev: Vec<f32> = (0..n).map(|r| rd.qq[n - 1 - r]).collect();
        block_scan(&a_rev, &q_rev, &cd.dy_rev, cd.threads, cd.s_len, self.p.dims.value_dim)
    }

    /// Launch 2 for one chunk: its reverse aggregate (`A[k]`, `B[k][v]`).
    fn reverse_reduce(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above), the only
            // requirement of a #[target_feature(enable = "fma")] function.
            return unsafe { self.reverse_reduce_fma(chunk) };
        }
        self.reverse_reduce_impl(chunk)
    }

    /// `reverse_reduce_impl` with hardware FMA (identical results: FMA is
    /// exactly rounded either way; only the speed differs).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    fn reverse_reduce_fma(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        self.reverse_reduce_impl(chunk)
    }

    #[inline(always)]
    fn reverse_reduce_impl(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        let d = self.p.dims;
        let (kd, vd) = (d.key_dim, d.value_dim);
        let cd = self.chunk_data(chunk);
        let mut ga = Vec::with_capacity(kd);
        let mut gb = Vec::with_capacity(kd * vd);
        for row in 0..kd {
            let rd = self.row_data(&cd, row);
            let bs = self.reverse_scan(&cd, &rd);
            let (ta, tb) = fold(&bs.agg_a, &bs.agg_b, self.gp.scan.warps, vd);
            ga.push(ta);
            gb.extend_from_slice(&tb);
        }
        (ga, gb)
    }

    /// Launch 4 for one chunk, from the forward state `fwd_enter` entering it
    /// and the adjoint `adj_enter` entering it from the right (both `[K][V]`).
    fn grads(&self, chunk: usize, fwd_enter: &[C32], adj_enter: &[C32]) -> ChunkGrads {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above), the only
            // requirement of a #[target_feature(enable = "fma")] function.
            return unsafe { self.grads_fma(chunk, fwd_enter, adj_enter) };
        }
        self.grads_impl(chunk, fwd_enter, adj_enter)
    }

    /// `grads_impl` with hardware FMA (see `reverse_reduce_fma`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    fn grads_fma(&self, chunk: usize, fwd_enter: &[C32], adj_enter: &[C32]) -> ChunkGrads {
        self.grads_impl(chunk, fwd_enter, adj_enter)
    }

    #[inline(always)]
    fn grads_impl(&self, chunk: usize, fwd_enter: &[C32], adj_enter: &[C32]) -> ChunkGrads {
        let d = self.p.dims;
        let (kd, vd) = (d.key_dim, d.value_dim);
        let per_head = d.gate_dim() == 1;
        let cd = self.chunk_data(chunk);
        let (n, threads, s_len, warps) = (cd.n, cd.threads, cd.s_len, self.gp.scan.warps);
        let tile = self.gp.value_tile;
        let tiles = vd.div_ceil(tile);
        let valid = d.len.saturating_sub(cd.t0).min(n);
        let zero = C32::new(0.0, 0.0);
        // Per step: [n][K] (dq, dk, per-channel dg), [n][V] dv, [n][tiles]
        // the per-head gate's per-tile sums over k.
        let mut dq = vec![0.0f32; n * kd];
        let mut dk = vec![0.0f32; n * kd];
        let mut dv = vec![0.0f32; n * vd];
        let mut dg = vec![zero; n * d.gate_dim()];
        let mut dg_tiles = vec![zero; if per_head { n * tiles } else { 0 }];
        let mut dh0 = (chunk == 0).then(|| vec![zero; kd * vd]);
        let mut h_prev = vec![zero; n * vd];
        let mut hs = vec![zero; vd];
        for row in 0..kd {
            let rd = self.row_data(&cd, row);
            // The forward: block scan, then each thread's steps from its
            // entering state, keeping h_{t−1}; dq over each tile's columns.
            let fs = block_scan(&rd.a[..n], &rd.kk, &cd.v, threads, s_len, vd);
            let entries = thread_entries(&fs, warps, &fwd_enter[row * vd..(row + 1) * vd]);
            for th in 0..threads {
                hs.copy_from_slice(&entries[th * vd..(th + 1) * vd]);
                for s in 0..s_len {
                    let i = th * s_len + s;
                    h_prev[i * vd..(i + 1) * vd].copy_from_slice(&hs);
                    for (j, x) in hs.iter_mut().enumerate() {
                        *x = step(rd.a[i], rd.kk[i] * cd.v[i * vd + j], *x);
                    }
                    for tl in 0..tiles {
                        let cols = tl * tile..((tl + 1) * tile).min(vd);
                        let dy = &cd.dy[i * vd..(i + 1) * vd];
                        let part =
                            dy[cols.clone()].iter().zip(&hs[cols]).fold(0.0f32, |acc, (&y, x)| y.mul_add(x.re, acc));
                        tile_sum(tl, &mut dq[i * kd + row], part);
                    }
                }
            }
            // The adjoint: reverse block scan, then each thread's steps
            // backwards from its entering adjoint.
            let rs = self.reverse_scan(&cd, &rd);
            let adj_entries = thread_entries(&rs, warps, &adj_enter[row * vd..(row + 1) * vd]);
            for th in 0..threads {
                let th_rev = threads - 1 - th;
                hs.copy_from_slice(&adj_entries[th_rev * vd..(th_rev + 1) * vd]);
                for s in (0..s_len).rev() {
                    let i = th * s_len + s;
                    let alpha = rd.a[i + 1].conj();
                    for (j, x) in hs.iter_mut().enumerate() {
                        *x = step(alpha, rd.qq[i] * cd.dy[i * vd + j], *x);
                    }
                    // hs = δ_t
                    let conj_a = rd.a[i].conj();
                    for tl in 0..tiles {
                        let mut dk_part = 0.0f32;
                        let mut da = zero;
                        for j in tl * tile..((tl + 1) * tile).min(vd) {
                            let delta = hs[j];
                            dk_part = delta.re.mul_add(cd.v[i * vd + j], dk_part);
                            dv[i * vd + j] = delta.re.mul_add(rd.kk[i], dv[i * vd + j]);
                            da = conj_mul_add(h_prev[i * vd + j], delta, da);
                        }
                        tile_sum(tl, &mut dk[i * kd + row], dk_part);
                        let g = cmul(conj_a, da);
                        if per_head {
                            dg_tiles[i * tiles + tl] += g;
                        } else {
                            tile_sum(tl, &mut dg[i * kd + row], g);
                        }
                    }
                    if cd.t0 + i == 0
                        && let Some(dh0) = dh0.as_mut()
                    {
                        for (o, &x) in dh0[row * vd..(row + 1) * vd].iter_mut().zip(&hs) {
                            *o = cmul(conj_a, x);
                        }
                    }
                }
            }
        }
        if per_head {
            for (i, g) in dg.iter_mut().enumerate() {
                for tl in 0..tiles {
                    tile_sum(tl, g, dg_tiles[i * tiles + tl]);
                }
            }
        }
        dq.truncate(valid * kd);
        dk.truncate(valid * kd);
        dv.truncate(valid * vd);
        dg.truncate(valid * d.gate_dim());
        ChunkGrads { dq, dk, dv, dg, dh0 }
    }
}

/// One head: the forward checkpoints, the reverse reduce and carry, the
/// gradients of every chunk.
fn head(p: &Problem<'_, f32>, g: &GradInputs<'_, f32>, gp: ScanGradParams, b: usize, h: usize) -> HeadGrads<f32> {
    let d = p.dims;
    let (kd, vd) = (d.key_dim, d.value_dim);
    let kv = kd * vd;
    let hd = Head { p, dy: g.dy, b, h, gp };
    let fwd_enter = chunk_entering_states(p, gp.scan, b, h);
    let nc = fwd_enter.len();
    // adj_enter[c] = the adjoint entering chunk c from its right.
    let mut adj_enter = vec![Vec::new(); nc];
    adj_enter[nc - 1] = match g.dh_final {
        Some(dh) => dh[(b * d.heads + h) * kv..][..kv].to_vec(),
        None => vec![C32::new(0.0, 0.0); kv],
    };
    let aggs: Vec<(Vec<C32>, Vec<C32>)> = (1..nc).into_par_iter().map(|c| hd.reverse_reduce(c)).collect();
    for c in (0..nc - 1).rev() {
        let (ga, gb) = &aggs[c]; // chunk c + 1
        adj_enter[c] = (0..kv).map(|i| apply(ga[i / vd], gb[i], adj_enter[c + 1][i])).collect();
    }
    let parts: Vec<ChunkGrads> = (0..nc).into_par_iter().map(|c| hd.grads(c, &fwd_enter[c], &adj_enter[c])).collect();
    let mut out = HeadGrads { dq: Vec::new(), dk: Vec::new(), dv: Vec::new(), dg: Vec::new(), dh0: Vec::new() };
    for part in parts {
        out.dq.extend_from_slice(&part.dq);
        out.dk.extend_from_slice(&part.dk);
        out.dv.extend_from_slice(&part.dv);
        out.dg.extend_from_slice(&part.dg);
        if let Some(dh0) = part.dh0 {
            out.dh0 = dh0;
        }
    }
    out
}

/// Gradients of L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final) with respect to
/// every input, by the fused scan backward's algorithm in f32, allocating
/// them; `dh0` is `Some` exactly when `p.h0` is. Same contract as
/// [`crate::reference::grad::backward`].
pub fn backward(
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    params: &ScanGradParams,
) -> Result<Grads<f32>, InputError> {
    grad::allocating(p, dy, dh_final, |g, out| backward_into(p, g, params, out))
}

/// [`backward`] into caller buffers (every element is overwritten; a `dh0`
/// buffer without h0 receives the gradient of the implicit zero state).
/// Validates the parameters, the problem (lengths and gate domain), the
/// upstream gradients and the output buffers before writing.
pub fn backward_into(
    p: &Problem<'_, f32>,
    g: &GradInputs<'_, f32>,
    params: &ScanGradParams,
    out: GradsMut<'_, f32>,
) -> Result<(), InputError> {
    params.validate()?;
    let gp = *params;
    per_head_grads_into(p, g, out, |b, h| head(p, g, gp, b, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validate() {
        assert!(ScanGradParams::default().validate().is_ok());
        let bad = ScanGradParams { value_tile: 0, ..ScanGradParams::default() };
        assert!(matches!(bad.validate(), Err(InputError::Param { name: "value_tile", .. })));
        let bad = ScanGradParams { scan: ScanParams { steps_per_thread: 8, warps: 0 }, value_tile: 2 };
        assert!(matches!(bad.validate(), Err(InputError::Param { name: "warps", .. })));
    }

    #[test]
    fn conj_mul_add_is_conj_times_plus() {
        let (x, y, acc) = (C32::new(0.5, -0.25), C32::new(-2.0, 3.0), C32::new(1.0, 1.0));
        assert_eq!(conj_mul_add(x, y, acc), x.conj() * y + acc);
    }
}
