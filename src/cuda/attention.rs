//! Masked surrogate attention on the GPU (`cuda/attention.cu`), O(L²).
//!
//! Three kernels on one stream: `prep` writes the tile-local log-gate sums to
//! a workspace the launcher allocates (stream-ordered), `attention` computes
//! y flash-style (one block per batch, head, query tile of 64 steps and 64
//! value columns), `attention_state` computes h_final. The CPU mirror is
//! [`crate::cpu::attention`]; the kernel file documents the anchoring.

use std::ffi::c_void;

use cudarc::driver::{CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopAttentionParams, GateloopDims};
use super::recurrent::{DeviceInputs, DeviceOutputs, check_align, check_context, check_len, i64_of, seq_strides, state_strides};
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, GateLayout, Outputs, Problem};

/// Largest key dimension the attention kernels support.
pub const MAX_KEY_DIM: usize = abi::GATELOOP_ATTENTION_MAX_KEY_DIM as usize;
const TILE: usize = abi::GATELOOP_ATTENTION_TILE as usize;
const VALUE_TILE: usize = abi::GATELOOP_ATTENTION_VALUE_TILE as usize;
const THREADS: u32 = abi::GATELOOP_ATTENTION_THREADS;
const PREP_THREADS: u32 = abi::GATELOOP_ATTENTION_PREP_THREADS;
const STATE_KEY_TILE: usize = abi::GATELOOP_ATTENTION_STATE_KEY_TILE as usize;
const STATE_VALUE_TILE: usize = abi::GATELOOP_ATTENTION_STATE_VALUE_TILE as usize;

// SAFETY: GateloopAttentionParams is the bindgen mirror (#[repr(C)]) of the C
// struct the attention kernels take by value; its layout is pinned on both
// sides (the header's static_assert, bindgen's layout checks, tests/abi.rs).
// It holds only integers and raw device addresses, so its bytes are a valid
// kernel argument for any value; the pointers are only dereferenced by the
// kernels, whose launcher (`forward_into`) guarantees they are valid.
unsafe impl DeviceRepr for GateloopAttentionParams {}

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
    /// Elements (per tensor) of the workspace: B·H·L·gate_dim.
    pub workspace_len: usize,
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
    Ok(LaunchPlan {
        num_tiles: tiles as u32,
        value_tiles: value_tiles as u32,
        state_key_tiles: skt as u32,
        state_value_tiles: svt as u32,
        prep_grid,
        grid: y_grid,
        state_grid,
        workspace_len: dims.batch * dims.heads * dims.len * dims.gate_dim(),
    })
}

