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
//! in place (decoding, any number of steps per call). [`forward_real_into`]
//! is the same recurrence with real gates (gated linear attention: log_gate
//! and the state real f32, half the state registers and a third of the
//! arithmetic a step): on real gates the complex kernel gives the same bits.
//! [`forward_varlen_into`] runs variable-length sequences packed into one
//! batch row (fla's `cu_seqlens`), each from its own h0 to its own h_final.
//!
//! # Example
//!
//! A prompt of 40 steps, then two decoding steps one at a time, against one
//! pass over all 42:
//!
//! ```
//! use gateloop::Dims;
//! use gateloop::cuda::recurrent::{self, DecodeInputs};
//! use gateloop::cuda::{DeviceInputs, DeviceOutputs, Gpu};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let Ok(gpu) = Gpu::new(0) else {
//! #   // The test command's emulated device runs this example with a GPU required.
//! #   if std::env::var_os("GATELOOP_REQUIRE_GPU").is_some_and(|v| v == "1") {
//! #       return Err("no GPU".into());
//! #   }
//!     return Ok(()); // no GPU here (Gpu::new says why)
//! };
//! let s = gpu.stream();
//! let (b, h, kd, vd, prompt, total) = (1, 2, 8, 4, 40, 42);
//! let all = Dims::new(b, total, h, kd, vd);
//! let wave = |n: usize, p: f32| -> Vec<f32> { (0..n).map(|i| (0.29 * i as f32 + p).sin()).collect() };
//! let (q, k, v) = (wave(all.qk_len(), 0.0), wave(all.qk_len(), 1.0), wave(all.v_len(), 2.0));
//! let gate: Vec<f32> = (0..all.gate_len()).flat_map(|i| [-0.03, (0.5 * i as f32).sin()]).collect();
//! // Steps t0..t1 of a [1, L, H, D] tensor (B = 1: contiguous).
//! let steps = |x: &[f32], d: usize, t0: usize, t1: usize| x[t0 * h * d..t1 * h * d].to_vec();
//!
//! // One pass over all 42 steps.
//! let mut y_all = s.alloc_zeros::<f32>(all.v_len())?;
//! let mut h_all = s.alloc_zeros::<f32>(2 * all.state_len())?;
//! let (dq, dk, dv, dg) = (s.clone_htod(&q)?, s.clone_htod(&k)?, s.clone_htod(&v)?, s.clone_htod(&gate)?);
//! let inputs = DeviceInputs { q: &dq, k: &dk, v: &dv, log_gate: &dg, h0: None };
//! recurrent::forward_into(&gpu, s, &all, inputs, DeviceOutputs { y: &mut y_all, h_final: &mut h_all })?;
//!
//! // The prompt, whose h_final becomes the decoding state.
//! let pd = Dims::new(b, prompt, h, kd, vd);
//! let (pq, pk, pv) = (steps(&q, kd, 0, prompt), steps(&k, kd, 0, prompt), steps(&v, vd, 0, prompt));
//! let pg = steps(&gate, 2 * kd, 0, prompt);
//! let (pq, pk, pv, pg) = (s.clone_htod(&pq)?, s.clone_htod(&pk)?, s.clone_htod(&pv)?, s.clone_htod(&pg)?);
//! let mut y = s.alloc_zeros::<f32>(pd.v_len())?;
//! let mut state = s.alloc_zeros::<f32>(2 * pd.state_len())?;
//! let inputs = DeviceInputs { q: &pq, k: &pk, v: &pv, log_gate: &pg, h0: None };
//! recurrent::forward_into(&gpu, s, &pd, inputs, DeviceOutputs { y: &mut y, h_final: &mut state })?;
//!
//! // Then one step per call, the state advanced in place.
//! let one = Dims::new(b, 1, h, kd, vd);
//! let mut y_step = s.alloc_zeros::<f32>(one.v_len())?;
//! let mut decoded = Vec::new();
//! for t in prompt..total {
//!     let (sq, sk) = (s.clone_htod(&steps(&q, kd, t, t + 1))?, s.clone_htod(&steps(&k, kd, t, t + 1))?);
//!     let (sv, sg) = (s.clone_htod(&steps(&v, vd, t, t + 1))?, s.clone_htod(&steps(&gate, 2 * kd, t, t + 1))?);
//!     let inputs = DecodeInputs { q: &sq, k: &sk, v: &sv, log_gate: &sg };
//!     recurrent::decode_into(&gpu, s, &one, inputs, &mut y_step, &mut state)?;
//!     decoded.extend(s.clone_dtoh(&y_step)?);
//! }
//!
//! // The same readouts and final state as the one pass.
//! let y_all = s.clone_dtoh(&y_all)?;
//! assert_eq!(decoded, y_all[prompt * h * vd..]);
//! assert_eq!(s.clone_dtoh(&state)?, s.clone_dtoh(&h_all)?);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopRecurrentParams};
use super::chunk::Gates;
use super::element::{Dtype, Element};
use super::launch::{self, Buffers, SeqParams, StateIo};
use super::phases::launched;
use super::{Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, Outputs, Problem};

