//! The recurrent mode on the GPU (`cuda/recurrent.cu`).
//!
//! One thread block per (batch, head, tile of 32 value columns); the complex
//! K×V state lives in registers, R rows per thread, spread over `key_groups`
//! warps. See the kernel file for the mapping and [`plan`] for how the launch
//! geometry is chosen.
//!
//! q, k, v and y are f32, f16 or bf16 (the [`Element`] type parameter of the
//! launchers); log_gate and the state are complex f32 for every type.
//! [`forward_into`] runs a sequence; [`decode_into`] advances a state buffer
//! in place (decoding, any number of steps per call).

use std::ffi::c_void;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopDims, GateloopRecurrentParams, GateloopSeqStrides, GateloopStateStrides};
use super::element::{Element, round_slice, widen_slice};
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, GateLayout, Outputs, Problem};

/// The rows-per-thread variants compiled into the kernel (`_r{R}` entry points).
pub const ROWS_PER_THREAD: [u32; 5] = [1, 2, 4, 8, 16];
/// Largest key dimension the recurrent kernel supports.
pub const MAX_KEY_DIM: usize = (abi::GATELOOP_RECURRENT_MAX_ROWS * abi::GATELOOP_RECURRENT_MAX_KEY_GROUPS) as usize;
const VALUE_TILE: usize = abi::GATELOOP_RECURRENT_VALUE_TILE as usize;
/// Dynamic shared memory per block stays within the 48 KiB every device
/// grants without an opt-in.
const SHARED_BUDGET: usize = 48 * 1024;
/// Most time steps staged at once.
const MAX_CHUNK: usize = 64;

// SAFETY: GateloopRecurrentParams is the bindgen mirror (#[repr(C)]) of the C
// struct the kernels take by value; its layout is pinned on both sides (the
// header's static_assert, bindgen's layout checks, tests/abi.rs). It holds
// only integers and raw device addresses, so its bytes are a valid kernel
// argument for any value; the pointers are only dereferenced by the kernel,
// whose launcher (`forward_into`) guarantees they are valid.
unsafe impl DeviceRepr for GateloopRecurrentParams {}

/// The launch geometry of one recurrent call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// R: state rows per thread (the `_r{R}` entry point).
    pub rows_per_thread: u32,
    /// Warps per block; each owns every key_groups-th row.
    pub key_groups: u32,
    /// rows_per_thread · key_groups ≥ K (rows beyond K are zero padding).
    pub padded_key_dim: u32,
    /// Time steps staged in shared memory at once.
    pub chunk_len: u32,
    /// ceil(V / 32).
    pub value_tiles: u32,
    /// B · H · value_tiles blocks.
    pub grid: u32,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
}

impl LaunchPlan {
    fn variant_index(&self) -> usize {
        self.rows_per_thread.trailing_zeros() as usize
    }
}

/// Chooses the launch geometry for `dims`.
///
/// R aims at 8 rows per thread (fewer when K < 8) with as many warps as that
/// needs, up to 16; above K = 128 R grows to 16. `chunk_len` is the most time
/// steps whose staging fits in 48 KiB of shared memory (≤ 64, ≤ L).
pub fn plan(dims: &Dims) -> Result<LaunchPlan, InputError> {
    dims.validate()?;
    let k = dims.key_dim;
    if k > MAX_KEY_DIM {
        return Err(InputError::Param {
            name: "key_dim",
            value: k.to_string(),
            why: "the recurrent GPU kernel keeps the state in registers and supports key_dim <= 256",
        });
    }
    let max_groups = abi::GATELOOP_RECURRENT_MAX_KEY_GROUPS as usize;
    let rows = k.div_ceil(max_groups).next_power_of_two().max(k.next_power_of_two().min(8));
    let groups = k.div_ceil(rows);
    debug_assert!(ROWS_PER_THREAD.contains(&(rows as u32)) && groups <= max_groups);
    let padded = rows * groups;
    let per_step = 16 * padded + 4 * VALUE_TILE * (1 + groups);
    let chunk = (SHARED_BUDGET / per_step).clamp(1, MAX_CHUNK).min(dims.len);
    let tiles = dims.value_dim.div_ceil(VALUE_TILE);
    let too_large = || InputError::TooLarge {
        name: "grid",
        shape: format!("[B·H·ceil(V/32)] = [{}·{}·{tiles}]", dims.batch, dims.heads),
        limit: "2^31 - 1 thread blocks".into(),
    };
    let grid = dims.batch.checked_mul(dims.heads).and_then(|x| x.checked_mul(tiles)).ok_or_else(too_large)?;
    Ok(LaunchPlan {
        rows_per_thread: rows as u32,
        key_groups: groups as u32,
        padded_key_dim: padded as u32,
        chunk_len: chunk as u32,
        value_tiles: u32::try_from(tiles).map_err(|_| too_large())?,
        grid: u32::try_from(grid).ok().filter(|&g| g <= i32::MAX as u32).ok_or_else(too_large)?,
        shared_bytes: (chunk * per_step) as u32,
    })
}

