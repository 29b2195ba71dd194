//! GPU benchmarks: every kernel of a [`registry`], per element type and
//! shape, timed with CUDA events and set against two floors.
//!
//! Method (`/work/.library/device/METHOD.md` in this workplace):
//!
//! - **Timing**: one pair of CUDA events around each launch on the Gpu's
//!   stream, after `warmup` untimed launches; the reported time is the
//!   median of `runs` (≥ 20 by default 30) launches, min and max alongside.
//!   A row of several kernel launches also gets each launch's median
//!   ([`BenchResult::phases`], from an event the launchers record after
//!   each kernel while the bench times them: [`super::phases`]).
//! - **Cache**: the inputs and outputs are allocated as several *sets* and
//!   consecutive launches rotate through them, so that the sets together
//!   exceed [`ROTATE_L2_MULTIPLE`] × the L2 size read off the device (H200:
//!   ~50–60 MB of L2; a 4 MB decode state needs ~60 sets, a 0.8 GB forward
//!   problem 2). Inputs are random, never zeros; outputs are poisoned with
//!   NaN before the first launch and checked to be finite afterwards.
//! - **Floors**: `bytes` is the fewest bytes the call must move (each input
//!   read once, each output written once, see each kernel's `cost`); the
//!   memory floor is bytes / the device-to-device copy bandwidth *measured in
//!   the same run* ([`measure_copy_bandwidth`], counting bytes read + bytes
//!   written). `flops` counts the kernel's arithmetic (an FMA is 2); the
//!   arithmetic floor is flops / the FP32 (non-tensor) peak computed from
//!   the device: SMs × FP32 lanes per SM × 2 × the maximum SM clock. For the
//!   H200 SXM that is 132 × 128 × 2 × 1.98 GHz ≈ 66.9 TFLOP/s, the
//!   datasheet's ~67 TFLOP/s; the datasheet's HBM3e bandwidth, 4.8 TB/s, is
//!   printed for reference only (a copy measured here on an H200 moved about
//!   4.3 TB/s). The larger floor is the bound; `of_floor` = floor / measured
//!   time (1.0 would be at the roofline).
//!
//! Adding a kernel (scan, attention, ...): write a [`KernelEntry`] (its
//! dtypes, default shapes, `check`, `cost` and `prepare`, which allocates
//! `sets` device copies of a [`HostInputs`] and returns a [`BenchCase`] that
//! launches on one of them) and list it in [`registry`].

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtrMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{Value, json};
use thiserror::Error;

use super::chunk::{self, ChunkCarry, ChunkConfig, ChunkOutput, ChunkPrecision, ChunkStateBlocks, Gates};
use super::chunk_grad;
use super::element::{Dtype, Element, round_slice};
use super::phases::{self, Geometry, Phase, phase_medians};
use super::recurrent::{
    self, DecodeInputs, DeviceInputs, DeviceOutputs, RecurrentConfig, RecurrentRows, RecurrentStaging,
};
use super::{DriverContext, Gpu, GpuError, attention, scan};
use crate::error::InputError;
use crate::problem::{Dims, GateLayout};

/// The input sets together cover at least this multiple of the L2 size.
pub const ROTATE_L2_MULTIPLE: usize = 4;
/// Fewest input sets (so no two consecutive launches share buffers).
pub const MIN_SETS: usize = 2;
/// Most input sets.
pub const MAX_SETS: usize = 128;
/// Bytes of each buffer of the device-to-device copy that measures bandwidth.
pub const COPY_BYTES: usize = 1 << 30;
/// Datasheet numbers of the H200 SXM, printed for reference (not used for the floors).
pub const H200_DATASHEET: &str = "H200 SXM datasheet: HBM3e 4.8 TB/s, FP32 (non-tensor) 67 TFLOP/s";

/// Errors of a benchmark run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A CUDA call outside the cases failed: querying the device or its free
    /// memory, or measuring the copy bandwidth. A case that fails is not
    /// this error but a [`BenchFailure`] in the report.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A shape that is invalid ([`parse_shape`]) or that a selected kernel
    /// does not run (its `check`).
    #[error(transparent)]
    Input(#[from] InputError),
    /// `--kernel` named no entry of the [`registry`].
    #[error("unknown kernel `{name}` (available: {available})")]
    UnknownKernel {
        /// The name given.
        name: String,
        /// Every entry's name, comma-separated.
        available: String,
    },
    /// A `--shape` argument that [`parse_shape`] cannot read; sizes that it
    /// reads but that are invalid are [`BenchError::Input`].
    #[error("`--shape {spec}`: {why} (expected B,L,H,K,V or B,L,H,K,V,head)")]
    BadShape {
        /// The argument as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// A kernel named with `--kernel` runs none of the `--dtype` element types.
    #[error("kernel `{kernel}` has none of the dtypes asked for ({asked}; it runs {has})")]
    UnsupportedDtype {
        /// The kernel's name.
        kernel: &'static str,
        /// The element types asked for, comma-separated.
        asked: String,
        /// The element types the kernel runs, comma-separated.
        has: String,
    },
    /// An option below its minimum (`--runs` 0).
    #[error("{what} must be at least {min}, got {value}")]
    TooFew {
        /// The option, as on the command line.
        what: &'static str,
        /// The least value allowed.
        min: usize,
        /// The value given.
        value: usize,
    },
}

/// The fewest bytes one call must move, the bytes its launches move as
/// written, and the arithmetic it does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Each input read once, each output written once.
    pub bytes: f64,
    /// Floating-point operations (an FMA counts 2).
    pub flops: f64,
    /// The bytes the launches move as written: every buffer a launch reads
    /// or writes counted once per launch (and once per value tile where the
    /// grid re-reads it), workspace round trips included (re-reads inside one
    /// block are assumed to hit the caches). Equal to `bytes` for the
    /// single-pass kernels; the chunked kernels' gap between the two is
    /// their structure's cost ([`chunked_traffic`]), the rest of the gap to
    /// the memory floor is the kernels'.
    pub traffic: f64,
}

impl Cost {
    /// A single-pass kernel's cost: the launches move the minimum.
    pub fn single_pass(bytes: f64, flops: f64) -> Cost {
        Cost { bytes, flops, traffic: bytes }
    }

    /// The cost of running `self`'s launches, then `next`'s (a forward
    /// then its backward): each count summed.
    pub fn then(self, next: Cost) -> Cost {
        Cost { bytes: self.bytes + next.bytes, flops: self.flops + next.flops, traffic: self.traffic + next.traffic }
    }
}

/// Random host inputs of one shape in the operator's layout, shared by every
/// kernel and dtype of that shape: q, k, v uniform in [−1, 1) as f32,
/// log_gate with Re ∈ (−0.3, 0], Im ∈ [−π, π) and a state with re and im
/// uniform in [−1, 1), both complex f32 as interleaved pairs.
pub struct HostInputs {
    /// The shape the arrays are laid out for.
    pub dims: Dims,
    /// Queries, `[B, L, H, K]` (each case rounds them to its element type).
    pub q: Vec<f32>,
    /// Keys, `[B, L, H, K]`, rounded like `q`.
    pub k: Vec<f32>,
    /// Values, `[B, L, H, V]`, rounded like `q` (the backward's dy is them
    /// reversed).
    pub v: Vec<f32>,
    /// `[B, L, H, gate_dim]` complex, interleaved.
    pub log_gate: Vec<f32>,
    /// `[B, H, K, V]` complex, interleaved: an initial state.
    pub state: Vec<f32>,
}

fn fill(out: &mut [f32], seed: u64, f: impl Fn(&mut StdRng, usize) -> f32 + Sync) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for (i, x) in chunk.iter_mut().enumerate() {
            *x = f(&mut rng, i);
        }
    });
}

impl HostInputs {
    /// log_gate as the `gates` kernels read it: the complex pairs, or (real
    /// gates) the real parts of the random complex ones.
    fn log_gate_for(&self, gates: Gates) -> Vec<f32> {
        match gates {
            Gates::Complex => self.log_gate.clone(),
            Gates::Real => self.log_gate.iter().step_by(2).copied().collect(),
        }
    }

    /// Reproducible from `seed`; generated in parallel.
    pub fn random(dims: Dims, seed: u64) -> Self {
        let uniform = |n: usize, s: u64| {
            let mut v = vec![0f32; n];
            fill(&mut v, s, |rng, _| rng.random_range(-1.0f32..1.0));
            v
        };
        let mut log_gate = vec![0f32; 2 * dims.gate_len()];
        fill(&mut log_gate, seed ^ 4, |rng, i| {
            if i % 2 == 0 {
                -rng.random_range(0.0f32..0.3)
            } else {
                rng.random_range(-std::f32::consts::PI..std::f32::consts::PI)
            }
        });
        HostInputs {
            dims,
            q: uniform(dims.qk_len(), seed),
            k: uniform(dims.qk_len(), seed ^ 1),
            v: uniform(dims.v_len(), seed ^ 2),
            log_gate,
            state: uniform(2 * dims.state_len(), seed ^ 3),
        }
    }
}

/// One prepared benchmark: device buffers for every set, ready to launch.
pub trait BenchCase {
    /// Enqueues one call on input set `set` (< the number of sets) on the
    /// Gpu's stream. Must not synchronize.
    fn launch(&mut self, set: usize) -> Result<(), GpuError>;
    /// After the runs: whether every output element of set 0 (launched
    /// during the warm-up) was written with a finite value.
    fn outputs_finite(&mut self) -> Result<bool, GpuError>;
}

/// Prepares a case: `sets` device copies of the inputs for one dtype.
pub type PrepareFn = for<'g> fn(&'g Gpu, Dims, Dtype, &HostInputs, usize) -> Result<Box<dyn BenchCase + 'g>, GpuError>;

/// A benchmarked kernel.
pub struct KernelEntry {
    /// Name on the command line and in results.
    pub name: &'static str,
    /// One line: what one call does.
    pub about: &'static str,
    /// The element types it runs.
    pub dtypes: &'static [Dtype],
    /// Shapes run when none is given.
    pub shapes: fn() -> Vec<Dims>,
    /// Whether it runs `dims` (an error explains why not).
    pub check: fn(&Dims) -> Result<(), InputError>,
    /// Minimum bytes and flops of one call.
    pub cost: fn(&Dims, Dtype) -> Cost,
    /// Allocates the sets.
    pub prepare: PrepareFn,
    /// A tuning measurement rather than a kernel a user calls: it runs only
    /// when named (`--kernel`), never in the default run or the peer
    /// benchmark.
    pub tuning: bool,
}

