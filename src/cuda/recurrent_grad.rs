//! The backward of the recurrent mode on the GPU (`cuda/recurrent_grad.cu`):
//! the adjoint recurrence δ_t = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t on the
//! forward kernel's mapping (one block per (b, h, tile of 32 value columns),
//! R state rows a thread in registers), the fused-recurrent backward.
//!
//! Three kernels on one stream: a forward sweep (the states, checkpointed
//! at the end of every 64-step segment, and dq over the block's value
//! tile), a backward sweep (δ, dv, dk over the tile, and δ at every
//! segment's end), then one block per (b, h, segment) for dq, dk, dh0 and
//! the gate gradient, which pairs the states and adjoints of a segment
//! through its two ends: every factor a product of gates (modulus ≤ 1), no
//! cancelling difference, so a strongly decaying gate's gradient keeps its
//! relative precision (the kernel file derives it). Every sum has a fixed
//! order: deterministic, no atomics. Memory beyond inputs and gradients:
//! [`GradLaunchPlan::workspace_len`] f32, O(B·H·(L/64)·K·V).
//!
//! Packed sequences ([`backward_varlen_into`], the backward of
//! [`recurrent::forward_varlen_into`]): one sweep block row per sequence,
//! its segments counted from its first step, the checkpoints of a head's
//! sequences in one row of ⌊L/64⌋ + N slots ([`plan_varlen`]); each
//! sequence's gradients bit for bit its own backward's.
//!
//! q, k, v, dy and dq, dk, dv have the element type `T` of
//! [`backward_into`] (f32, f16 or bf16); log_gate, h0, dh_final, dlog_gate,
//! dh0 and the workspace are complex f32, and all arithmetic is f32. K ≤ 128.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use num_complex::Complex;

use super::abi::{self, GateloopRecurrentGradParams, GateloopRecurrentParams};
use super::chunk::Gates;
use super::element::{Dtype, Element};
use super::launch::{self, GradBuffers, GradParams, SeqParams};
use super::phases::launched;
use super::recurrent::{self, RecurrentStaging};
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, Problem};
use crate::reference::grad::Grads;

pub use super::launch::{DeviceGradInputs, DeviceGrads, DeviceInputs};

/// The rows-per-thread variants compiled into the sweeps (`_r{R}`): the
/// forward's but R = 16, whose backward sweep would spill.
pub const ROWS_PER_THREAD: [u32; 4] = [1, 2, 4, 8];
/// Largest key dimension of the recurrent backward (8 rows · 16 warps).
pub const MAX_KEY_DIM: usize = 8 * abi::GATELOOP_RECURRENT_MAX_KEY_GROUPS as usize;
/// Steps between the checkpoints, and the length of the gate gradient's
/// running sums.
pub const SEGMENT: usize = abi::GATELOOP_RECURRENT_GRAD_SEGMENT as usize;
const VALUE_TILE: usize = abi::GATELOOP_RECURRENT_VALUE_TILE as usize;
const GATE_BLOCK: usize = abi::GATELOOP_RECURRENT_GRAD_GATE_BLOCK as usize;
/// A sweep's chunk staging stays within the 48 KiB every device grants
/// without an opt-in ...
const SHARED_BUDGET: usize = 48 * 1024;
/// ... and its sequence (GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES) comes on
/// top: the sweeps' dynamic shared memory limit, raised at load (the
/// staging of K = 9..16 fills the 48 KiB exactly; sm_80 and sm_90 allow
/// far more).
const SWEEP_SHARED_LIMIT: usize = SHARED_BUDGET + abi::GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES as usize;

// SAFETY: the bindgen mirror (#[repr(C)]) of the C struct the kernels take by
// value; its layout is pinned on both sides (the header's static_assert,
// bindgen's layout checks, tests/abi.rs). It holds only integers and raw
// device addresses, so its bytes are a valid kernel argument for any value;
// the pointers are only dereferenced by the kernels, whose launcher
// (`backward_into`) guarantees they are valid.
unsafe impl DeviceRepr for GateloopRecurrentGradParams {}

