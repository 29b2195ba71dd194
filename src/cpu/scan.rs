//! The f32 CPU mirror of the fused scan kernel (`cuda/scan.cu`): the same
//! algorithm, operation for operation, so that testing it against the f64
//! reference proves the kernel's algorithm without a GPU.
//!
//! Mirrored exactly:
//! - time chunks of `chunk_len = steps_per_thread · 32 · warps` steps, each
//!   thread of a chunk owning `steps_per_thread` consecutive steps;
//! - per key row k (in order 0..K): the thread's serial fold of its
//!   elements; a Hillis–Steele inclusive scan over each warp's 32 lanes (the
//!   `__shfl_up_sync` loop: offsets 1, 2, 4, 8, 16, a lane ≥ offset combining
//!   the value of lane − offset *before* this level in front of its own);
//!   the in-order fold of the earlier warps' aggregates; the entering state
//!   pushed through the warp prefix, then the lane's exclusive prefix; the
//!   serial re-run with the readout `y += q · Re h` (one FMA per k, k in order);
//! - the carry: every chunk but the last reduced to its aggregate (in-order
//!   fold of all warp aggregates), then per (k, v) a sequential walk
//!   `h ← A_c h + B_c` over the chunks, starting from h0 (or 0);
//! - steps past L are the identity element (a = 1, k = q = v = 0);
//! - every complex product and sum is the kernel's explicit `fmaf` sequence
//!   (`f32::mul_add` here), and the gate is `exp2(Re · log2 e) · (cos, sin)(Im)`.
//!
//! The kernel's value tiling (T columns per thread) does not change any
//! arithmetic (the 'A' component is per (t, k), each column's 'B' is
//! independent), so the mirror processes all V columns of a thread together.
//! What cannot match bit for bit is `exp2f`/`sincosf` of the GPU against the
//! CPU's libm (a few ulp).
//!
//! Parallel with rayon over (b, h) and over the chunks of a head.

use num_complex::Complex;
use rayon::prelude::*;

use crate::cuda::abi;
use crate::error::InputError;
use crate::problem::{Outputs, OutputsMut, Problem};
use crate::reference::{HeadOutputs, per_head_into};

pub(crate) type C32 = Complex<f32>;

/// Tuning of the scan: the kernel's chunk geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanParams {
    /// Time steps one thread owns (serial). The kernel's is fixed:
    /// [`STEPS_PER_THREAD`]; the mirror accepts any value ≥ 1.
    pub steps_per_thread: usize,
    /// Warps per block, 1..=[`MAX_WARPS`]: a chunk is `steps_per_thread · 32 · warps` steps.
    pub warps: usize,
}

/// The kernel's steps per thread (`GATELOOP_SCAN_STEPS_PER_THREAD`).
pub const STEPS_PER_THREAD: usize = abi::GATELOOP_SCAN_STEPS_PER_THREAD as usize;
/// Most warps per block (`GATELOOP_SCAN_MAX_WARPS`).
pub const MAX_WARPS: usize = abi::GATELOOP_SCAN_MAX_WARPS as usize;
pub(crate) const LANES: usize = 32;

impl Default for ScanParams {
    /// The kernel's steps per thread, 4 warps (chunks of 1024 steps).
    fn default() -> Self {
        ScanParams { steps_per_thread: STEPS_PER_THREAD, warps: 4 }
    }
}

impl ScanParams {
    /// Steps per time chunk: `steps_per_thread · 32 · warps`.
    pub fn chunk_len(&self) -> usize {
        self.steps_per_thread * LANES * self.warps
    }

    /// Checks the ranges (errors name the parameter).
    pub fn validate(&self) -> Result<(), InputError> {
        if self.steps_per_thread == 0 || self.steps_per_thread > 4096 {
            return Err(InputError::Param {
                name: "steps_per_thread",
                value: self.steps_per_thread.to_string(),
                why: "must be in 1..=4096",
            });
        }
        if self.warps == 0 || self.warps > MAX_WARPS {
            return Err(InputError::Param {
                name: "warps",
                value: self.warps.to_string(),
                why: "must be in 1..=GATELOOP_SCAN_MAX_WARPS (8)",
            });
        }
        Ok(())
    }
}

// ---- the kernel's arithmetic ------------------------------------------------