/// Every benchmarked kernel. New kernels are appended here.
pub fn registry() -> Vec<KernelEntry> {
    vec![
        KernelEntry {
            name: "recurrent",
            about: "forward over L steps from a zero state: y and h_final",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| recurrent::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Forward, RecurrentConfig::default(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-batched",
            about: "recurrent forward with each chunk's loads done before its recurrence \
                    (RecurrentStaging::Batched forced, the staging until 2026-12-04, which the default's Auto \
                    takes only where Ahead needs more rounds of the SMs; bit for bit recurrent's results)",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| recurrent::plan_with(d, RecurrentStaging::Batched).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Forward, RecurrentStaging::Batched.into(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-ahead",
            about: "recurrent forward with the next chunk's loads in flight during each chunk's recurrence \
                    (RecurrentStaging::Ahead forced; bit for bit recurrent's results)",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| recurrent::plan_with(d, RecurrentStaging::Ahead).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Forward, RecurrentStaging::Ahead.into(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-rows4",
            about: "recurrent forward with four state rows a thread (RecurrentRows::Four: at K = 64 sixteen \
                    warps a block instead of eight, twice the resident warps where the grid fills the SMs \
                    twice; the same bounds)",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| recurrent::plan_with(d, RecurrentRows::Four).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Forward, RecurrentRows::Four.into(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-real",
            about: "recurrent forward, REAL gates (gated linear attention: a real state, one fmaf a row and \
                    step, no sincos; the same bits as recurrent on real gates)",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| recurrent::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Real),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Forward, RecurrentConfig::default(), Gates::Real)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-varlen",
            about: "recurrent forward of the B sequences packed into one row (forward_varlen_into, cu_seqlens \
                    = 0, L, .., B·L; the offsets uploaded each call): recurrent's problem and bits through the \
                    packed path",
            dtypes: &[Dtype::F32, Dtype::Bf16],
            shapes: varlen_shapes,
            check: |d| recurrent::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Packed, RecurrentConfig::default(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-decode",
            about: "decode: L steps applied in place to a [B,H,K,V] state, y for the L steps",
            dtypes: &Dtype::ALL,
            shapes: decode_shapes,
            check: |d| recurrent::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, true, Gates::Complex),
            prepare: |gpu, d, t, host, sets| crate::with_element!(t, T => prepare_recurrent::<T>(gpu, d, host, sets, RecurrentRun::Decode, RecurrentConfig::default(), Gates::Complex)),
            tuning: false,
        },
        KernelEntry {
            name: "scan",
            about: "time-parallel fused associative scan: y and h_final",
            dtypes: &Dtype::ALL,
            shapes: recurrent_shapes,
            check: |d| scan::plan(d, 1).map(|_| ()),
            // The recurrence's bytes and flops, the operator's minimum; the
            // time-parallel scan does about twice that arithmetic (it
            // composes gates as well as states) and round-trips its
            // chunk-boundary carries through the workspace, both overhead
            // over this floor.
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex),
            prepare: |gpu, d, t, host, sets| {
                let ws = scan::plan_for(gpu, &d)?.workspace_len;
                crate::with_element!(t, T => prepare_forward::<T>(gpu, d, host, sets, Gates::Complex, ws, scan::forward_into::<T>))
            },
            tuning: false,
        },
        KernelEntry {
            name: "attention",
            about: "stable masked surrogate attention, O(L^2): y and h_final",
            dtypes: &Dtype::ALL,
            shapes: attention_shapes,
            check: |d| attention::plan(d).map(|_| ()),
            cost: attention_cost,
            prepare: |gpu, d, t, host, sets| {
                let ws = attention::plan(&d)?.workspace_len;
                crate::with_element!(t, T => prepare_forward::<T>(gpu, d, host, sets, Gates::Complex, ws, attention::forward_into::<T>))
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked",
            about: "chunked forward on tensor cores, complex gates, exact (3 split products): y and h_final",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Complex),
            prepare: prepare_chunked::<false, false, CARRY_AUTO, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-separate",
            about: "chunked forward, complex gates, exact, the separate carry forced (state, carry, output launches): \
                    what `chunked` runs since 2026-12-04 (the plan's rule), and the packed launch's baseline",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost_with(d, t, Gates::Complex, ChunkCarry::Separate),
            prepare: prepare_chunked::<false, false, CARRY_SEPARATE, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-fast",
            about: "chunked forward on tensor cores, complex gates, fast (1 product, fla-equivalent precision)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Complex),
            prepare: prepare_chunked::<false, true, CARRY_AUTO, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-fast-narrow-state",
            about: "chunked forward, complex gates, fast, the state kernel in blocks of 64 value columns \
                    (ChunkStateBlocks::Narrow): beside `chunked-fast`, whose state blocks take 128 columns where \
                    V > 64 (16-bit inputs) and build each key slab's gate prefix and K̃ once for both halves",
            dtypes: &[Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Complex),
            prepare: prepare_chunked::<false, true, CARRY_AUTO, OUTPUT_NARROW_STATE>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real",
            about: "chunked forward on tensor cores, REAL gates (gated linear attention), exact",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Real),
            prepare: prepare_chunked::<true, false, CARRY_AUTO, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-separate",
            about: "chunked forward, REAL gates, exact, the separate carry forced: `chunked-real` takes the \
                    sequential walk for 16-bit inputs from 512 blocks on; this row is the other choice",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost_with(d, t, Gates::Real, ChunkCarry::Separate),
            prepare: prepare_chunked::<true, false, CARRY_SEPARATE, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "scan-grad",
            about: "fused scan backward: dq, dk, dv, dlog_gate from dy and dh_final, states recomputed",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| super::scan_grad::plan(d, 1).map(|_| ()),
            cost: scan_grad_cost,
            prepare: |gpu, d, t, host, sets| prepare_grad(gpu, d, t, host, sets, Backward::Scan),
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-grad",
            about: "recurrent backward (fused-recurrent: two sweeps on the forward's mapping, K <= 128), complex \
                    gates: dq, dk, dv, dlog_gate from dy",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| super::recurrent_grad::plan(d).map(|_| ()),
            cost: recurrent_grad_cost,
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::Recurrent { forward: false, gates: Gates::Complex })
            },
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-fwd-bwd",
            about: "recurrent forward then its backward, complex gates: y, h_final, then every gradient",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| super::recurrent_grad::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Complex).then(recurrent_grad_cost(d, t)),
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::Recurrent { forward: true, gates: Gates::Complex })
            },
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-real-grad",
            about: "recurrent backward, REAL gates (real sweeps, the gate launch's expansion at phase 0): dq, dk, \
                    dv, dlog_gate from dy",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| super::recurrent_grad::plan(d).map(|_| ()),
            cost: recurrent_grad_cost,
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::Recurrent { forward: false, gates: Gates::Real })
            },
            tuning: false,
        },
        KernelEntry {
            name: "recurrent-real-fwd-bwd",
            about: "recurrent forward then its backward, REAL gates (gated linear attention, fla's operator)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| super::recurrent_grad::plan(d).map(|_| ()),
            cost: |d, t| recurrent_cost(d, t, false, Gates::Real).then(recurrent_grad_cost(d, t)),
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::Recurrent { forward: true, gates: Gates::Real })
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-fast",
            about: "chunked forward on tensor cores, REAL gates, fast (1 product)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Real),
            prepare: prepare_chunked::<true, true, CARRY_AUTO, OUTPUT_STAGED>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-fast-narrow",
            about: "chunked forward, REAL gates, fast, the staged output launch in blocks of 64 value columns \
                    (ChunkOutput::StagedNarrow): beside `chunked-real-fast`, whose output blocks take 128 \
                    columns where V > 64 and form each chunk's scores once for both halves",
            dtypes: &[Dtype::F32, Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Real),
            prepare: prepare_chunked::<true, true, CARRY_AUTO, OUTPUT_NARROW>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-fast-narrow-state",
            about: "chunked forward, REAL gates, fast, the state launch (the walk or the state kernel, whichever \
                    carry the plan takes) in blocks of 64 value columns (ChunkStateBlocks::Narrow): beside \
                    `chunked-real-fast`, whose state blocks take 128 columns where V > 64 (16-bit inputs; the walk \
                    on sm_90) and build each key slab's gate prefix and keys once for both halves",
            dtypes: &[Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Real),
            prepare: prepare_chunked::<true, true, CARRY_AUTO, OUTPUT_NARROW_STATE>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-grad",
            about: "chunked backward, complex gates, exact: dq, dk, dv, dlog_gate from dy (no h0, no dh_final)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk_grad::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_grad_cost(d, t, Gates::Complex),
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::chunked(false, Gates::Complex))
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-fwd-bwd",
            about: "chunked forward then backward, complex gates, exact: y, h_final, then every gradient, the backward \
                    reading the forward's chunk states (chunk_grad::forward_saving_into, backward_saved_into; the \
                    fwd+bwd column of the peer comparison)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk_grad::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_fwd_bwd_cost(d, t, Gates::Complex, true),
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(gpu, d, t, host, sets, Backward::chunked(true, Gates::Complex))
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-grad",
            about: "chunked backward, REAL gates (gated linear attention), exact: dq, dk, dv, dlog_gate from dy",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk_grad::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_grad_cost(d, t, Gates::Real),
            prepare: |gpu, d, t, host, sets| prepare_grad(gpu, d, t, host, sets, Backward::chunked(false, Gates::Real)),
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-fwd-bwd",
            about: "chunked forward then backward, REAL gates, exact, the backward reading the forward's chunk \
                    states (fla chunk_gla's fwd+bwd, apples to apples)",
            dtypes: &Dtype::ALL,
            shapes: chunked_shapes,
            check: |d| chunk_grad::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_fwd_bwd_cost(d, t, Gates::Real, true),
            prepare: |gpu, d, t, host, sets| prepare_grad(gpu, d, t, host, sets, Backward::chunked(true, Gates::Real)),
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-fwd-bwd-recompute",
            about: "chunked forward then backward, REAL gates, exact, the backward recomputing the chunk states (its \
                    state launches: the fwd+bwd as timed on 2026-12-04), beside `chunked-real-fwd-bwd`",
            dtypes: &[Dtype::F32, Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk_grad::plan(d, Dtype::F32, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_fwd_bwd_cost(d, t, Gates::Real, false),
            prepare: |gpu, d, t, host, sets| {
                let backward = Backward::Chunked { forward: true, gates: Gates::Real, packed: false, saved: false };
                prepare_grad(gpu, d, t, host, sets, backward)
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-frag",
            about: "chunked forward, complex gates, exact, the output launch on register fragments (mma.sync; \
                    ChunkOutput::Fragments): beside `chunked`, whose output launch stages every operand",
            dtypes: &[Dtype::F16, Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::Bf16, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Complex),
            prepare: prepare_chunked::<false, false, CARRY_AUTO, OUTPUT_FRAGMENTS>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-real-frag-fast",
            about: "chunked forward, REAL gates, fast, the output launch on register fragments: beside \
                    `chunked-real-fast` (fla chunk_gla's precision and gates)",
            dtypes: &[Dtype::F16, Dtype::Bf16],
            shapes: chunked_shapes,
            check: |d| chunk::plan(d, Dtype::Bf16, Gates::Real).map(|_| ()),
            cost: |d, t| chunked_cost(d, t, Gates::Real),
            prepare: prepare_chunked::<true, true, CARRY_AUTO, OUTPUT_FRAGMENTS>,
            tuning: false,
        },
        KernelEntry {
            name: "chunked-varlen",
            about: "chunked forward, complex gates, exact, of the B sequences packed into one row \
                    (forward_varlen_into, cu_seqlens = 0, L, .., B·L; the offsets uploaded each call; the \
                    separate carry, the packed launch's): chunked's problem and bits through the packed path",
            dtypes: &[Dtype::F32, Dtype::Bf16],
            shapes: varlen_shapes,
            check: |d| chunk::rows_packed_plan(d, Dtype::F32, Gates::Complex, ChunkCarry::Auto).map(|_| ()),
            cost: |d, t| chunked_cost_with(d, t, Gates::Complex, ChunkCarry::Separate),
            prepare: |gpu, d, t, host, sets| {
                crate::with_element!(t, T => {
                    let ws = chunk::rows_packed_plan(&d, T::DTYPE, Gates::Complex, ChunkCarry::Auto)?.workspace_len;
                    let launch: ForwardFn<T> = |g, _s, d, i, o, w| {
                        // The bench launches on the Gpu's stream (ForwardCase), which the packed launch takes as its Arc.
                        chunk::forward_rows_packed_into(g, g.stream(), d, i, o, w, ChunkConfig::default(), Gates::Complex)
                    };
                    prepare_forward::<T>(gpu, d, host, sets, Gates::Complex, ws, launch)
                })
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-grad-varlen",
            about: "chunked backward, complex gates, exact, of the B sequences packed into one row \
                    (backward_varlen_into, cu_seqlens = 0, L, .., B·L; the offsets uploaded each call; the \
                    separate carry): chunked-grad's problem and bits through the packed path (f32, where \
                    chunked-grad takes the separate carry too)",
            dtypes: &[Dtype::F32],
            shapes: chunked_shapes,
            check: |d| chunk_grad::rows_packed_plan(d, Dtype::F32, Gates::Complex, ChunkCarry::Auto).map(|_| ()),
            cost: |d, t| chunked_grad_cost(d, t, Gates::Complex),
            prepare: |gpu, d, t, host, sets| {
                prepare_grad(
                    gpu,
                    d,
                    t,
                    host,
                    sets,
                    Backward::Chunked { forward: false, gates: Gates::Complex, packed: true, saved: false },
                )
            },
            tuning: false,
        },
        KernelEntry {
            name: "chunked-sequential",
            about: "chunked forward, complex gates, exact, the sequential carry forced; beside chunked-separate \
                    over these shapes (sequential grid 32 to 528 blocks, B·H·L ≈ 2^19) it sets SEQUENTIAL_MIN_BLOCKS",
            dtypes: &Dtype::ALL,
            shapes: carry_sweep_shapes,
            check: |d| chunk::plan(d, Dtype::F32, Gates::Complex).map(|_| ()),
            cost: |d, t| chunked_cost_with(d, t, Gates::Complex, ChunkCarry::Sequential),
            prepare: prepare_chunked::<false, false, CARRY_SEQUENTIAL, OUTPUT_STAGED>,
            tuning: true,
        },
    ]
}

fn shape(b: usize, l: usize, h: usize, k: usize, v: usize, gate: GateLayout) -> Dims {
    Dims::new(b, l, h, k, v).with_gate(gate)
}

fn recurrent_shapes() -> Vec<Dims> {
    use GateLayout::{PerChannel, PerHead};
    vec![
        shape(8, 4096, 16, 64, 64, PerChannel),
        shape(8, 4096, 16, 64, 64, PerHead),
        shape(1, 65536, 4, 64, 64, PerChannel),
        shape(4, 2048, 8, 128, 128, PerChannel),
        shape(32, 1024, 32, 32, 32, PerHead),
    ]
}

/// Shapes with several sequences to pack (B > 1), equal lengths, so that
/// each row compares with `recurrent`'s at the same shape.
fn varlen_shapes() -> Vec<Dims> {
    use GateLayout::{PerChannel, PerHead};
    vec![shape(8, 4096, 16, 64, 64, PerChannel), shape(32, 1024, 32, 32, 32, PerHead)]
}

fn decode_shapes() -> Vec<Dims> {
    use GateLayout::{PerChannel, PerHead};
    vec![shape(8, 1, 16, 64, 64, PerChannel), shape(64, 1, 32, 128, 128, PerHead), shape(8, 16, 16, 64, 64, PerChannel)]
}

/// Recurrent forward / decode. Bytes: q, k, v read and y written in the
/// element type; log_gate read as complex f32 (8 bytes; real gates 4); the
/// state read (h0, decode only) and written (h_final) as complex f32 (real:
/// f32). Flops per (b, t, h, k, v): the complex update a·h + k·v (complex
/// multiply 6, k·v 1, add 1) and the readout q·Re h (FMA 2): 10; real gates
/// 1 + 1 + 1 + 2 = 5; the gate's exp/sincos per (b, t, h, gate channel) is
/// not counted.
pub fn recurrent_cost(d: &Dims, t: Dtype, reads_state: bool, gates: Gates) -> Cost {
    let e = t.size_bytes() as f64;
    let p = gates.parts() as f64;
    let state = 4.0 * p * d.state_len() as f64;
    let bytes = e * (2 * d.qk_len() + 2 * d.v_len()) as f64
        + 4.0 * p * d.gate_len() as f64
        + state * if reads_state { 2.0 } else { 1.0 };
    let per_element = if gates == Gates::Real { 5.0 } else { 10.0 };
    let flops = per_element * (d.batch * d.len * d.heads * d.key_dim * d.value_dim) as f64;
    Cost::single_pass(bytes, flops)
}

/// One set of device buffers of the recurrent kernel.
struct RecurrentSet<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    log_gate: CudaSlice<f32>,
    y: CudaSlice<T>,
    /// h_final (forward) or the in-place state (decode).
    state: CudaSlice<f32>,
}