/// The kernels of `cuda/recurrent_grad.cu`:
/// `gateloop_recurrent_grad_{,real_}{fwd,bwd}_{dtype}_r{R}` and
/// `gateloop_recurrent_grad_{,real_}gate_{dtype}`, indexed by the gates
/// (complex 0, real 1), then [`Dtype::index`], then log2(R).
pub(crate) struct RecurrentGradKernels {
    forward: [[Vec<CudaFunction>; 3]; 2],
    backward: [[Vec<CudaFunction>; 3]; 2],
    gate: [[CudaFunction; 3]; 2],
}

impl RecurrentGradKernels {
    /// Looks up every entry point and raises the sweeps' dynamic shared
    /// memory limit to [`SWEEP_SHARED_LIMIT`] where the device allows it.
    pub(crate) fn load(ctx: &Arc<CudaContext>, module: &Arc<CudaModule>) -> Result<Self, GpuError> {
        fn per_dtype<X>(load: impl Fn(Dtype) -> Result<X, GpuError>) -> Result<[X; 3], GpuError> {
            Ok([load(Dtype::F32)?, load(Dtype::F16)?, load(Dtype::Bf16)?])
        }
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .doing("querying the opt-in shared memory per block")?
            .max(0) as usize;
        let sweep = |name: String| -> Result<CudaFunction, GpuError> {
            let f = module.load_function(&name).doing("looking up gateloop_recurrent_grad_{,real_}{fwd,bwd}_*_r*")?;
            // (Where the device does not allow it, a launch past 48 KiB gets
            // the driver's error.)
            if SWEEP_SHARED_LIMIT <= max_shared {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    SWEEP_SHARED_LIMIT as i32,
                )
                .doing("raising the recurrent backward sweeps' dynamic shared memory limit")?;
            }
            Ok(f)
        };
        let sweeps = |real: &str, kind: &str| {
            per_dtype(|dtype: Dtype| {
                ROWS_PER_THREAD
                    .iter()
                    .map(|r| sweep(format!("gateloop_recurrent_grad_{real}{kind}_{}_r{r}", dtype.name())))
                    .collect::<Result<Vec<_>, _>>()
            })
        };
        let gates = |real: &str| {
            per_dtype(|dtype: Dtype| {
                module
                    .load_function(&format!("gateloop_recurrent_grad_{real}gate_{}", dtype.name()))
                    .doing("looking up gateloop_recurrent_grad_{,real_}gate_{f32,f16,bf16}")
            })
        };
        Ok(RecurrentGradKernels {
            forward: [sweeps("", "fwd")?, sweeps("real_", "fwd")?],
            backward: [sweeps("", "bwd")?, sweeps("real_", "bwd")?],
            gate: [gates("")?, gates("real_")?],
        })
    }
}

/// The launch geometry of one recurrent backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradLaunchPlan {
    /// The sweeps' geometry: the forward's rows and key groups, with
    /// `chunk_len` a power of two dividing [`SEGMENT`] and the shared memory
    /// of the sweeps' staging.
    pub sweep: recurrent::LaunchPlan,
    /// Checkpoint slots a workspace row holds: ⌈L / 64⌉; packed (see
    /// [`plan_varlen`]) ⌊L / 64⌋ + N, every sequence's segments from slot
    /// ⌊cu_seqlens\[i\] / 64⌋ + i.
    pub segments: usize,
    /// Rows of the checkpoints and partial sums: B·H, or H when packed
    /// (the sequences of a head share its row).
    pub workspace_rows: usize,
    /// Blocks of the gate launch, one per (workspace row, slot) (128
    /// threads each: one per key row; an empty slot's block returns).
    pub gate_grid: u32,
    /// f32 of the workspace: the state and adjoint checkpoints, then the dq
    /// and dk partial sums.
    pub workspace_len: usize,
}