/// Device inputs of one call. q, k, v are `T` (f32, f16 or bf16); the complex
/// tensors (`log_gate`, `h0`) are complex f32 for every `T`, as interleaved
/// (re, im) f32 pairs: twice as many f32 as complex elements, 8-byte aligned.
/// All must belong to the [`Gpu`]'s context.
pub struct DeviceInputs<'a, T = f32> {
    /// `[B, L, H, K]`
    pub q: &'a dyn DevicePtr<T>,
    /// `[B, L, H, K]`
    pub k: &'a dyn DevicePtr<T>,
    /// `[B, L, H, V]`
    pub v: &'a dyn DevicePtr<T>,
    /// `[B, L, H, K]` or `[B, L, H, 1]` complex f32
    pub log_gate: &'a dyn DevicePtr<f32>,
    /// `[B, H, K, V]` complex f32, or none (zero initial state)
    pub h0: Option<&'a dyn DevicePtr<f32>>,
}

/// Caller-owned device outputs (every element is overwritten).
pub struct DeviceOutputs<'a, T = f32> {
    /// `[B, L, H, V]`, `T`
    pub y: &'a mut dyn DevicePtrMut<T>,
    /// `[B, H, K, V]` complex f32
    pub h_final: &'a mut dyn DevicePtrMut<f32>,
}

/// Device inputs of one decode call: `T` steps of a `[B, T, H, *]` problem
/// (the `len` of the dims given to [`decode_into`]). Same types as
/// [`DeviceInputs`]; the initial state is the state buffer itself.
pub struct DecodeInputs<'a, T = f32> {
    /// `[B, T, H, K]`
    pub q: &'a dyn DevicePtr<T>,
    /// `[B, T, H, K]`
    pub k: &'a dyn DevicePtr<T>,
    /// `[B, T, H, V]`
    pub v: &'a dyn DevicePtr<T>,
    /// `[B, T, H, K]` or `[B, T, H, 1]` complex f32
    pub log_gate: &'a dyn DevicePtr<f32>,
}

pub(crate) fn check_len(name: &'static str, shape: [usize; 4], complex: bool, actual: usize) -> Result<(), InputError> {
    let expected = shape.iter().product::<usize>() * if complex { 2 } else { 1 };
    if actual != expected {
        let shape = if complex { format!("{shape:?} complex, as f32 pairs") } else { format!("{shape:?}") };
        return Err(InputError::Length { name, expected, actual, shape });
    }
    Ok(())
}

pub(crate) fn check_context<T>(gpu: &Gpu, name: &'static str, buf: &dyn DeviceSlice<T>) -> Result<(), InputError> {
    if buf.stream().context() != gpu.context() {
        return Err(InputError::Param {
            name,
            value: format!("a buffer on device {}", buf.stream().context().ordinal()),
            why: "every buffer must belong to the Gpu's CUDA context",
        });
    }
    Ok(())
}

pub(crate) fn check_align(name: &'static str, ptr: u64) -> Result<(), InputError> {
    if !ptr.is_multiple_of(8) {
        return Err(InputError::Param {
            name,
            value: format!("device address {ptr:#x}"),
            why: "complex buffers must be 8-byte aligned (start at an even f32 index)",
        });
    }
    Ok(())
}

pub(crate) fn i64_of(name: &'static str, x: usize) -> Result<i64, InputError> {
    i64::try_from(x).map_err(|_| InputError::TooLarge { name, shape: x.to_string(), limit: "i64::MAX".into() })
}

/// Contiguous strides of a `[B, L, H, dim]` tensor.
pub(crate) fn seq_strides(d: &Dims, dim: usize) -> Result<GateloopSeqStrides, InputError> {
    let head = i64_of("stride", dim)?;
    let time = i64_of("stride", d.heads * dim)?;
    let batch = i64_of("stride", d.len * d.heads * dim)?;
    Ok(GateloopSeqStrides { batch, time, head })
}

