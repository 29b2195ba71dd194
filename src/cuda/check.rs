//! Opt-in device-side value checks of GPU buffers (`cuda/check.cu`).
//!
//! The `_into` launchers check lengths, contexts and alignment on the host
//! but never read the data, so a log gate outside the domain (Re > 0, NaN,
//! an infinite phase) propagates into the outputs. [`log_gate`] scans a
//! device log_gate buffer on the GPU and reports the first offending element
//! exactly as [`Problem::check_gate`](crate::Problem::check_gate) does on the
//! host (same [`InputError::Value`], same index and message: both use
//! [`log_gate_error`]).
//!
//! Unlike every launcher, [`log_gate`] SYNCHRONIZES its stream (it needs the
//! answer on the host). That is why it is opt-in: call it where a bad gate
//! must become an error rather than NaN outputs, e.g. on untrusted inputs
//! before a launch on the same stream.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopCheckParams};
use super::launch::{check_align, check_context, check_len, i64_of};
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, log_gate_error};

const THREADS: u32 = abi::GATELOOP_CHECK_THREADS;
const MAX_BLOCKS: u32 = abi::GATELOOP_CHECK_MAX_BLOCKS;
const RESULT_WORDS: usize = abi::GATELOOP_CHECK_RESULT_WORDS as usize;

// SAFETY: the bindgen mirror (#[repr(C)]) of the C struct the kernel takes by
// value; its layout is pinned on both sides (the header's static_assert,
// bindgen's layout checks, tests/abi.rs). It holds a pointer, a pointer and
// an i64, no padding, so its bytes are a valid kernel argument for any value;
// the pointers are only dereferenced by the kernel, whose launcher
// guarantees they are valid (see `log_gate`).
unsafe impl DeviceRepr for GateloopCheckParams {}

/// The grid [`log_gate`] launches for `n` complex elements: one thread per
/// element up to [`abi::GATELOOP_CHECK_MAX_BLOCKS`] blocks of
/// [`abi::GATELOOP_CHECK_THREADS`], then a grid-stride loop (the result does
/// not depend on the grid). Public for the kernel's CPU emulation test.
pub fn grid(n: usize) -> u32 {
    u32::try_from(n.div_ceil(THREADS as usize)).unwrap_or(MAX_BLOCKS).clamp(1, MAX_BLOCKS)
}