impl GradLaunchPlan {
    fn variant_index(&self) -> usize {
        self.sweep.rows_per_thread.trailing_zeros() as usize
    }
    /// f32 offsets of (checkpoints, adjoints, partial_dq, partial_dk, end);
    /// None when they overflow `usize`.
    fn offsets(&self, d: &Dims) -> Option<[usize; 5]> {
        let rows = self.workspace_rows;
        let checkpoints =
            [rows, self.segments, d.key_dim, d.value_dim].into_iter().try_fold(2usize, usize::checked_mul)?;
        let partial =
            [rows, d.len, d.key_dim].into_iter().try_fold(self.sweep.value_tiles as usize, usize::checked_mul)?;
        let two_ck = checkpoints.checked_mul(2)?;
        Some([0, checkpoints, two_ck, two_ck.checked_add(partial)?, two_ck.checked_add(partial.checked_mul(2)?)?])
    }
}

/// Chooses the geometry for `dims`: the forward's rows per thread and key
/// groups (K ≤ 128), time chunks of the largest power of two ≤ 64 whose
/// staging fits 48 KiB.
pub fn plan(dims: &Dims) -> Result<GradLaunchPlan, InputError> {
    plan_rows(dims, false)
}

/// The geometry of the packed backward ([`backward_varlen_into`]): `dims`
/// the packed problem's (`[1, L, H, *]`), `cu_seqlens` its N + 1 offsets
/// (checked: [`crate::packing::sequence_starts`]). The sweeps run one block
/// row per sequence ([`plan`] of N rows of L steps); the checkpoints of a
/// head's sequences share one row of ⌊L / 64⌋ + N slots, sequence i's
/// segments from slot ⌊cu_seqlens\[i\] / 64⌋ + i (apart by at least its
/// ⌈len / 64⌉), and the partial sums one row of L steps, so the workspace
/// is O(H·(L/64 + N)·K·V), about the batched one's for the same steps.
pub fn plan_varlen(dims: &Dims, cu_seqlens: &[usize]) -> Result<GradLaunchPlan, InputError> {
    crate::packing::sequence_starts(dims, cu_seqlens)?;
    plan_rows(&Dims { batch: cu_seqlens.len() - 1, ..*dims }, true)
}

/// The body of [`plan`] and [`plan_varlen`] (`dims.batch` = N sequences when
/// `packed`).
fn plan_rows(dims: &Dims, packed: bool) -> Result<GradLaunchPlan, InputError> {
    dims.validate()?;
    if dims.key_dim > MAX_KEY_DIM {
        return Err(InputError::Param {
            name: "key_dim",
            value: dims.key_dim.to_string(),
            why: "the recurrent GPU backward supports key_dim <= 128 (the chunked backward takes up to 256)",
        });
    }
    let forward = recurrent::plan_with(dims, RecurrentStaging::Batched)?;
    let groups = forward.key_groups as usize;
    let per_step = 16 * forward.padded_key_dim as usize + 4 * VALUE_TILE * (2 + groups);
    // The chunk from the staging alone; the sequence after it (see
    // SWEEP_SHARED_LIMIT).
    let sequence_bytes = abi::GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES as usize;
    let fit = (SHARED_BUDGET / per_step).clamp(1, SEGMENT);
    let chunk = 1usize << fit.ilog2();
    debug_assert!(SEGMENT.is_multiple_of(chunk));
    // (packed: dims.len is the packed row's L, dims.batch the N sequences)
    let (segments, workspace_rows) = if packed {
        (dims.len / SEGMENT + dims.batch, dims.heads)
    } else {
        (dims.len.div_ceil(SEGMENT), dims.batch * dims.heads)
    };
    let rows_name = if packed { "H·(⌊L/64⌋ + N)" } else { "B·H·⌈L/64⌉" };
    let gate_grid = workspace_rows
        .checked_mul(segments)
        .and_then(|g| u32::try_from(g).ok())
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| InputError::TooLarge {
            name: "grid",
            shape: format!("[{rows_name}] = [{workspace_rows}·{segments}]"),
            limit: "2^31 - 1 thread blocks".into(),
        })?;
    let sweep = recurrent::LaunchPlan {
        chunk_len: chunk as u32,
        shared_bytes: (chunk * per_step + sequence_bytes) as u32,
        ..forward
    };
    let mut p = GradLaunchPlan { sweep, segments, workspace_rows, gate_grid, workspace_len: 0 };
    p.workspace_len = p.offsets(dims).ok_or_else(|| InputError::TooLarge {
        name: "workspace",
        shape: format!("2·({rows_name}·K·V complex) + 2·(⌈V/32⌉·{workspace_rows}·L·K) f32 for {dims:?}"),
        limit: "usize::MAX f32".into(),
    })?[4];
    Ok(p)
}