/// Contiguous strides of a `[B, H, K, V]` state.
pub(crate) fn state_strides(d: &Dims) -> Result<GateloopStateStrides, InputError> {
    Ok(GateloopStateStrides {
        batch: i64_of("stride", d.heads * d.key_dim * d.value_dim)?,
        head: i64_of("stride", d.key_dim * d.value_dim)?,
        key: i64_of("stride", d.value_dim)?,
    })
}

/// Where the kernel's initial state comes from and its final state goes.
enum StateIo<'a> {
    /// Forward: an optional `h0` read, a distinct `h_final` written.
    Separate { h0: Option<&'a dyn DevicePtr<f32>>, h_final: &'a mut dyn DevicePtrMut<f32> },
    /// Decode: one buffer, read then overwritten (`GATELOOP_FLAG_STATE_IN_PLACE`).
    InPlace(&'a mut dyn DevicePtrMut<f32>),
}

/// The sequence inputs of one launch.
struct SeqInputs<'a, T> {
    q: &'a dyn DevicePtr<T>,
    k: &'a dyn DevicePtr<T>,
    v: &'a dyn DevicePtr<T>,
    log_gate: &'a dyn DevicePtr<f32>,
}

/// Checks every argument on the host and enqueues one kernel on `stream`.
fn launch<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    d: &Dims,
    inputs: SeqInputs<'_, T>,
    y: &mut dyn DevicePtrMut<T>,
    state: StateIo<'_>,
) -> Result<(), GpuError> {
    let lp = plan(d)?;
    check_len("q", d.qk_shape(), false, inputs.q.len())?;
    check_len("k", d.qk_shape(), false, inputs.k.len())?;
    check_len("v", d.v_shape(), false, inputs.v.len())?;
    check_len("log_gate", d.gate_shape(), true, inputs.log_gate.len())?;
    check_len("y", d.v_shape(), false, y.len())?;
    match &state {
        StateIo::Separate { h0, h_final } => {
            if let Some(h0) = h0 {
                check_len("h0", d.state_shape(), true, h0.len())?;
            }
            check_len("h_final", d.state_shape(), true, h_final.len())?;
        }
        StateIo::InPlace(s) => check_len("state", d.state_shape(), true, s.len())?,
    }
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
    check_context(gpu, "y", &*y)?;
    match &state {
        StateIo::Separate { h0, h_final } => {
            if let Some(h0) = h0 {
                check_context(gpu, "h0", *h0)?;
            }
            check_context(gpu, "h_final", &**h_final)?;
        }
        StateIo::InPlace(s) => check_context(gpu, "state", &**s)?,
    }

    let mut params = GateloopRecurrentParams {
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
        dtype: T::DTYPE.abi(),
        key_groups: lp.key_groups as i32,
        padded_key_dim: lp.padded_key_dim as i32,
        chunk_len: lp.chunk_len as i32,
        value_tiles: lp.value_tiles as i32,
        ..Default::default()
    };

    // The guards make `stream` wait for earlier writes of the buffers now,
    // and record this launch's reads/writes when they drop after the launch.
    let (q, _q_guard) = inputs.q.device_ptr(stream);
    let (k, _k_guard) = inputs.k.device_ptr(stream);
    let (v, _v_guard) = inputs.v.device_ptr(stream);
    let (log_gate, _gate_guard) = inputs.log_gate.device_ptr(stream);
    let (y, _y_guard) = y.device_ptr_mut(stream);
    check_align("log_gate", log_gate)?;
    // Each state buffer is borrowed exactly once: in place, the one `&mut`
    // gives the one device pointer that the kernel both reads and writes
    // (h0 stays NULL); no `&` and `&mut` of the same buffer coexist.
    let (_h0_guard, _state_guard) = match state {
        StateIo::Separate { h0, h_final } => {
            let h0 = h0.map(|h0| h0.device_ptr(stream));
            let (h_final, h_final_guard) = h_final.device_ptr_mut(stream);
            check_align("h_final", h_final)?;
            params.h_final = h_final as usize as *mut f32;
            let h0_guard = match h0 {
                Some((h0, guard)) => {
                    check_align("h0", h0)?;
                    params.h0 = h0 as usize as *const f32;
                    params.flags |= abi::GATELOOP_FLAG_HAS_H0;
                    Some(guard)
                }
                None => None,
            };
            (h0_guard, h_final_guard)
        }
        StateIo::InPlace(s) => {
            let (s, guard) = s.device_ptr_mut(stream);
            check_align("state", s)?;
            params.h_final = s as usize as *mut f32;
            params.flags |= abi::GATELOOP_FLAG_STATE_IN_PLACE;
            (None, guard)
        }
    };
    params.q = q as usize as *const c_void;
    params.k = k as usize as *const c_void;
    params.v = v as usize as *const c_void;
    params.log_gate = log_gate as usize as *const f32;
    params.y = y as usize as *mut c_void;

    let cfg = LaunchConfig {
        grid_dim: (lp.grid, 1, 1),
        block_dim: (VALUE_TILE as u32, lp.key_groups, 1),
        shared_mem_bytes: lp.shared_bytes,
    };
    let func = &gpu.kernels.recurrent[T::DTYPE.index()][lp.variant_index()];
    let mut launch = stream.launch_builder(func);
    launch.arg(&params);
    // SAFETY: `func` is gateloop_recurrent_{T}_r{R} with R = lp.rows_per_thread
    // and {T} the element type of q, k, v, y (T::DTYPE picks the table row),
    // whose only parameter is a GateloopRecurrentParams by value, which is
    // what is pushed. Every pointer in it comes from a live buffer of this
    // context whose length was checked above against the dims in `params`
    // (the kernel reads/writes exactly those extents with the contiguous
    // strides set above, in elements of T for q, k, v, y and of complex f32
    // for log_gate and the state); complex buffers are 8-byte aligned; h0 is
    // null iff HAS_H0 is clear, and with STATE_IN_PLACE h0 is null and
    // h_final is the single state buffer, which the kernel reads and then
    // writes element by element from the same thread (see cuda/recurrent.cu),
    // so the in-place update is race free. The geometry (block = 32 ×
    // key_groups ≤ 512 threads, the __launch_bounds__; shared memory ≤ 48 KiB;
    // grid ≤ 2^31 − 1) is the one `plan` computed for these dims. The buffers
    // outlive the launch: their borrows are held until this function returns,
    // and cudarc's drop of a CudaSlice waits on the events the guards record.
    unsafe { launch.launch(cfg) }.doing("launching gateloop_recurrent")?;
    Ok(())
}

