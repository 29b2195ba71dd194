//! Masked surrogate attention on the GPU (`cuda/attention.cu`), O(L²).
//!
//! Three kernels on one stream: `prep` writes the tile-local log-gate sums to
//! the caller's workspace ([`LaunchPlan::workspace_len`] f32, see
//! [`crate::cuda`] for the workspace convention), `attention` computes y
//! flash-style (one block per batch, head, query tile of 64 steps and 64
//! value columns), `attention_state` computes h_final. The CPU mirror is
//! [`crate::cpu::attention`]; the kernel file documents the anchoring.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::abi::{self, GateloopAttentionParams};
use super::element::{Dtype, Element};
use super::launch::{self, Buffers, SeqParams};
use super::phases::launched;
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, Outputs, Problem};

pub use super::launch::{DeviceInputs, DeviceOutputs};

/// Largest key dimension the attention kernels support.
pub const MAX_KEY_DIM: usize = abi::GATELOOP_ATTENTION_MAX_KEY_DIM as usize;
const TILE: usize = abi::GATELOOP_ATTENTION_TILE as usize;
const VALUE_TILE: usize = abi::GATELOOP_ATTENTION_VALUE_TILE as usize;
const THREADS: u32 = abi::GATELOOP_ATTENTION_THREADS;
const PREP_THREADS: u32 = abi::GATELOOP_ATTENTION_PREP_THREADS;
const STATE_KEY_TILE: usize = abi::GATELOOP_ATTENTION_STATE_KEY_TILE as usize;
const STATE_VALUE_TILE: usize = abi::GATELOOP_ATTENTION_STATE_VALUE_TILE as usize;

/// The attention kernels of one element type (`gateloop_attention_prep_T`,
/// `gateloop_attention_T`, `gateloop_attention_state_T`).
pub(crate) struct AttentionKernels {
    prep: CudaFunction,
    y: CudaFunction,
    state: CudaFunction,
}

impl AttentionKernels {
    pub(crate) fn load(module: &Arc<CudaModule>, dtype: Dtype) -> Result<AttentionKernels, GpuError> {
        let t = dtype.name();
        let f = |kind: &str| {
            module
                .load_function(&format!("gateloop_attention_{kind}{t}"))
                .doing("looking up gateloop_attention_{prep_,,state_}{f32,f16,bf16}")
        };
        Ok(AttentionKernels { prep: f("prep_")?, y: f("")?, state: f("state_")? })
    }
}

/// The launch geometry of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// ceil(L / 64)
    pub num_tiles: u32,
    /// ceil(V / 64)
    pub value_tiles: u32,
    /// ceil(K / 64)
    pub state_key_tiles: u32,
    /// ceil(V / 32)
    pub state_value_tiles: u32,
    /// Blocks of the prep kernel: ceil(B·H·num_tiles·gate_dim / 128).
    pub prep_grid: u32,
    /// Blocks of the y kernel: B·H·num_tiles·value_tiles.
    pub grid: u32,
    /// Blocks of the state kernel: B·H·state_key_tiles·state_value_tiles.
    pub state_grid: u32,
    /// f32 elements of the workspace: [`WORKSPACE_WORDS_PER_ELEMENT`]·n = 6·n
    /// for n = B·H·L·gate_dim, laid out as ws_prefix (n complex f32),
    /// ws_suffix (n complex f32), ws_reset (n i32, as f32-sized words),
    /// ws_prefix_lo (n f32, the compensation of Re ws_prefix).
    pub workspace_len: usize,
}

/// f32-sized words of workspace per (b, h, t, gate channel): prefix (2),
/// suffix (2), reset (1), prefix_lo (1).
pub const WORKSPACE_WORDS_PER_ELEMENT: usize = 6;

impl LaunchPlan {
    /// n = B·H·L·gate_dim, the elements of each workspace tensor.
    fn workspace_elements(&self) -> usize {
        self.workspace_len / WORKSPACE_WORDS_PER_ELEMENT
    }
}