/// exp of a complex log gate, as `complex_gate` in the kernel.
#[inline(always)]
pub(crate) fn complex_gate(g: C32) -> C32 {
    let mag = (g.re * std::f32::consts::LOG2_E).exp2();
    let (s, c) = g.im.sin_cos();
    C32::new(mag * c, mag * s)
}

/// x · y
#[inline(always)]
pub(crate) fn cmul(x: C32, y: C32) -> C32 {
    C32::new(x.re.mul_add(y.re, -(x.im * y.im)), x.re.mul_add(y.im, x.im * y.re))
}

/// a · h + b
#[inline(always)]
pub(crate) fn apply(a: C32, b: C32, h: C32) -> C32 {
    C32::new(a.re.mul_add(h.re, (-a.im).mul_add(h.im, b.re)), a.re.mul_add(h.im, a.im.mul_add(h.re, b.im)))
}

/// a · h + kv (kv real)
#[inline(always)]
pub(crate) fn step(a: C32, kv: f32, h: C32) -> C32 {
    apply(a, C32::new(kv, 0.0), h)
}

/// `earlier • later` into `later`: (A, `B[V]`) with one A for all columns.
#[inline(always)]
pub(crate) fn combine_into(earlier_a: C32, earlier_b: &[C32], later_a: &mut C32, later_b: &mut [C32]) {
    for (lb, &eb) in later_b.iter_mut().zip(earlier_b) {
        *lb = apply(*later_a, *lb, eb);
    }
    *later_a = cmul(*later_a, earlier_a);
}

/// In-order fold of aggregates `0..n` (n ≥ 1): the kernel's `tot = smem[0];
/// for w in 1..n { x = smem[w]; combine_into(tot, x); tot = x }`.
#[inline(always)]
pub(crate) fn fold(agg_a: &[C32], agg_b: &[C32], n: usize, vd: usize) -> (C32, Vec<C32>) {
    let mut tot_a = agg_a[0];
    let mut tot_b = agg_b[..vd].to_vec();
    for w in 1..n {
        let mut xa = agg_a[w];
        let mut xb = agg_b[w * vd..(w + 1) * vd].to_vec();
        combine_into(tot_a, &tot_b, &mut xa, &mut xb);
        tot_a = xa;
        tot_b = xb;
    }
    (tot_a, tot_b)
}

// ---- one block (one time chunk of one head) ------------------------------------

/// The inputs of one chunk of one head, laid out per thread:
/// index `thread · S + s` (v: `(thread · S + s) · V + j`). Identity past L.
struct ChunkInputs {
    t0: usize,
    threads: usize,
    steps: usize,
    v: Vec<f32>,
}

struct Block<'p, 'a> {
    p: &'p Problem<'a, f32>,
    b: usize,
    h: usize,
    sp: ScanParams,
}

/// One key row's block scan over one chunk (steps 2–4 of the kernel):
/// per-thread inclusive warp-scan values (`incl_b` `[threads][V]`) and the
/// warp aggregates (`agg_b` `[warps][V]`).
pub(crate) struct BlockScan {
    pub incl_a: Vec<C32>,
    pub incl_b: Vec<C32>,
    pub agg_a: Vec<C32>,
    pub agg_b: Vec<C32>,
}

/// One key row's loaded elements and their block scan.
struct RowScan {
    a: Vec<C32>,
    kk: Vec<f32>,
    scan: BlockScan,
}