/// Runs the recurrent kernel on `stream` over device buffers, writing `out`.
/// `T` is the element type of q, k, v and y (f32, f16, bf16); log_gate and the
/// state are complex f32 and the kernel computes in f32 (y is rounded to `T`
/// once, at the end). Asynchronous: it enqueues one kernel and never
/// synchronizes (cudarc's event tracking orders it after earlier writes of
/// the inputs, and later uses of the outputs after it).
///
/// Checks on the host: dims, every buffer's length (the error names the
/// argument), context, alignment of complex buffers. It does not read the
/// data, so the gate's domain (Re ≤ 0, see [`Problem::check_gate`]) is the
/// caller's responsibility; NaN/Inf propagate.
pub fn forward_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    let DeviceInputs { q, k, v, log_gate, h0 } = inputs;
    let state = StateIo::Separate { h0, h_final: out.h_final };
    launch(gpu, stream, dims, SeqInputs { q, k, v, log_gate }, out.y, state)
}

/// Decoding: advances `state` (`[B, H, K, V]` complex f32, as interleaved f32
/// pairs) IN PLACE by the `dims.len` ≥ 1 steps of `inputs`, and writes their
/// readouts to `y` (`[B, dims.len, H, V]`, `T`). Chained calls equal one
/// [`forward_into`] over the concatenated steps with `h0` = the initial
/// state: the kernel, its per-step arithmetic and its reduction order are the
/// same, so in exact terms (and, on one device, bit for bit) a long sequence
/// may be fed in pieces of any lengths.
///
/// Same checks and asynchrony as [`forward_into`]; a wrongly sized state is
/// reported as `state`. The one `&mut` borrow of `state` is the only handle
/// the kernel gets: it reads each element once, before the same thread
/// overwrites it (`GATELOOP_FLAG_STATE_IN_PLACE`).
pub fn decode_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DecodeInputs<'_, T>,
    y: &mut dyn DevicePtrMut<T>,
    state: &mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    let DecodeInputs { q, k, v, log_gate } = inputs;
    launch(gpu, stream, dims, SeqInputs { q, k, v, log_gate }, y, StateIo::InPlace(state))
}

