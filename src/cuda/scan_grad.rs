//! The backward of the fused scan on the GPU (`cuda/scan_grad.cu`): the
//! adjoint recurrence δ_t = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t as the scan's
//! own machinery run backwards in time, with the forward states recomputed
//! from chunk-boundary checkpoints (never O(L·K·V) memory), and every
//! per-step reduction (dq, dk and the gate over V, dv over K) fused.
//!
//! Five kernels on one stream: the forward's `reduce` and `carry` (the state
//! entering every chunk), the reverse `grad_reduce` and `grad_carry` (the
//! adjoint entering every chunk from its right), and the gradient kernel
//! (one block per (b, h, chunk), looping over value tiles and key rows); a
//! single chunk needs only the last. The sums over V are written by the
//! first value tile and added by the later ones, by the one thread that owns
//! the step: no atomics, deterministic. [`crate::cpu::scan_grad`] is the CPU
//! mirror (same chunks, same order of every sum) and documents the algorithm.
//!
//! q, k, v, dy and dq, dk, dv have the element type `T` of
//! [`backward_into`] (f32, f16 or bf16); log_gate, h0, dh_final, dlog_gate,
//! dh0 and the workspace are complex f32, and all arithmetic is f32. Each
//! `T` output is rounded once: for a 16-bit `T` with several value tiles,
//! the running sums of dq and dk over the tiles live in the workspace (f32)
//! and the last tile rounds them.

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopScanGradParams, GateloopScanParams};
use super::element::{Dtype, Element};
use super::launch::{self, GradBuffers, GradParams, SeqParams};
use super::phases::launched;
use super::scan::{LaunchPlan, plan_with_warps, sm_count};
use super::{DriverContext, Gpu, GpuError};
use crate::cpu::scan::{MAX_WARPS, STEPS_PER_THREAD, ScanParams};
use crate::cpu::scan_grad::ScanGradParams;
use crate::error::InputError;
use crate::problem::{Dims, Problem};
use crate::reference::grad::Grads;

pub use super::launch::{DeviceGradInputs, DeviceGrads, DeviceInputs};

/// The value tiles compiled into the gradient kernel (`_v{T}` entry points).
pub const VALUE_TILES: [u32; 2] = [1, 2];
const LANES: usize = 32;
const CARRY_BLOCK: usize = abi::GATELOOP_SCAN_CARRY_BLOCK as usize;

// SAFETY: the bindgen mirror (#[repr(C)]) of the C struct the kernels take by
// value; its layout is pinned on both sides (the header's static_assert,
// bindgen's layout checks, tests/abi.rs). It holds only integers and raw
// device addresses, with explicit padding, so its bytes are a valid kernel
// argument for any value; the pointers are only dereferenced by the kernels,
// whose launcher (`backward_into`) guarantees they are valid.
unsafe impl DeviceRepr for GateloopScanGradParams {}

/// The kernels of `cuda/scan_grad.cu`.
pub(crate) struct ScanGradKernels {
    /// `gateloop_scan_grad_reduce_{dtype}_v{1,2}`, indexed by
    /// [`Dtype::index`], then log2(T).
    reduce: [Vec<CudaFunction>; 3],
    carry: CudaFunction,
    /// `gateloop_scan_grad_{dtype}_v{1,2}`, indexed likewise.
    grad: [Vec<CudaFunction>; 3],
}

impl ScanGradKernels {
    pub(crate) fn load(module: &std::sync::Arc<CudaModule>) -> Result<Self, GpuError> {
        let table = |kind: &str| -> Result<[Vec<CudaFunction>; 3], GpuError> {
            let variants = |dtype: Dtype| {
                VALUE_TILES
                    .iter()
                    .map(|t| module.load_function(&format!("gateloop_scan_grad{kind}_{}_v{t}", dtype.name())))
                    .collect::<Result<Vec<_>, _>>()
                    .doing("looking up gateloop_scan_grad{_reduce,}_{f32,f16,bf16}_v*")
            };
            Ok([variants(Dtype::F32)?, variants(Dtype::F16)?, variants(Dtype::Bf16)?])
        };
        Ok(ScanGradKernels {
            reduce: table("_reduce")?,
            carry: module.load_function("gateloop_scan_grad_carry").doing("looking up gateloop_scan_grad_carry")?,
            grad: table("")?,
        })
    }
}