/// Chooses the launch geometry for `dims` (K ≤ 256; every grid ≤ 2^31 − 1).
pub fn plan(dims: &Dims) -> Result<LaunchPlan, InputError> {
    dims.validate()?;
    if dims.key_dim > MAX_KEY_DIM {
        return Err(InputError::Param {
            name: "key_dim",
            value: dims.key_dim.to_string(),
            why: "the attention GPU kernel supports key_dim <= 256",
        });
    }
    let bh = dims.batch.checked_mul(dims.heads);
    let grid = |name: &'static str, per_head: usize, div: usize| -> Result<u32, InputError> {
        bh.and_then(|x| x.checked_mul(per_head))
            .map(|x| x.div_ceil(div))
            .and_then(|x| u32::try_from(x).ok())
            .filter(|&g| g <= i32::MAX as u32)
            .ok_or_else(|| InputError::TooLarge {
                name,
                shape: format!("B·H·{per_head}/{div} with B = {}, H = {}", dims.batch, dims.heads),
                limit: "2^31 - 1 thread blocks".into(),
            })
    };
    let tiles = dims.len.div_ceil(TILE);
    let value_tiles = dims.value_dim.div_ceil(VALUE_TILE);
    let skt = dims.key_dim.div_ceil(STATE_KEY_TILE);
    let svt = dims.value_dim.div_ceil(STATE_VALUE_TILE);
    let prep_grid = grid("prep grid", tiles * dims.gate_dim(), PREP_THREADS as usize)?;
    let y_grid = grid("grid", tiles * value_tiles, 1)?;
    let state_grid = grid("state grid", skt * svt, 1)?;
    let workspace_len = bh
        .and_then(|x| x.checked_mul(dims.len * dims.gate_dim()))
        .and_then(|n| n.checked_mul(WORKSPACE_WORDS_PER_ELEMENT))
        .ok_or_else(|| InputError::TooLarge {
            name: "workspace",
            shape: format!(
                "[{WORKSPACE_WORDS_PER_ELEMENT}·B·H·L·gate_dim] with B = {}, H = {}",
                dims.batch, dims.heads
            ),
            limit: "usize::MAX".into(),
        })?;
    Ok(LaunchPlan {
        num_tiles: tiles as u32,
        value_tiles: value_tiles as u32,
        state_key_tiles: skt as u32,
        state_value_tiles: svt as u32,
        prep_grid,
        grid: y_grid,
        state_grid,
        workspace_len,
    })
}