fn complex_as_f32(z: &[Complex<f32>]) -> &[f32] {
    // SAFETY: Complex<f32> is #[repr(C)] { re: f32, im: f32 }: size 8, align 4,
    // no padding, so n of them are exactly 2n contiguous initialized f32.
    unsafe { std::slice::from_raw_parts(z.as_ptr().cast::<f32>(), z.len() * 2) }
}

/// Uploads `p`, runs the recurrent kernel on the Gpu's default stream,
/// downloads the outputs; synchronizes. Checks the gate domain on the host.
pub fn forward_host(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    forward_host_as::<f32>(gpu, p)
}

/// [`forward_host`] with q, k, v rounded to `T` on the host before the upload
/// (log_gate and h0 stay f32) and the kernel's `T` output `y` widened back to
/// f32 (exactly).
pub fn forward_host_as<T: Element>(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    p.validate()?;
    p.check_gate()?;
    let d = p.dims;
    let s = gpu.stream();
    let q = s.clone_htod(&round_slice::<T>(p.q)).doing("uploading q")?;
    let k = s.clone_htod(&round_slice::<T>(p.k)).doing("uploading k")?;
    let v = s.clone_htod(&round_slice::<T>(p.v)).doing("uploading v")?;
    let log_gate = s.clone_htod(complex_as_f32(p.log_gate)).doing("uploading log_gate")?;
    let h0 = p.h0.map(|h| s.clone_htod(complex_as_f32(h))).transpose().doing("uploading h0")?;
    let mut y = s.alloc_zeros::<T>(d.v_len()).doing("allocating y")?;
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
    s.synchronize().doing("synchronizing after the recurrent kernel")?;
    let h_final = h_final.chunks_exact(2).map(|c| Complex::new(c[0], c[1])).collect();
    Ok(Outputs { y: widen_slice(&y), h_final })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn plan_covers_every_key_dim() {
        for k in 1..=MAX_KEY_DIM {
            for (l, v) in [(1, 1), (1000, 128), (3, 33)] {
                let p = plan(&dims(2, l, 3, k, v, false)).unwrap();
                assert!(ROWS_PER_THREAD.contains(&p.rows_per_thread), "k={k}: {p:?}");
                assert!(p.key_groups >= 1 && p.key_groups <= 16, "k={k}: {p:?}");
                assert_eq!(p.padded_key_dim, p.rows_per_thread * p.key_groups);
                assert!(p.padded_key_dim as usize >= k);
                // no warp without a real row
                assert!(((p.key_groups - 1) as usize) < k, "k={k}: {p:?}");
                assert!(p.chunk_len >= 1 && p.chunk_len as usize <= l.min(MAX_CHUNK));
                assert!(p.shared_bytes as usize <= SHARED_BUDGET);
                let per_step = 16 * p.padded_key_dim + 4 * 32 * (1 + p.key_groups);
                assert_eq!(p.shared_bytes, p.chunk_len * per_step);
                assert_eq!(p.value_tiles as usize, v.div_ceil(32));
                assert_eq!(p.grid, 6 * p.value_tiles);
            }
        }
    }

    #[test]
    fn plan_examples() {
        let p = plan(&dims(1, 100, 1, 64, 64, false)).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups), (8, 8));
        let p = plan(&dims(1, 100, 1, 128, 64, false)).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups), (8, 16));
        let p = plan(&dims(1, 100, 1, 5, 64, true)).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.padded_key_dim), (8, 1, 8));
        let p = plan(&dims(1, 100, 1, 1, 1, true)).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups), (1, 1));
        let p = plan(&dims(1, 100, 1, 256, 1, true)).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups), (16, 16));
    }

    #[test]
    fn plan_rejects() {
        assert!(matches!(plan(&dims(1, 1, 1, 257, 1, false)), Err(InputError::Param { name: "key_dim", .. })));
        assert!(matches!(plan(&dims(1, 0, 1, 1, 1, false)), Err(InputError::ZeroDim { name: "len" })));
        assert!(matches!(
            plan(&dims(1 << 20, 1, 1 << 12, 1, 1, false)),
            Err(InputError::TooLarge { name: "grid", .. })
        ));
    }

    #[test]
    fn length_errors_name_the_argument() {
        let d = dims(2, 3, 1, 4, 5, true);
        assert!(check_len("log_gate", d.gate_shape(), true, 12).is_ok());
        match check_len("log_gate", d.gate_shape(), true, 6) {
            Err(InputError::Length { name: "log_gate", expected: 12, actual: 6, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