/// The launch geometry of one backward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradLaunchPlan {
    /// The forward's reduce and carry geometry, with this plan's warps (its
    /// `workspace_len` is the forward half of the workspace).
    pub forward: LaunchPlan,
    /// T: value columns per thread of the reverse reduce and gradient kernels.
    pub value_tile: u32,
    /// ceil(V / T).
    pub value_tiles: u32,
    /// Blocks of the reverse reduce: B·H · value_tiles · (chunks − 1) (0: not launched).
    pub reverse_reduce_grid: u32,
    /// Blocks of the gradient kernel: B·H · chunks.
    pub grad_grid: u32,
    /// f32 offset in the workspace of the reverse half (rev_gate, rev_state):
    /// the forward's `workspace_len` (0 with one chunk).
    pub reverse_offset: usize,
    /// f32 offset of dq's running sums over the value tiles (then dk's, each
    /// B·L·H·K f32): only for a 16-bit dtype with more than one value tile.
    pub accumulator_offset: Option<usize>,
    /// f32 elements of the workspace: with more than one chunk the forward's
    /// chunk_gate and chunk_state, then rev_gate and rev_state of the same
    /// sizes; then the dq and dk running sums when `accumulator_offset` is
    /// set. 0 when neither is needed.
    pub workspace_len: usize,
}

impl GradLaunchPlan {
    /// The CPU mirror's parameters for this geometry.
    pub fn grad_params(&self) -> ScanGradParams {
        ScanGradParams {
            scan: ScanParams { steps_per_thread: STEPS_PER_THREAD, warps: self.forward.warps as usize },
            value_tile: self.value_tile as usize,
        }
    }
    fn variant_index(&self) -> usize {
        self.value_tile.trailing_zeros() as usize
    }
}

/// Chooses the backward's geometry for `dims` on a GPU with `sm_count` SMs,
/// for f32 inputs ([`plan_as`] with [`Dtype::F32`]: the geometry is the same
/// for every element type, the workspace is not).
pub fn plan(dims: &Dims, sm_count: usize) -> Result<GradLaunchPlan, InputError> {
    plan_as(dims, Dtype::F32, sm_count)
}

/// Chooses the backward's geometry and workspace for `dims`, element type
/// `dtype`, on a GPU with `sm_count` SMs.
///
/// The gradient kernel has one block per (b, h, chunk) (its value tiles run
/// in sequence, so that one thread owns every sum over V of its steps), so
/// the warps are the largest of 4, 2, 1 that still give ≥ 2 such blocks per
/// SM, and no more than L needs. T = 1 for V = 1, else 2 (the thread keeps
/// h_{t−1} of its S steps and T columns in registers besides the forward's).
pub fn plan_as(dims: &Dims, dtype: Dtype, sm_count: usize) -> Result<GradLaunchPlan, InputError> {
    dims.validate()?;
    let d = dims;
    let per_warp = STEPS_PER_THREAD * LANES;
    let needed = d.len.div_ceil(per_warp);
    let bh = d.batch.checked_mul(d.heads);
    let target = 2 * sm_count.max(1);
    let warps = [4usize, 2]
        .into_iter()
        .find(|&w| {
            w <= needed && bh.and_then(|x| x.checked_mul(d.len.div_ceil(per_warp * w))).is_some_and(|n| n >= target)
        })
        .unwrap_or(1);
    debug_assert!(warps <= MAX_WARPS);
    let forward = plan_with_warps(d, warps)?;
    let value_tile = if d.value_dim == 1 { 1 } else { 2 };
    let tiles = d.value_dim.div_ceil(value_tile);
    let nc = forward.num_chunks as usize;
    let too_large = |what: &str| InputError::TooLarge {
        name: "grid",
        shape: format!("[{what}] for B={} H={} V={} L={}", d.batch, d.heads, d.value_dim, d.len),
        limit: "2^31 - 1 thread blocks".into(),
    };
    let grid = |n: Option<usize>, what: &str| {
        n.and_then(|g| u32::try_from(g).ok()).filter(|&g| g <= i32::MAX as u32).ok_or_else(|| too_large(what))
    };
    let grad_grid = grid(bh.and_then(|x| x.checked_mul(nc)), "B·H·chunks")?;
    let reverse_reduce_grid = grid(
        bh.and_then(|x| x.checked_mul(tiles)).and_then(|x| x.checked_mul(nc - 1)),
        "B·H·value_tiles·(chunks - 1)",
    )?;
    let ws_error = || InputError::TooLarge {
        name: "workspace",
        shape: format!("[2·B·H·chunks·K·(V + 1)·2 + 2·B·L·H·K] with {nc} chunks"),
        limit: "usize::MAX".into(),
    };
    let reverse_offset = forward.workspace_len;
    let checkpoints = reverse_offset.checked_mul(2).ok_or_else(ws_error)?;
    let accumulator_offset = (dtype != Dtype::F32 && tiles > 1).then_some(checkpoints);
    let workspace_len = match accumulator_offset {
        Some(o) => d.qk_len().checked_mul(2).and_then(|a| a.checked_add(o)).ok_or_else(ws_error)?,
        None => checkpoints,
    };
    Ok(GradLaunchPlan {
        forward,
        value_tile: value_tile as u32,
        value_tiles: u32::try_from(tiles).map_err(|_| too_large("value_tiles"))?,
        reverse_reduce_grid,
        grad_grid,
        reverse_offset,
        accumulator_offset,
        workspace_len,
    })
}

