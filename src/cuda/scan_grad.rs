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

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopScanGradParams, GateloopScanParams};
use super::launch::{self, GradBuffers, SeqParams, seq_strides, state_strides};
use super::scan::{LaunchPlan, plan_with_warps, sm_count};
use super::element::Dtype;
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
    /// `gateloop_scan_grad_reduce_f32_v{1,2}`, indexed by log2(T).
    reduce: Vec<CudaFunction>,
    carry: CudaFunction,
    /// `gateloop_scan_grad_f32_v{1,2}`, indexed by log2(T).
    grad: Vec<CudaFunction>,
}

impl ScanGradKernels {
    pub(crate) fn load(module: &std::sync::Arc<CudaModule>) -> Result<Self, GpuError> {
        let variants = |kind: &str| {
            VALUE_TILES
                .iter()
                .map(|t| module.load_function(&format!("gateloop_scan_grad{kind}_f32_v{t}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(ScanGradKernels {
            reduce: variants("_reduce").doing("looking up gateloop_scan_grad_reduce_f32_v*")?,
            carry: module.load_function("gateloop_scan_grad_carry").doing("looking up gateloop_scan_grad_carry")?,
            grad: variants("").doing("looking up gateloop_scan_grad_f32_v*")?,
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
    /// f32 elements of the workspace (0 with one chunk): the forward's
    /// chunk_gate and chunk_state, then rev_gate and rev_state of the same sizes.
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

/// Chooses the backward's geometry for `dims` on a GPU with `sm_count` SMs.
///
/// The gradient kernel has one block per (b, h, chunk) (its value tiles run
/// in sequence, so that one thread owns every sum over V of its steps), so
/// the warps are the largest of 4, 2, 1 that still give ≥ 2 such blocks per
/// SM, and no more than L needs. T = 1 for V = 1, else 2 (the thread keeps
/// h_{t−1} of its S steps and T columns in registers besides the forward's).
pub fn plan(dims: &Dims, sm_count: usize) -> Result<GradLaunchPlan, InputError> {
    dims.validate()?;
    let d = dims;
    let per_warp = STEPS_PER_THREAD * LANES;
    let needed = d.len.div_ceil(per_warp);
    let bh = d.batch.checked_mul(d.heads);
    let target = 2 * sm_count.max(1);
    let warps = [4usize, 2]
        .into_iter()
        .find(|&w| w <= needed && bh.and_then(|x| x.checked_mul(d.len.div_ceil(per_warp * w))).is_some_and(|n| n >= target))
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
    let reverse_reduce_grid =
        grid(bh.and_then(|x| x.checked_mul(tiles)).and_then(|x| x.checked_mul(nc - 1)), "B·H·value_tiles·(chunks - 1)")?;
    let workspace_len = forward.workspace_len.checked_mul(2).ok_or_else(|| InputError::TooLarge {
        name: "workspace",
        shape: format!("[2·B·H·chunks·K·(V + 1)·2] with {nc} chunks"),
        limit: "usize::MAX".into(),
    })?;
    Ok(GradLaunchPlan {
        forward,
        value_tile: value_tile as u32,
        value_tiles: u32::try_from(tiles).map_err(|_| too_large("value_tiles"))?,
        reverse_reduce_grid,
        grad_grid,
        workspace_len,
    })
}

/// The plan `backward_into` uses on `gpu` (its workspace size:
/// [`GradLaunchPlan::workspace_len`] f32).
pub fn plan_for(gpu: &Gpu, dims: &Dims) -> Result<GradLaunchPlan, GpuError> {
    Ok(plan(dims, sm_count(gpu)?)?)
}

/// Runs the backward on `stream` over device buffers, writing `grads`.
/// Asynchronous: it enqueues up to five kernels and never synchronizes.
///
/// `workspace` must hold at least [`GradLaunchPlan::workspace_len`] f32 of
/// [`plan_for`]`(gpu, dims)` (overwritten; `None` is fine when that is 0).
/// Checks on the host: dims, every buffer's length (the error names the
/// argument), contexts, alignment of complex buffers. The gate's domain
/// (Re ≤ 0) is the caller's responsibility, as for the forward. A `dh0`
/// buffer is required when `inputs.h0` is given (and, given without h0, gets
/// the gradient of the implicit zero initial state).
pub fn backward_into<'a>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a>,
    upstream: DeviceGradInputs<'a>,
    grads: DeviceGrads<'a>,
    workspace: Option<&'a mut dyn DevicePtrMut<f32>>,
) -> Result<(), GpuError> {
    let d = dims;
    let lp = plan_for(gpu, d)?;
    let buffers = GradBuffers { inputs, grad_in: upstream, grads, workspace };
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
            ..GateloopScanParams::for_dims(d, abi::GATELOOP_DTYPE_F32)?
        },
        dy_strides: seq_strides(d, d.value_dim)?,
        dq_strides: seq_strides(d, d.key_dim)?,
        dk_strides: seq_strides(d, d.key_dim)?,
        dv_strides: seq_strides(d, d.value_dim)?,
        dgate_strides: seq_strides(d, d.gate_dim())?,
        dh_final_strides: state_strides(d)?,
        dh0_strides: state_strides(d)?,
        value_tile: lp.value_tile as i32,
        value_tiles: lp.value_tiles as i64,
        ..Default::default()
    };
    // Device addresses (q, k, v, log_gate, h0 and HAS_H0 into params.fwd);
    // the guards order this stream after earlier work on each buffer and
    // record these launches when dropped (at return).
    let (ptrs, _bound) = buffers.bind(stream, &mut params.fwd)?;
    params.dy = ptrs.dy as usize as *const std::ffi::c_void;
    params.dh_final = ptrs.dh_final.map_or(std::ptr::null(), |p| p as usize as *const f32);
    params.dq = ptrs.dq as usize as *mut std::ffi::c_void;
    params.dk = ptrs.dk as usize as *mut std::ffi::c_void;
    params.dv = ptrs.dv as usize as *mut std::ffi::c_void;
    params.dlog_gate = ptrs.dlog_gate as usize as *mut f32;
    params.dh0 = ptrs.dh0.map_or(std::ptr::null_mut(), |p| p as usize as *mut f32);
    match ptrs.workspace {
        Some(w) if lp.workspace_len > 0 => {
            // Four 8-byte aligned parts: every part holds an even number of f32.
            let half = fl.workspace_len;
            params.fwd.chunk_gate = w as usize as *mut f32;
            params.fwd.chunk_state = (w as usize + 4 * fl.state_offset(d)) as *mut f32;
            params.rev_gate = (w as usize + 4 * half) as *mut f32;
            params.rev_state = (w as usize + 4 * (half + fl.state_offset(d))) as *mut f32;
        }
        _ => {}
    }

    let block = (LANES as u32 * fl.warps, 1, 1);
    let kernels = &gpu.kernels;
    let vi = lp.variant_index();
    if fl.num_chunks > 1 {
        let cfg = LaunchConfig { grid_dim: (fl.reduce_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&kernels.scan_reduce[Dtype::F32.index()][fl.variant_index()]);
        launch.arg(&params.fwd);
        // SAFETY: the forward's gateloop_scan_reduce_f32_v{T} (T =
        // fl.value_tile) takes one GateloopScanParams by value, which is
        // what is pushed, with the forward's geometry for these dims
        // (`plan_with_warps`): its pointers come from live buffers of this
        // context whose lengths were checked (Buffers::check); y and h_final
        // are null and never touched by this kernel; chunk_gate and
        // chunk_state lie in the first half of a workspace of ≥
        // lp.workspace_len f32, 8-byte aligned.
        unsafe { launch.launch(cfg) }.doing("launching gateloop_scan_reduce_f32 (backward)")?;
        let carry_cfg = LaunchConfig {
            grid_dim: (fl.carry_grid, 1, 1),
            block_dim: (CARRY_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&kernels.scan_carry);
        launch.arg(&params.fwd);
        // SAFETY: as for the reduce launch; gateloop_scan_carry reads h0
        // (when HAS_H0) and the workspace the reduce wrote (same stream),
        // one thread per (b, h, k, v), bounds-checked.
        unsafe { launch.launch(carry_cfg) }.doing("launching gateloop_scan_carry (backward)")?;

        let cfg = LaunchConfig { grid_dim: (lp.reverse_reduce_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&kernels.scan_grad.reduce[vi]);
        launch.arg(&params);
        // SAFETY: gateloop_scan_grad_reduce_f32_v{T} (T = lp.value_tile)
        // takes one GateloopScanGradParams by value, which is what is
        // pushed; besides the checked inputs it reads dy (checked length
        // [B, L, H, V]) and writes rev_gate [B·H, chunks, K] and rev_state
        // [B·H, chunks, K, V] (complex), the second half of the workspace.
        // Block = 32·warps ≤ 256 = __launch_bounds__, grid as planned,
        // static shared memory only.
        unsafe { launch.launch(cfg) }.doing("launching gateloop_scan_grad_reduce_f32")?;
        let mut launch = stream.launch_builder(&kernels.scan_grad.carry);
        launch.arg(&params);
        // SAFETY: as for the reverse reduce; gateloop_scan_grad_carry reads
        // dh_final (when non-null: checked length and alignment) and the
        // workspace the reverse reduce wrote (same stream), one thread per
        // (b, h, k, v) with grid · 256 ≥ B·H·K·V and a bounds check.
        unsafe { launch.launch(carry_cfg) }.doing("launching gateloop_scan_grad_carry")?;
    }
    let cfg = LaunchConfig { grid_dim: (lp.grad_grid, 1, 1), block_dim: block, shared_mem_bytes: 0 };
    let mut launch = stream.launch_builder(&kernels.scan_grad.grad[vi]);
    launch.arg(&params);
    // SAFETY: as for the reverse reduce, with grid = B·H·chunks; it writes
    // dq, dk [B, L, H, K], dv [B, L, H, V], dlog_gate (the gate's layout,
    // complex) and dh0 (when non-null) [B, H, K, V] complex, all checked
    // above; with chunks > 1 it reads the workspace completed by both carry
    // kernels earlier on this stream, with one chunk it reads h0 and
    // dh_final directly and never touches the (null) workspace pointers.
    // Every buffer outlives the launch: borrowed until this function
    // returns, and the guards record the launches on drop.
    unsafe { launch.launch(cfg) }.doing("launching gateloop_scan_grad_f32")?;
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
    let workspace_len = |d: &Dims| Ok(plan_for(gpu, d)?.workspace_len);
    launch::backward_host::<f32>(gpu, p, dy, dh_final, workspace_len, "synchronizing after the scan backward kernels", |s, d, i, g, o, w| {
        backward_into(gpu, s, d, i, g, o, w)
    })
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