/// Runs the recurrent backward on `stream` over device buffers: `grads`
/// receive ∂L/∂(q, k, v, log_gate, h0) for L = Σ dy ⊙ y + ⟨dh_final, h_final⟩
/// (the convention of [`crate::reference::grad`]). `T` is the element type
/// of q, k, v, dy and of dq, dk, dv; log_gate, h0, dh_final, dlog_gate and
/// dh0 are complex f32. Asynchronous: it enqueues three kernels and never
/// synchronizes.
///
/// `workspace` must hold at least [`GradLaunchPlan::workspace_len`] f32 of
/// [`plan`]`(dims)` (overwritten). Checks on the host: dims (K ≤ 128), every
/// buffer's length (the error names the argument), contexts, alignment of
/// complex buffers. The gate's domain (Re ≤ 0) is the caller's
/// responsibility. A `dh0` buffer is required when `inputs.h0` is given.
pub fn backward_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    upstream: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: &'a mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    let buffers =
        GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: false, packed: false };
    launch_backward(gpu, stream, dims, plan(dims)?, buffers, None)
}

/// [`backward_into`] with real gates (gated linear attention), the backward
/// of [`recurrent::forward_real_into`]: log_gate, h0, dh_final, dlog_gate
/// and dh0 are real f32 (`[B, L, H, K or 1]`, `[B, H, K, V]`); the same
/// plan and workspace. The sweeps step a real state and adjoint; the gate
/// launch runs the complex expansion on gates of phase 0. Its gradients
/// equal [`backward_into`]'s on those gates as real numbers (the Im parts
/// the complex sweeps carry are zeros, whose signs may differ).
pub fn backward_real_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    upstream: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: &'a mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    let buffers =
        GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: true, packed: false };
    launch_backward(gpu, stream, dims, plan(dims)?, buffers, None)
}

/// The backward of [`recurrent::forward_varlen_into`]: packed sequences,
/// sequence i the steps `cu_seqlens[i] .. cu_seqlens[i + 1]` of the one
/// batch row of q, k, v, log_gate, dy (`dims` = `[1, L, H, *]`) and of the
/// gradients dq, dk, dv, dlog_gate written there; h0, dh_final and dh0
/// `[N, H, K, V]`, state i sequence i's. Every sequence's gradients are
/// [`backward_into`]'s on that sequence alone, bit for bit (the same
/// blocks, chunks and segments, counted from its first step), in one
/// launch of each kernel. `workspace`: at least
/// [`plan_varlen`]`(dims, cu_seqlens).workspace_len` f32. The offsets are
/// checked (they start at 0, rise strictly, end at L), then every buffer,
/// before anything is queued; then they are uploaded on `stream` (freed in
/// stream order after the launches).
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'a, T>,
    upstream: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: &'a mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    let buffers =
        GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: false, packed: true };
    varlen_backward(gpu, stream, dims, cu_seqlens, buffers)
}

/// [`backward_varlen_into`] with real gates ([`backward_real_into`]'s
/// layouts: log_gate, h0, dh_final, dlog_gate, dh0 real f32).
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_real_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'a, T>,
    upstream: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: &'a mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    let buffers =
        GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: true, packed: true };
    varlen_backward(gpu, stream, dims, cu_seqlens, buffers)
}