/// The plan `backward_into` uses on `gpu` for element type `dtype` (its
/// workspace size: [`GradLaunchPlan::workspace_len`] f32).
pub fn plan_for(gpu: &Gpu, dims: &Dims, dtype: Dtype) -> Result<GradLaunchPlan, GpuError> {
    Ok(plan_as(dims, dtype, sm_count(gpu)?)?)
}

/// Runs the backward on `stream` over device buffers, writing `grads`.
/// `T` is the element type of q, k, v, dy and of dq, dk, dv; log_gate, h0,
/// dh_final, dlog_gate and dh0 are complex f32 (interleaved pairs).
/// Asynchronous: it enqueues up to five kernels and never synchronizes.
///
/// `workspace` must hold at least [`GradLaunchPlan::workspace_len`] f32 of
/// [`plan_for`]`(gpu, dims, T::DTYPE)` (overwritten; `None` is fine when
/// that is 0).
/// Checks on the host: dims, every buffer's length (the error names the
/// argument), contexts, alignment of complex buffers. The gate's domain
/// (Re ≤ 0) is the caller's responsibility, as for the forward. A `dh0`
/// buffer is required when `inputs.h0` is given (and, given without h0, gets
/// the gradient of the implicit zero initial state).
pub fn backward_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    upstream: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn DevicePtrMut<f32>>,
) -> Result<(), GpuError> {
    let d = dims;
    let lp = plan_for(gpu, d, T::DTYPE)?;
    let buffers = GradBuffers { inputs, grad_in: upstream, grads, workspace, real_gates: false, packed: false };
    buffers.check(gpu, stream, d, lp.workspace_len, || {
        format!("at least {} f32 ({} chunks)", lp.workspace_len, lp.forward.num_chunks)
    })?;
    let fl = &lp.forward;
    let mut params = GateloopScanGradParams {
        fwd: GateloopScanParams {
            warps: fl.warps as i32,
            value_tile: fl.value_tile as i32,
            chunk_len: fl.chunk_len as i64,
            num_chunks: fl.num_chunks as i64,
            value_tiles: fl.value_tiles as i64,
            ..GateloopScanParams::for_dims(d, T::DTYPE.abi())?
        },
        value_tile: lp.value_tile as i32,
        value_tiles: lp.value_tiles as i64,
        ..Default::default()
    };
    // Device addresses (q, k, v, log_gate, h0 and HAS_H0 into params.fwd);
    // the guards order this stream after earlier work on each buffer and
    // record these launches when dropped (at return).
    params.set_grad_strides(d)?;
    let (ptrs, _bound) = buffers.bind(stream, &mut params.fwd)?;
    params.set_grad_pointers(&ptrs);
    if let Some(w) = ptrs.workspace.filter(|_| lp.workspace_len > 0) {
        let at = |offset: usize| (w as usize + 4 * offset) as *mut f32;
        if fl.num_chunks > 1 {
            // Four 8-byte aligned parts: every part holds an even number of f32.
            params.fwd.chunk_gate = at(0);
            params.fwd.chunk_state = at(fl.state_offset(d));
            params.rev_gate = at(lp.reverse_offset);
            params.rev_state = at(lp.reverse_offset + fl.state_offset(d));
        }
        if let Some(o) = lp.accumulator_offset {
            params.dq_acc = at(o);
            params.dk_acc = at(o + d.qk_len());
        }
    }

    let block = (LANES as u32 * fl.warps, 1, 1);
    let kernels = &gpu.kernels;
    let (ti, vi) = (T::DTYPE.index(), lp.variant_index());
    if fl.num_chunks > 1 {
        let cfg = LaunchConfig { grid_dim: (fl.reduce_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        let kernel = &kernels.scan_reduce[ti][fl.variant_index()];
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params.fwd);
        // SAFETY: the forward's gateloop_scan_reduce_{E}_v{T} (E the element
        // type of q, k, v: T::DTYPE picks the table row; T = fl.value_tile)
        // takes one GateloopScanParams by value, which is what is pushed,
        // with the forward's geometry for these dims (`plan_with_warps`):
        // q, k, v are buffers of element type E (the launcher's T), log_gate
        // and h0 complex f32, all live buffers of this context whose lengths
        // were checked (GradBuffers::check); y and h_final are null and
        // never touched by this kernel; chunk_gate and chunk_state (complex
        // f32) lie in the first half of a workspace of ≥ lp.workspace_len
        // f32, 8-byte aligned.
        launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_reduce (backward)")?;
        let carry_cfg = LaunchConfig {
            grid_dim: (fl.carry_grid, 1, 1),
            block_dim: (CARRY_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = &kernels.scan_carry;
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params.fwd);
        launched(
            stream,
            kernel,
            carry_cfg,
            // SAFETY: as for the reduce launch; gateloop_scan_carry reads h0
            // (when HAS_H0) and the workspace the reduce wrote (same stream),
            // one thread per (b, h, k, v), bounds-checked.
            unsafe { launch.launch(carry_cfg) },
            "launching gateloop_scan_carry (backward)",
        )?;

        let cfg = LaunchConfig { grid_dim: (lp.reverse_reduce_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        let kernel = &kernels.scan_grad.reduce[ti][vi];
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params);
        // SAFETY: gateloop_scan_grad_reduce_{E}_v{T} (E = T::DTYPE, the
        // element type of q, k, v and dy; T = lp.value_tile) takes one
        // GateloopScanGradParams by value, which is what is pushed; besides
        // the checked inputs it reads dy (element type E, checked length
        // [B, L, H, V]) and writes rev_gate [B·H, chunks, K] and rev_state
        // [B·H, chunks, K, V] (complex f32) at lp.reverse_offset of the
        // workspace, inside its checked length. Block = 32·warps ≤ 256 =
        // __launch_bounds__, grid as planned, static shared memory only.
        launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_grad_reduce")?;
        let kernel = &kernels.scan_grad.carry;
        let mut launch = stream.launch_builder(kernel);
        launch.arg(&params);
        // SAFETY: as for the reverse reduce; gateloop_scan_grad_carry reads
        // dh_final (when non-null: checked length and alignment) and the
        // workspace the reverse reduce wrote (same stream), one thread per
        // (b, h, k, v) with grid · 256 ≥ B·H·K·V and a bounds check.
        launched(stream, kernel, carry_cfg, unsafe { launch.launch(carry_cfg) }, "launching gateloop_scan_grad_carry")?;
    }
    let cfg = LaunchConfig { grid_dim: (lp.grad_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
    let kernel = &kernels.scan_grad.grad[ti][vi];
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&params);
    // SAFETY: as for the reverse reduce (gateloop_scan_grad_{E}_v{T}), with
    // grid = B·H·chunks; it writes dq, dk [B, L, H, K] and dv [B, L, H, V]
    // of element type E, dlog_gate (the gate's layout) and dh0 (when
    // non-null) [B, H, K, V] complex f32, all checked above; with chunks > 1
    // it reads the workspace completed by both carry kernels earlier on this
    // stream, with one chunk it reads h0 and dh_final directly and never
    // touches the (null) checkpoint pointers. dq_acc and dk_acc (f32
    // [B, L, H, K] each, at lp.accumulator_offset of the checked workspace)
    // are set exactly when E is 16-bit with value_tiles > 1, the only case
    // the kernel dereferences them. Every buffer outlives the launch:
    // borrowed until this function returns, and the guards record the
    // launches on drop.
    launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_scan_grad")?;
    Ok(())
}

/// Uploads `p` and the upstream gradients, runs the backward on the Gpu's
/// default stream (allocating the workspace), downloads the gradients;
/// synchronizes. `dh0` is `Some` exactly when `p.h0` is, as in
/// [`crate::reference::grad::backward`]. Checks the gate domain on the host.
pub fn backward_host(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    backward_host_as::<f32>(gpu, p, dy, dh_final)
}

/// [`backward_host`] with q, k, v and dy rounded to `T` on the host
/// (log_gate, h0, dh_final stay f32), dq, dk, dv computed in `T` and widened
/// back to f32 (exactly). `dh0` is `Some` exactly when `p.h0` is. Checks the
/// gate domain on the host.
pub fn backward_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    let workspace_len = |d: &Dims| Ok(plan_for(gpu, d, T::DTYPE)?.workspace_len);
    launch::backward_host::<T>(
        gpu,
        p,
        dy,
        dh_final,
        false,
        workspace_len,
        "synchronizing after the scan backward kernels",
        |s, d, i, g, o, w| backward_into(gpu, s, d, i, g, o, w),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    const H200_SMS: usize = 132;

    #[test]
    fn plan_examples() {
        // B·H = 1, L = 65536: 4 warps give 64 chunks < 264 blocks, 2 give
        // 128, so one warp per block (256 chunks).
        let d = dims(1, 65536, 1, 64, 64, false);
        let p = plan(&d, H200_SMS).unwrap();
        assert_eq!((p.forward.warps, p.value_tile, p.value_tiles, p.forward.num_chunks), (1, 2, 32, 256));
        assert_eq!((p.grad_grid, p.reverse_reduce_grid), (256, 32 * 255));
        assert_eq!(p.workspace_len, 2 * p.forward.workspace_len);
        assert_eq!(p.grad_params().scan, ScanParams { steps_per_thread: STEPS_PER_THREAD, warps: 1 });
        // Many heads: 4 warps.
        let p = plan(&dims(8, 4096, 16, 16, 1, true), H200_SMS).unwrap();
        assert_eq!((p.forward.warps, p.value_tile, p.forward.num_chunks, p.grad_grid), (4, 1, 4, 512));
        // One chunk: no workspace, only the gradient kernel.
        let p = plan(&dims(3, 200, 2, 5, 7, false), H200_SMS).unwrap();
        assert_eq!((p.forward.num_chunks, p.workspace_len, p.reverse_reduce_grid, p.grad_grid), (1, 0, 0, 6));
        // In bf16 its 4 value tiles sum dq, dk in the workspace (f32).
        let p = plan_as(&dims(3, 200, 2, 5, 7, false), Dtype::Bf16, H200_SMS).unwrap();
        assert_eq!((p.value_tiles, p.accumulator_offset, p.workspace_len), (4, Some(0), 2 * 3 * 200 * 2 * 5));
        // V = 2: one tile stores its sums directly.
        let p = plan_as(&dims(3, 200, 2, 5, 2, false), Dtype::F16, H200_SMS).unwrap();
        assert_eq!((p.value_tiles, p.accumulator_offset, p.workspace_len), (1, None, 0));
    }

    #[test]
    fn plan_invariants() {
        for (b, l, h, k, v) in [(1, 1, 1, 1, 1), (2, 65, 3, 5, 7), (1, 100_000, 1, 3, 2), (300, 3000, 4, 64, 64)] {
            for sms in [1, 16, 132] {
                let d = dims(b, l, h, k, v, false);
                let p = plan(&d, sms).unwrap();
                let nc = p.forward.num_chunks as usize;
                assert!(VALUE_TILES.contains(&p.value_tile));
                assert_eq!(p.value_tiles as usize, v.div_ceil(p.value_tile as usize));
                assert_eq!(p.grad_grid as usize, b * h * nc);
                assert_eq!(p.reverse_reduce_grid as usize, b * h * p.value_tiles as usize * (nc - 1));
                assert!((p.forward.warps as usize - 1) * 256 < l, "{d:?} {p:?}");
                assert_eq!(p.forward, plan_with_warps(&d, p.forward.warps as usize).unwrap());
                assert_eq!(p.workspace_len, if nc > 1 { 4 * b * h * nc * k * (v + 1) } else { 0 });
                assert_eq!((p.reverse_offset * 2, p.accumulator_offset), (p.workspace_len, None));
                for dtype in [Dtype::F16, Dtype::Bf16] {
                    // The same geometry; the dq, dk running sums after the
                    // checkpoints with more than one value tile.
                    let q = plan_as(&d, dtype, sms).unwrap();
                    assert_eq!(GradLaunchPlan { accumulator_offset: None, workspace_len: p.workspace_len, ..q }, p);
                    let acc = p.value_tiles > 1;
                    assert_eq!(q.accumulator_offset, acc.then_some(p.workspace_len));
                    assert_eq!(q.workspace_len, p.workspace_len + if acc { 2 * b * l * h * k } else { 0 });
                }
            }
        }
    }

    #[test]
    fn plan_rejects() {
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false), 132), Err(InputError::ZeroDim { name: "len" })));
        assert!(matches!(
            plan(&dims(1 << 20, 1 << 20, 1 << 4, 1, 1, false), 132),
            Err(InputError::TooLarge { name: "grid", .. })
        ));
    }
}
