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
//! q, k, v, dy and dq, dk, dv have the element type `T` of
//! [`backward_into`] (f32, f16 or bf16); log_gate, h0, dh_final, dlog_gate,
//! dh0 and the workspace are complex f32, and all arithmetic is f32. K ≤ 128.

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopRecurrentGradParams, GateloopRecurrentParams};
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
/// Dynamic shared memory of a sweep stays within the 48 KiB every device
/// grants without an opt-in.
const SHARED_BUDGET: usize = 48 * 1024;

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
    pub(crate) fn load(module: &std::sync::Arc<CudaModule>) -> Result<Self, GpuError> {
        fn per_dtype<X>(load: impl Fn(Dtype) -> Result<X, GpuError>) -> Result<[X; 3], GpuError> {
            Ok([load(Dtype::F32)?, load(Dtype::F16)?, load(Dtype::Bf16)?])
        }
        let sweeps = |real: &str, kind: &str| {
            per_dtype(|dtype: Dtype| {
                ROWS_PER_THREAD
                    .iter()
                    .map(|r| {
                        module.load_function(&format!("gateloop_recurrent_grad_{real}{kind}_{}_r{r}", dtype.name()))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .doing("looking up gateloop_recurrent_grad_{,real_}{fwd,bwd}_{f32,f16,bf16}_r*")
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
    /// ⌈L / 64⌉.
    pub segments: usize,
    /// Blocks of the gate launch, one per (b, h, segment) (128 threads
    /// each: one per key row).
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
        let bh = d.batch.checked_mul(d.heads)?;
        let checkpoints =
            [bh, self.segments, d.key_dim, d.value_dim].into_iter().try_fold(2usize, usize::checked_mul)?;
        let partial =
            [bh, d.len, d.key_dim].into_iter().try_fold(self.sweep.value_tiles as usize, usize::checked_mul)?;
        let two_ck = checkpoints.checked_mul(2)?;
        Some([0, checkpoints, two_ck, two_ck.checked_add(partial)?, two_ck.checked_add(partial.checked_mul(2)?)?])
    }
}

/// Chooses the geometry for `dims`: the forward's rows per thread and key
/// groups (K ≤ 128), time chunks of the largest power of two ≤ 64 whose
/// staging fits 48 KiB.
pub fn plan(dims: &Dims) -> Result<GradLaunchPlan, InputError> {
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
    let fit = (SHARED_BUDGET / per_step).clamp(1, SEGMENT);
    let chunk = 1usize << fit.ilog2();
    debug_assert!(SEGMENT.is_multiple_of(chunk));
    let segments = dims.len.div_ceil(SEGMENT);
    let bh = dims.batch * dims.heads;
    let gate_grid =
        bh.checked_mul(segments).and_then(|g| u32::try_from(g).ok()).filter(|&g| g <= i32::MAX as u32).ok_or_else(
            || InputError::TooLarge {
                name: "grid",
                shape: format!("[B·H·⌈L/64⌉] = [{bh}·{segments}]"),
                limit: "2^31 - 1 thread blocks".into(),
            },
        )?;
    let sweep = recurrent::LaunchPlan { chunk_len: chunk as u32, shared_bytes: (chunk * per_step) as u32, ..forward };
    let mut p = GradLaunchPlan { sweep, segments, gate_grid, workspace_len: 0 };
    p.workspace_len = p.offsets(dims).ok_or_else(|| InputError::TooLarge {
        name: "workspace",
        shape: format!("2·(B·H·⌈L/64⌉·K·V complex) + 2·(⌈V/32⌉·B·H·L·K) f32 for {dims:?}"),
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
    let buffers = GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: false };
    launch_backward(gpu, stream, dims, buffers)
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
    let buffers = GradBuffers { inputs, grad_in: upstream, grads, workspace: Some(workspace), real_gates: true };
    launch_backward(gpu, stream, dims, buffers)
}

/// The body of [`backward_into`] and [`backward_real_into`]: `buffers`
/// (complex or real gate-side tensors, as its `real_gates` says) checked and
/// bound, the three launches enqueued.
fn launch_backward<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    d: &Dims,
    buffers: GradBuffers<'_, T>,
) -> Result<(), GpuError> {
    let lp = plan(d)?;
    let real = usize::from(buffers.real_gates);
    buffers.check(gpu, stream, d, lp.workspace_len, || {
        format!("at least {} f32 ({} segments of {SEGMENT} steps)", lp.workspace_len, lp.segments)
    })?;
    let sp = &lp.sweep;
    let mut params = GateloopRecurrentGradParams {
        fwd: GateloopRecurrentParams {
            key_groups: sp.key_groups as i32,
            padded_key_dim: sp.padded_key_dim as i32,
            chunk_len: sp.chunk_len as i32,
            value_tiles: sp.value_tiles as i32,
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
            let buffers = GradBuffers { inputs: i, grad_in: g, grads: o, workspace: Some(w), real_gates };
            launch_backward(gpu, s, d, buffers)
        },
    )
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
                assert!(p.sweep.shared_bytes as usize <= SHARED_BUDGET);
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

    #[test]
    fn plan_rejects() {
        for k in [129, 257, 1000] {
            assert!(matches!(plan(&dims(1, 5, 1, k, 1, false)), Err(InputError::Param { name: "key_dim", .. })));
        }
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false)), Err(InputError::ZeroDim { name: "len" })));
    }
}