/// Runs the attention kernels on `stream` over device buffers, writing `out`.
/// Asynchronous: it allocates the workspace on `stream`, enqueues three
/// kernels and never synchronizes (the workspace is freed stream-ordered).
///
/// Checks on the host: dims (K ≤ 256), every buffer's length (the error names
/// the argument), context, alignment of complex buffers. It does not read
/// the data, so the gate's domain (Re ≤ 0) is the caller's responsibility.
pub fn forward_into(
    gpu: &Gpu,
    stream: &std::sync::Arc<CudaStream>,
    dims: &Dims,
    inputs: DeviceInputs<'_>,
    out: DeviceOutputs<'_>,
) -> Result<(), GpuError> {
    let d = dims;
    let lp = plan(d)?;
    check_len("q", d.qk_shape(), false, inputs.q.len())?;
    check_len("k", d.qk_shape(), false, inputs.k.len())?;
    check_len("v", d.v_shape(), false, inputs.v.len())?;
    check_len("log_gate", d.gate_shape(), true, inputs.log_gate.len())?;
    if let Some(h0) = inputs.h0 {
        check_len("h0", d.state_shape(), true, h0.len())?;
    }
    check_len("y", d.v_shape(), false, out.y.len())?;
    check_len("h_final", d.state_shape(), true, out.h_final.len())?;
    if stream.context() != gpu.context() {
        return Err(InputError::Param {
            name: "stream",
            value: format!("a stream on device {}", stream.context().ordinal()),
            why: "the stream must belong to the Gpu's CUDA context",
        }
        .into());
    }
    check_context(gpu, "q", inputs.q)?;
    check_context(gpu, "k", inputs.k)?;
    check_context(gpu, "v", inputs.v)?;
    check_context(gpu, "log_gate", inputs.log_gate)?;
    if let Some(h0) = inputs.h0 {
        check_context(gpu, "h0", h0)?;
    }
    check_context(gpu, "y", &*out.y)?;
    check_context(gpu, "h_final", &*out.h_final)?;

    // SAFETY: the workspace is fully written by the prep kernel (every
    // (b, h, t, c) of its [B, H, L, gate_dim] extent) before the other two
    // kernels, ordered after it on `stream`, read it; nothing reads it uninitialized.
    let mut ws_prefix = unsafe { stream.alloc::<f32>(2 * lp.workspace_len) }.doing("allocating the workspace")?;
    // SAFETY: as above.
    let mut ws_suffix = unsafe { stream.alloc::<f32>(2 * lp.workspace_len) }.doing("allocating the workspace")?;
    // SAFETY: as above.
    let mut ws_reset = unsafe { stream.alloc::<i32>(lp.workspace_len) }.doing("allocating the workspace")?;

    let mut params = GateloopAttentionParams {
        dims: GateloopDims {
            batch: i64_of("batch", d.batch)?,
            len: i64_of("len", d.len)?,
            heads: i64_of("heads", d.heads)?,
            key_dim: i64_of("key_dim", d.key_dim)?,
            value_dim: i64_of("value_dim", d.value_dim)?,
            gate_dim: i64_of("gate_dim", d.gate_dim())?,
        },
        q_strides: seq_strides(d, d.key_dim)?,
        k_strides: seq_strides(d, d.key_dim)?,
        v_strides: seq_strides(d, d.value_dim)?,
        gate_strides: seq_strides(d, d.gate_dim())?,
        y_strides: seq_strides(d, d.value_dim)?,
        h0_strides: state_strides(d)?,
        h_final_strides: state_strides(d)?,
        flags: if d.gate == GateLayout::PerHead { abi::GATELOOP_FLAG_PER_HEAD_GATE } else { 0 },
        dtype: abi::GATELOOP_DTYPE_F32,
        num_tiles: lp.num_tiles as i64,
        value_tiles: lp.value_tiles as i64,
        state_key_tiles: lp.state_key_tiles as i64,
        state_value_tiles: lp.state_value_tiles as i64,
        ..Default::default()
    };

    // The guards make `stream` wait for earlier writes of the buffers now,
    // and record this call's reads/writes when they drop after the launches.
    let (q, _q_guard) = inputs.q.device_ptr(stream);
    let (k, _k_guard) = inputs.k.device_ptr(stream);
    let (v, _v_guard) = inputs.v.device_ptr(stream);
    let (log_gate, _gate_guard) = inputs.log_gate.device_ptr(stream);
    let h0 = inputs.h0.map(|h0| h0.device_ptr(stream));
    let (y, _y_guard) = out.y.device_ptr_mut(stream);
    let (h_final, _h_final_guard) = out.h_final.device_ptr_mut(stream);
    let (wp, _wp_guard) = ws_prefix.device_ptr_mut(stream);
    let (wsuf, _ws_guard) = ws_suffix.device_ptr_mut(stream);
    let (wr, _wr_guard) = ws_reset.device_ptr_mut(stream);
    check_align("log_gate", log_gate)?;
    check_align("h_final", h_final)?;
    if let Some((h0, _)) = &h0 {
        check_align("h0", *h0)?;
        params.h0 = *h0 as usize as *const f32;
        params.flags |= abi::GATELOOP_FLAG_HAS_H0;
    }
    params.q = q as usize as *const c_void;
    params.k = k as usize as *const c_void;
    params.v = v as usize as *const c_void;
    params.log_gate = log_gate as usize as *const c_void;
    params.y = y as usize as *mut c_void;
    params.h_final = h_final as usize as *mut f32;
    params.ws_prefix = wp as usize as *mut f32;
    params.ws_suffix = wsuf as usize as *mut f32;
    params.ws_reset = wr as usize as *mut i32;

    let kernels = &gpu.kernels;
    let launches = [
        (&kernels.attention_prep_f32, lp.prep_grid, PREP_THREADS, "launching gateloop_attention_prep_f32"),
        (&kernels.attention_f32, lp.grid, THREADS, "launching gateloop_attention_f32"),
        (&kernels.attention_state_f32, lp.state_grid, THREADS, "launching gateloop_attention_state_f32"),
    ];
    for (func, grid, threads, doing) in launches {
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(func);
        launch.arg(&params);
        // SAFETY: `func` is one of gateloop_attention{_prep,,_state}_f32, whose
        // only parameter is a GateloopAttentionParams by value, which is what
        // is pushed. Every pointer in it comes from a live buffer of this
        // context whose length was checked above against the dims in `params`
        // (the kernels touch exactly those extents with the contiguous strides
        // set above; the workspace holds B·H·L·gate_dim elements each, complex
        // ones as f32 pairs), complex buffers are 8-byte aligned (cudarc
        // allocations are 256-byte aligned), h0 is null iff HAS_H0 is clear,
        // and the geometry (blocks of 128 or 256 threads, the
        // __launch_bounds__; static shared memory only, < 48 KiB; grids ≤
        // 2^31 − 1) is the one `plan` computed for these dims. The buffers
        // outlive the launches: borrows are held until this function returns,
        // and cudarc's drop of a CudaSlice (the workspace here) waits on the
        // events the guards record.
        unsafe { launch.launch(cfg) }.doing(doing)?;
    }
    Ok(())
}