/// What a recurrent bench case launches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RecurrentRun {
    /// `forward_into_gates` from a zero state.
    Forward,
    /// `decode_into` on a random state.
    Decode,
    /// `forward_varlen_into` with the B sequences packed into one row: the
    /// `[B, L, H, *]` buffers read as `[1, B·L, H, *]`, the same memory, and
    /// h_final `[B, H, K, V]` either way.
    Packed,
}

struct RecurrentCase<'g, T> {
    gpu: &'g Gpu,
    dims: Dims,
    run: RecurrentRun,
    /// The forward's staging and rows (decode: always the default).
    config: RecurrentConfig,
    /// Complex, or real (the forward only: `forward_real_into`).
    gates: Gates,
    sets: Vec<RecurrentSet<T>>,
}

fn prepare_recurrent<'g, T: Element>(
    gpu: &'g Gpu,
    dims: Dims,
    host: &HostInputs,
    sets: usize,
    run: RecurrentRun,
    config: RecurrentConfig,
    gates: Gates,
) -> Result<Box<dyn BenchCase + 'g>, GpuError> {
    let s = gpu.stream();
    let (q, k, v) = (round_slice::<T>(&host.q), round_slice::<T>(&host.k), round_slice::<T>(&host.v));
    let y_poison = vec![T::nan(); dims.v_len()];
    let log_gate = host.log_gate_for(gates);
    let state_len = gates.parts() * dims.state_len();
    let state_init = if run == RecurrentRun::Decode { host.state.clone() } else { vec![f32::NAN; state_len] };
    let sets = (0..sets)
        .map(|_| {
            Ok(RecurrentSet {
                q: s.clone_htod(&q).doing("uploading q")?,
                k: s.clone_htod(&k).doing("uploading k")?,
                v: s.clone_htod(&v).doing("uploading v")?,
                log_gate: s.clone_htod(&log_gate).doing("uploading log_gate")?,
                y: s.clone_htod(&y_poison).doing("allocating y")?,
                state: s.clone_htod(&state_init).doing("allocating the state")?,
            })
        })
        .collect::<Result<Vec<_>, GpuError>>()?;
    Ok(Box::new(RecurrentCase { gpu, dims, run, config, gates, sets }))
}

impl<T: Element> BenchCase for RecurrentCase<'_, T> {
    fn launch(&mut self, set: usize) -> Result<(), GpuError> {
        let st = &mut self.sets[set];
        let s = self.gpu.stream();
        let d = &self.dims;
        if self.run == RecurrentRun::Decode {
            let inputs = DecodeInputs { q: &st.q, k: &st.k, v: &st.v, log_gate: &st.log_gate };
            return recurrent::decode_into(self.gpu, s, d, inputs, &mut st.y, &mut st.state);
        }
        let inputs = DeviceInputs { q: &st.q, k: &st.k, v: &st.v, log_gate: &st.log_gate, h0: None };
        let out = DeviceOutputs { y: &mut st.y, h_final: &mut st.state };
        if self.run == RecurrentRun::Packed {
            return recurrent::forward_rows_packed_into(self.gpu, s, d, self.config, self.gates, inputs, out);
        }
        recurrent::forward_into_gates(self.gpu, s, d, self.config, self.gates, inputs, out)
    }

    fn outputs_finite(&mut self) -> Result<bool, GpuError> {
        let s = self.gpu.stream();
        let y = s.clone_dtoh(&self.sets[0].y).doing("downloading y")?;
        let state = s.clone_dtoh(&self.sets[0].state).doing("downloading the state")?;
        s.synchronize().doing("synchronizing")?;
        Ok(y.iter().all(|x| x.to_f32().is_finite()) && state.iter().all(|x| x.is_finite()))
    }
}

/// Chunked forward (complex or real gates). Bytes: q, k, v read and y
/// written in the element type; log_gate read and h_final written as f32 ×
/// parts (2 complex, 1 real); the workspace round trips are not counted
/// (they are the kernel's overhead over this floor). Flops per (b, t, h),
/// with C = 64 and p = parts, counting the operator's products once (the
/// exact variant's split operands triple the tensor-core work, not this
/// count): the chunk state 2·pK·V, the inter-chunk readout 2·pK·V, the
/// causal scores ~C·pK (C/2 keys × 2pK), P·V ~C·V: 4pKV + C(pK + V); gate
/// exps and sincos are not counted.
pub fn chunked_cost(d: &Dims, t: Dtype, gates: Gates) -> Cost {
    chunked_cost_with(d, t, gates, ChunkCarry::Auto)
}

/// [`chunked_cost`] with a choice of carry (it changes the traffic only).
pub fn chunked_cost_with(d: &Dims, t: Dtype, gates: Gates, carry: ChunkCarry) -> Cost {
    let e = t.size_bytes() as f64;
    let p = gates.parts() as f64;
    let bytes = e * (2 * d.qk_len() + 2 * d.v_len()) as f64 + 4.0 * p * (d.gate_len() + d.state_len()) as f64;
    let (k, v, c) = (d.key_dim as f64, d.value_dim as f64, chunk::CHUNK_LEN as f64);
    let steps = (d.batch * d.len * d.heads) as f64;
    let traffic = chunked_traffic(d, t, gates, carry, ChunkedPass::Forward);
    Cost { bytes, flops: steps * (4.0 * p * k * v + c * (p * k + v)), traffic }
}

/// The bytes the chunked launches move as written (no h0, no dh_final, as
/// the bench runs them), e = element size, p = parts, per value tile of 64
/// columns (vt = ⌈V/64⌉) where the grid re-reads a buffer per tile; ws =
/// one chunk-state workspace (4p·B·H·⌈L/64⌉·K·V bytes), A = the decays.
/// Forward, with the carry `carry` resolves to ([`chunk::plan_with`]): the
/// separate carry's state (k·vt, v, log_gate·vt; writes ws, A) and carry
/// (ws read and written in place, A; h_final), or the sequential carry's one
/// launch (k·vt, v, log_gate·vt; writes ws, A, h_final); then the output
/// (q·vt, k·vt, v, log_gate·vt, ws; writes y). [`ChunkedPass::Backward`]:
/// the launches of cuda/chunk_grad.cu, the forward part as above (h_final to
/// a sink; none of it for [`ChunkedPass::SavedBackward`]), grad_w (q·vt,
/// dy, log_gate·vt; writes a second ws) and the adjoint carry (ws read and
/// written, A), or with the sequential carry grad_w_seq (grad_w's reads;
/// writes the second ws once), grad_qk (q, k, v, dy, log_gate, both ws; writes dq, dk, dlog_gate) and
/// grad_dv (q·vt, k·vt, log_gate·vt, dy, the adjoint ws; writes dv). The
/// output launch (`ChunkOutput::Staged`) and grad_dv read
/// q, k and log_gate once per 128 value columns where V > 64 (their wide
/// kernels): ot = ⌈V/128⌉ in place of vt there.
/// At B8 L4096 H16 K = V = 64 bf16 the separate carry moves 3.75× the
/// forward's minimum (the four passes over ws, written, carried in place
/// and read, are half of it; the second read of k and log_gate the rest),
/// the sequential carry 2.75×.
pub fn chunked_traffic(d: &Dims, t: Dtype, gates: Gates, carry: ChunkCarry, pass: ChunkedPass) -> f64 {
    let e = t.size_bytes() as f64;
    let p = gates.parts() as f64;
    let vt = d.value_dim.div_ceil(chunk::VALUE_TILE) as f64;
    // The wide output blocks' tiles (V > 64; at V ≤ 64 one either way).
    let ot = d.value_dim.div_ceil(chunk::WIDE_TILE) as f64;
    let nc = d.len.div_ceil(chunk::CHUNK_LEN) as f64;
    let bh = (d.batch * d.heads) as f64;
    let (qk, v, gate) = (e * d.qk_len() as f64, e * d.v_len() as f64, 4.0 * p * d.gate_len() as f64);
    let ws = 4.0 * p * bh * nc * (d.key_dim * d.value_dim) as f64;
    let decays = 4.0 * p * bh * nc * d.gate_dim() as f64;
    let h_final = 4.0 * p * d.state_len() as f64;
    let state = qk * vt + v + gate * vt + ws + decays;
    let plan = chunk::plan_with(d, t, gates, carry).ok();
    let sequential = plan.is_some_and(|lp| lp.carry == ChunkCarry::Sequential);
    // The carry in S segments reads the chunk states and decays once more
    // (the segments' sums) and writes and reads 4 f32 an element a segment.
    let segments = plan.map_or(1, |lp| lp.carry_segments) as f64;
    let segment_pass =
        if segments > 1.0 { ws + decays + 2.0 * 4.0 * 4.0 * segments * d.state_len() as f64 } else { 0.0 };
    let carry_pass = 2.0 * ws + decays + h_final + segment_pass;
    let states = if sequential { state + h_final } else { state + carry_pass };
    if pass == ChunkedPass::Forward {
        let output = 2.0 * qk * ot + v + gate * ot + ws + v;
        return states + output;
    }
    let grad_w = qk * vt + v + gate * vt + ws;
    let adjoint_carry = 2.0 * ws + decays + segment_pass;
    let grad_qk = 2.0 * qk + 2.0 * v + gate + 2.0 * ws + 2.0 * qk + gate;
    let grad_dv = 2.0 * qk * ot + gate * ot + v + ws + v;
    // The sequential carry's grad_w_seq writes D where grad_w wrote W, and
    // there is no adjoint carry pass.
    let adjoints = if sequential { grad_w } else { grad_w + adjoint_carry };
    // A saved forward left the states and decays (backward_saved_into).
    let forward_part = if pass == ChunkedPass::SavedBackward { 0.0 } else { states };
    forward_part + adjoints + grad_qk + grad_dv
}