/// Steps 2–4 of the kernel for the elements `(a[i], coef[i] · x[i][j])`,
/// i = thread · S + s (`x` is `[n][V]`): the serial fold of each thread's S
/// elements, the Hillis–Steele scan over each warp's lanes, the warp
/// aggregates. The scan backward (`super::scan_grad`) runs it on the
/// time-reversed chunk.
#[inline(always)]
pub(crate) fn block_scan(a: &[C32], coef: &[f32], x: &[f32], threads: usize, s_len: usize, vd: usize) -> BlockScan {
    // Serial fold per thread.
    let mut incl_a = vec![C32::new(0.0, 0.0); threads];
    let mut incl_b = vec![C32::new(0.0, 0.0); threads * vd];
    for th in 0..threads {
        let base = th * s_len;
        let xb = &mut incl_b[th * vd..(th + 1) * vd];
        let mut xa = a[base];
        for (j, e) in xb.iter_mut().enumerate() {
            *e = C32::new(coef[base] * x[base * vd + j], 0.0);
        }
        for s in 1..s_len {
            let i = base + s;
            for (j, e) in xb.iter_mut().enumerate() {
                *e = step(a[i], coef[i] * x[i * vd + j], *e);
            }
            xa = cmul(a[i], xa);
        }
        incl_a[th] = xa;
    }
    // Hillis–Steele over each warp's lanes; descending lanes read the
    // pre-level value of lane − offset (what __shfl_up_sync returns).
    let warps = threads / LANES;
    for w in 0..warps {
        let mut offset = 1;
        while offset < LANES {
            for lane in (offset..LANES).rev() {
                let (dst, src) = (w * LANES + lane, w * LANES + lane - offset);
                let ea = incl_a[src];
                let (lo, hi) = incl_b.split_at_mut(dst * vd);
                let eb = &lo[src * vd..(src + 1) * vd];
                combine_into(ea, eb, &mut incl_a[dst], &mut hi[..vd]);
            }
            offset *= 2;
        }
    }
    let mut agg_a = Vec::with_capacity(warps);
    let mut agg_b = Vec::with_capacity(warps * vd);
    for w in 0..warps {
        let last = w * LANES + LANES - 1;
        agg_a.push(incl_a[last]);
        agg_b.extend_from_slice(&incl_b[last * vd..(last + 1) * vd]);
    }
    BlockScan { incl_a, incl_b, agg_a, agg_b }
}

/// Step 5 of the kernel for every thread: the state before each thread's
/// first step (`[threads][V]`), from the state `enter` (`[V]`) entering the
/// chunk, pushed through the in-order fold of the earlier warps' aggregates,
/// then through the lane's exclusive prefix.
#[inline(always)]
pub(crate) fn thread_entries(bs: &BlockScan, warps: usize, enter: &[C32]) -> Vec<C32> {
    let vd = enter.len();
    let threads = bs.incl_a.len();
    // prefixes[w - 1] = in-order fold of the aggregates of warps 0..w
    // (each warp of the kernel folds its own; the fold is sequential,
    // so building them incrementally is the same arithmetic).
    let mut prefixes: Vec<(C32, Vec<C32>)> = Vec::with_capacity(warps);
    for w in 1..warps {
        let next = match prefixes.last() {
            None => (bs.agg_a[0], bs.agg_b[..vd].to_vec()),
            Some((pa, pb)) => {
                let mut xa = bs.agg_a[w - 1];
                let mut xb = bs.agg_b[(w - 1) * vd..w * vd].to_vec();
                combine_into(*pa, pb, &mut xa, &mut xb);
                (xa, xb)
            }
        };
        prefixes.push(next);
    }
    let mut out = Vec::with_capacity(threads * vd);
    for th in 0..threads {
        let (warp, lane) = (th / LANES, th % LANES);
        let start = out.len();
        out.extend_from_slice(enter);
        let hs = &mut out[start..];
        if warp > 0 {
            let (pa, pb) = &prefixes[warp - 1];
            for (x, &b) in hs.iter_mut().zip(pb) {
                *x = apply(*pa, b, *x);
            }
        }
        if lane > 0 {
            let ea = bs.incl_a[th - 1];
            let eb = &bs.incl_b[(th - 1) * vd..th * vd];
            for (x, &b) in hs.iter_mut().zip(eb) {
                *x = apply(ea, b, *x);
            }
        }
    }
    out
}

impl Block<'_, '_> {
    #[inline(always)]
    fn chunk_inputs(&self, chunk: usize) -> ChunkInputs {
        let d = self.p.dims;
        let (s_len, vd) = (self.sp.steps_per_thread, d.value_dim);
        let threads = LANES * self.sp.warps;
        let t0 = chunk * self.sp.chunk_len();
        let mut v = vec![0.0f32; threads * s_len * vd];
        for i in 0..threads * s_len {
            let t = t0 + i;
            if t < d.len {
                let o = self.p.row(self.b, t, self.h, vd);
                v[i * vd..(i + 1) * vd].copy_from_slice(&self.p.v[o..o + vd]);
            }
        }
        ChunkInputs { t0, threads, steps: s_len, v }
    }