/// Checks the gate domain of a device log_gate buffer (`dims.gate_shape()`
/// complex f32 as interleaved f32 pairs, 8-byte aligned, on the Gpu's
/// context): Re(log_gate) ≤ 0 (−∞ allowed: a reset), no NaN, Im finite.
///
/// Returns the error [`Problem::check_gate`](crate::Problem::check_gate)
/// would give for the same values: `InputError::Value { name: "log_gate",
/// index, value, why }` for the FIRST offending element, `index` counting
/// complex elements of the flat `[B, L, H, gate_dim]` tensor. The answer is
/// deterministic (the kernel uses integer atomics only).
///
/// Enqueues one kernel on `stream` (ordered after earlier writes of
/// `log_gate` by cudarc's event tracking), copies back 16 bytes and
/// SYNCHRONIZES `stream`: the one function of [`crate::cuda`] that blocks the
/// host. It allocates a 24-byte result buffer on `stream` per call (hence
/// the `Arc`: a cudarc buffer keeps its stream alive). Host
/// checks first, as the launchers do: dims, the buffer's length, the
/// stream's and the buffer's context, alignment.
pub fn log_gate(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    log_gate: &dyn DevicePtr<f32>,
) -> Result<(), GpuError> {
    dims.validate()?;
    check_len("log_gate", dims.gate_shape(), true, log_gate.len())?;
    if stream.context() != gpu.context() {
        return Err(InputError::Param {
            name: "stream",
            value: format!("a stream on device {}", stream.context().ordinal()),
            why: "the stream must belong to the Gpu's CUDA context",
        }
        .into());
    }
    check_context(gpu, "log_gate", log_gate)?;
    let n = dims.gate_len();
    let n64 = i64_of("log_gate", n)?;

    // result = [first offending index (in: n), its value (out), blocks done (in: 0)].
    let mut init = [0i64; RESULT_WORDS];
    init[0] = n64;
    let mut result = stream.clone_htod(&init).doing("uploading the check's result buffer")?;
    {
        let (gate_ptr, _gate_guard) = log_gate.device_ptr(stream);
        check_align("log_gate", gate_ptr)?;
        let (result_ptr, _result_guard) = result.device_ptr_mut(stream);
        let params = GateloopCheckParams {
            log_gate: gate_ptr as usize as *const f32,
            result: result_ptr as usize as *mut i64,
            n: n64,
        };
        let cfg = LaunchConfig { grid_dim: (grid(n), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut launch = stream.launch_builder(&gpu.kernels.check_log_gate);
        launch.arg(&params);
        // SAFETY: gateloop_check_log_gate takes one GateloopCheckParams by
        // value, which is what is pushed. log_gate points to a live buffer of
        // this context holding exactly 2·n f32 (length checked above against
        // dims, n = dims.gate_len() complex elements), 8-byte aligned
        // (checked), which the kernel only reads (elements < n, as float2);
        // result points to a live buffer of RESULT_WORDS = 3 i64 of this
        // context, initialized above on this stream (so before the kernel),
        // which the kernel reads and writes with 64-bit atomics and one
        // 8-byte store (word 1). The geometry (THREADS threads, the
        // __launch_bounds__; 1..=MAX_BLOCKS blocks; static shared memory
        // only) is any the kernel accepts: it is a grid-stride loop. Both
        // buffers outlive the launch: their borrows (and the guards that
        // record this use for cudarc's event tracking) live until the end of
        // this block, after the launch, and `result` is dropped only after
        // the synchronization below.
        unsafe { launch.launch(cfg) }.doing("launching gateloop_check_log_gate")?;
    }
    let words = stream.clone_dtoh(&result.slice(0..2)).doing("downloading the check's result")?;
    stream.synchronize().doing("synchronizing after gateloop_check_log_gate")?;
    let first = words[0];
    if first == n64 {
        return Ok(());
    }
    let index = usize::try_from(first).ok().filter(|&i| i < n).ok_or(InputError::Param {
        name: "log_gate",
        value: format!("device check result {first}"),
        why: "gateloop_check_log_gate returned an index outside the buffer (a kernel bug)",
    })?;
    let bytes = words[1].to_le_bytes();
    let re = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let im = f32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let g = Complex::new(re, im);
    // The kernel's predicate is exactly log_gate_violation's; a value it
    // flags that the host classifier accepts would be a kernel bug.
    Err(log_gate_error(index, g)
        .unwrap_or_else(|| InputError::Value {
            name: "log_gate",
            index,
            value: format!("{g}"),
            why: "flagged by the device check but inside the gate's domain (a kernel bug)",
        })
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_sizes() {
        assert_eq!(grid(1), 1);
        assert_eq!(grid(256), 1);
        assert_eq!(grid(257), 2);
        assert_eq!(grid(256 * 1024), 1024);
        assert_eq!(grid(256 * 1024 + 1), 1024);
        assert_eq!(grid(usize::MAX), 1024);
    }

    #[test]
    fn the_host_classifier_is_the_kernel_predicate() {
        // log_gate_bad in cuda/check.cu: isnan(re) || isnan(im) || re > 0 || isinf(im).
        let bad = |g: Complex<f32>| g.re.is_nan() || g.im.is_nan() || g.re > 0.0 || g.im.is_infinite();
        let values =
            [0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        for re in values {
            for im in values {
                let g = Complex::new(re, im);
                assert_eq!(log_gate_error(7, g).is_some(), bad(g), "{g}");
            }
        }
    }
}