pub use super::launch::{DeviceInputs, DeviceOutputs};

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

/// How the recurrent kernel brings each time chunk of gates, keys, queries
/// and values into shared memory. Every staging gives the same bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RecurrentStaging {
    /// Load, stage, recur, in turn: a chunk's loads (a few per thread at a
    /// time) complete before its recurrence starts. The kernel measured on an
    /// H200 on 2026-11-30 (64 registers at R = 8: four resident 256-thread
    /// blocks per SM).
    Batched,
    /// Ahead: each chunk's recurrence runs while the next chunk's loads are
    /// in flight (issued before it, held in registers, stored to shared
    /// memory after it), so the global round trip overlaps the recurrence
    /// instead of adding to it. Bitwise the same results as
    /// [`RecurrentStaging::Batched`] (same arithmetic, same order). Costs
    /// registers (up to 128 a thread: two resident 256-thread blocks per SM)
    /// and shorter chunks (at most 4 staged items a thread:
    /// chunk_len ≤ 128 / R and ≤ 4 · key_groups; R = 16: 2 items). On an
    /// H200 on 2026-12-04 (K = V = 64, both grids one round of the SMs) it
    /// took 0.68× to 0.84× of Batched's time
    /// (`benches/results/gpu-2026-12-04-nvidia-h200/verdict.md`).
    Ahead,
    /// The default: [`RecurrentStaging::Ahead`] where its grid takes no
    /// more rounds of the device's SMs than [`RecurrentStaging::Batched`]'s
    /// (the driver's occupancy calculator for each kernel at this launch's
    /// block and shared memory), else Batched. Ahead holds half the blocks
    /// an SM (its registers), so on a grid that Batched runs in one round
    /// and Ahead in two, each step's latency would be paid twice; that case
    /// is inferred from the residency, not yet timed. Decided at each launch
    /// on its device ([`plan_on`]); [`plan`] and [`plan_with`], which have
    /// no device, plan it as Batched.
    #[default]
    Auto,
}

/// How many state rows each thread of the recurrent kernel keeps, which sets
/// the warps a block has for the same state: the rows per thread the plan
/// aims at (fewer when K is smaller; more when K would need more than 16
/// warps, so both choices give R = 8 at K = 128 and R = 16 at K = 256).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RecurrentRows {
    /// Aim at 8 rows a thread (K = 64: 8 warps a block, 256 threads). The
    /// geometry measured on an H200 on 2026-11-30.
    #[default]
    Eight,
    /// Aim at 4 rows a thread (K = 64: 16 warps a block, 512 threads): twice
    /// the warps for the same state, each with half the work a step, and a
    /// chunk's staging spread over twice the threads (fewer round trips
    /// each), for shorter chunks (the partial readouts of 16 key groups take
    /// more of the 48 KiB: 15 steps at K = 64 instead of 22) and a reduction
    /// over 16 partials instead of 8. On an H200 the batched kernel measured
    /// ~0.55 µs a step whether 1 or 2 blocks shared an SM, i.e. latency-bound
    /// with issue slots to spare (16 resident warps per SM at B8 L4096 H16
    /// K = V = 64, whose 256 blocks fill the 132 SMs twice): this doubles
    /// the warps resident there (the R = 4 kernel takes 63 registers: two
    /// 512-thread blocks per SM). On an H200 on 2026-12-04 (with the
    /// batched staging, K = V = 64) it took 0.73× (bf16) and 0.85× (f32)
    /// of Eight's time at B1 L65536 H4, 0.90× (bf16) and 1.06× (f32) at B8
    /// L4096 H16: mixed, so not the default; with the ahead staging it is
    /// not yet timed (`gateloop bench` runs it as `recurrent-rows4`, with
    /// the default staging). Bitwise the same results as
    /// [`RecurrentRows::Eight`] wherever both give the same R; elsewhere
    /// another order of the sums over K, within the same bounds.
    Four,
}

impl RecurrentRows {
    /// `eight` or `four`.
    pub fn name(self) -> &'static str {
        match self {
            RecurrentRows::Eight => "eight",
            RecurrentRows::Four => "four",
        }
    }

    fn aim(self) -> usize {
        match self {
            RecurrentRows::Eight => 8,
            RecurrentRows::Four => 4,
        }
    }
}

/// The recurrent kernel's launch choices: the staging and the rows per
/// thread. Every choice computes the same function to the same bounds. A
/// bare [`RecurrentStaging`] or [`RecurrentRows`] converts into it (the
/// other field at its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RecurrentConfig {
    /// How each time chunk is staged.
    pub staging: RecurrentStaging,
    /// The rows per thread the plan aims at.
    pub rows: RecurrentRows,
}