    /// Steps 1–4 of the kernel for key row `row`.
    #[inline(always)]
    fn row_scan(&self, ci: &ChunkInputs, row: usize) -> RowScan {
        let d = self.p.dims;
        let (kd, vd) = (d.key_dim, d.value_dim);
        let (threads, s_len) = (ci.threads, ci.steps);
        let n = threads * s_len;
        let mut a = vec![C32::new(1.0, 0.0); n];
        let mut kk = vec![0.0f32; n];
        for i in 0..n {
            let t = ci.t0 + i;
            if t < d.len {
                a[i] = complex_gate(self.p.gate(self.b, t, self.h, row));
                kk[i] = self.p.k[self.p.row(self.b, t, self.h, kd) + row];
            }
        }
        let scan = block_scan(&a, &kk, &ci.v, threads, s_len, vd);
        RowScan { a, kk, scan }
    }

    /// The reduce kernel for one chunk: (`A[k]`, `B[k][v]`).
    fn reduce(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above), the only
            // requirement of a #[target_feature(enable = "fma")] function.
            return unsafe { self.reduce_fma(chunk) };
        }
        self.reduce_impl(chunk)
    }

    /// `reduce_impl` compiled with hardware FMA: `mul_add` becomes one
    /// instruction instead of a libm call. FMA is exactly rounded either way,
    /// so the results are identical; only the speed differs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    fn reduce_fma(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        self.reduce_impl(chunk)
    }

    #[inline(always)]
    fn reduce_impl(&self, chunk: usize) -> (Vec<C32>, Vec<C32>) {
        let d = self.p.dims;
        let (kd, vd) = (d.key_dim, d.value_dim);
        let ci = self.chunk_inputs(chunk);
        let mut ga = Vec::with_capacity(kd);
        let mut gb = Vec::with_capacity(kd * vd);
        for row in 0..kd {
            let rs = self.row_scan(&ci, row);
            let (ta, tb) = fold(&rs.scan.agg_a, &rs.scan.agg_b, self.sp.warps, vd);
            ga.push(ta);
            gb.extend_from_slice(&tb);
        }
        (ga, gb)
    }

    /// The forward kernel for one chunk, from the entering states `enter`
    /// (`[K][V]`): y of the chunk's valid steps (`[steps][V]`) and, for the
    /// chunk holding step L − 1, h_final.
    fn forward(&self, chunk: usize, enter: &[C32]) -> (Vec<f32>, Option<Vec<C32>>) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above), the only
            // requirement of a #[target_feature(enable = "fma")] function.
            return unsafe { self.forward_fma(chunk, enter) };
        }
        self.forward_impl(chunk, enter)
    }

    /// `forward_impl` with hardware FMA (see `reduce_fma`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    fn forward_fma(&self, chunk: usize, enter: &[C32]) -> (Vec<f32>, Option<Vec<C32>>) {
        self.forward_impl(chunk, enter)
    }

    #[inline(always)]
    fn forward_impl(&self, chunk: usize, enter: &[C32]) -> (Vec<f32>, Option<Vec<C32>>) {
        let d = self.p.dims;
        let (kd, vd) = (d.key_dim, d.value_dim);
        let ci = self.chunk_inputs(chunk);
        let (threads, s_len) = (ci.threads, ci.steps);
        let n = threads * s_len;
        let valid = d.len.saturating_sub(ci.t0).min(n);
        let mut y = vec![0.0f32; n * vd];
        let last_thread = (valid > 0 && ci.t0 + n >= d.len).then(|| (d.len - 1 - ci.t0) / s_len);
        let mut h_final = last_thread.map(|_| vec![C32::new(0.0, 0.0); kd * vd]);
        let mut hs = vec![C32::new(0.0, 0.0); vd];
        for row in 0..kd {
            let rs = self.row_scan(&ci, row);
            let q: Vec<f32> = (0..n)
                .map(|i| {
                    let t = ci.t0 + i;
                    if t < d.len { self.p.q[self.p.row(self.b, t, self.h, kd) + row] } else { 0.0 }
                })
                .collect();
            let entries = thread_entries(&rs.scan, self.sp.warps, &enter[row * vd..(row + 1) * vd]);
            for th in 0..threads {
                hs.copy_from_slice(&entries[th * vd..(th + 1) * vd]);
                for s in 0..s_len {
                    let i = th * s_len + s;
                    let yi = &mut y[i * vd..(i + 1) * vd];
                    for (j, (x, yv)) in hs.iter_mut().zip(yi.iter_mut()).enumerate() {
                        *x = step(rs.a[i], rs.kk[i] * ci.v[i * vd + j], *x);
                        *yv = q[i].mul_add(x.re, *yv);
                    }
                }
                if Some(th) == last_thread
                    && let Some(hf) = h_final.as_mut()
                {
                    hf[row * vd..(row + 1) * vd].copy_from_slice(&hs);
                }
            }
        }
        y.truncate(valid * vd);
        (y, h_final)
    }
}

