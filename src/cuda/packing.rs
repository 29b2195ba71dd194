//! [`crate::packing`] on the device: reset gates written into a packed
//! `log_gate` that already lives on the GPU, so variable-length sequences
//! packed into one batch row run through every kernel as if each ran alone.
//!
//! One host-to-device copy of one step's gates (H · (K or 1) values) per
//! sequence start, queued on `stream` before the kernels that read them;
//! `log_gate`'s other elements are not touched.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::launch::{check_context, check_len, check_stream};
use super::{DriverContext, Gpu, GpuError};
use crate::packing::{gates_per_step, sequence_starts};
use crate::problem::Dims;

/// [`crate::packing::reset_sequence_starts`] on the device: `log_gate` is a
/// packed complex `[1, L, H, K or 1]` as interleaved f32 pairs (the complex
/// kernels' layout). Every argument is checked before anything is queued.
pub fn reset_sequence_starts(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    log_gate: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    write_resets(gpu, stream, dims, cu_seqlens, log_gate, &[f32::NEG_INFINITY, 0.0])
}

/// [`reset_sequence_starts`] for real gates: `log_gate` `[1, L, H, K or 1]`
/// real f32 (the real-gate kernels' layout).
pub fn reset_sequence_starts_real(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    log_gate: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    write_resets(gpu, stream, dims, cu_seqlens, log_gate, &[f32::NEG_INFINITY])
}

/// The body of both: `reset` is one gate as f32s (a pair, or one real).
fn write_resets(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    log_gate: &mut CudaSlice<f32>,
    reset: &[f32],
) -> Result<(), GpuError> {
    let starts = sequence_starts(dims, cu_seqlens)?;
    check_stream(gpu, stream)?;
    check_context(gpu, "log_gate", log_gate)?;
    check_len("log_gate", dims.gate_shape(), reset.len() == 2, log_gate.len())?;
    let step = gates_per_step(dims) * reset.len();
    let row: Vec<f32> = reset.iter().copied().cycle().take(step).collect();
    // The copies are queued on the caller's stream, in order with the
    // launches queued after them (cudarc also records the write on
    // `log_gate`, so work on another stream that uses it through cudarc
    // waits for it). The host row may go once each call returns: a copy from
    // pageable memory has read its source by then.
    for &s in starts {
        stream.memcpy_htod(&row, &mut log_gate.slice_mut(s * step..(s + 1) * step)).doing("writing reset gates")?;
    }
    Ok(())
}