impl From<RecurrentStaging> for RecurrentConfig {
    fn from(staging: RecurrentStaging) -> Self {
        RecurrentConfig { staging, ..RecurrentConfig::default() }
    }
}

impl From<RecurrentRows> for RecurrentConfig {
    fn from(rows: RecurrentRows) -> Self {
        RecurrentConfig { rows, ..RecurrentConfig::default() }
    }
}

impl RecurrentStaging {
    /// `batched` or `ahead`.
    pub fn name(self) -> &'static str {
        match self {
            RecurrentStaging::Batched => "batched",
            RecurrentStaging::Ahead => "ahead",
            RecurrentStaging::Auto => "auto",
        }
    }

    /// Auto's rule: Ahead when a grid of `grid` blocks takes no more rounds
    /// of `sm_count` SMs holding `ahead_per_sm` blocks each than holding
    /// `batched_per_sm` (the occupancy calculator's answers; 0 where it
    /// gave none, which keeps Batched).
    pub fn auto_choice(grid: u64, sm_count: u64, batched_per_sm: u32, ahead_per_sm: u32) -> RecurrentStaging {
        let rounds = |per_sm: u32| grid.div_ceil(u64::from(per_sm) * sm_count.max(1));
        if batched_per_sm > 0 && ahead_per_sm > 0 && rounds(ahead_per_sm) <= rounds(batched_per_sm) {
            RecurrentStaging::Ahead
        } else {
            RecurrentStaging::Batched
        }
    }

    /// Staging items a thread of the `_ahead` kernel holds for R rows per
    /// thread (the ABI's GATELOOP_RECURRENT_AHEAD_ITEMS{,_R16}).
    fn ahead_items(rows: usize) -> usize {
        (if rows < 16 { abi::GATELOOP_RECURRENT_AHEAD_ITEMS } else { abi::GATELOOP_RECURRENT_AHEAD_ITEMS_R16 }) as usize
    }
}

/// The launch geometry of one recurrent call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// R: state rows per thread (the `_r{R}` entry point).
    pub rows_per_thread: u32,
    /// Warps per block; warp g owns the R consecutive rows g·R … g·R + R − 1.
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
    /// Which kernel: `gateloop_recurrent_{dtype}_r{R}` (batched) or
    /// `gateloop_recurrent_ahead_{dtype}_r{R}`; never
    /// [`RecurrentStaging::Auto`], which the plan decides.
    pub staging: RecurrentStaging,
    /// The rows per thread the plan aimed at (`rows_per_thread` is what it
    /// gave).
    pub rows: RecurrentRows,
}

impl LaunchPlan {
    /// The kernel's index in its dtype's table: the gates (complex, then
    /// real), the staging, then log2(R); the table's names are
    /// [`kernel_names`]'s.
    fn variant_index(&self, real_gates: bool) -> usize {
        ((real_gates as usize * 2 + self.staging as usize) * ROWS_PER_THREAD.len())
            + self.rows_per_thread.trailing_zeros() as usize
    }
}

/// Entry points of one dtype, in the order of [`LaunchPlan`]'s table index:
/// `gateloop_recurrent_{,ahead_,real_,real_ahead_}{dtype}_r{1,2,4,8,16}`.
pub(crate) fn kernel_names(dtype: &str) -> Vec<String> {
    ["", "ahead_", "real_", "real_ahead_"]
        .iter()
        .flat_map(|kind| ROWS_PER_THREAD.iter().map(move |r| format!("gateloop_recurrent_{kind}{dtype}_r{r}")))
        .collect()
}

/// Chooses the launch geometry for `dims` with the default staging and rows,
/// without a device: [`RecurrentStaging::Auto`] planned as Batched
/// ([`plan_on`] decides it as a launch does).
///
/// R aims at 8 rows per thread (fewer when K < 8; [`RecurrentRows::Four`]:
/// 4, fewer when K < 4) with as many warps as that needs, up to 16; above
/// K = 16·aim R grows (K = 256: R = 16). `chunk_len` is the most time
/// steps whose staging fits in 48 KiB of shared memory (≤ 64, ≤ L), and for
/// [`RecurrentStaging::Ahead`] in the registers the kernel holds them in.
pub fn plan(dims: &Dims) -> Result<LaunchPlan, InputError> {
    plan_with(dims, RecurrentStaging::default())
}