/// The body of [`backward_varlen_into`] and [`backward_varlen_real_into`]
/// (`buffers.packed`): the launch's dims have one block row per sequence.
fn varlen_backward<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    buffers: GradBuffers<'_, T>,
) -> Result<(), GpuError> {
    let lp = plan_varlen(dims, cu_seqlens)?;
    let d = Dims { batch: cu_seqlens.len() - 1, ..*dims };
    // Every buffer before the upload (launch_backward checks them again).
    buffers.check(gpu, stream, &d, lp.workspace_len, || workspace_shape(&lp))?;
    launch::with_offsets(gpu, stream, dims, cu_seqlens, |d, ptr| {
        launch_backward(gpu, stream, d, lp, buffers, Some(ptr))
    })
}

/// The workspace a plan needs, for the length error.
fn workspace_shape(lp: &GradLaunchPlan) -> String {
    format!("at least {} f32 ({} segments of {SEGMENT} steps)", lp.workspace_len, lp.segments)
}

/// The body of every backward: `buffers` (complex or real gate-side
/// tensors, as its `real_gates` says; packed sequences when `cu_seqlens`,
/// their device offsets, is given, `d.batch` of them) checked against the
/// plan `lp` of `d` and bound, the three launches enqueued.
fn launch_backward<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    d: &Dims,
    lp: GradLaunchPlan,
    buffers: GradBuffers<'_, T>,
    cu_seqlens: Option<u64>,
) -> Result<(), GpuError> {
    let real = usize::from(buffers.real_gates);
    buffers.check(gpu, stream, d, lp.workspace_len, || workspace_shape(&lp))?;
    let sp = &lp.sweep;
    let mut params = GateloopRecurrentGradParams {
        fwd: GateloopRecurrentParams {
            key_groups: sp.key_groups as i32,
            padded_key_dim: sp.padded_key_dim as i32,
            chunk_len: sp.chunk_len as i32,
            value_tiles: sp.value_tiles as i32,
            cu_seqlens: cu_seqlens.map_or(std::ptr::null(), |p| p as usize as *const i64),
            ..GateloopRecurrentParams::for_dims(d, T::DTYPE.abi())?
        },
        segments: lp.segments as i64,
        ..Default::default()
    };
    params.set_grad_strides(d)?;
    // Device addresses (q, k, v, log_gate, h0 and HAS_H0 into params.fwd);
    // the guards order this stream after earlier work on each buffer and
    // record these launches when dropped (at return).
    let (ptrs, _bound) = buffers.bind(stream, &mut params.fwd)?;
    params.set_grad_pointers(&ptrs);
    let w = ptrs.workspace.expect("bound with a workspace");
    // Four parts of the checked workspace (the complex ones at even offsets:
    // 8-byte aligned).
    let offsets = lp.offsets(d).expect("`plan` checked the workspace's size");
    let [ck, adj, pdq, pdk, _] = offsets.map(|o| (w as usize + 4 * o) as *mut f32);
    (params.checkpoints, params.adjoints, params.partial_dq, params.partial_dk) = (ck, adj, pdq, pdk);

    let kernels = &gpu.kernels.recurrent_grad;
    let (ti, vi) = (T::DTYPE.index(), lp.variant_index());
    let sweep_cfg = LaunchConfig {
        grid_dim: (sp.grid, 1, 1),
        block_dim: (VALUE_TILE as u32, sp.key_groups, 1),
        shared_mem_bytes: sp.shared_bytes,
    };
    let kernel = &kernels.forward[real][ti][vi];
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&params);
    // SAFETY: gateloop_recurrent_grad_{,real_}fwd_{E}_r{R} (real_ exactly
    // when the buffers were checked as real: `real`; E = T::DTYPE, the element
    // type of q, k, v, dy: T::DTYPE picks the table row; R =
    // sp.rows_per_thread ≤ 8, the column) takes one GateloopRecurrentGradParams
    // by value, which is what is pushed. Its inputs are live buffers of this
    // context with the lengths GradBuffers::check verified for `d` (q, k, v,
    // dy in E, log_gate and h0 complex f32, 8-byte aligned, or real f32 for
    // the real_ kernels, which read f32 elements of them); it writes
    // partial_dq and the checkpoints, inside the workspace of ≥
    // lp.workspace_len f32 (offsets from `plan`). Geometry:
    // block 32 × key_groups (≤ 512 threads with R = 8, one warp with R < 8:
    // the entry's bounds), chunk_len | 64 and shared memory ≤ 48 KiB as
    // `plan` computed, grid B·H·⌈V/32⌉ < 2^31.
    launched(stream, kernel, sweep_cfg, unsafe { launch.launch(sweep_cfg) }, "launching gateloop_recurrent_grad_fwd")?;
    let kernel = &kernels.backward[real][ti][vi];
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&params);
    // SAFETY: as for the forward sweep (gateloop_recurrent_grad_{,real_}bwd_{E}_r{R},
    // the same geometry); it also reads dh_final (when non-null: checked
    // length, complex 8-byte aligned or real), and writes dv (E, checked length), partial_dk
    // and the adjoints (workspace) and, when non-null, dh0 (checked length).
    launched(stream, kernel, sweep_cfg, unsafe { launch.launch(sweep_cfg) }, "launching gateloop_recurrent_grad_bwd")?;
    let cfg = LaunchConfig {
        grid_dim: (lp.gate_grid, 1, 1),
        block_dim: (GATE_BLOCK as u32, 1, 1),
        shared_mem_bytes: abi::GATELOOP_RECURRENT_GRAD_GATE_SHARED_BYTES,
    };
    let kernel = &kernels.gate[real][ti];
    let mut launch = stream.launch_builder(kernel);
    launch.arg(&params);
    // SAFETY: gateloop_recurrent_grad_{,real_}gate_{E} takes the same struct
    // (real_ with `real`: dlog_gate, dh0 and h0 read and written as f32); one
    // block per (b, h, segment) (grid = B·H·segments, `plan`), one thread per
    // key row (K ≤ 128 = its block; the threads past K store nothing), the
    // ABI's GATE_SHARED_BYTES of dynamic shared memory (< 48 KiB); it reads q, k, v, dy, log_gate, h0 and the
    // checkpoints, adjoints and partial sums both sweeps wrote earlier on
    // this stream, writes dq, dk (E), dlog_gate (the gate's layout) and
    // rescales dh0 in place (when non-null), all of checked lengths. Every
    // buffer outlives the launches: borrowed until this function returns,
    // and the guards record them on drop.
    launched(stream, kernel, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_recurrent_grad_gate")?;
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
/// back to f32 (exactly).
pub fn backward_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    host_backward::<T>(gpu, p, dy, dh_final, false)
}