/// The launches [`chunked_traffic`] counts: the forward's, the backward's
/// (its forward part included), or those of the backward of a saved forward
/// (`chunk_grad::backward_saved_into`: no forward part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedPass {
    /// The chunked forward.
    Forward,
    /// The chunked backward, recomputing the forward's chunk states.
    Backward,
    /// The chunked backward reading a saved forward's chunk states.
    SavedBackward,
}

/// Chunked backward (no h0, no dh_final). Bytes: read q, k, v, dy (element
/// type) and log_gate (p f32) once, write dq, dk, dv and dlog_gate once.
/// Flops per (b, t, h), p = 2 for complex gates (1 for real), C = 64,
/// products counted once: five K·V products (U_c, W_c, S_in·dy, D·v, K̃·D:
/// 10pKV), the causal pairs of s = dY Vᵀ and Pᵀ dY (2CV), the recomputed
/// scores and the two pre-phase accumulators (3CpK); gate exps and sincos are
/// not counted.
pub fn chunked_grad_cost(d: &Dims, t: Dtype, gates: Gates) -> Cost {
    let e = t.size_bytes() as f64;
    let p = gates.parts() as f64;
    let bytes = e * (4 * d.qk_len() + 3 * d.v_len()) as f64 + 8.0 * p * d.gate_len() as f64;
    let (k, v, c) = (d.key_dim as f64, d.value_dim as f64, chunk::CHUNK_LEN as f64);
    let steps = (d.batch * d.len * d.heads) as f64;
    let traffic = chunked_traffic(d, t, gates, ChunkCarry::Auto, ChunkedPass::Backward);
    Cost { bytes, flops: steps * (10.0 * p * k * v + c * (3.0 * p * k + 2.0 * v)), traffic }
}

/// The chunked forward then backward: the sum of the two costs; with
/// `saved` (the training pair, `chunk_grad::backward_saved_into`) less what
/// the backward's forward part costs: its launches' traffic and U_c's
/// product (2pKV a step).
fn chunked_fwd_bwd_cost(d: &Dims, t: Dtype, gates: Gates, saved: bool) -> Cost {
    let backward = chunked_grad_cost(d, t, gates);
    let backward = if saved {
        let (p, k, v) = (gates.parts() as f64, d.key_dim as f64, d.value_dim as f64);
        let steps = (d.batch * d.len * d.heads) as f64;
        Cost {
            flops: backward.flops - steps * 2.0 * p * k * v,
            traffic: chunked_traffic(d, t, gates, ChunkCarry::Auto, ChunkedPass::SavedBackward),
            ..backward
        }
    } else {
        backward
    };
    chunked_cost(d, t, gates).then(backward)
}

/// Attention. Bytes: as the recurrence's in element type `t` (each input
/// read once, y and h_final written once). Flops per (b, h): every causal pair (n ≥ m) costs
/// the score over the 2K real/imaginary products (4K) and its share of
/// P·V (2V); h_final adds the decayed kᵀv of every step (8KV); gate exps and
/// sincos are not counted.
pub fn attention_cost(d: &Dims, t: Dtype) -> Cost {
    let (l, k, v) = (d.len as f64, d.key_dim as f64, d.value_dim as f64);
    let pairs = l * (l + 1.0) / 2.0;
    let heads = (d.batch * d.heads) as f64;
    Cost::single_pass(
        recurrent_cost(d, t, false, Gates::Complex).bytes,
        heads * (pairs * (4.0 * k + 2.0 * v) + 8.0 * l * k * v),
    )
}

/// The issue's two shapes and fla's 4/2048/16/128 (B, L, H, K = V).
fn chunked_shapes() -> Vec<Dims> {
    use GateLayout::PerChannel;
    vec![
        shape(8, 4096, 16, 64, 64, PerChannel),
        shape(1, 65536, 4, 64, 64, PerChannel),
        shape(4, 2048, 16, 128, 128, PerChannel),
    ]
}

/// The sweep of the carry choice (`chunked-sequential` against
/// `chunked-separate`): K = V = 64, so the sequential grid is 4·B·H blocks
/// (one value tile, four key slabs): 32, 64, 132, 264 and 528 blocks (an
/// H200 has 132 SMs), with B·H·L ≈ 2^19 at every point so that the work is
/// the same and only the parallelism of the carry changes.
pub fn carry_sweep_shapes() -> Vec<Dims> {
    use GateLayout::PerChannel;
    vec![
        shape(1, 65536, 8, 64, 64, PerChannel),
        shape(1, 32768, 16, 64, 64, PerChannel),
        shape(1, 15872, 33, 64, 64, PerChannel),
        shape(2, 7936, 33, 64, 64, PerChannel),
        shape(4, 3968, 33, 64, 64, PerChannel),
    ]
}

/// The recurrent backward: the scan backward's bytes ([`scan_grad_cost`])
/// but dh_final's, which its bench rows do not pass (`grad_bytes`); flops: the two sweeps' recurrences
/// and per-row products (~24 per (b, t, h, k, v)); the gate launch's
/// per-segment sums are O(64·K + 64²) per step and not counted. Real gates
/// (`recurrent-real-grad`) take the same count: an upper bound (their gate
/// side is half the bytes, their sweeps' steps a third of the flops).
pub fn recurrent_grad_cost(d: &Dims, t: Dtype) -> Cost {
    let flops = 24.0 * (d.batch * d.len * d.heads * d.key_dim * d.value_dim) as f64;
    Cost::single_pass(grad_bytes(d, t, false), flops)
}

/// The bytes of a backward that reads q, k, v, dy and writes dq, dk, dv in
/// the element type, reads log_gate and writes dlog_gate (complex, 8 bytes),
/// and reads dh_final (complex) when `reads_dh_final`, each once.
fn grad_bytes(d: &Dims, t: Dtype, reads_dh_final: bool) -> f64 {
    let e = t.size_bytes() as f64;
    let dh_final = if reads_dh_final { 8.0 * d.state_len() as f64 } else { 0.0 };
    e * (4 * d.qk_len() + 3 * d.v_len()) as f64 + 16.0 * d.gate_len() as f64 + dh_final
}

/// The scan backward. Bytes: q, k, v, dy read and dq, dk, dv written in
/// the element type, log_gate read and dlog_gate written (complex 8 bytes),
/// dh_final read, once each (`grad_bytes`). Flops per (b, t, h, k, v): the
/// forward step recomputed (8), the adjoint step conj(a)·δ + q·dy (9), dq, dk and dv (2
/// each), the gate's conj(h)·δ (8): 31; the gate's exp/sincos is not
/// counted, nor the chunk-level passes.
pub fn scan_grad_cost(d: &Dims, t: Dtype) -> Cost {
    let bytes = grad_bytes(d, t, true);
    let flops = 31.0 * (d.batch * d.len * d.heads * d.key_dim * d.value_dim) as f64;
    Cost::single_pass(bytes, flops)
}

fn attention_shapes() -> Vec<Dims> {
    use GateLayout::{PerChannel, PerHead};
    vec![
        shape(8, 4096, 16, 64, 64, PerChannel),
        shape(1, 65536, 4, 64, 64, PerChannel),
        shape(32, 1024, 32, 32, 32, PerHead),
    ]
}

/// A forward launcher with a workspace (`scan::forward_into`,
/// `attention::forward_into`, the chunked ones with their precision bound).
type ForwardFn<T> = fn(
    &Gpu,
    &CudaStream,
    &Dims,
    DeviceInputs<'_, T>,
    DeviceOutputs<'_, T>,
    Option<&mut dyn DevicePtrMut<f32>>,
) -> Result<(), GpuError>;

// The carry a chunked bench entry takes (the `CARRY` const parameter of
// `prepare_chunked`; an enum cannot be one): the plan's choice, or one forced.
const CARRY_AUTO: u8 = 0;
const CARRY_SEPARATE: u8 = 1;
const CARRY_SEQUENTIAL: u8 = 2;

// The output kernel a chunked bench entry takes (`OUTPUT` of
// `prepare_chunked`).
const OUTPUT_STAGED: u8 = 0;
const OUTPUT_NARROW: u8 = 1;
const OUTPUT_FRAGMENTS: u8 = 2;
// The staged output launch, the state launches (the walk or the state
// kernel) in blocks of 64 value columns at every V
// (ChunkStateBlocks::Narrow).
const OUTPUT_NARROW_STATE: u8 = 3;

/// The chunked kernel for one gate kind (`REAL`), precision (`FAST`), carry
/// (`CARRY`) and output kernel (`OUTPUT`: [`ChunkOutput`]).
fn prepare_chunked<'g, const REAL: bool, const FAST: bool, const CARRY: u8, const OUTPUT: u8>(
    gpu: &'g Gpu,
    dims: Dims,
    t: Dtype,
    host: &HostInputs,
    sets: usize,
) -> Result<Box<dyn BenchCase + 'g>, GpuError> {
    let gates = if REAL { Gates::Real } else { Gates::Complex };
    crate::with_element!(t, T => {
        let ws = chunk::plan(&dims, T::DTYPE, gates)?.workspace_len;
        let launch: ForwardFn<T> = if REAL {
            |g, s, d, i, o, w| chunk::forward_real_into(g, s, d, i, o, w, chunked_config::<FAST, CARRY, OUTPUT>())
        } else {
            |g, s, d, i, o, w| chunk::forward_into(g, s, d, i, o, w, chunked_config::<FAST, CARRY, OUTPUT>())
        };
        prepare_forward::<T>(gpu, dims, host, sets, gates, ws, launch)
    })
}

/// The chunked bench entries' configuration: fast or exact, the carry, the
/// output kernel.
fn chunked_config<const FAST: bool, const CARRY: u8, const OUTPUT: u8>() -> ChunkConfig {
    ChunkConfig {
        precision: if FAST { ChunkPrecision::Fast } else { ChunkPrecision::Exact },
        carry: match CARRY {
            CARRY_SEPARATE => ChunkCarry::Separate,
            CARRY_SEQUENTIAL => ChunkCarry::Sequential,
            _ => ChunkCarry::Auto,
        },
        output: match OUTPUT {
            OUTPUT_NARROW => ChunkOutput::StagedNarrow,
            OUTPUT_FRAGMENTS => ChunkOutput::Fragments,
            _ => ChunkOutput::Staged,
        },
        state_blocks: if OUTPUT == OUTPUT_NARROW_STATE { ChunkStateBlocks::Narrow } else { ChunkStateBlocks::Auto },
    }
}

/// One set of device buffers of a forward kernel with a workspace.
struct ForwardSet<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    /// complex (interleaved) or, for real-gate kernels, real f32.
    log_gate: CudaSlice<f32>,
    y: CudaSlice<T>,
    h_final: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
}

struct ForwardCase<'g, T> {
    gpu: &'g Gpu,
    dims: Dims,
    launch: ForwardFn<T>,
    sets: Vec<ForwardSet<T>>,
}