/// [`plan`] with a choice of staging and rows per thread (a
/// [`RecurrentConfig`], or a bare [`RecurrentStaging`] or [`RecurrentRows`]).
pub fn plan_with(dims: &Dims, config: impl Into<RecurrentConfig>) -> Result<LaunchPlan, InputError> {
    let RecurrentConfig { staging, rows: aim } = config.into();
    let staging = if staging == RecurrentStaging::Auto { RecurrentStaging::Batched } else { staging };
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
    let rows = k.div_ceil(max_groups).next_power_of_two().max(k.next_power_of_two().min(aim.aim()));
    let groups = k.div_ceil(rows);
    debug_assert!(ROWS_PER_THREAD.contains(&(rows as u32)) && groups <= max_groups);
    let padded = rows * groups;
    let per_step = 16 * padded + 4 * VALUE_TILE * (1 + groups);
    let sequence_bytes = abi::GATELOOP_RECURRENT_SEQUENCE_BYTES as usize;
    let mut chunk = ((SHARED_BUDGET - sequence_bytes) / per_step).clamp(1, MAX_CHUNK).min(dims.len);
    if staging == RecurrentStaging::Ahead {
        let items = RecurrentStaging::ahead_items(rows);
        chunk = chunk.min(VALUE_TILE * items / rows).min(items * groups);
    }
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
        shared_bytes: (chunk * per_step + sequence_bytes) as u32,
        staging,
        rows: aim,
    })
}

/// The plan a launch on `gpu` takes for `dims`, `dtype` and `gates`:
/// [`plan_with`], with [`RecurrentStaging::Auto`] decided on the device
/// ([`RecurrentStaging::auto_choice`] over the SM count and each kernel's
/// residency at its block and shared memory).
pub fn plan_on(
    gpu: &Gpu,
    dims: &Dims,
    config: impl Into<RecurrentConfig>,
    dtype: Dtype,
    gates: Gates,
) -> Result<LaunchPlan, GpuError> {
    let config = config.into();
    if config.staging != RecurrentStaging::Auto {
        return Ok(plan_with(dims, config)?);
    }
    let batched = plan_with(dims, RecurrentConfig { staging: RecurrentStaging::Batched, ..config })?;
    let ahead = plan_with(dims, RecurrentConfig { staging: RecurrentStaging::Ahead, ..config })?;
    // A driver that cannot say (0) keeps Batched, the kernel measured
    // first, rather than failing the launch.
    let per_sm = |lp: &LaunchPlan| {
        gpu.recurrent_blocks_per_sm(dtype, lp.variant_index(gates == Gates::Real), 32 * lp.key_groups, lp.shared_bytes)
    };
    let sm_count = super::scan::sm_count(gpu)? as u64;
    Ok(match RecurrentStaging::auto_choice(u64::from(batched.grid), sm_count, per_sm(&batched), per_sm(&ahead)) {
        RecurrentStaging::Ahead => ahead,
        _ => batched,
    })
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
    /// `[B, T, H, K]` or `[B, T, H, 1]` complex f32 (real f32 for
    /// [`decode_real_into`])
    pub log_gate: &'a dyn DevicePtr<f32>,
}

/// Checks every argument on the host and enqueues one kernel on `stream`.
/// `cu_seqlens`: for packed sequences, the device address of the
/// `d.batch + 1` offsets, checked on the host ([`forward_varlen_into`]); the
/// buffers are then checked as packed (`Buffers::packed`).
fn launch<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    d: &Dims,
    config: RecurrentConfig,
    buffers: Buffers<'_, T>,
    cu_seqlens: Option<u64>,
) -> Result<(), GpuError> {
    let real_gates = buffers.real_gates;
    let gates = if real_gates { Gates::Real } else { Gates::Complex };
    let lp = plan_on(gpu, d, config, T::DTYPE, gates)?;
    let buffers = Buffers { packed: cu_seqlens.is_some(), ..buffers };
    buffers.check(gpu, stream, d, 0, String::new)?;
    let mut params = GateloopRecurrentParams {
        key_groups: lp.key_groups as i32,
        padded_key_dim: lp.padded_key_dim as i32,
        chunk_len: lp.chunk_len as i32,
        value_tiles: lp.value_tiles as i32,
        cu_seqlens: cu_seqlens.map_or(std::ptr::null(), |p| p as usize as *const i64),
        ..GateloopRecurrentParams::for_dims(d, T::DTYPE.abi())?
    };
    // Held until this function returns, after the launch.
    let _bound = buffers.bind(stream, &mut params, false)?;

    let cfg = LaunchConfig {
        grid_dim: (lp.grid, 1, 1),
        block_dim: (VALUE_TILE as u32, lp.key_groups, 1),
        shared_mem_bytes: lp.shared_bytes,
    };
    let func = &gpu.kernels.recurrent[T::DTYPE.index()][lp.variant_index(real_gates)];
    let mut launch = stream.launch_builder(func);
    launch.arg(&params);
    // SAFETY: `func` is gateloop_recurrent_{,real_}{,ahead_}{T}_r{R} with
    // R = lp.rows_per_thread, the staging lp.staging (whose chunk_len bounds
    // `plan_with` applied), `real_` exactly when the buffers were checked as
    // real (`buffers.real_gates`), and {T} the element type of q, k, v, y
    // (T::DTYPE picks the table row),
    // whose only parameter is a GateloopRecurrentParams by value, which is
    // what is pushed. Every pointer in it comes from a live buffer of this
    // context whose length was checked above against the dims in `params`
    // (the kernel reads/writes exactly those extents with the contiguous
    // strides set above, in elements of T for q, k, v, y and of complex f32
    // for log_gate and the state, real f32 for the real_ kernels, which
    // read f32 elements: 4-byte alignment suffices); complex buffers are
    // 8-byte aligned; h0 is
    // null iff HAS_H0 is clear; packed, cu_seqlens holds d.batch + 1
    // offsets that the caller checked to rise strictly from 0 to d.len, so
    // every sequence's steps lie inside the one batch row q, k, v, log_gate
    // and y were checked to hold; and with STATE_IN_PLACE h0 is null and
    // h_final is the single state buffer, which the kernel reads and then
    // writes element by element from the same thread (see cuda/recurrent.cu),
    // so the in-place update is race free. The geometry (block = 32 ×
    // key_groups ≤ 512 threads, the __launch_bounds__; shared memory ≤ 48 KiB;
    // grid ≤ 2^31 − 1) is the one `plan` computed for these dims. The buffers
    // outlive the launch: their borrows are held until this function returns,
    // and cudarc's drop of a CudaSlice waits on the events the guards record.
    launched(stream, func, cfg, unsafe { launch.launch(cfg) }, "launching gateloop_recurrent")?;
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
/// caller's responsibility; NaN/Inf propagate ([`super::check::log_gate`]
/// checks it on the device, opt-in, synchronizing).
pub fn forward_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    forward_into_with(gpu, stream, dims, RecurrentConfig::default(), inputs, out)
}