/// [`backward_real_into`] from host data: `p`'s log_gate and h0 and
/// `dh_final` must be real (Im = 0 everywhere, else [`InputError::Value`]);
/// their real parts are uploaded as real f32, q, k, v, dy rounded to `T`.
/// Returns the gradients with dlog_gate and dh0 as complex numbers with
/// Im = 0.
pub fn backward_real_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    host_backward::<T>(gpu, p, dy, dh_final, true)
}

/// The body of [`backward_host_as`] and [`backward_real_host_as`].
fn host_backward<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    real_gates: bool,
) -> Result<Grads<f32>, GpuError> {
    let workspace_len = |d: &Dims| Ok(plan(d)?.workspace_len);
    launch::backward_host::<T>(
        gpu,
        p,
        dy,
        dh_final,
        real_gates,
        workspace_len,
        "synchronizing after the recurrent backward kernels",
        |s, d, i, g, o, w| {
            let w = w.expect("a workspace: its length is never 0");
            let buffers =
                GradBuffers { inputs: i, grad_in: g, grads: o, workspace: Some(w), real_gates, packed: false };
            launch_backward(gpu, s, d, plan(d)?, buffers, None)
        },
    )
}

/// [`backward_varlen_into`] from host data: `p` is the packed problem
/// (`[1, L, H, *]`, no h0 of its own; [`crate::packing::backward_varlen`]'s
/// contract), `h0` and `dh_final` `[N, H, K, V]`; returns dq, dk, dv,
/// dlog_gate in the packed layout and, when `h0` is given, dh0 `[N, H, K,
/// V]`. `gates`: [`Gates::Real`] runs [`backward_varlen_real_into`] and
/// needs real log_gate, h0 and dh_final (else [`InputError::Value`]).
/// Everything is checked before the upload.
pub fn backward_varlen_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<f32>]>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    gates: Gates,
) -> Result<Grads<f32>, GpuError> {
    let sequences = crate::packing::check_varlen(p, cu_seqlens, h0)?;
    let real_gates = gates == Gates::Real;
    let workspace_len = |d: &Dims| Ok(plan_varlen(d, cu_seqlens)?.workspace_len);
    launch::backward_host_states::<T>(
        gpu,
        p,
        launch::HostStates::Packed { sequences, h0 },
        dy,
        dh_final,
        real_gates,
        workspace_len,
        "synchronizing after the recurrent backward kernels",
        |_, d, i, g, o, w| {
            let w = w.expect("a workspace: its length is never 0");
            let buffers = GradBuffers { inputs: i, grad_in: g, grads: o, workspace: Some(w), real_gates, packed: true };
            // backward_host_states runs on the Gpu's stream, which the
            // upload of the offsets takes as its Arc.
            varlen_backward(gpu, gpu.stream(), d, cu_seqlens, buffers)
        },
    )
}