fn prepare_forward<'g, T: Element>(
    gpu: &'g Gpu,
    dims: Dims,
    host: &HostInputs,
    sets: usize,
    gates: Gates,
    workspace_len: usize,
    launch: ForwardFn<T>,
) -> Result<Box<dyn BenchCase + 'g>, GpuError> {
    let s = gpu.stream();
    let (q, k, v) = (round_slice::<T>(&host.q), round_slice::<T>(&host.k), round_slice::<T>(&host.v));
    let log_gate = host.log_gate_for(gates);
    let y_poison = vec![T::nan(); dims.v_len()];
    let h_poison = vec![f32::NAN; gates.parts() * dims.state_len()];
    let sets = (0..sets)
        .map(|_| {
            Ok(ForwardSet {
                q: s.clone_htod(&q).doing("uploading q")?,
                k: s.clone_htod(&k).doing("uploading k")?,
                v: s.clone_htod(&v).doing("uploading v")?,
                log_gate: s.clone_htod(&log_gate).doing("uploading log_gate")?,
                y: s.clone_htod(&y_poison).doing("allocating y")?,
                h_final: s.clone_htod(&h_poison).doing("allocating h_final")?,
                // At least one element: a zero-sized allocation is not a buffer.
                workspace: s.alloc_zeros::<f32>(workspace_len.max(1)).doing("allocating the workspace")?,
            })
        })
        .collect::<Result<Vec<_>, GpuError>>()?;
    Ok(Box::new(ForwardCase { gpu, dims, launch, sets }))
}

impl<T: Element> BenchCase for ForwardCase<'_, T> {
    fn launch(&mut self, set: usize) -> Result<(), GpuError> {
        let st = &mut self.sets[set];
        let s = self.gpu.stream();
        let inputs = DeviceInputs { q: &st.q, k: &st.k, v: &st.v, log_gate: &st.log_gate, h0: None };
        let out = DeviceOutputs { y: &mut st.y, h_final: &mut st.h_final };
        (self.launch)(self.gpu, s, &self.dims, inputs, out, Some(&mut st.workspace))
    }

    fn outputs_finite(&mut self) -> Result<bool, GpuError> {
        let s = self.gpu.stream();
        let y = s.clone_dtoh(&self.sets[0].y).doing("downloading y")?;
        let h = s.clone_dtoh(&self.sets[0].h_final).doing("downloading h_final")?;
        s.synchronize().doing("synchronizing")?;
        Ok(y.iter().all(|x| x.to_f32().is_finite()) && h.iter().all(|x| x.is_finite()))
    }
}

/// One set of device buffers of a backward (and, for the chunked fwd+bwd,
/// the forward's outputs).
struct GradSet<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    log_gate: CudaSlice<f32>,
    dy: CudaSlice<T>,
    y: CudaSlice<T>,
    h_final: CudaSlice<f32>,
    /// The scan backward's ∂L/∂h_final (the chunked one runs without).
    dh_final: Option<CudaSlice<f32>>,
    dq: CudaSlice<T>,
    dk: CudaSlice<T>,
    dv: CudaSlice<T>,
    dlog_gate: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
}

/// Which backward a [`GradCase`] runs.
#[derive(Clone, Copy, Debug)]
enum Backward {
    /// The chunked backward, exact, complex or real gates, no dh_final; after
    /// the chunked forward when `forward` (fwd+bwd: with `saved`, the
    /// training pair `forward_saving_into` and `backward_saved_into`, the
    /// backward reading the forward's chunk states; else a plain forward
    /// and a backward that recomputes them); through the packed launches
    /// when `packed` (the B rows as B sequences:
    /// `chunk_grad::backward_rows_packed_into`, backward only).
    Chunked { forward: bool, gates: Gates, packed: bool, saved: bool },
    /// The fused scan backward, with dh_final = the host's random state.
    Scan,
    /// The recurrent backward, complex or real gates, no dh_final; after the
    /// recurrent forward when `forward` (fwd+bwd).
    Recurrent { forward: bool, gates: Gates },
}

impl Backward {
    fn chunked(forward: bool, gates: Gates) -> Self {
        Backward::Chunked { forward, gates, packed: false, saved: forward }
    }
    /// The gate kind of log_gate, h_final and dlog_gate.
    fn gates(self) -> Gates {
        match self {
            Backward::Chunked { gates, .. } | Backward::Recurrent { gates, .. } => gates,
            Backward::Scan => Gates::Complex,
        }
    }
}

struct GradCase<'g, T> {
    gpu: &'g Gpu,
    dims: Dims,
    backward: Backward,
    sets: Vec<GradSet<T>>,
}

/// A backward in element type `t`, no h0; dy is the random v reversed (a
/// `[B, L, H, V]` array of the same distribution, not equal to v).
fn prepare_grad<'g>(
    gpu: &'g Gpu,
    dims: Dims,
    t: Dtype,
    host: &HostInputs,
    sets: usize,
    backward: Backward,
) -> Result<Box<dyn BenchCase + 'g>, GpuError> {
    let fwd = matches!(backward, Backward::Chunked { forward: true, .. } | Backward::Recurrent { forward: true, .. });
    let parts = backward.gates().parts();
    let log_gate = host.log_gate_for(backward.gates());
    crate::with_element!(t, T => {
        let s = gpu.stream();
        let ws_len = match backward {
            Backward::Chunked { gates, packed: true, .. } => {
                chunk_grad::rows_packed_plan(&dims, T::DTYPE, gates, ChunkCarry::Auto)?.workspace_len
            }
            Backward::Chunked { gates, .. } => chunk_grad::plan(&dims, T::DTYPE, gates)?.workspace_len,
            Backward::Scan => super::scan_grad::plan_for(gpu, &dims, T::DTYPE)?.workspace_len,
            Backward::Recurrent { .. } => super::recurrent_grad::plan(&dims)?.workspace_len,
        };
        let (q, k, v) = (round_slice::<T>(&host.q), round_slice::<T>(&host.k), round_slice::<T>(&host.v));
        let dy: Vec<T> = v.iter().rev().copied().collect();
        let sets = (0..sets)
            .map(|_| {
                Ok(GradSet {
                    q: s.clone_htod(&q).doing("uploading q")?,
                    k: s.clone_htod(&k).doing("uploading k")?,
                    v: s.clone_htod(&v).doing("uploading v")?,
                    log_gate: s.clone_htod(&log_gate).doing("uploading log_gate")?,
                    dy: s.clone_htod(&dy).doing("uploading dy")?,
                    y: s.alloc_zeros::<T>(if fwd { dims.v_len() } else { 1 }).doing("allocating y")?,
                    h_final: s.alloc_zeros::<f32>(if fwd { parts * dims.state_len() } else { 1 }).doing("allocating h_final")?,
                    dh_final: matches!(backward, Backward::Scan)
                        .then(|| s.clone_htod(&host.state))
                        .transpose()
                        .doing("uploading dh_final")?,
                    dq: s.clone_htod(&vec![T::nan(); dims.qk_len()]).doing("allocating dq")?,
                    dk: s.clone_htod(&vec![T::nan(); dims.qk_len()]).doing("allocating dk")?,
                    dv: s.clone_htod(&vec![T::nan(); dims.v_len()]).doing("allocating dv")?,
                    dlog_gate: s.clone_htod(&vec![f32::NAN; parts * dims.gate_len()]).doing("allocating dlog_gate")?,
                    // At least one element: a zero-sized allocation is not a
                    // buffer (the scan's plan may need no workspace).
                    workspace: s.alloc_zeros::<f32>(ws_len.max(1)).doing("allocating the workspace")?,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(Box::new(GradCase::<T> { gpu, dims, backward, sets }) as Box<dyn BenchCase + 'g>)
    })
}

impl<T: Element> GradSet<T> {
    /// A call's arguments from this set: the inputs twice (a forward and
    /// its backward each take theirs), the forward's outputs, the upstream
    /// gradients, the gradients and the workspace, each field borrowed once.
    fn args(&mut self) -> GradArgs<'_, T> {
        let inputs = || DeviceInputs { q: &self.q, k: &self.k, v: &self.v, log_gate: &self.log_gate, h0: None };
        GradArgs {
            forward_inputs: inputs(),
            inputs: inputs(),
            out: DeviceOutputs { y: &mut self.y, h_final: &mut self.h_final },
            grad_in: chunk_grad::DeviceGradInputs { dy: &self.dy, dh_final: self.dh_final.as_ref().map(|h| h as _) },
            grads: chunk_grad::DeviceGrads {
                dq: &mut self.dq,
                dk: &mut self.dk,
                dv: &mut self.dv,
                dlog_gate: &mut self.dlog_gate,
                dh0: None,
            },
            workspace: &mut self.workspace,
        }
    }
}

/// [`GradSet::args`].
struct GradArgs<'a, T> {
    forward_inputs: DeviceInputs<'a, T>,
    inputs: DeviceInputs<'a, T>,
    out: DeviceOutputs<'a, T>,
    grad_in: chunk_grad::DeviceGradInputs<'a, T>,
    grads: chunk_grad::DeviceGrads<'a, T>,
    workspace: &'a mut CudaSlice<f32>,
}

impl<T: Element> BenchCase for GradCase<'_, T> {
    fn launch(&mut self, set: usize) -> Result<(), GpuError> {
        let GradArgs { forward_inputs, inputs, out, grad_in, grads, workspace: ws } = self.sets[set].args();
        let s = self.gpu.stream();
        let (gpu, d) = (self.gpu, &self.dims);
        let exact = ChunkPrecision::Exact;
        match self.backward {
            Backward::Recurrent { forward: true, gates } => {
                recurrent::forward_into_gates(gpu, s, d, RecurrentConfig::default(), gates, forward_inputs, out)?;
            }
            Backward::Chunked { forward: true, gates, saved: true, .. } => {
                let saved = chunk_grad::forward_saving_into(gpu, s, d, gates, forward_inputs, out, ws, exact)?;
                return chunk_grad::backward_saved_into(gpu, s, d, inputs, grad_in, grads, saved);
            }
            Backward::Chunked { forward: true, gates, saved: false, .. } => {
                // The forward's workspace is a prefix of the backward's.
                let w = Some(&mut *ws as _);
                match gates {
                    Gates::Complex => chunk::forward_into(gpu, s, d, forward_inputs, out, w, exact)?,
                    Gates::Real => chunk::forward_real_into(gpu, s, d, forward_inputs, out, w, exact)?,
                }
            }
            _ => {}
        }
        match self.backward {
            Backward::Chunked { gates, packed: true, .. } => {
                let config = ChunkConfig::from(exact);
                chunk_grad::backward_rows_packed_into(gpu, s, d, inputs, grad_in, grads, Some(ws), config, gates)
            }
            Backward::Chunked { gates: Gates::Complex, .. } => {
                chunk_grad::backward_into(gpu, s, d, inputs, grad_in, grads, Some(ws), exact)
            }
            Backward::Chunked { gates: Gates::Real, .. } => {
                chunk_grad::backward_real_into(gpu, s, d, inputs, grad_in, grads, Some(ws), exact)
            }
            Backward::Scan => super::scan_grad::backward_into(gpu, s, d, inputs, grad_in, grads, Some(ws)),
            Backward::Recurrent { gates: Gates::Complex, .. } => {
                super::recurrent_grad::backward_into(gpu, s, d, inputs, grad_in, grads, ws)
            }
            Backward::Recurrent { gates: Gates::Real, .. } => {
                super::recurrent_grad::backward_real_into(gpu, s, d, inputs, grad_in, grads, ws)
            }
        }
    }

    fn outputs_finite(&mut self) -> Result<bool, GpuError> {
        let s = self.gpu.stream();
        let st = &self.sets[0];
        let dq = s.clone_dtoh(&st.dq).doing("downloading dq")?;
        let dk = s.clone_dtoh(&st.dk).doing("downloading dk")?;
        let dv = s.clone_dtoh(&st.dv).doing("downloading dv")?;
        let dg = s.clone_dtoh(&st.dlog_gate).doing("downloading dlog_gate")?;
        s.synchronize().doing("synchronizing")?;
        let finite = |x: &[T]| x.iter().all(|x| x.to_f32().is_finite());
        Ok(finite(&dq) && finite(&dk) && finite(&dv) && dg.iter().all(|x| x.is_finite()))
    }
}

/// What the device offers, read off it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name, as the driver reports it.
    pub name: String,
    /// Compute capability, (major, minor).
    pub capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: usize,
    /// L2 cache size, bytes.
    pub l2_bytes: usize,
    /// Maximum SM clock (kHz), 0 if the driver did not say.
    pub clock_khz: usize,
    /// Device memory, bytes: all of it, not what is free.
    pub total_memory: usize,
}