/// [`forward_into`] with a choice of staging and rows per thread (a
/// [`RecurrentConfig`], or a bare [`RecurrentStaging`] or [`RecurrentRows`]):
/// the same function to the same bounds (the staging: the same bits).
pub fn forward_into_with<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    config: impl Into<RecurrentConfig>,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    forward_into_gates(gpu, stream, dims, config.into(), Gates::Complex, inputs, out)
}

/// [`forward_into`] with real gates (gated linear attention: the phase ≡ 0,
/// compiled out): `inputs.log_gate` is `[B, L, H, K or 1]` real f32 (≤ 0;
/// −∞ a reset), `inputs.h0` and `out.h_final` are `[B, H, K, V]` real f32.
/// The same geometry and order of operations as the complex kernel, whose
/// imaginary parts stay 0 on such gates: the same bits as [`forward_into`]
/// on the complex gates (g, 0) and state (h0, 0), for half the state
/// registers, one fmaf a row and step instead of three, and no sincos.
/// Takes the launch choices as [`forward_into_with`] does
/// (`RecurrentConfig::default()` for the default), as
/// `chunk::forward_real_into` takes its config.
pub fn forward_real_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    config: impl Into<RecurrentConfig>,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    forward_into_gates(gpu, stream, dims, config.into(), Gates::Real, inputs, out)
}

/// [`forward_into_with`] (complex gates) or [`forward_real_into`] (real), as
/// `gates` says: the one body of both, for the callers that choose at run
/// time (the host conveniences, the bench).
pub(crate) fn forward_into_gates<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    config: RecurrentConfig,
    gates: Gates,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    let buffers = Buffers::forward(inputs, out, None);
    launch(gpu, stream, dims, config, if gates == Gates::Real { buffers.with_real_gates() } else { buffers }, None)
}

/// Packed variable-length sequences (fla's `cu_seqlens`), each with its own
/// state, in one launch: `dims` is the packed problem (`dims.batch` = 1;
/// q, k, v, log_gate and y `[1, L, H, *]`) and `cu_seqlens` its N + 1
/// offsets (sequence i is steps `cu_seqlens[i] .. cu_seqlens[i + 1]`; 0
/// first, L last, strictly increasing: [`crate::packing::sequence_starts`]);
/// `inputs.h0` (optional) and `out.h_final` are `[N, H, K, V]` complex f32:
/// sequence i starts from h0\[i\] (or 0) and ends in h_final\[i\]. So a
/// batch of prompts of different lengths is prefilled in one call, and
/// [`decode_into`] with `dims.batch` = N continues every one from its
/// state. The blocks run (sequence, head, value tile), each its sequence
/// only: y and h_final\[i\] equal [`forward_into_with`] on sequence i alone,
/// bit for bit (no reset gate needed, unlike [`crate::packing`]).
///
/// The offsets are checked on the host and uploaded on `stream` (one small
/// allocation a call); the other checks and the asynchrony are
/// [`forward_into`]'s.
pub fn forward_varlen_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    config: impl Into<RecurrentConfig>,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    varlen(gpu, stream, dims, cu_seqlens, config.into(), Gates::Complex, inputs, out)
}