/// Runs the attention kernels on `stream` over device buffers, writing `out`.
/// `T` is the element type of q, k, v and y (f32, f16, bf16); log_gate, h0,
/// h_final and the workspace are (complex) f32, and the kernels compute in
/// f32 (y is rounded to `T` once). Asynchronous: it enqueues three kernels
/// and never synchronizes.
///
/// `workspace` must hold at least [`LaunchPlan::workspace_len`] f32 of
/// [`plan`]`(dims)` (its contents are overwritten; never 0, so never `None`).
/// Checks on the host: dims (K ≤ 256), every buffer's length (the error names
/// the argument), context, alignment of complex buffers and of the
/// workspace. It does not read the data, so the gate's domain (Re ≤ 0) is
/// the caller's responsibility ([`super::check::log_gate`] checks it on the
/// device, opt-in, synchronizing).
pub fn forward_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
) -> Result<(), GpuError> {
    let d = dims;
    let lp = plan(d)?;
    let buffers = Buffers::forward(inputs, out, workspace);
    buffers.check(gpu, stream, d, lp.workspace_len, || format!("at least {} f32", lp.workspace_len))?;
    let mut params = GateloopAttentionParams {
        num_tiles: lp.num_tiles as i64,
        value_tiles: lp.value_tiles as i64,
        state_key_tiles: lp.state_key_tiles as i64,
        state_value_tiles: lp.state_value_tiles as i64,
        ..GateloopAttentionParams::for_dims(d, T::DTYPE.abi())?
    };
    // Held until this function returns, after the launches.
    let bound = buffers.bind(stream, &mut params, true)?;
    let w = bound.workspace.expect("checked: the workspace is never empty") as usize;
    // 8-byte aligned (checked), so are the complex planes prefix and suffix:
    // each starts after an even number of f32. reset and prefix_lo are 4-byte
    // words at 4-byte offsets.
    let n = lp.workspace_elements();
    params.ws_prefix = w as *mut f32;
    params.ws_suffix = (w + 4 * 2 * n) as *mut f32;
    params.ws_reset = (w + 4 * 4 * n) as *mut i32;
    params.ws_prefix_lo = (w + 4 * 5 * n) as *mut f32;

    let kernels = &gpu.kernels.attention[T::DTYPE.index()];
    let launches = [
        (&kernels.prep, lp.prep_grid, PREP_THREADS, "launching gateloop_attention_prep"),
        (&kernels.y, lp.grid, THREADS, "launching gateloop_attention"),
        (&kernels.state, lp.state_grid, THREADS, "launching gateloop_attention_state"),
    ];
    for (func, grid, threads, doing) in launches {
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(func);
        launch.arg(&params);
        // SAFETY: `func` is one of gateloop_attention{_prep,,_state}_T with T
        // the element type of q, k, v, y (T::DTYPE picks the table), whose
        // only parameter is a GateloopAttentionParams by value, which is what
        // is pushed. Every pointer in it comes from a live buffer of this
        // context whose length was checked above against the dims in `params`
        // (the kernels touch exactly those extents with the contiguous strides
        // set above, in elements of T for q, k, v, y and of f32 for the rest; the workspace, checked to hold ≥ 6·n f32 for
        // n = B·H·L·gate_dim, is carved into prefix and suffix, n complex f32
        // each, reset, n i32, and prefix_lo, n f32; the prep kernel writes
        // every element of all four before the other two kernels, after it
        // on `stream`, read them), complex buffers and the workspace are
        // 8-byte aligned (checked), h0 is null iff HAS_H0 is clear,
        // and the geometry (blocks of 128 or 256 threads, the
        // __launch_bounds__; static shared memory only, < 48 KiB; grids ≤
        // 2^31 − 1) is the one `plan` computed for these dims. The buffers
        // outlive the launches: borrows are held until this function returns,
        // and cudarc's drop of a CudaSlice waits on the events the guards
        // record.
        launched(stream, func, cfg, unsafe { launch.launch(cfg) }, doing)?;
    }
    Ok(())
}

/// Uploads `p`, runs the attention kernels on the Gpu's default stream
/// (allocating the workspace), downloads the outputs; synchronizes. Checks
/// the gate domain on the host.
pub fn forward_host(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    forward_host_as::<f32>(gpu, p)
}

/// [`forward_host`] with q, k, v rounded to `T` on the host before the upload
/// (log_gate and h0 stay f32) and the kernels' `T` output `y` widened back to
/// f32 (exactly).
pub fn forward_host_as<T: Element>(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    let workspace_len = |d: &Dims| Ok(plan(d)?.workspace_len);
    launch::forward_host::<T>(
        gpu,
        p,
        false,
        workspace_len,
        "synchronizing after the attention kernels",
        |s, d, i, o, ws| forward_into(gpu, s, d, i, o, ws),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn plan_examples() {
        let p = plan(&dims(2, 65, 3, 5, 65, false)).unwrap();
        assert_eq!((p.num_tiles, p.value_tiles, p.state_key_tiles, p.state_value_tiles), (2, 2, 1, 3));
        assert_eq!(p.grid, 6 * 2 * 2);
        assert_eq!(p.state_grid, 6 * 3);
        assert_eq!(p.prep_grid, (6 * 2 * 5usize).div_ceil(128) as u32);
        assert_eq!(p.workspace_len, 6 * (2 * 3 * 65 * 5));
        let p = plan(&dims(1, 65536, 256, 64, 64, true)).unwrap();
        assert_eq!((p.num_tiles, p.grid, p.workspace_len), (1024, 256 * 1024, 6 * 256 * 65536));
        assert!(matches!(plan(&dims(1, 1, 1, 257, 1, false)), Err(InputError::Param { name: "key_dim", .. })));
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false)), Err(InputError::ZeroDim { name: "len" })));
        assert!(matches!(plan(&dims(1 << 16, 1 << 16, 1 << 6, 1, 1, false)), Err(InputError::TooLarge { .. })));
    }
}