impl DeviceInfo {
    /// Reads these off `gpu`'s device. A failed query is an error, except the
    /// clock's, which leaves `clock_khz` 0.
    pub fn query(gpu: &Gpu) -> Result<Self, GpuError> {
        let ctx = gpu.context();
        let attr = |a: CUdevice_attribute, what: &'static str| -> Result<usize, GpuError> {
            Ok(ctx.attribute(a).doing(what)?.max(0) as usize)
        };
        Ok(DeviceInfo {
            name: gpu.name(),
            capability: gpu.compute_capability(),
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "querying the SM count")?,
            l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "querying the L2 size")?,
            clock_khz: ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
                .map_or(0, |c| c.max(0) as usize),
            total_memory: ctx.total_mem().doing("querying the memory size")?,
        })
    }

    /// FP32 lanes per SM of a compute capability (CUDA programming guide's
    /// throughput table): 64 on 7.x and 8.0, 128 on 8.6–8.9, 9.0 (Hopper) and
    /// newer; `None` before 7.0.
    pub fn fp32_lanes_per_sm(capability: (i32, i32)) -> Option<usize> {
        match capability {
            (7, _) | (8, 0) => Some(64),
            (8, _) | (9.., _) => Some(128),
            _ => None,
        }
    }

    /// FP32 (non-tensor) peak in GFLOP/s and how it was computed.
    pub fn fp32_peak(&self) -> (f64, String) {
        match Self::fp32_lanes_per_sm(self.capability) {
            Some(lanes) if self.clock_khz > 0 && self.sm_count > 0 => {
                let gflops = (self.sm_count * lanes * 2) as f64 * self.clock_khz as f64 * 1e-6;
                let basis = format!(
                    "{} SMs x {lanes} FP32 lanes x 2 (FMA) x {} MHz (max SM clock)",
                    self.sm_count,
                    self.clock_khz / 1000
                );
                (gflops, basis)
            }
            _ => (67_000.0, "unknown device: the H200 datasheet's 67 TFLOP/s assumed".to_string()),
        }
    }
}

/// The two ceilings the floors are computed from.
#[derive(Clone, Debug)]
pub struct Ceilings {
    /// Measured device-to-device copy: (bytes read + bytes written) / time.
    pub copy_gbs: f64,
    /// Bytes of each of the two copy buffers.
    pub copy_bytes: usize,
    /// FP32 (non-tensor) peak, GFLOP/s ([`DeviceInfo::fp32_peak`]).
    pub peak_gflops: f64,
    /// How `peak_gflops` was obtained: the product it is, or, for a device
    /// whose lanes or clock are unknown, that the H200's datasheet figure was
    /// assumed.
    pub peak_basis: String,
}

/// Times `runs` launches of `f(i)` (after `warmup` untimed ones, i counting
/// on through both) on `stream` with a pair of events each; milliseconds, in
/// launch order.
pub fn time_launches(
    stream: &Arc<CudaStream>,
    warmup: usize,
    runs: usize,
    f: impl FnMut(usize) -> Result<(), GpuError>,
) -> Result<Vec<f64>, GpuError> {
    Ok(time_phased(stream, warmup, runs, f)?.0)
}

/// [`time_launches`], and the time of each kernel launch of `f` (the
/// crate's launchers record an event after each: [`phases`]): one phase for
/// a one-launch row (its geometry is still worth printing), None when `f`
/// launches no kernel, or not the same ones every run. A run's
/// end is the event recorded after its last launch (a run without launches,
/// the copy, records its own), so a one-launch run adds no event.
pub fn time_phased(
    stream: &Arc<CudaStream>,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut(usize) -> Result<(), GpuError>,
) -> Result<(Vec<f64>, Option<Vec<Phase>>), GpuError> {
    for i in 0..warmup {
        f(i)?;
    }
    stream.synchronize().doing("synchronizing after the warm-up")?;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = stream.record_event(timing).doing("recording an event")?;
        let (ran, launches) = phases::recorded(|| f(warmup + i));
        ran?;
        let end =
            if launches.is_empty() { Some(stream.record_event(timing).doing("recording an event")?) } else { None };
        events.push((start, launches, end));
    }
    let ms = |a: &CudaEvent, b: &CudaEvent| a.elapsed_ms(b).map(f64::from).doing("reading an event time");
    let mut times = Vec::with_capacity(runs);
    let mut per_run = Vec::with_capacity(runs);
    for (start, launches, end) in &events {
        let last = end.as_ref().or(launches.last().map(|l| &l.event)).expect("an end event or a launch's");
        times.push(ms(start, last)?);
        let mut before = start;
        let mut run = Vec::with_capacity(launches.len());
        for l in launches {
            run.push((l.kernel, ms(before, &l.event)?));
            before = &l.event;
        }
        per_run.push(run);
    }
    // Each phase's geometry from the first run's launches (phase_medians
    // checked that every run made the same ones), asked after the timing.
    let phases = phase_medians(&per_run).map(|mut phases| {
        if let Some((_, launches, _)) = events.first() {
            for (phase, launch) in phases.iter_mut().zip(launches) {
                phase.geometry = Some(Geometry::of(launch));
            }
        }
        phases
    });
    Ok((times, phases))
}

/// Median of `xs` (sorted copy; the mean of the middle two for even lengths).
pub fn median(xs: &[f64]) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Device-to-device copy bandwidth (GB/s, bytes read + bytes written) of a
/// `bytes`-byte buffer filled with random data: median of `runs` copies.
pub fn measure_copy_bandwidth(gpu: &Gpu, bytes: usize, runs: usize) -> Result<f64, GpuError> {
    let s = gpu.stream();
    let n = bytes / 4;
    let chunk: Vec<f32> = {
        let mut c = vec![0f32; n.clamp(1, 1 << 24)];
        fill(&mut c, 0xc0ffee, |rng, _| rng.random::<f32>());
        c
    };
    let mut src = s.alloc_zeros::<f32>(n).doing("allocating the copy source")?;
    let mut dst = s.alloc_zeros::<f32>(n).doing("allocating the copy destination")?;
    let mut off = 0;
    while off < n {
        let len = chunk.len().min(n - off);
        let mut view = src.slice_mut(off..off + len);
        s.memcpy_htod(&chunk[..len], &mut view).doing("filling the copy source")?;
        off += len;
    }
    let times = time_launches(s, 3, runs, |_| s.memcpy_dtod(&src, &mut dst).doing("copying device to device"))?;
    let ms = median(&times);
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Kernel names (empty: all of the registry).
    pub kernels: Vec<String>,
    /// Element types (empty: each kernel's).
    pub dtypes: Vec<Dtype>,
    /// Shapes (empty: each kernel's defaults).
    pub shapes: Vec<Dims>,
    /// Timed launches per case (the median is reported).
    pub runs: usize,
    /// Untimed launches first.
    pub warmup: usize,
    /// Seed of the random host inputs ([`HostInputs::random`]), the same for
    /// every shape.
    pub seed: u64,
    /// Seconds after which no further case is started (the ones left are
    /// listed in `Report::not_run`); None: no limit.
    pub time_budget_s: Option<f64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            kernels: Vec::new(),
            dtypes: Vec::new(),
            shapes: Vec::new(),
            runs: 30,
            warmup: 5,
            seed: 0,
            time_budget_s: None,
        }
    }
}

/// The measurement of one (kernel, dtype, shape).
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// The registry entry's name.
    pub kernel: &'static str,
    /// The element type it ran in.
    pub dtype: Dtype,
    /// The problem shape.
    pub dims: Dims,
    /// Buffer sets the launches rotated through ([`sets_for`]).
    pub sets: usize,
    /// The time of each timed call (all of its launches), ms, in order.
    pub times_ms: Vec<f64>,
    /// Median of `times_ms`, ms.
    pub median_ms: f64,
    /// Fastest of `times_ms`, ms.
    pub min_ms: f64,
    /// Slowest of `times_ms`, ms.
    pub max_ms: f64,
    /// One call's minimum bytes, flops and traffic as written (the entry's
    /// `cost`).
    pub cost: Cost,
    /// cost.bytes / median time.
    pub gbs: f64,
    /// cost.flops / median time.
    pub gflops: f64,
    /// cost.bytes / measured copy bandwidth.
    pub floor_mem_ms: f64,
    /// cost.flops / FP32 peak.
    pub floor_flops_ms: f64,
    /// cost.traffic / measured copy bandwidth: the memory floor of the
    /// launches as written.
    pub floor_traffic_ms: f64,
    /// Every output element of set 0 finite after the runs.
    pub outputs_finite: bool,
    /// Each kernel launch's median time, in launch order ([`time_phased`]):
    /// one for a one-launch row; empty when the row launched no kernel or
    /// not the same ones every run. Their sum is close to, not exactly,
    /// `median_ms` (medians of parts).
    pub phases: Vec<Phase>,
}

impl BenchResult {
    /// The larger floor.
    pub fn floor_ms(&self) -> f64 {
        self.floor_mem_ms.max(self.floor_flops_ms)
    }
    /// "memory" or "fp32": which floor is larger.
    pub fn bound(&self) -> &'static str {
        if self.floor_mem_ms >= self.floor_flops_ms { "memory" } else { "fp32" }
    }
    /// floor / measured: 1.0 is at the roofline.
    pub fn of_floor(&self) -> f64 {
        self.floor_ms() / self.median_ms
    }
}

/// A case that could not be measured.
#[derive(Clone, Debug)]
pub struct BenchFailure {
    /// The registry entry's name.
    pub kernel: &'static str,
    /// The element type.
    pub dtype: Dtype,
    /// The problem shape.
    pub dims: Dims,
    /// The message of the error that stopped it: in preparing the sets,
    /// launching and timing, or reading the outputs back.
    pub error: String,
}

/// Everything one `gateloop bench` measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The device measured on.
    pub device: DeviceInfo,
    /// The copy bandwidth and FP32 peak the floors were computed from.
    pub ceilings: Ceilings,
    /// The options of the run, as given (a `warmup` of 0 still ran one
    /// warm-up launch).
    pub options: BenchOptions,
    /// One per measured (kernel, dtype, shape), in the order run.
    pub results: Vec<BenchResult>,
    /// The cases that could not be measured, in the order run.
    pub failures: Vec<BenchFailure>,
    /// Cases not started because `time_budget_s` was spent.
    pub not_run: Vec<(&'static str, Dtype, Dims)>,
}

/// `"8,4096,16,64,64"` (per-channel gate) or `"8,4096,16,64,64,head"`.
pub fn parse_shape(spec: &str) -> Result<Dims, BenchError> {
    let bad = |why: String| BenchError::BadShape { spec: spec.to_string(), why };
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let (nums, gate) = match parts.len() {
        5 => (&parts[..], GateLayout::PerChannel),
        6 => match parts[5] {
            "head" => (&parts[..5], GateLayout::PerHead),
            "channel" => (&parts[..5], GateLayout::PerChannel),
            other => return Err(bad(format!("the gate is `{other}`, not `head` or `channel`"))),
        },
        n => return Err(bad(format!("{n} fields"))),
    };
    let mut v = [0usize; 5];
    for (slot, s) in v.iter_mut().zip(nums) {
        *slot = s.parse().map_err(|_| bad(format!("`{s}` is not a size")))?;
    }
    let d = Dims::new(v[0], v[1], v[2], v[3], v[4]).with_gate(gate);
    d.validate()?;
    Ok(d)
}

/// How many sets make the working set at least [`ROTATE_L2_MULTIPLE`] × L2,
/// within [`MIN_SETS`]..=[`MAX_SETS`] and `budget` bytes (at least 1 set).
pub fn sets_for(bytes_per_set: f64, l2_bytes: usize, budget: usize) -> usize {
    let want = ((ROTATE_L2_MULTIPLE * l2_bytes) as f64 / bytes_per_set.max(1.0)).ceil() as usize;
    let fit = (budget as f64 / bytes_per_set.max(1.0)).floor() as usize;
    want.clamp(MIN_SETS, MAX_SETS).min(fit).max(1)
}

/// The entries a run measures: those named, or with no name every kernel a
/// user calls (the tuning entries only when named).
fn selected<'a>(all: &'a [KernelEntry], names: &[String]) -> Vec<&'a KernelEntry> {
    all.iter().filter(|e| if names.is_empty() { !e.tuning } else { names.iter().any(|n| n == e.name) }).collect()
}