/// [`forward_varlen_into`] with real gates ([`forward_real_into`]'s
/// layouts: log_gate `[1, L, H, K or 1]`, h0 and h_final `[N, H, K, V]`
/// real f32).
pub fn forward_varlen_real_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    config: impl Into<RecurrentConfig>,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    varlen(gpu, stream, dims, cu_seqlens, config.into(), Gates::Real, inputs, out)
}

/// The body of [`forward_varlen_into`] and [`forward_varlen_real_into`].
#[allow(clippy::too_many_arguments)]
fn varlen<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    config: RecurrentConfig,
    gates: Gates,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    let buffers = Buffers { real_gates: gates == Gates::Real, ..Buffers::forward(inputs, out, None) };
    // The launch's dims: one block row per sequence (`launch` checks the
    // buffers against them).
    launch::with_offsets(gpu, stream, dims, cu_seqlens, |d, ptr| launch(gpu, stream, d, config, buffers, Some(ptr)))
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
    decode(gpu, stream, dims, inputs, y, state, false)
}

/// [`decode_into`] with real gates: `inputs.log_gate` is `[B, T, H, K or
/// 1]` real f32 and `state` `[B, H, K, V]` real f32, advanced in place by
/// the real-gate kernel ([`forward_real_into`]'s): chained calls equal one
/// [`forward_real_into`] over the concatenated steps, bit for bit on one
/// device, as the complex ones do.
pub fn decode_real_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DecodeInputs<'_, T>,
    y: &mut dyn DevicePtrMut<T>,
    state: &mut dyn DevicePtrMut<f32>,
) -> Result<(), GpuError> {
    decode(gpu, stream, dims, inputs, y, state, true)
}

/// The body of [`decode_into`] and [`decode_real_into`].
fn decode<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DecodeInputs<'_, T>,
    y: &mut dyn DevicePtrMut<T>,
    state: &mut dyn DevicePtrMut<f32>,
    real_gates: bool,
) -> Result<(), GpuError> {
    let DecodeInputs { q, k, v, log_gate } = inputs;
    let state = StateIo::InPlace(state);
    // A few steps a call: nothing for Ahead to overlap, and no occupancy
    // queries on the per-token path.
    launch(
        gpu,
        stream,
        dims,
        RecurrentStaging::Batched.into(),
        Buffers { q, k, v, log_gate, y, state, workspace: None, real_gates, packed: false },
        None,
    )
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
    forward_host_with::<T>(gpu, p, RecurrentConfig::default())
}

/// [`forward_host_as`] with a choice of staging and rows per thread.
pub fn forward_host_with<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<RecurrentConfig>,
) -> Result<Outputs<f32>, GpuError> {
    host_with::<T>(gpu, p, config.into(), Gates::Complex)
}

/// The real-gate kernel ([`forward_real_into`]) from host data: `p`'s
/// log_gate and h0 must be real (Im = 0 everywhere, else
/// [`InputError::Value`]); their real parts are uploaded as real f32, q, k,
/// v rounded to `T`, with the launch choices `config`. Returns y (widened to
/// f32) and h_final (Im = 0).
pub fn forward_real_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<RecurrentConfig>,
) -> Result<Outputs<f32>, GpuError> {
    host_with::<T>(gpu, p, config.into(), Gates::Real)
}

/// [`forward_host_with`] (or, with real gates, [`forward_real_host_as`])
/// through the packed launch: `p`'s B batch rows run as B packed sequences
/// of `p.dims.len` steps, [`forward_varlen_into`] on the same buffers read
/// as `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0 and h_final
/// `[B, H, K, V]` either way). Its answer is the batched launch's, bit for
/// bit: this is how the packed path meets every input the other paths
/// meet (`dispatch::Variant::Packed`, which the fuzzer runs).
pub fn forward_packed_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<RecurrentConfig>,
    gates: Gates,
) -> Result<Outputs<f32>, GpuError> {
    let config = config.into();
    let no_workspace = |_: &Dims| Ok(0);
    launch::forward_host::<T>(gpu, p, gates == Gates::Real, no_workspace, SYNC_DOING, |_, d, i, o, _| {
        // forward_host launches on the Gpu's stream, which `varlen` takes
        // as its Arc.
        forward_rows_packed_into(gpu, gpu.stream(), d, config, gates, i, o)
    })
}