/// [`backward_host_as`] (or, with real gates, [`backward_real_host_as`])
/// through the packed launches: `p`'s B batch rows as B packed sequences
/// of `p.dims.len` steps, [`backward_varlen_host_as`] on the same data read
/// as `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0, dh_final and dh0
/// `[B, H, K, V]` either way). The batched backward's gradients, bit for
/// bit: so the packed path meets every input the others meet
/// (`dispatch::Variant::Packed`, which the fuzzer runs).
pub fn backward_packed_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    gates: Gates,
) -> Result<Grads<f32>, GpuError> {
    p.validate()?;
    let (dims, cu_seqlens) = crate::packing::rows_as_sequences(&p.dims);
    let rows = Problem { dims, h0: None, ..*p };
    backward_varlen_host_as::<T>(gpu, &rows, &cu_seqlens, p.h0, dy, dh_final, gates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn plan_examples() {
        // K = 64: 8 rows, 8 warps; 21 steps fit 48 KiB, so chunks of 16.
        let p = plan(&dims(8, 4096, 16, 64, 64, false)).unwrap();
        assert_eq!((p.sweep.rows_per_thread, p.sweep.key_groups, p.sweep.chunk_len), (8, 8, 16));
        assert_eq!((p.segments, p.sweep.grid, p.gate_grid), (64, 256, 8 * 16 * 64));
        // K = 1, per-head gate: chunks of 64, one gate block per segment.
        let p = plan(&dims(1, 100, 3, 1, 5, true)).unwrap();
        assert_eq!((p.sweep.rows_per_thread, p.sweep.key_groups, p.sweep.chunk_len, p.segments), (1, 1, 64, 2));
        assert_eq!(p.gate_grid, 6);
        // Two checkpoint sets (3 heads · 2 segments · K·V = 5, complex), then
        // dq, dk partials (one tile · 3 heads · 100 steps · K = 1).
        assert_eq!(p.workspace_len, 2 * (2 * 3 * 2 * 5) + 2 * (3 * 100));
    }

    #[test]
    fn plan_invariants() {
        for k in 1..=MAX_KEY_DIM {
            for (l, v) in [(1, 1), (65, 33), (1000, 64)] {
                let d = dims(2, l, 3, k, v, k % 2 == 0);
                let p = plan(&d).unwrap();
                let c = p.sweep.chunk_len as usize;
                assert!(c.is_power_of_two() && SEGMENT.is_multiple_of(c), "{p:?}");
                // The staging within 48 KiB, the sequence above it, within the raised limit.
                let sequence = abi::GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES as usize;
                assert!(p.sweep.shared_bytes as usize - sequence <= SHARED_BUDGET);
                assert!(p.sweep.shared_bytes as usize <= SWEEP_SHARED_LIMIT);
                assert!(ROWS_PER_THREAD.contains(&p.sweep.rows_per_thread));
                assert!(p.sweep.rows_per_thread == 8 || p.sweep.key_groups == 1, "one warp below 8 rows: {p:?}");
                assert_eq!(p.segments, l.div_ceil(64));
                assert_eq!(p.gate_grid as usize, 6 * p.segments);
                assert!(k <= GATE_BLOCK);
                let o = p.offsets(&d).unwrap();
                assert!(o[..3].iter().all(|x| x % 2 == 0) && o.windows(2).all(|w| w[0] < w[1]));
                assert_eq!(p.workspace_len, o[4]);
            }
        }
    }

    /// Packed: one sweep row per sequence, H workspace rows of ⌊L/64⌋ + N
    /// slots; every sequence's slots (from ⌊cu_i / 64⌋ + i, ⌈len_i / 64⌉ of
    /// them) inside its head's row and apart from the others'.
    #[test]
    fn varlen_plan_slots_never_overlap() {
        let d = dims(1, 300, 3, 16, 40, false);
        let cu = [0, 1, 64, 65, 200, 263, 300];
        let p = plan_varlen(&d, &cu).unwrap();
        let n = cu.len() - 1;
        assert_eq!((p.segments, p.workspace_rows, p.gate_grid), (300 / 64 + n, 3, 3 * (300 / 64 + n) as u32));
        assert_eq!(p.sweep.grid, plan(&dims(n, 300, 3, 16, 40, false)).unwrap().sweep.grid);
        for lens in [vec![1usize; 200], vec![64, 64, 64], vec![63, 65, 1, 127, 129], vec![1000], vec![1, 999]] {
            let cu: Vec<usize> =
                std::iter::once(0).chain(lens.iter().scan(0, |e, l| Some(*e + l).inspect(|x| *e = *x))).collect();
            let l = *cu.last().unwrap();
            let p = plan_varlen(&dims(1, l, 2, 8, 8, true), &cu).unwrap();
            let mut used = vec![false; p.segments];
            for (i, len) in lens.iter().enumerate() {
                let base = cu[i] / SEGMENT + i;
                for (slot, u) in used.iter_mut().enumerate().skip(base).take(len.div_ceil(SEGMENT)) {
                    assert!(!std::mem::replace(u, true), "{lens:?}: slot {slot} twice");
                }
                assert!(base + len.div_ceil(SEGMENT) <= p.segments, "{lens:?}: sequence {i} past the row");
            }
            // Two checkpoint sets of H rows, then the partials of H rows of L steps.
            assert_eq!(p.workspace_len, 2 * (2 * 2 * p.segments * 8 * 8) + 2 * (2 * l * 8));
        }
        assert!(matches!(plan_varlen(&d, &[0, 300, 300]), Err(InputError::Value { name: "cu_seqlens", .. })));
        assert!(matches!(
            plan_varlen(&dims(2, 300, 3, 16, 40, false), &cu),
            Err(InputError::Param { name: "batch", .. })
        ));
    }

    #[test]
    fn plan_rejects() {
        for k in [129, 257, 1000] {
            assert!(matches!(plan(&dims(1, 5, 1, k, 1, false)), Err(InputError::Param { name: "key_dim", .. })));
        }
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false)), Err(InputError::ZeroDim { name: "len" })));
    }
}