/// Measures the ceilings, then every selected (kernel, shape, dtype).
/// `progress` receives one line per step (for a log). A case that fails (out
/// of memory, say) is recorded in `failures` and the run goes on.
pub fn run(gpu: &Gpu, opts: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<Report, BenchError> {
    if opts.runs < 1 {
        return Err(BenchError::TooFew { what: "--runs", min: 1, value: opts.runs });
    }
    let all = registry();
    for name in &opts.kernels {
        if !all.iter().any(|e| e.name == name) {
            let available = all.iter().map(|e| e.name).collect::<Vec<_>>().join(", ");
            return Err(BenchError::UnknownKernel { name: name.clone(), available });
        }
    }
    let entries = selected(&all, &opts.kernels);
    let names = |ts: &[Dtype]| ts.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
    for e in &entries {
        // `--dtype` filters each kernel's dtypes (the fragment kernels have
        // no f32, say); a kernel named with `--kernel` that keeps none is an error.
        if !opts.kernels.is_empty() && !opts.dtypes.is_empty() && !opts.dtypes.iter().any(|t| e.dtypes.contains(t)) {
            return Err(BenchError::UnsupportedDtype {
                kernel: e.name,
                asked: names(&opts.dtypes),
                has: names(e.dtypes),
            });
        }
        for d in &opts.shapes {
            (e.check)(d)?;
        }
    }

    let device = DeviceInfo::query(gpu)?;
    progress(&format!("measuring device-to-device copy bandwidth ({} MiB buffers)", COPY_BYTES >> 20));
    let copy_gbs = measure_copy_bandwidth(gpu, COPY_BYTES, opts.runs.max(20))?;
    let (peak_gflops, peak_basis) = device.fp32_peak();
    let ceilings = Ceilings { copy_gbs, copy_bytes: COPY_BYTES, peak_gflops, peak_basis };
    let (free, _) = gpu.context().mem_get_info().doing("querying free memory")?;
    let budget = (free / 2).min(24 << 30);

    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut not_run = Vec::new();
    let t0 = std::time::Instant::now();
    let spent = || opts.time_budget_s.is_some_and(|b| t0.elapsed().as_secs_f64() >= b);
    for e in entries {
        let shapes = if opts.shapes.is_empty() { (e.shapes)() } else { opts.shapes.clone() };
        let dtypes: Vec<Dtype> = if opts.dtypes.is_empty() {
            e.dtypes.to_vec()
        } else {
            let (kept, dropped): (Vec<Dtype>, Vec<Dtype>) = opts.dtypes.iter().partition(|t| e.dtypes.contains(t));
            if !dropped.is_empty() {
                progress(&format!("{}: no {} variant, not run in it", e.name, names(&dropped)));
            }
            kept
        };
        if dtypes.is_empty() {
            continue;
        }
        for dims in shapes {
            if spent() {
                not_run.extend(dtypes.iter().map(|&t| (e.name, t, dims)));
                continue;
            }
            let host = HostInputs::random(dims, opts.seed);
            for &dtype in &dtypes {
                if spent() {
                    not_run.push((e.name, dtype, dims));
                    continue;
                }
                let cost = (e.cost)(&dims, dtype);
                let sets = sets_for(cost.bytes, device.l2_bytes, budget);
                progress(&format!("{} {dtype} {}: {sets} sets", e.name, shape_str(&dims)));
                let measured = (|| -> Result<BenchResult, GpuError> {
                    let mut case = (e.prepare)(gpu, dims, dtype, &host, sets)?;
                    let (times, phases) =
                        time_phased(gpu.stream(), opts.warmup.max(1), opts.runs, |i| case.launch(i % sets))?;
                    let outputs_finite = case.outputs_finite()?;
                    let median_ms = median(&times);
                    let secs = median_ms * 1e-3;
                    Ok(BenchResult {
                        kernel: e.name,
                        dtype,
                        dims,
                        sets,
                        min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
                        max_ms: times.iter().copied().fold(0.0, f64::max),
                        times_ms: times,
                        median_ms,
                        cost,
                        gbs: cost.bytes / secs / 1e9,
                        gflops: cost.flops / secs / 1e9,
                        floor_mem_ms: cost.bytes / (ceilings.copy_gbs * 1e9) * 1e3,
                        floor_flops_ms: cost.flops / (ceilings.peak_gflops * 1e9) * 1e3,
                        floor_traffic_ms: cost.traffic / (ceilings.copy_gbs * 1e9) * 1e3,
                        outputs_finite,
                        phases: phases.unwrap_or_default(),
                    })
                })();
                match measured {
                    Ok(r) => results.push(r),
                    Err(err) => {
                        progress(&format!("  FAILED: {err}"));
                        failures.push(BenchFailure { kernel: e.name, dtype, dims, error: err.to_string() });
                    }
                }
            }
        }
    }
    if !not_run.is_empty() {
        progress(&format!(
            "time budget of {:.0} s spent: {} cases not run",
            opts.time_budget_s.unwrap_or(0.0),
            not_run.len()
        ));
    }
    Ok(Report { device, ceilings, options: opts.clone(), results, failures, not_run })
}

/// `B=8 L=4096 H=16 K=64 V=64 channel`
pub fn shape_str(d: &Dims) -> String {
    let gate = match d.gate {
        GateLayout::PerChannel => "channel",
        GateLayout::PerHead => "head",
    };
    format!("B={} L={} H={} K={} V={} {gate}", d.batch, d.len, d.heads, d.key_dim, d.value_dim)
}

/// `512x256, 53376 B smem, 4/SM, 0.970 waves`: a launch's grid and block,
/// its dynamic shared memory, the blocks one SM holds (the driver's
/// occupancy calculator; `?/SM` when it did not say) and how many rounds of
/// `sm_count` SMs the grid takes.
pub fn geometry_str(g: &Geometry, sm_count: usize) -> String {
    let resident = g.resident_per_sm.map_or("?".to_string(), |n| n.to_string());
    let waves = g.waves(sm_count).map_or(String::new(), |w| format!(", {w:.3} waves"));
    format!("{}x{}, {} B smem, {resident}/SM{waves}", g.blocks, g.block_threads, g.shared_bytes)
}

impl Report {
    /// The human-readable report: a header with the device and ceilings, one
    /// row per (kernel, dtype, shape), then the failures.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let d = &self.device;
        let c = &self.ceilings;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "device: {} (sm_{}{}, {} SMs, L2 {:.1} MiB, {:.1} GiB)",
            d.name,
            d.capability.0,
            d.capability.1,
            d.sm_count,
            d.l2_bytes as f64 / (1 << 20) as f64,
            d.total_memory as f64 / (1u64 << 30) as f64
        );
        let _ = writeln!(
            s,
            "ceilings: copy {:.0} GB/s measured ({} MiB device-to-device, read + write); fp32 {:.1} TFLOP/s = {}",
            c.copy_gbs,
            c.copy_bytes >> 20,
            c.peak_gflops / 1e3,
            c.peak_basis
        );
        let _ = writeln!(s, "reference: {H200_DATASHEET}");
        let _ = writeln!(
            s,
            "floor_mem: the fewest bytes / copy bandwidth; traffic_mem: the bytes the launches move as written \
             (workspace round trips, re-reads by several launches) / copy bandwidth"
        );
        let _ = writeln!(
            s,
            "timing: median of {} launches after {} warm-up, CUDA events, inputs rotated over `sets` buffer sets (>= {} x L2)",
            self.options.runs,
            self.options.warmup.max(1),
            ROTATE_L2_MULTIPLE
        );
        let _ = writeln!(
            s,
            "{:<17} {:<5} {:>4} {:>6} {:>3} {:>4} {:>4} {:<7} {:>4} {:>10} {:>10} {:>8} {:>9} {:>10} {:>10} {:<6} {:>8} {:>11} check",
            "kernel",
            "dtype",
            "B",
            "L",
            "H",
            "K",
            "V",
            "gate",
            "sets",
            "median_ms",
            "min_ms",
            "GB/s",
            "GFLOP/s",
            "floor_mem",
            "floor_fp32",
            "bound",
            "of_floor",
            "traffic_mem"
        );
        for r in &self.results {
            let g = &r.dims;
            let gate = if g.gate == GateLayout::PerHead { "head" } else { "channel" };
            let _ = writeln!(
                s,
                "{:<17} {:<5} {:>4} {:>6} {:>3} {:>4} {:>4} {:<7} {:>4} {:>10.4} {:>10.4} {:>8.0} {:>9.0} {:>10.4} {:>10.4} {:<6} {:>8.3} {:>11.4} {}",
                r.kernel,
                r.dtype.name(),
                g.batch,
                g.len,
                g.heads,
                g.key_dim,
                g.value_dim,
                gate,
                r.sets,
                r.median_ms,
                r.min_ms,
                r.gbs,
                r.gflops,
                r.floor_mem_ms,
                r.floor_flops_ms,
                r.bound(),
                r.of_floor(),
                r.floor_traffic_ms,
                if r.outputs_finite { "ok" } else { "NONFINITE" }
            );
            if !r.phases.is_empty() {
                let parts: Vec<String> = r
                    .phases
                    .iter()
                    .map(|p| {
                        let name = p.kernel.trim_start_matches("gateloop_");
                        match &p.geometry {
                            Some(g) => format!("{name} {:.4} [{}]", p.median_ms, geometry_str(g, d.sm_count)),
                            None => format!("{name} {:.4}", p.median_ms),
                        }
                    })
                    .collect();
                let _ = writeln!(s, "    launches (median ms): {}", parts.join(" + "));
            }
        }
        for f in &self.failures {
            let _ = writeln!(s, "FAILED {} {} {}: {}", f.kernel, f.dtype, shape_str(&f.dims), f.error);
        }
        for (kernel, dtype, d) in &self.not_run {
            let _ = writeln!(s, "NOT RUN (--time-budget spent) {kernel} {dtype} {}", shape_str(d));
        }
        s
    }

    /// The JSON written by `gateloop bench --json`.
    pub fn to_json(&self) -> Value {
        let d = &self.device;
        let c = &self.ceilings;
        let dims = |g: &Dims| {
            json!({
                "batch": g.batch, "len": g.len, "heads": g.heads, "key_dim": g.key_dim, "value_dim": g.value_dim,
                "gate": if g.gate == GateLayout::PerHead { "head" } else { "channel" },
            })
        };
        json!({
            "schema": "gateloop-bench/1",
            "gpu": true,
            "device": {
                "name": d.name,
                "compute_capability": format!("{}.{}", d.capability.0, d.capability.1),
                "sm_count": d.sm_count,
                "l2_bytes": d.l2_bytes,
                "max_sm_clock_khz": d.clock_khz,
                "total_memory_bytes": d.total_memory,
            },
            "ceilings": {
                "copy_gb_per_s_measured": c.copy_gbs,
                "copy_buffer_bytes": c.copy_bytes,
                "fp32_peak_gflop_per_s": c.peak_gflops,
                "fp32_peak_basis": c.peak_basis,
                "reference": H200_DATASHEET,
            },
            "options": {
                "runs": self.options.runs,
                "warmup": self.options.warmup.max(1),
                "seed": self.options.seed,
                "time_budget_s": self.options.time_budget_s,
                "rotate_l2_multiple": ROTATE_L2_MULTIPLE,
            },
            "results": self.results.iter().map(|r| json!({
                "kernel": r.kernel,
                "dtype": r.dtype.name(),
                "shape": dims(&r.dims),
                "sets": r.sets,
                "median_ms": r.median_ms,
                "min_ms": r.min_ms,
                "max_ms": r.max_ms,
                "times_ms": r.times_ms,
                "bytes": r.cost.bytes,
                "flops": r.cost.flops,
                "gb_per_s": r.gbs,
                "gflop_per_s": r.gflops,
                "floor_mem_ms": r.floor_mem_ms,
                "floor_fp32_ms": r.floor_flops_ms,
                "traffic_bytes": r.cost.traffic,
                "floor_traffic_ms": r.floor_traffic_ms,
                "floor_ms": r.floor_ms(),
                "bound": r.bound(),
                "of_floor": r.of_floor(),
                "outputs_finite": r.outputs_finite,
                "phases": r.phases.iter().map(|p| {
                    let mut phase = json!({ "kernel": p.kernel, "median_ms": p.median_ms });
                    if let Some(g) = &p.geometry {
                        phase["blocks"] = json!(g.blocks);
                        phase["block_threads"] = json!(g.block_threads);
                        phase["shared_bytes"] = json!(g.shared_bytes);
                        phase["resident_per_sm"] = json!(g.resident_per_sm);
                        phase["waves"] = json!(g.waves(d.sm_count));
                    }
                    phase
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "failures": self.failures.iter().map(|f| json!({
                "kernel": f.kernel, "dtype": f.dtype.name(), "shape": dims(&f.dims), "error": f.error,
            })).collect::<Vec<_>>(),
            "not_run": self.not_run.iter().map(|(kernel, dtype, d)| json!({
                "kernel": kernel, "dtype": dtype.name(), "shape": dims(d), "why": "--time-budget spent",
            })).collect::<Vec<_>>(),
        })
    }
}

/// The JSON written when there is no GPU to benchmark on.
pub fn skipped_json(reason: &str) -> Value {
    json!({ "schema": "gateloop-bench/1", "gpu": false, "skipped": reason, "results": [] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        let d = parse_shape("8,4096,16,64,64").unwrap();
        assert_eq!(d, Dims::new(8, 4096, 16, 64, 64));
        let d = parse_shape("1, 2, 3, 4, 5, head").unwrap();
        assert_eq!(d.gate, GateLayout::PerHead);
        assert!(matches!(parse_shape("1,2,3"), Err(BenchError::BadShape { .. })));
        assert!(matches!(parse_shape("1,2,3,4,x"), Err(BenchError::BadShape { .. })));
        assert!(matches!(parse_shape("1,2,3,4,5,row"), Err(BenchError::BadShape { .. })));
        assert!(matches!(parse_shape("1,0,3,4,5"), Err(BenchError::Input(InputError::ZeroDim { name: "len" }))));
    }

    #[test]
    fn tuning_entries_run_only_when_named() {
        let all = registry();
        let default: Vec<_> = selected(&all, &[]).iter().map(|e| e.name).collect();
        assert!(default.contains(&"chunked") && default.contains(&"chunked-separate"));
        assert!(!default.contains(&"chunked-sequential"));
        assert_eq!(default.len(), all.len() - all.iter().filter(|e| e.tuning).count());
        let named: Vec<_> = selected(&all, &["chunked-sequential".into()]).iter().map(|e| e.name).collect();
        assert_eq!(named, ["chunked-sequential"]);
        // The sweep's sequential grids: 32 to 528 blocks, the work equal within 0.1%.
        let grids: Vec<u32> = carry_sweep_shapes()
            .iter()
            .map(|d| chunk::plan_with(d, Dtype::Bf16, Gates::Complex, ChunkCarry::Auto).unwrap().sequential_grid)
            .collect();
        assert_eq!(grids, [32, 64, 132, 264, 528]);
        for d in carry_sweep_shapes() {
            let work = (d.batch * d.heads * d.len) as f64;
            assert!((work / (1u64 << 19) as f64 - 1.0).abs() < 1e-3, "{d:?}");
        }
    }

    #[test]
    fn registry_is_consistent() {
        let r = registry();
        let mut names: Vec<_> = r.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), r.len(), "kernel names are unique");
        for e in &r {
            assert!(!e.dtypes.is_empty());
            for d in (e.shapes)() {
                (e.check)(&d).unwrap_or_else(|err| panic!("{}: default shape {d:?}: {err}", e.name));
                for &t in e.dtypes {
                    let c = (e.cost)(&d, t);
                    assert!(c.bytes > 0.0 && c.flops > 0.0);
                }
            }
        }
        // the shapes the issue asks for
        let shapes = (r[0].shapes)();
        assert!(shapes.contains(&Dims::new(8, 4096, 16, 64, 64)));
        assert!(shapes.contains(&Dims::new(1, 65536, 4, 64, 64)));
    }

    #[test]
    fn recurrent_cost_counts() {
        let d = Dims::new(8, 4096, 16, 64, 64);
        let c = recurrent_cost(&d, Dtype::F32, false, Gates::Complex);
        let n = (8 * 4096 * 16 * 64) as f64;
        // q, k, v, y in f32, the gate complex f32, h_final written
        assert_eq!(c.bytes, 4.0 * 4.0 * n + 8.0 * n + 8.0 * (8 * 16 * 64 * 64) as f64);
        assert_eq!(c.flops, 10.0 * n * 64.0);
        let h = recurrent_cost(&d, Dtype::Bf16, true, Gates::Complex);
        assert_eq!(h.bytes, 2.0 * 4.0 * n + 8.0 * n + 16.0 * (8 * 16 * 64 * 64) as f64);
        // Real gates: the gate and h_final in f32, half the flops.
        let r = recurrent_cost(&d, Dtype::Bf16, false, Gates::Real);
        assert_eq!(r.bytes, 2.0 * 4.0 * n + 4.0 * n + 4.0 * (8 * 16 * 64 * 64) as f64);
        assert_eq!(r.flops, 5.0 * n * 64.0);
    }

    /// Attention and the recurrent backward move their own element type's
    /// bytes (attention's were counted in f32 for every dtype), and the
    /// recurrent backward's rows pass no dh_final.
    #[test]
    fn attention_and_recurrent_grad_bytes_follow_the_rows() {
        let d = Dims::new(8, 4096, 16, 64, 64);
        for t in Dtype::ALL {
            assert_eq!(attention_cost(&d, t).bytes, recurrent_cost(&d, t, false, Gates::Complex).bytes, "{t:?}");
            let dh_final = 8.0 * d.state_len() as f64;
            assert_eq!(recurrent_grad_cost(&d, t).bytes, scan_grad_cost(&d, t).bytes - dh_final, "{t:?}");
        }
        assert!(attention_cost(&d, Dtype::Bf16).bytes < attention_cost(&d, Dtype::F32).bytes);
    }

    #[test]
    fn chunked_cost_counts() {
        let d = Dims::new(8, 4096, 16, 64, 64);
        let n = (8 * 4096 * 16 * 64) as f64;
        let state = (8 * 16 * 64 * 64) as f64;
        let c = chunked_cost(&d, Dtype::F32, Gates::Complex);
        // q, k, v, y in f32; gate complex f32 read, h_final complex f32 written
        assert_eq!(c.bytes, 4.0 * 4.0 * n + 8.0 * n + 8.0 * state);
        let steps = (8 * 4096 * 16) as f64;
        assert_eq!(c.flops, steps * (4.0 * 2.0 * 64.0 * 64.0 + 64.0 * (2.0 * 64.0 + 64.0)));
        let r = chunked_cost(&d, Dtype::Bf16, Gates::Real);
        assert_eq!(r.bytes, 2.0 * 4.0 * n + 4.0 * n + 4.0 * state);
        assert_eq!(r.flops, steps * (4.0 * 64.0 * 64.0 + 64.0 * (64.0 + 64.0)));
    }

    #[test]
    fn chunked_traffic_counts() {
        // The forward's (state, carry, output) bytes by hand for [B, L, H, K
        // = V] in bf16 with p parts (2 complex, 1 real): n elements of q (and
        // of k, v, y), ws = 4p bytes per chunk-state element; the state
        // launch reads k and log_gate per value tile of 64 (`vt`), the
        // output launch q, k and log_gate per block of its columns (`ot`).
        let by_hand = |[b, l, h, kv]: [usize; 4], p: usize, vt: f64, ot: f64| {
            let n = (b * l * h * kv) as f64;
            let ws = (4 * p * b * h * l.div_ceil(64) * kv * kv) as f64;
            let (decays, h_final) = ((4 * p * b * h * l.div_ceil(64) * kv) as f64, (4 * p * b * h * kv * kv) as f64);
            let (x, gate) = (2.0 * n, 4.0 * p as f64 * n);
            let state = vt * x + x + vt * gate + ws + decays;
            let carry = 2.0 * ws + decays + h_final;
            let output = 2.0 * ot * x + x + ot * gate + ws + x;
            (state, carry, output, h_final)
        };
        // B8 L4096 H16 K = V = 64, complex per-channel gates.
        let d = Dims::new(8, 4096, 16, 64, 64);
        let (state, carry, output, h_final) = by_hand([8, 4096, 16, 64], 2, 1.0, 1.0);
        let c = chunked_cost_with(&d, Dtype::Bf16, Gates::Complex, ChunkCarry::Separate);
        assert_eq!(c.traffic, state + carry + output);
        let ratio = c.traffic / c.bytes;
        assert!((3.74..3.76).contains(&ratio), "separate carry: forward traffic / minimum = {ratio}");
        // The sequential carry (automatic here for real gates only): U_c
        // stays on chip.
        let a = chunked_cost_with(&d, Dtype::Bf16, Gates::Complex, ChunkCarry::Sequential);
        assert_eq!(a.traffic, state + h_final + output);
        let ratio = a.traffic / a.bytes;
        assert!((2.74..2.76).contains(&ratio), "sequential carry: forward traffic / minimum = {ratio}");
        assert_eq!(chunked_cost(&d, Dtype::Bf16, Gates::Complex).traffic, c.traffic, "complex: the separate carry");
        // The single-pass kernels move their minimum.
        let r = recurrent_cost(&d, Dtype::Bf16, false, Gates::Complex);
        assert_eq!(r.traffic, r.bytes);
        let g = chunked_grad_cost(&d, Dtype::Bf16, Gates::Complex);
        assert!(g.traffic > g.bytes);
        // V = 128, real gates, the separate carry: two value tiles for the
        // state launch, one wide block's reads for the output launch.
        let d = Dims::new(4, 2048, 16, 128, 128);
        let (state, carry, output, _) = by_hand([4, 2048, 16, 128], 1, 2.0, 1.0);
        let c = chunked_cost_with(&d, Dtype::Bf16, Gates::Real, ChunkCarry::Separate);
        assert_eq!(c.traffic, state + carry + output);
    }

    #[test]
    fn sets_cover_l2() {
        let l2 = 50 << 20;
        assert_eq!(sets_for(805e6, l2, 24 << 30), MIN_SETS);
        let decode_state = 8.0 * 16.0 * 64.0 * 64.0 * 16.0;
        let n = sets_for(decode_state, l2, 24 << 30);
        assert!(n as f64 * decode_state >= (ROTATE_L2_MULTIPLE * l2) as f64 && n <= MAX_SETS);
        assert_eq!(sets_for(1e9, l2, 1 << 30), 1); // the budget wins
        assert_eq!(sets_for(1.0, l2, 24 << 30), MAX_SETS);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn peak_of_an_h200() {
        let d = DeviceInfo {
            name: "NVIDIA H200".into(),
            capability: (9, 0),
            sm_count: 132,
            l2_bytes: 50 << 20,
            clock_khz: 1_980_000,
            total_memory: 141 << 30,
        };
        let (gflops, basis) = d.fp32_peak();
        assert!((gflops - 66_908.16).abs() < 1.0, "{gflops}");
        assert!(basis.contains("132 SMs"));
        assert_eq!(DeviceInfo::fp32_lanes_per_sm((8, 0)), Some(64));
        assert_eq!(DeviceInfo::fp32_lanes_per_sm((8, 6)), Some(128));
        assert_eq!(DeviceInfo::fp32_lanes_per_sm((6, 1)), None);
    }

    #[test]
    fn host_inputs_are_random_and_in_domain() {
        let d = Dims::new(2, 3, 2, 4, 5);
        let h = HostInputs::random(d, 7);
        assert_eq!(h.q.len(), d.qk_len());
        assert_eq!(h.log_gate.len(), 2 * d.gate_len());
        assert_eq!(h.state.len(), 2 * d.state_len());
        assert!(h.q.iter().all(|x| x.abs() < 1.0) && h.q.iter().any(|&x| x != 0.0));
        assert!(h.log_gate.chunks(2).all(|g| g[0] <= 0.0 && g[0] >= -0.3 && g[1].abs() <= std::f32::consts::PI));
        assert_ne!(h.q, h.k);
        assert_eq!(HostInputs::random(d, 7).v, h.v);
    }
}