/// Packed sequences from host data in one launch: `p` is `[1, L, H, *]`
/// with no h0 of its own, sequence i is steps `cu_seqlens[i] ..
/// cu_seqlens[i + 1]` and starts from state i of `h0` (`[N, H, K, V]`, or
/// zero); returns y `[1, L, H, V]` (widened to f32) and h_final `[N, H, K,
/// V]`. [`crate::packing::forward_varlen`]'s answer with this kernel run on
/// each sequence alone, bit for bit, in one launch instead of N (the CLI's
/// packed files take it). `gates`: [`Gates::Real`] needs real log_gate and
/// h0 (else [`InputError::Value`]). Everything is checked before the upload.
pub fn forward_varlen_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<f32>]>,
    config: impl Into<RecurrentConfig>,
    gates: Gates,
) -> Result<Outputs<f32>, GpuError> {
    let config = config.into();
    let sequences = crate::packing::check_varlen(p, cu_seqlens, h0)?;
    let states = launch::HostStates::Packed { sequences, h0 };
    let no_workspace = |_: &Dims| Ok(0);
    launch::forward_host_states::<T>(gpu, p, states, gates == Gates::Real, no_workspace, SYNC_DOING, |_, d, i, o, _| {
        // forward_host_states launches on the Gpu's stream, which `varlen`
        // takes as its Arc.
        varlen(gpu, gpu.stream(), d, cu_seqlens, config, gates, i, o)
    })
}

/// The `[B, L, H, *]` problem `dims` through the packed launch: its B
/// batch rows as B packed sequences of L steps, the same buffers read as
/// `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0 and h_final `[B, H,
/// K, V]` either way); [`forward_into_gates`]'s answer, bit for bit.
/// [`forward_packed_host_as`] and the bench's `recurrent-varlen` run it.
pub(crate) fn forward_rows_packed_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    config: RecurrentConfig,
    gates: Gates,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
) -> Result<(), GpuError> {
    let (packed, cu_seqlens) = crate::packing::rows_as_sequences(dims);
    varlen(gpu, stream, &packed, &cu_seqlens, config, gates, inputs, out)
}

/// What the host paths' synchronization is doing, for its error.
const SYNC_DOING: &str = "synchronizing after the recurrent kernel";