/// The reduce and carry kernels for head (b, h): the state entering every
/// chunk (`[chunks][K][V]`; h0 or 0 for the first). The scan backward
/// (`super::scan_grad`) recomputes its forward states from these checkpoints.
pub(crate) fn chunk_entering_states(p: &Problem<'_, f32>, sp: ScanParams, b: usize, h: usize) -> Vec<Vec<C32>> {
    let d = p.dims;
    let (kd, vd) = (d.key_dim, d.value_dim);
    let blk = Block { p, b, h, sp };
    let nc = d.len.div_ceil(sp.chunk_len());
    let h0 = crate::reference::head_h0(p, b, h);
    if nc == 1 {
        return vec![h0];
    }
    let aggs: Vec<(Vec<C32>, Vec<C32>)> = (0..nc - 1).into_par_iter().map(|c| blk.reduce(c)).collect();
    let mut enter = vec![h0];
    for (ga, gb) in &aggs {
        let prev = enter.last().expect("non-empty");
        let next: Vec<C32> = (0..kd * vd).map(|i| apply(ga[i / vd], gb[i], prev[i])).collect();
        enter.push(next);
    }
    enter
}

/// One head: reduce every chunk but the last, carry, forward every chunk.
fn head(p: &Problem<'_, f32>, sp: ScanParams, b: usize, h: usize) -> HeadOutputs<f32> {
    let d = p.dims;
    let vd = d.value_dim;
    let blk = Block { p, b, h, sp };
    // enter[c] = state entering chunk c, [K][V].
    let enter = chunk_entering_states(p, sp, b, h);
    let parts: Vec<(Vec<f32>, Option<Vec<C32>>)> =
        enter.par_iter().enumerate().map(|(c, e)| blk.forward(c, e)).collect();
    let mut y = Vec::with_capacity(d.len * vd);
    let mut h_final = None;
    for (yc, hf) in parts {
        y.extend_from_slice(&yc);
        if hf.is_some() {
            h_final = hf;
        }
    }
    HeadOutputs { y, h_final: h_final.expect("the last chunk holds step L - 1") }
}

/// The fused scan in f32 (the kernel's algorithm), allocating the outputs.
pub fn forward(p: &Problem<'_, f32>, params: &ScanParams) -> Result<Outputs<f32>, InputError> {
    Outputs::computed(p, |p, out| forward_into(p, params, out))
}

/// The fused scan in f32 into caller buffers. Validates the problem (lengths,
/// gate domain), the output buffers and `params`.
pub fn forward_into(p: &Problem<'_, f32>, params: &ScanParams, out: OutputsMut<'_, f32>) -> Result<(), InputError> {
    params.validate()?;
    let sp = *params;
    per_head_into(p, out, |b, h| head(p, sp, b, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validate() {
        assert!(ScanParams::default().validate().is_ok());
        assert_eq!(ScanParams::default().chunk_len(), STEPS_PER_THREAD * 32 * 4);
        let bad = ScanParams { steps_per_thread: 0, warps: 1 };
        assert!(matches!(bad.validate(), Err(InputError::Param { name: "steps_per_thread", .. })));
        let bad = ScanParams { steps_per_thread: 8, warps: MAX_WARPS + 1 };
        assert!(matches!(bad.validate(), Err(InputError::Param { name: "warps", .. })));
    }

    #[test]
    fn reset_drops_the_past_exactly() {
        let a = C32::new(0.0, 0.0);
        let later_b = C32::new(0.25, -0.5);
        let mut la = a;
        let mut lb = [later_b];
        combine_into(C32::new(0.3, 0.4), &[C32::new(1e30, -7.0)], &mut la, &mut lb);
        assert_eq!(lb[0], later_b);
        assert_eq!(la.norm(), 0.0);
        assert_eq!(complex_gate(C32::new(f32::NEG_INFINITY, 2.0)).norm(), 0.0);
    }
}