fn complex_as_f32(z: &[Complex<f32>]) -> &[f32] {
    // SAFETY: Complex<f32> is #[repr(C)] { re: f32, im: f32 }: size 8, align 4,
    // no padding, so n of them are exactly 2n contiguous initialized f32.
    unsafe { std::slice::from_raw_parts(z.as_ptr().cast::<f32>(), z.len() * 2) }
}

/// Uploads `p`, runs the attention kernels on the Gpu's default stream,
/// downloads the outputs; synchronizes. Checks the gate domain on the host.
pub fn forward_host(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    let s = gpu.stream();
    let q = s.clone_htod(p.q).doing("uploading q")?;
    let k = s.clone_htod(p.k).doing("uploading k")?;
    let v = s.clone_htod(p.v).doing("uploading v")?;
    let log_gate = s.clone_htod(complex_as_f32(p.log_gate)).doing("uploading log_gate")?;
    let h0 = p.h0.map(|h| s.clone_htod(complex_as_f32(h))).transpose().doing("uploading h0")?;
    let mut y = s.alloc_zeros::<f32>(d.v_len()).doing("allocating y")?;
    let mut h_final = s.alloc_zeros::<f32>(2 * d.state_len()).doing("allocating h_final")?;
    forward_into(
        gpu,
        s,
        &d,
        DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: h0.as_ref().map(|h| h as _) },
        DeviceOutputs { y: &mut y, h_final: &mut h_final },
    )?;
    let y = s.clone_dtoh(&y).doing("downloading y")?;
    let h_final = s.clone_dtoh(&h_final).doing("downloading h_final")?;
    s.synchronize().doing("synchronizing after the attention kernels")?;
    let h_final = h_final.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect();
    Ok(Outputs { y, h_final })
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
        assert_eq!(p.workspace_len, 2 * 3 * 65 * 5);
        let p = plan(&dims(1, 65536, 256, 64, 64, true)).unwrap();
        assert_eq!((p.num_tiles, p.grid, p.workspace_len), (1024, 256 * 1024, 256 * 65536));
        assert!(matches!(plan(&dims(1, 1, 1, 257, 1, false)), Err(InputError::Param { name: "key_dim", .. })));
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false)), Err(InputError::ZeroDim { name: "len" })));
        assert!(matches!(plan(&dims(1 << 16, 1 << 16, 1 << 6, 1, 1, false)), Err(InputError::TooLarge { .. })));
    }
}