/// The body of the `forward_host` family.
fn host_with<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: RecurrentConfig,
    gates: Gates,
) -> Result<Outputs<f32>, GpuError> {
    let no_workspace = |_: &Dims| Ok(0);
    launch::forward_host::<T>(gpu, p, gates == Gates::Real, no_workspace, SYNC_DOING, |s, d, i, o, _| {
        forward_into_gates(gpu, s, d, config, gates, i, o)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn plan_covers_every_key_dim() {
        let configs = [RecurrentStaging::Batched, RecurrentStaging::Ahead].into_iter().flat_map(|staging| {
            [RecurrentRows::Eight, RecurrentRows::Four].map(|rows| RecurrentConfig { staging, rows })
        });
        for (k, config) in (1..=MAX_KEY_DIM).flat_map(|k| configs.clone().map(move |c| (k, c))) {
            let RecurrentConfig { staging, rows } = config;
            for (l, v) in [(1, 1), (1000, 128), (3, 33)] {
                let p = plan_with(&dims(2, l, 3, k, v, false), config).unwrap();
                assert_eq!((p.staging, p.rows), (staging, rows));
                // R: the aim, at most K rounded up, at least what 16 warps need.
                let aim = if rows == RecurrentRows::Four { 4 } else { 8 };
                let r = (k.next_power_of_two().min(aim)).max(k.div_ceil(16).next_power_of_two());
                assert_eq!(p.rows_per_thread as usize, r, "k={k}: {p:?}");
                if staging == RecurrentStaging::Ahead {
                    // The kernel's registers hold one chunk's staging: the
                    // ABI's bounds, else it traps.
                    let items = if p.rows_per_thread < 16 { 4 } else { 2 };
                    assert!(p.chunk_len * p.rows_per_thread <= 32 * items, "k={k}: {p:?}");
                    assert!(p.chunk_len <= items * p.key_groups, "k={k}: {p:?}");
                    let batched = plan_with(
                        &dims(2, l, 3, k, v, false),
                        RecurrentConfig { staging: RecurrentStaging::Batched, rows },
                    )
                    .unwrap();
                    assert_eq!(
                        (p.rows_per_thread, p.key_groups, p.grid),
                        (batched.rows_per_thread, batched.key_groups, batched.grid)
                    );
                    assert!(p.chunk_len <= batched.chunk_len);
                }
                assert!(ROWS_PER_THREAD.contains(&p.rows_per_thread), "k={k}: {p:?}");
                assert!(p.key_groups >= 1 && p.key_groups <= 16, "k={k}: {p:?}");
                assert_eq!(p.padded_key_dim, p.rows_per_thread * p.key_groups);
                assert!(p.padded_key_dim as usize >= k);
                // no warp without a real row
                assert!(((p.key_groups - 1) as usize) < k, "k={k}: {p:?}");
                assert!(p.chunk_len >= 1 && p.chunk_len as usize <= l.min(MAX_CHUNK));
                assert!(p.shared_bytes as usize <= SHARED_BUDGET);
                let per_step = 16 * p.padded_key_dim + 4 * 32 * (1 + p.key_groups);
                assert_eq!(p.shared_bytes, p.chunk_len * per_step + 16);
                assert_eq!(p.value_tiles as usize, v.div_ceil(32));
                assert_eq!(p.grid, 6 * p.value_tiles);
            }
        }
    }

    #[test]
    fn auto_staging_takes_ahead_where_it_needs_no_more_rounds() {
        use RecurrentStaging::{Ahead, Batched};
        // (grid, SMs, Batched's blocks an SM, Ahead's, the choice)
        let cases = [
            // H200 (132 SMs), K = V = 64: Batched 4 blocks an SM, Ahead 2
            // (its registers). B8 H16 (256 blocks) and B1 H4 (8): one round
            // each, Ahead (measured 0.68x to 0.84x of Batched, 2026-12-04).
            (256, 132, 4, 2, Ahead),
            (8, 132, 4, 2, Ahead),
            // 512 blocks: one round of Batched, two of Ahead; 1056: two, four.
            (512, 132, 4, 2, Batched),
            (1056, 132, 4, 2, Batched),
            // K = 128 (512-thread blocks): Batched 2, Ahead 1. B4 H16 (256
            // blocks): one round of Batched, two of Ahead; B1 H96 (384): two
            // and three; 132 blocks: one each.
            (256, 132, 2, 1, Batched),
            (384, 132, 2, 1, Batched),
            (132, 132, 2, 1, Ahead),
            // Equal residency: Ahead always.
            (10_000, 132, 2, 2, Ahead),
            // A driver that gave no residency keeps Batched.
            (8, 132, 4, 0, Batched),
            (8, 132, 0, 2, Batched),
            // No SM count (0) counts as one SM, not a division by zero.
            (8, 0, 4, 2, Batched),
            (2, 0, 4, 2, Ahead),
        ];
        for (grid, sms, batched, ahead, want) in cases {
            assert_eq!(
                RecurrentStaging::auto_choice(grid, sms, batched, ahead),
                want,
                "{grid} {sms} {batched} {ahead}"
            );
        }
        // plan and plan_with, without a device, plan Auto as Batched.
        let d = dims(8, 4096, 16, 64, 64, false);
        assert_eq!(plan(&d).unwrap(), plan_with(&d, RecurrentStaging::Batched).unwrap());
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
        // Ahead at K = 64: 22 steps fit 48 KiB, 16 fit 4 items a thread.
        assert_eq!(plan(&dims(8, 4096, 16, 64, 64, false)).unwrap().chunk_len, 22);
        let p = plan_with(&dims(8, 4096, 16, 64, 64, false), RecurrentStaging::Ahead).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.chunk_len, p.variant_index(false)), (8, 8, 16, 8));
        let p = plan_with(&dims(1, 100, 1, 5, 64, true), RecurrentStaging::Ahead).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.chunk_len), (8, 1, 4));
        let p = plan_with(&dims(1, 100, 1, 256, 1, true), RecurrentStaging::Ahead).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.chunk_len, p.variant_index(false)), (16, 16, 4, 9));
        // Four rows a thread: K = 64 on 16 warps (512 threads), 15 steps in
        // 48 KiB; K = 128 stays at 8 rows (16 warps already), K = 5 on 2 warps.
        let p = plan_with(&dims(8, 4096, 16, 64, 64, false), RecurrentRows::Four).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.chunk_len, p.grid), (4, 16, 15, 256));
        let p = plan_with(&dims(1, 100, 1, 128, 64, false), RecurrentRows::Four).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups), (8, 16));
        let p = plan_with(&dims(1, 100, 1, 5, 64, true), RecurrentRows::Four).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.padded_key_dim), (4, 2, 8));
        let config = RecurrentConfig { staging: RecurrentStaging::Ahead, rows: RecurrentRows::Four };
        let p = plan_with(&dims(8, 4096, 16, 64, 64, false), config).unwrap();
        assert_eq!((p.rows_per_thread, p.key_groups, p.chunk_len, p.variant_index(false)), (4, 16, 15, 7));
    }

    #[test]
    fn kernel_table_order() {
        // The table index of every (gates, staging, R) names its entry point.
        let names = kernel_names("bf16");
        assert_eq!(names.len(), 4 * ROWS_PER_THREAD.len());
        for real in [false, true] {
            for staging in [RecurrentStaging::Batched, RecurrentStaging::Ahead] {
                for k in [1, 3, 8, 64, 200] {
                    let p = plan_with(&dims(1, 9, 1, k, 4, false), staging).unwrap();
                    let kind = format!(
                        "{}{}",
                        if real { "real_" } else { "" },
                        if staging == RecurrentStaging::Ahead { "ahead_" } else { "" }
                    );
                    let want = format!("gateloop_recurrent_{kind}bf16_r{}", p.rows_per_thread);
                    assert_eq!(names[p.variant_index(real)], want);
                }
            }
        }
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
}
