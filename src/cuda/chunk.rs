//! The chunked mode on the GPU (`cuda/chunk.cu`), on tensor cores: surrogate
//! attention inside chunks of 64 steps, the recurrence between them. The CPU
//! mirror is [`crate::cpu::chunked`] with its default [`ChunkParams`]
//! (chunks of 64, anchored sub-chunks of 16): the same segmented chunk-local
//! log gates, reset rule, phase reduction, anchors and passes (see its module
//! doc for the algebra and the kernel file for the mapping).
//!
//! # Structure: three launches on one stream (two with the sequential carry)
//!
//! 1. `state`: one block per (b, h, chunk, 64 value columns): the chunk's own
//!    state `U_c = (K ⊙ E(last, ·))ᵀ V` (a tensor-core GEMM of inner
//!    dimension 64) and its decay `A_c`, into the workspace. Where V > 64
//!    with 16-bit inputs a block takes 128 value columns (`state_wide`),
//!    each key slab's gate prefix and `K ⊙ E` built once for both 64-column
//!    products ([`ChunkStateBlocks`] in [`ChunkConfig`]; the same bits).
//! 2. `carry`: one thread per (b, h, key row, value column), sequential over
//!    the chunks: `S ← diag(A_c) S + U_c` in f32, `U_c` overwritten by the
//!    state entering chunk c; writes `h_final`.
//! 3. `output`: one block per (b, h, chunk, value tile): the inter-chunk
//!    term `Re((Q ⊙ e^G) S_c)` (inner dimension 2K) and the intra-chunk term
//!    `P V` (off-diagonal 16 × 16 score blocks as anchored GEMMs of inner
//!    dimension 2K, diagonal blocks pairwise in f32), y written once. Where
//!    V > 64 a block takes 128 value columns (`output_wide`), so that each
//!    chunk's scores P, most of the launch's work, are formed once, not once
//!    per 64 columns.
//!
//! Or (1) and (2) as ONE launch ([`ChunkCarry::Sequential`]): one block per
//! (b, h, value tile, key slab of [`walk_slab`] channels: 16 complex, 32
//! real) walks the chunks in order with its slab of the state in shared memory, writing the same workspace and
//! h_final bit for bit (the emulated and GPU tests compare the carries to the
//! last bit); U_c never makes the round trip through the workspace, which is
//! half of the separate carry's workspace traffic, and k, v, log_gate are
//! read once. Where V > 64 (real gates, 16-bit inputs, sm_90) a walk block
//! takes 128 value columns, its gate prefix and keys built once for both
//! 64-column tiles ([`ChunkStateBlocks`] in [`ChunkConfig`]; the same bits).
//! [`ChunkCarry::Auto`] (what [`forward_into`] with a bare
//! [`ChunkPrecision`] uses) takes it for real gates and 16-bit inputs when
//! B·H·value tiles·⌈K / 16⌉ is at least [`SEQUENTIAL_MIN_BLOCKS`], i.e. when
//! the GPU is full without the chunks' parallelism (B8 L4096 H16 K = 64:
//! 512 slabs of 16, in 256 blocks of 32 channels), and never for complex
//! gates or f32: the rule measured on an H200 (see the constant).
//!
//! The output launch (3) has two kernels ([`ChunkOutput`] in
//! [`ChunkConfig`]): the staged one (WMMA tiles, every operand through
//! shared memory; the default, measured; in blocks of 128 value columns
//! where V > 64, or of 64 at every V with [`ChunkOutput::StagedNarrow`])
//! and, for f16 and bf16 inputs, one on mma.sync register fragments
//! (`cuda/chunk_frag.cuh`), which builds the operands each warp owns in its
//! registers and stages only the state slab and V; same bounds, not bit for
//! bit, and on an H200 (2026-12-04) 8% to 9% slower than the staged one (its
//! L1/shared pipe as busy, 88%).
//!
//! Why: (1) and (3) are parallel over every chunk (B·H = 1 at L = 65536 gives
//! 1024 blocks per value tile), and the only sequential work, (2), is K·V
//! numbers per chunk. Launch 3 recomputes the chunk's gate prefix rather
//! than storing Q̃ (O(64·K) work against 8·64·K bytes of traffic), so the
//! workspace holds only the chunk states and decays
//! ([`LaunchPlan::workspace_len`]) and y is rounded to its type exactly once.
//! Three launches in all (fla's chunked GLA forward uses more and writes
//! every chunk's state as well as a separate intra-chunk score tensor).
//!
//! # Precision
//!
//! f32 inputs use TF32 tensor-core operands (m16n16k8), f16 and bf16 inputs
//! operands of their own type (m16n16k16); accumulation is f32. With
//! [`ChunkPrecision::Exact`] (the default) every operand is split into
//! `hi + lo` in the operand type and each product is
//! `hi·hi + hi·lo + lo·hi` (3 tensor-core products: "3xTF32" for f32), which
//! keeps the f32 bounds of the other kernels (relative L2 ≤ 1e-4). With
//! [`ChunkPrecision::Fast`] one product `hi·hi` (the precision of fla's
//! kernels): about 1e-3 relative for f32 (TF32), 1e-2 for bf16. The f16
//! operands have f16's range: decayed q̃, k̃, the scores and the carried
//! state must stay below 65504 in magnitude (use bf16 or f32 otherwise).
//!
//! Subnormal inputs: q, k, v (and dy in the backward, h0 and dh_final as
//! they enter the carried state) are tensor-core operands, which the GPU
//! may read as 0 below f32's smallest normal 2⁻¹²⁶; a result that depends
//! on such an input alone is then 0 (`gateloop fuzz` judges these kernels
//! accordingly: [`crate::fuzz`], "Subnormal inputs and tensor cores"). The
//! recurrent, scan and attention kernels compute in f32 on CUDA cores and
//! keep them.
//!
//! # Real gates
//!
//! [`forward_real_into`] is the same code path with the imaginary part
//! compiled out (gated linear attention): log_gate `[B, L, H, K or 1]` and
//! h0 / h_final `[B, H, K, V]` are REAL f32 (half the bytes), the GEMMs have
//! inner dimension K.
//!
//! # Packed sequences
//!
//! [`forward_varlen_into`] (and [`forward_varlen_real_into`]) runs packed
//! variable-length sequences (fla's `cu_seqlens`) each from its own h0 to
//! its own h_final, one launch of each kernel: every sequence's chunks start
//! at its first step, so no chunk straddles two sequences and each is
//! computed as it is alone, bit for bit. A head's sequences share one row of
//! ⌊L/64⌋ + N chunk slots ([`plan_varlen`]); the state and output blocks
//! find their sequence by a binary search over the slot bases, the carry
//! (`gateloop_chunk_carry_packed_*`) walks each sequence's slots. The
//! sequential carry's walking kernel runs batched problems only.
//!
//! Limits: key_dim ≤ [`MAX_KEY_DIM`] (the blocks walk the key channels in
//! slabs of 16, so the bound only caps a block's serial work); any value_dim
//! (tiles of 64 columns). Shared memory per block is above the 48 KiB
//! default (up to ~112 KiB, [`shared_bytes`]); the launcher raises the
//! function's limit, and a device whose opt-in limit is smaller gets a typed
//! error.
//!
//! The kernels compile spill-free for sm_80 and sm_90; `tests/gpu_chunked.rs`
//! passed on an H200 (2026-11-30) and skips without a device.

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::abi::{self, GateloopChunkParams};
use super::element::{Dtype, Element};
use super::launch::{self, Buffers, SeqParams};
use super::phases::launched;
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, Outputs, Problem};

#[cfg(doc)]
use crate::cpu::chunked::ChunkParams;

pub use super::launch::{DeviceInputs, DeviceOutputs};

/// Steps per chunk (the CPU mirror's default `chunk_len`).
pub const CHUNK_LEN: usize = abi::GATELOOP_CHUNK_LEN as usize;
/// Steps per anchored sub-chunk (the CPU mirror's default `sub_chunk_len`).
pub const SUB_CHUNK_LEN: usize = abi::GATELOOP_CHUNK_SUB_LEN as usize;
/// Largest key dimension the chunked kernels accept.
pub const MAX_KEY_DIM: usize = abi::GATELOOP_CHUNK_MAX_KEY_DIM as usize;
pub(super) const KEY_SLAB: usize = abi::GATELOOP_CHUNK_KEY_SLAB as usize;
/// Key channels a block of the real-gate walks takes (two slabs).
const WALK_SLAB_REAL: usize = abi::GATELOOP_CHUNK_WALK_SLAB_REAL as usize;
pub(super) const VALUE_TILE: usize = abi::GATELOOP_CHUNK_VALUE_TILE as usize;
/// Value columns a block of the wide output launch takes (two value tiles).
pub(super) const WIDE_TILE: usize = abi::GATELOOP_CHUNK_WIDE_TILE as usize;
pub(super) const THREADS: u32 = abi::GATELOOP_CHUNK_THREADS;
pub(super) const CARRY_THREADS: u32 = abi::GATELOOP_CHUNK_CARRY_THREADS;

/// How many tensor-core products each operand pair costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChunkPrecision {
    /// Split operands, 3 products: the f32 bounds of the other kernels.
    #[default]
    Exact,
    /// One product of the operands rounded to the operand type (TF32, f16,
    /// bf16): fla-equivalent precision, about 3× fewer tensor-core products.
    Fast,
}

impl ChunkPrecision {
    /// Both, in the order of the kernel tables.
    pub const ALL: [ChunkPrecision; 2] = [ChunkPrecision::Exact, ChunkPrecision::Fast];
    /// `exact` or `fast` (entry-point suffix, bench name).
    pub fn name(self) -> &'static str {
        match self {
            ChunkPrecision::Exact => "exact",
            ChunkPrecision::Fast => "fast",
        }
    }
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Complex gates (the GateLoop contract) or real gates (phase ≡ 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gates {
    /// log_gate, h0, h_final complex f32.
    Complex,
    /// log_gate, h0, h_final real f32.
    Real,
}

impl Gates {
    /// In the order of the kernel tables.
    pub const ALL: [Gates; 2] = [Gates::Complex, Gates::Real];
    /// Entry-point suffix: `c` or `r`.
    pub fn suffix(self) -> &'static str {
        match self {
            Gates::Complex => "c",
            Gates::Real => "r",
        }
    }
    /// f32 per gate / state element: 2 (complex) or 1.
    pub fn parts(self) -> usize {
        match self {
            Gates::Complex => 2,
            Gates::Real => 1,
        }
    }
    pub(super) fn index(self) -> usize {
        self as usize
    }
    /// The kind a buffer set's `real_gates` flag says its gate side has.
    pub(super) fn of(real_gates: bool) -> Gates {
        if real_gates { Gates::Real } else { Gates::Complex }
    }
}

/// How the chunk states travel across the chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChunkCarry {
    /// [`ChunkCarry::Sequential`] for real gates and 16-bit inputs when
    /// B·H·value tiles·⌈K / 16⌉ ≥ [`SEQUENTIAL_MIN_BLOCKS`] (it fills the GPU
    /// without the chunks' parallelism), else [`ChunkCarry::Separate`]
    /// (complex gates and f32 always: measured slower sequential).
    #[default]
    Auto,
    /// Two launches: the state kernel, one block per (b, h, chunk, value
    /// tile), writes every U_c to the workspace; the carry kernel walks the
    /// chunks per state element. Parallel over the chunks (B·H = 1 at
    /// L = 65536 still gives 1024 blocks).
    Separate,
    /// One launch, one block per (b, h, value tile, key slab of
    /// [`walk_slab`] channels: 16 complex, 32 real), walking
    /// the chunks with its slab of the state on chip: the same results bit
    /// for bit, without U_c's round trip through the workspace (half the
    /// forward's workspace traffic) or the second read of the inputs.
    Sequential,
}

/// Which blocks the state launches run in: the forward's state kernel
/// ([`ChunkCarry::Separate`]) or walk ([`ChunkCarry::Sequential`]), and in
/// the backward their recomputation and `grad_w` or `grad_w_seq`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChunkStateBlocks {
    /// Where V > 64: one block per 128 value columns, whose gate prefix,
    /// key slab and slab operand (most of a block's instructions) serve
    /// both 64-column tiles, where [`ChunkStateBlocks::Narrow`]'s two blocks
    /// each built them; half the blocks, bit for bit the same workspace,
    /// h_final and gradients. The separate carry's state kernel and
    /// `grad_w` with 16-bit inputs (`gateloop_chunk_state_wide_*`,
    /// `gateloop_chunk_grad_w_wide_*`; speed log item 54); the walk with
    /// real gates and 16-bit inputs on sm_90 or newer
    /// (`gateloop_chunk_state_seq_wide_*`, `gateloop_chunk_grad_w_seq_wide_*`;
    /// item 52; on sm_80 the wide walk takes one block an SM). Else the
    /// narrow blocks.
    #[default]
    Auto,
    /// One block per 64 value columns at every V (the state launches as
    /// measured on an H200 on 2026-12-04). Kept for the bench's side by side
    /// (`chunked-real-fast-narrow-state` against `chunked-real-fast`,
    /// `chunked-fast-narrow-state` against `chunked-fast`).
    Narrow,
}

impl ChunkCarry {
    /// `auto`, `separate` or `sequential`.
    pub fn name(self) -> &'static str {
        match self {
            ChunkCarry::Auto => "auto",
            ChunkCarry::Separate => "separate",
            ChunkCarry::Sequential => "sequential",
        }
    }
}

/// [`ChunkCarry::Auto`] takes the sequential carry from this many blocks on,
/// for real gates and 16-bit inputs only: blocks of a walk over key slabs
/// of 16 (B·H·value tiles·⌈K / 16⌉), the walk measured below; the real-gate
/// walk has since taken 32 channels a block (speed log item 30: half the
/// blocks, each about a third more work), and the rule still counts slabs
/// of 16, so the same problems take it. Measured on an H200 (2026-11-30,
/// benches/results/gpu-2026-11-30-nvidia-h200/): at B8 L4096 H16 K = V = 64
/// (512 blocks) the sequential carry took 5.51 ms against the separate
/// carry's 5.87 in bf16 (0.94×) but 9.87 against 8.77 in f32 (1.13×); at 32
/// blocks it took 2.3× the separate carry's time in bf16. So f32 keeps the
/// separate carry, and 16-bit inputs take the sequential one from the one
/// grid where it was seen to win (the carry sweep between 32 and 528 blocks
/// ran out of its lease: `bash bundle/run.sh carry` refines this).
///
/// Then measured again on the same H200 (2026-12-04,
/// benches/results/gpu-2026-12-04-nvidia-h200/bench.json), after the
/// speed log's nineteen changes, which sped the state kernel up more than
/// the walk: complex gates, bf16, exact, at the same 512 blocks, the
/// sequential walk took 1.306 ms against the separate carry's 0.925 (state
/// 0.638 + carry 0.287), the forward 3.40 against 3.02 ms (1.13×). So
/// complex gates keep the separate carry at every grid. Real gates keep
/// this rule: their walk runs four blocks an SM, one round of an H200's
/// SMs at 512 blocks (the complex exact walk runs two an SM: two rounds),
/// and took
/// 0.632 ms, while their separate carry was not timed at 16 bits (from
/// that run's other rows, about 0.4 ms of state kernel and the real
/// carry's 0.171: even). The bench's `chunked-real-separate` times it.
pub const SEQUENTIAL_MIN_BLOCKS: usize = 512;

/// The separate carry runs in segments only when each would walk at least
/// this many chunks.
pub const CARRY_SEGMENT_MIN_CHUNKS: usize = 16;
/// ... and when its B·H·K·V threads are fewer than this: it then takes as
/// many segments as bring them to it (at most ⌊chunks / 16⌋).
pub const CARRY_SEGMENT_THREADS: usize = 1 << 19;

/// Segments of chunks the separate carry of a batched problem runs in, for
/// `chunks` chunks and `elements` = B·H·K·V state elements (one carry thread
/// each). The carry is a chain over the chunks per element: at B1 H4 L65536
/// K = V = 64 its 16384 threads (64 blocks) each walk 1024 chunks, 0.41 to
/// 0.49 ms of a 1.2 to 1.9 ms forward on an H200 (2026-12-04), with two
/// thirds of the SMs idle. In S segments a first launch sums each segment
/// from a zero state (S − 1 of them, in parallel), and the carry's S·B·H·K·V
/// threads each start their segment from the state carried over the ones
/// before (`cuda/chunk_common.cuh`, "the carry in segments"): chains of
/// ⌈chunks / S⌉ + S steps instead of chunks. 1 (the one walk, bit for bit
/// the sequential carry's) where the threads already number
/// [`CARRY_SEGMENT_THREADS`] or segments would be shorter than
/// [`CARRY_SEGMENT_MIN_CHUNKS`]: every problem of fewer than 2048 steps.
pub fn carry_segments(chunks: usize, elements: usize) -> usize {
    if elements == 0 || elements >= CARRY_SEGMENT_THREADS {
        return 1;
    }
    let want = CARRY_SEGMENT_THREADS.div_ceil(elements);
    let most = chunks / CARRY_SEGMENT_MIN_CHUNKS;
    let s = want.min(most).max(1);
    // No empty segment: the kernels' segments are ⌈chunks / s⌉ long.
    chunks.div_ceil(chunks.div_ceil(s))
}

/// How the output launch forms its tensor-core operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChunkOutput {
    /// WMMA tiles: every operand (the decayed query rows, the anchored
    /// rows, the scores P, the state slab, V) staged through shared memory
    /// as a split tile. Every dtype. Where V > 64, one block per 128 value
    /// columns (`gateloop_chunk_output_wide_*`): a chunk's scores P (every
    /// key slab's q and k rows, anchored rows and diagonal pairs, most of the
    /// launch's work) are formed once for both 64-column halves, where
    /// [`ChunkOutput::StagedNarrow`]'s two blocks each form them; on sm_90
    /// the same blocks an SM (the same shared memory for real gates; speed
    /// log item 23); bit for bit the narrow launch's.
    #[default]
    Staged,
    /// [`ChunkOutput::Staged`] in blocks of 64 value columns at every V (the
    /// staged launch as measured on an H200 on 2026-12-04): at V = 128 two
    /// blocks a chunk, each forming the same scores. Kept for the bench's
    /// side by side (`chunked-real-fast-narrow` against `chunked-real-fast`).
    StagedNarrow,
    /// Register fragments (mma.sync m16n8k16, `cuda/chunk_frag.cuh`): the
    /// operands a warp owns (decayed and anchored rows, the scores P) built
    /// in its registers, only the state slab and V staged; one anchor per
    /// query sub-chunk. Within the same bounds as [`ChunkOutput::Staged`],
    /// not bit for bit. f16 and bf16 inputs only (an f32 call is a typed
    /// error). On an H200 on 2026-12-04 (real gates, bf16, K = 64 and
    /// 128) it took 1.08× to 1.09× the staged kernel's time, its L1/shared
    /// pipe as busy (88% against 81% for the complex bf16 case): so not the
    /// default.
    Fragments,
}

impl ChunkOutput {
    /// `staged`, `staged-narrow` or `fragments`.
    pub fn name(self) -> &'static str {
        match self {
            ChunkOutput::Staged => "staged",
            ChunkOutput::StagedNarrow => "staged-narrow",
            ChunkOutput::Fragments => "fragments",
        }
    }
}

/// What a chunked forward call may choose: precision, carry and output
/// kernel. A [`ChunkPrecision`] converts into it with the automatic carry
/// and the staged output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkConfig {
    /// Three split tensor-core products (Exact, the default) or one (Fast).
    pub precision: ChunkPrecision,
    /// How the state passes between chunks: a separate carry launch or the
    /// sequential walk (Auto picks by dtype and grid).
    pub carry: ChunkCarry,
    /// How the output launch builds its operands: staged WMMA tiles (the
    /// default) or mma.sync register fragments (16-bit inputs only).
    pub output: ChunkOutput,
    /// The state launches' blocks (the walk's or the state kernel's,
    /// whichever carry runs): 128 value columns where that pays (Auto) or
    /// 64.
    pub state_blocks: ChunkStateBlocks,
}

impl From<ChunkPrecision> for ChunkConfig {
    fn from(precision: ChunkPrecision) -> Self {
        ChunkConfig { precision, ..ChunkConfig::default() }
    }
}

/// Bytes of the chunk-local gate prefix tables every chunked kernel (forward
/// and backward) puts first in its shared memory: Re G as a compensated pair,
/// cos θ and sin θ when complex, the reset index; each `[CHUNK_LEN]` rows of
/// `KEY_SLAB` 4-byte entries, or with `padded` (the output and dv launches,
/// grad_qk: their pairwise loops read the tables across rows)
/// `GATELOOP_CHUNK_PREFIX_LD`, the rest of a row padding against shared-memory
/// bank conflicts (`prefix_bytes` in cuda/chunk_common.cuh, Block's kLd).
pub(crate) fn prefix_bytes(gates: Gates, padded: bool) -> usize {
    prefix_tables(gates) * slab_table_bytes(padded)
}

/// How many `[CHUNK_LEN][row]` tables the gate prefix takes: Re G's pair,
/// the reset index, and cos θ, sin θ with complex gates.
fn prefix_tables(gates: Gates) -> usize {
    if gates == Gates::Complex { 5 } else { 3 }
}

/// Bytes of one `[CHUNK_LEN][KEY_SLAB]` f32 table of a chunked kernel (a
/// prefix table, the raw q or k rows): rows of `KEY_SLAB` entries, or with
/// `padded` of `GATELOOP_CHUNK_PREFIX_LD` (Block's kLd in
/// cuda/chunk_common.cuh).
pub(crate) fn slab_table_bytes(padded: bool) -> usize {
    table_bytes(if padded { abi::GATELOOP_CHUNK_PREFIX_LD as usize } else { KEY_SLAB })
}

/// Bytes of one f32 table of `CHUNK_LEN` rows of `row` entries.
fn table_bytes(row: usize) -> usize {
    CHUNK_LEN * row * 4
}

/// Row padding, in elements, of a split operand tile in shared memory
/// (`Op::kPad`): 4 for TF32 (f32 inputs), 8 for 16-bit operands.
pub(crate) fn operand_pad(dtype: Dtype) -> usize {
    if dtype.size_bytes() == 4 { 4 } else { 8 }
}

/// Bytes of a split (hi + lo) operand of `rows` rows of `ld` elements
/// (`split_bytes` in cuda/chunk_common.cuh; the operand type is as wide as
/// the input's).
pub(crate) fn split_bytes(dtype: Dtype, rows: usize, ld: usize) -> usize {
    2 * rows * ld * dtype.size_bytes()
}

/// Bytes of dynamic shared memory of the (state, output) kernels for operand
/// element size `op_bytes` (4: TF32 for f32 inputs, 2: f16 / bf16) and `gates`.
/// The same layout as `state_smem_bytes` / `output_smem_bytes` in
/// cuda/chunk.cu (the kernels trap if given less).
pub fn shared_bytes(dtype: Dtype, gates: Gates) -> (u32, u32) {
    shared_bytes_cols(dtype, gates, VALUE_TILE)
}

/// Bytes of dynamic shared memory of the wide output kernel
/// (`output_smem_bytes<Op, kComplex, kWideCols>` in cuda/chunk_common.cuh):
/// the output kernel's layout with a state slab of 128 columns (its V
/// passes in halves of 64 through the same bytes as the narrow one's).
pub fn wide_output_shared_bytes(dtype: Dtype, gates: Gates) -> u32 {
    shared_bytes_cols(dtype, gates, WIDE_TILE).1
}

/// Bytes of dynamic shared memory of the backward's dv kernel for blocks of
/// `cols` value columns (`VALUE_TILE`, or `WIDE_TILE` for the wide launch;
/// `adjoint_smem_bytes` in cuda/chunk_common.cuh): the output kernel's pass
/// reading the scores P instead of forming them, so its layout less what
/// forming them takes (raw q, the anchored q̃ and k̃ rows, the diagonal
/// blocks): the prefix tables, raw k, a union of the slab phase's K̃ and
/// state slab with the final phase's P and dY, the staging tiles.
pub(super) fn adjoint_shared_bytes(dtype: Dtype, gates: Gates, cols: usize) -> u32 {
    let pad = operand_pad(dtype);
    let width = KEY_SLAB * gates.parts();
    let split = |rows: usize, ld: usize| split_bytes(dtype, rows, ld);
    let slab_phase = split(CHUNK_LEN, width + pad) + split(width, cols + pad);
    (prefix_bytes(gates, true) + slab_table_bytes(true) + slab_phase.max(final_phase_bytes(dtype)) + STAGING_BYTES)
        as u32
}

/// The output and dv kernels' final phase (`output_final_bytes`): P split
/// and a raw value tile.
fn final_phase_bytes(dtype: Dtype) -> usize {
    split_bytes(dtype, CHUNK_LEN, VALUE_TILE + operand_pad(dtype)) + raw_tile_bytes(dtype)
}

/// A raw value tile (V or dY, 64 × 64 in padded rows) staged as a
/// tensor-core operand: split (hi and lo planes), one plane for bf16 inputs,
/// which are exact in their bf16 operand (`carve_terms`, `OpOf::kRawTerms`
/// in cuda/chunk_common.cuh).
pub(super) fn raw_tile_bytes(dtype: Dtype) -> usize {
    raw_tile_bytes_cols(dtype, VALUE_TILE)
}

/// [`raw_tile_bytes`] for a tile of `cols` value columns (grad_qk's
/// inter-chunk steps of 32 or 64).
pub(super) fn raw_tile_bytes_cols(dtype: Dtype, cols: usize) -> usize {
    let tile = split_bytes(dtype, CHUNK_LEN, cols + operand_pad(dtype));
    if dtype == Dtype::Bf16 { tile / 2 } else { tile }
}

/// [`shared_bytes`] for an output block of `cols` value columns (its state
/// slab's width; the state kernel's layout does not depend on it).
fn shared_bytes_cols(dtype: Dtype, gates: Gates, cols: usize) -> (u32, u32) {
    let pad = operand_pad(dtype);
    let width = KEY_SLAB * gates.parts();
    let ld_slab = width + pad;
    let split = |rows: usize, ld: usize| split_bytes(dtype, rows, ld);
    let subs = CHUNK_LEN / SUB_CHUNK_LEN;
    let pairs = subs * (subs - 1) / 2;
    let state = state_layout_bytes(dtype, gates, KEY_SLAB, false, ChunkPrecision::Exact);
    let slab_phase = split(CHUNK_LEN, ld_slab)
        + split(width, cols + pad)
        + split(pairs * SUB_CHUNK_LEN, ld_slab)
        + split((subs - 1) * SUB_CHUNK_LEN, ld_slab);
    let output = prefix_bytes(gates, true)
        + 2 * slab_table_bytes(true)
        + slab_phase.max(final_phase_bytes(dtype))
        + subs * SUB_CHUNK_LEN * SUB_CHUNK_LEN * 4
        + STAGING_BYTES;
    (state as u32, output as u32)
}

/// Bytes of dynamic shared memory of the register-fragment output kernel
/// ([`ChunkOutput::Fragments`], `frag_output_smem_bytes` in
/// cuda/chunk_frag.cuh): the prefix tables, the raw q and k slabs, the state
/// slab and the value tile as split 16-bit operands, the diagonal scores
/// (4 × 16 × 16 f32) and the off-diagonal scores (48 × 52 f32). `None` for
/// f32 inputs (the kernel takes 16-bit operands only).
pub fn fragment_output_shared_bytes(dtype: Dtype, gates: Gates) -> Option<u32> {
    if dtype == Dtype::F32 {
        return None;
    }
    let split = |rows: usize| 2 * rows * (VALUE_TILE + 8) * 2;
    let subs = CHUNK_LEN / SUB_CHUNK_LEN;
    let off = (CHUNK_LEN - SUB_CHUNK_LEN) * (CHUNK_LEN - SUB_CHUNK_LEN + 4) * 4;
    let bytes = prefix_bytes(gates, false)
        + 2 * slab_table_bytes(false)
        + split(KEY_SLAB * gates.parts())
        + split(CHUNK_LEN)
        + subs * SUB_CHUNK_LEN * SUB_CHUNK_LEN * 4
        + off;
    Some(bytes as u32)
}

/// Key channels a block of the sequential walks (the forward's
/// `state_seq`, the backward's `grad_w_seq`) takes: a slab of 16 with
/// complex gates, two (32) with real ones, whose slab operand is then as
/// wide as a complex slab's [Re | Im] (`walk_slab` in
/// cuda/chunk_common.cuh).
pub fn walk_slab(gates: Gates) -> usize {
    match gates {
        Gates::Complex => KEY_SLAB,
        Gates::Real => WALK_SLAB_REAL,
    }
}

/// Bytes of dynamic shared memory of the sequential state kernel
/// (`seq_smem_bytes` in cuda/chunk_common.cuh) at `precision`: the state
/// kernel's layout for slabs of [`walk_slab`] channels with the raw key slab
/// in the staging tiles' bytes (and, under [`ChunkPrecision::Fast`], its
/// one-term slab operand one plane), with real gates the pad of the Gram
/// product's f32 rows after the staging tiles (`walk_x_pad_bytes`: rows of
/// 72 words where 64, 8 words a row), then the slab's carried state
/// (parts·channels × 64 f32) and its decays (one complex per channel). The
/// backward's `grad_w_seq` takes Exact's.
pub fn sequential_shared_bytes(dtype: Dtype, gates: Gates, precision: ChunkPrecision) -> u32 {
    let channels = walk_slab(gates);
    let layout = state_layout_bytes(dtype, gates, channels, true, precision);
    let x_pad = match gates {
        Gates::Real => channels * 8 * 4,
        Gates::Complex => 0,
    };
    (layout + x_pad + channels * gates.parts() * VALUE_TILE * 4 + channels * 8) as u32
}

/// Bytes of dynamic shared memory of the wide state kernel
/// (`gateloop_chunk_state_wide_*`, and the backward's
/// `gateloop_chunk_grad_w_wide_*`: `state_block_bytes` with kCols = 128):
/// the narrow layout and a second value tile laid out as the first. `None`
/// where there is no wide state kernel (f32 inputs).
pub fn state_wide_shared_bytes(dtype: Dtype, gates: Gates) -> Option<u32> {
    (dtype != Dtype::F32).then(|| shared_bytes(dtype, gates).0 + raw_tile_bytes(dtype) as u32)
}

/// Bytes of dynamic shared memory of the wide sequential walk
/// (`gateloop_chunk_state_seq_wide_*`: `seq_smem_bytes` with kCols = 128):
/// the narrow walk's layout, its carried state twice as wide, and a second
/// value tile laid out as the first. `None` where there is no wide walk
/// (complex gates, f32 inputs).
pub fn sequential_wide_shared_bytes(dtype: Dtype, gates: Gates, precision: ChunkPrecision) -> Option<u32> {
    (gates == Gates::Real && dtype != Dtype::F32).then(|| {
        let extra = walk_slab(gates) * VALUE_TILE * 4 + raw_tile_bytes(dtype);
        sequential_shared_bytes(dtype, gates, precision) + extra as u32
    })
}

/// The staging tiles every chunked kernel ends its layout with: a 16 × 16
/// f32 tile a warp (`kStagingBytes`).
const STAGING_BYTES: usize = (THREADS as usize / 32) * 16 * 16 * 4;

/// Bytes of the state kernel's layout (`state_smem_bytes` in
/// cuda/chunk_common.cuh) for slabs of `channels` key channels: the prefix
/// tables in plain rows, the raw key slab (in the staging tiles' bytes with
/// `raw_in_staging`, the walks'), the value tile and the slab operand as
/// split operands (the value tile one plane for bf16: [`raw_tile_bytes`];
/// the slab operand one plane at `precision` Fast, whose products take its
/// hi plane alone: the walks' `kSlabTerms`; the state kernel's layout is
/// Exact's at either precision), the staging tiles.
fn state_layout_bytes(
    dtype: Dtype,
    gates: Gates,
    channels: usize,
    raw_in_staging: bool,
    precision: ChunkPrecision,
) -> usize {
    let pad = operand_pad(dtype);
    let raw = if raw_in_staging { 0 } else { table_bytes(channels) };
    let slab = split_bytes(dtype, CHUNK_LEN, channels * gates.parts() + pad);
    let slab = if precision == ChunkPrecision::Fast { slab / 2 } else { slab };
    prefix_tables(gates) * table_bytes(channels) + raw + raw_tile_bytes(dtype) + slab + STAGING_BYTES
}

/// The launch geometry of one chunked call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// ceil(L / 64); packed ([`plan_varlen`]): the ⌊L / 64⌋ + N chunk
    /// slots of a head's sequences.
    pub num_chunks: u64,
    /// ceil(V / 64).
    pub value_tiles: u32,
    /// Blocks of the state and output kernels: B·H·num_chunks·value_tiles
    /// (packed: H·num_chunks·value_tiles).
    pub grid: u32,
    /// Blocks of the wide output kernel ([`ChunkOutput::Staged`] where
    /// V > 64): B·H·num_chunks·⌈V / 128⌉ (packed: H·num_chunks·⌈V / 128⌉).
    pub wide_grid: u32,
    /// Blocks of the carry kernel: ceil(B·H·K·V / 256) (times
    /// `carry_segments` along grid.y).
    pub carry_grid: u32,
    /// Segments of chunks the separate carry runs in ([`carry_segments`];
    /// 1: the one walk over every chunk).
    pub carry_segments: u32,
    /// Where the segments' sums and decay products start in the workspace
    /// (f32; 4·S·B·H·K·V of them, after the chunk states, S the separate
    /// carry's segments: there with either carry, so that the workspace is
    /// the same for both).
    pub segments_offset: usize,
    /// f32 of the decays: B·H·num_chunks·gate_dim·parts (first in the
    /// workspace; packed: H·num_chunks·gate_dim·parts).
    pub decay_len: usize,
    /// f32 of the workspace: decay_len + B·H·num_chunks·parts·K·V (packed:
    /// H·num_chunks·parts·K·V), + 4·S·B·H·K·V where the separate carry runs
    /// in S > 1 segments ([`carry_segments`]; whichever carry this plan
    /// takes).
    pub workspace_len: usize,
    /// Dynamic shared memory of the state kernel, bytes.
    pub state_shared_bytes: u32,
    /// Dynamic shared memory of the output kernel, bytes.
    pub output_shared_bytes: u32,
    /// Dynamic shared memory of the wide output kernel, bytes.
    pub wide_output_shared_bytes: u32,
    /// Dynamic shared memory of the register-fragment output kernel
    /// ([`ChunkOutput::Fragments`]), bytes; `None` for f32 inputs.
    pub fragment_output_shared_bytes: Option<u32>,
    /// The carry this plan launches (never [`ChunkCarry::Auto`]).
    pub carry: ChunkCarry,
    /// Blocks of the sequential state kernel: B·H·value_tiles·⌈K /
    /// [`walk_slab`]⌉ (packed: B = N sequences).
    pub sequential_grid: u32,
    /// Dynamic shared memory of the sequential state kernel at
    /// [`ChunkPrecision::Exact`] (and of the backward's `grad_w_seq`), bytes;
    /// Fast's is less ([`sequential_shared_bytes`]).
    pub sequential_shared_bytes: u32,
    /// Blocks of the wide sequential walk ([`ChunkStateBlocks::Auto`] where it
    /// applies): B·H·⌈V / 128⌉·⌈K / [`walk_slab`]⌉.
    pub wide_sequential_grid: u32,
}

impl LaunchPlan {
    /// The staged output launch's (the default `ChunkOutput::Staged`'s, and
    /// the backward's dv launch, which runs its pass) kernel, blocks and
    /// dynamic shared memory: `(true, wide_grid, wide_output_shared_bytes)`,
    /// the wide kernel, where V > 64 (more than one value tile), else
    /// `(false, grid, output_shared_bytes)`.
    pub fn staged_output(&self) -> (bool, u32, u32) {
        if self.value_tiles > 1 {
            (true, self.wide_grid, self.wide_output_shared_bytes)
        } else {
            (false, self.grid, self.output_shared_bytes)
        }
    }

    /// Points `params` at the carry's segments in the workspace at device
    /// address `workspace`, where this plan runs the carry in segments (the
    /// forward's launch and the backward's).
    pub(super) fn bind_segments(&self, params: &mut GateloopChunkParams, workspace: usize) {
        if self.carry_segments > 1 {
            params.carry_segments = i64::from(self.carry_segments);
            params.ws_carry_segments = (workspace + 4 * self.segments_offset) as *mut f32;
        }
    }
}

/// Chooses the launch geometry for `dims`, element type `dtype` and `gates`
/// (K ≤ [`MAX_KEY_DIM`]; every grid ≤ 2^31 − 1), with the automatic carry.
pub fn plan(dims: &Dims, dtype: Dtype, gates: Gates) -> Result<LaunchPlan, InputError> {
    plan_with(dims, dtype, gates, ChunkCarry::Auto)
}

/// [`plan`] with a choice of carry ([`ChunkCarry::Auto`] resolved by the
/// gates, the dtype and [`SEQUENTIAL_MIN_BLOCKS`]). The workspace is the same for both carries.
pub fn plan_with(dims: &Dims, dtype: Dtype, gates: Gates, carry: ChunkCarry) -> Result<LaunchPlan, InputError> {
    plan_rows(dims, dtype, gates, carry, false)
}

/// The geometry of the packed forward ([`forward_varlen_into`]) with a
/// choice of carry: `dims` the packed problem's (`[1, L, H, *]`),
/// `cu_seqlens` its N + 1 offsets (checked:
/// [`crate::packing::sequence_starts`]). Every sequence's chunks start at
/// its first step; a head's sequences share one row of ⌊L / 64⌋ + N chunk
/// slots, sequence i's from slot ⌊cu_seqlens\[i\] / 64⌋ + i (apart by at
/// least its ⌈len / 64⌉ chunks), so the workspace is O(H·(L/64 + N)·K·V),
/// about the batched one's for the same steps. The state and output
/// launches run one block per (head, slot, value tile), an empty slot's
/// block returning at once; the carry one thread per (sequence, head, key
/// row, value column). The carry is the separate one ([`ChunkCarry::Auto`]
/// resolves to it; [`ChunkCarry::Sequential`] is refused): the walking
/// kernel runs batched problems only (the same bits either way).
pub fn plan_varlen(
    dims: &Dims,
    cu_seqlens: &[usize],
    dtype: Dtype,
    gates: Gates,
    carry: ChunkCarry,
) -> Result<LaunchPlan, InputError> {
    crate::packing::sequence_starts(dims, cu_seqlens)?;
    plan_rows(&Dims { batch: cu_seqlens.len() - 1, ..*dims }, dtype, gates, carry, true)
}

/// The body of [`plan_with`] and [`plan_varlen`] (`dims.batch` = N
/// sequences, `dims.len` the packed row's steps when `packed`; the
/// backward's [`super::chunk_grad::plan_varlen`] takes it too).
pub(super) fn plan_rows(
    dims: &Dims,
    dtype: Dtype,
    gates: Gates,
    carry: ChunkCarry,
    packed: bool,
) -> Result<LaunchPlan, InputError> {
    dims.validate()?;
    let d = dims;
    if d.key_dim > MAX_KEY_DIM {
        return Err(InputError::Param {
            name: "key_dim",
            value: d.key_dim.to_string(),
            why: "the chunked GPU kernel supports key_dim <= 256",
        });
    }
    // Chunks (or, packed, chunk slots) of a workspace row, and its rows:
    // (b, h), or packed a head's sequences in one row.
    let (nc, rows) = if packed {
        (d.len / CHUNK_LEN + d.batch, Some(d.heads))
    } else {
        (d.len.div_ceil(CHUNK_LEN), d.batch.checked_mul(d.heads))
    };
    let tiles = d.value_dim.div_ceil(VALUE_TILE);
    let bh = d.batch.checked_mul(d.heads);
    let too_large = |name: &'static str, what: &str| InputError::TooLarge {
        name,
        shape: format!("[{what}] for B={} H={} L={} K={} V={}", d.batch, d.heads, d.len, d.key_dim, d.value_dim),
        limit: "2^31 - 1 thread blocks".into(),
    };
    let as_grid = |x: Option<usize>, what: &str| {
        x.and_then(|g| u32::try_from(g).ok()).filter(|&g| g <= i32::MAX as u32).ok_or_else(|| too_large("grid", what))
    };
    let grid =
        as_grid(rows.and_then(|x| x.checked_mul(nc)).and_then(|x| x.checked_mul(tiles)), "B·H·chunks·value_tiles")?;
    // Never more blocks than `grid`.
    let wide_grid = (rows.unwrap_or(0) * nc * d.value_dim.div_ceil(WIDE_TILE)) as u32;
    // B·H·K·V fits: validated.
    let state = d.batch * d.heads * d.key_dim * d.value_dim;
    let carry_grid = as_grid(Some(state.div_ceil(CARRY_THREADS as usize)), "B·H·K·V / 256")?;
    let p = gates.parts();
    let ws_error = || InputError::TooLarge {
        name: "workspace",
        shape: format!("[B·H·chunks·{p}·(K·V + gate_dim)] with {nc} chunks"),
        limit: "usize::MAX".into(),
    };
    let slots = rows.and_then(|x| x.checked_mul(nc));
    let decay_len = slots.and_then(|x| x.checked_mul(d.gate_dim() * p)).ok_or_else(ws_error)?;
    let workspace_len = slots
        .and_then(|x| x.checked_mul(p * d.key_dim * d.value_dim))
        .and_then(|s| s.checked_add(decay_len))
        .ok_or_else(ws_error)?;
    let (state_shared_bytes, output_shared_bytes) = shared_bytes(dtype, gates);
    let walk_blocks = |channels: usize| {
        bh.and_then(|x| x.checked_mul(tiles)).and_then(|x| x.checked_mul(d.key_dim.div_ceil(channels)))
    };
    let sequential_grid = as_grid(walk_blocks(walk_slab(gates)), "B·H·value_tiles·key_slabs")?;
    // The rule counts slabs of 16 whatever the walk's width: the real-gate
    // walk's blocks of 32 channels each do about two of the old blocks' work
    // (speed log item 30), so the same problems take it.
    let walk_slabs_of_16 = walk_blocks(KEY_SLAB).unwrap_or(usize::MAX);
    let carry = match carry {
        ChunkCarry::Sequential if packed => {
            return Err(InputError::Param {
                name: "carry",
                value: "sequential, with packed sequences".into(),
                why: "packed sequences take the separate carry (ChunkCarry::Auto or Separate): the walking kernel runs batched problems only",
            });
        }
        ChunkCarry::Auto
            if !packed && gates == Gates::Real && dtype != Dtype::F32 && walk_slabs_of_16 >= SEQUENTIAL_MIN_BLOCKS =>
        {
            ChunkCarry::Sequential
        }
        ChunkCarry::Auto => ChunkCarry::Separate,
        chosen => chosen,
    };
    // The separate carry of a batched problem in segments (packed sequences
    // keep one walk each: their carries are kernels of their own). The
    // workspace has the segments' room whatever the carry, so that one
    // workspace serves every carry of the problem.
    let separate_segments = if packed { 1 } else { carry_segments(nc, state) };
    let segments = if carry == ChunkCarry::Sequential { 1 } else { separate_segments };
    let segments_offset = workspace_len;
    let workspace_len = if separate_segments > 1 {
        separate_segments.checked_mul(4 * state).and_then(|s| s.checked_add(workspace_len)).ok_or_else(ws_error)?
    } else {
        workspace_len
    };
    Ok(LaunchPlan {
        num_chunks: nc as u64,
        value_tiles: tiles as u32,
        grid,
        wide_grid,
        carry_grid,
        carry_segments: segments as u32,
        segments_offset,
        decay_len,
        workspace_len,
        state_shared_bytes,
        output_shared_bytes,
        wide_output_shared_bytes: wide_output_shared_bytes(dtype, gates),
        fragment_output_shared_bytes: fragment_output_shared_bytes(dtype, gates),
        carry,
        sequential_grid,
        sequential_shared_bytes: sequential_shared_bytes(dtype, gates, ChunkPrecision::Exact),
        // Never more blocks than `sequential_grid`.
        wide_sequential_grid: (bh.unwrap_or(0) * d.value_dim.div_ceil(WIDE_TILE) * d.key_dim.div_ceil(walk_slab(gates)))
            as u32,
    })
}

/// The chunked kernels of one context: `[dtype][gates][precision]` for the
/// state and output kernels, `[gates]` for the carry.
pub(crate) struct ChunkKernels {
    /// The backward ([`super::chunk_grad`]) launches the state and carry kernels too.
    pub(super) state: Vec<CudaFunction>,
    /// The wide state kernels (128 value columns a block), `None` where
    /// there is none (f32).
    state_wide: Vec<Option<CudaFunction>>,
    pub(super) sequential: Vec<CudaFunction>,
    /// The wide walks (128 value columns a block), `None` where there is
    /// none (complex gates, f32).
    sequential_wide: Vec<Option<CudaFunction>>,
    output: Vec<CudaFunction>,
    /// The wide output kernels (128 value columns a block).
    output_wide: Vec<CudaFunction>,
    /// `None` where there is no fragment kernel (f32).
    output_fragments: Vec<Option<CudaFunction>>,
    pub(super) carry: Vec<CudaFunction>,
    /// The carry of packed sequences, `[gates]` (a kernel of its own: see cuda/chunk.cu).
    pub(super) carry_packed: Vec<CudaFunction>,
    /// The segmented carry's first launch, `[gates]`: the segments' sums
    /// and decay products ([`carry_segments`]).
    pub(super) carry_segments: Vec<CudaFunction>,
    /// The device's opt-in shared memory per block (bytes).
    pub(super) max_shared: usize,
}

pub(super) fn table_index(dtype: Dtype, gates: Gates, precision: ChunkPrecision) -> usize {
    (dtype.index() * Gates::ALL.len() + gates.index()) * ChunkPrecision::ALL.len() + precision.index()
}

/// The forward's state launch (the separate carry's state kernel or the
/// sequential carry's walk, and the backward's recomputation of it):
/// kernel, blocks, dynamic shared memory and what a failed launch was
/// doing.
pub(super) struct StateLaunch<'a> {
    pub func: &'a CudaFunction,
    pub grid: u32,
    pub shared_bytes: u32,
    pub doing: &'static str,
    /// `doing` for the backward's recomputation (the bench's phase names).
    pub doing_backward: &'static str,
    /// In blocks of 128 value columns (the backward's grad_w or grad_w_seq
    /// follows).
    pub wide: bool,
}

/// The state launch plan `lp` runs (its carry) at `precision` under
/// `blocks` on a device of compute capability `capability`: the wide
/// kernel where [`ChunkStateBlocks::Auto`] takes it (V > 64; the separate
/// carry with 16-bit inputs, the walk with real gates and 16-bit inputs on
/// sm_90 or newer), else the narrow one.
pub(super) fn forward_state<'a>(
    kernels: &'a ChunkKernels,
    lp: &LaunchPlan,
    d: &Dims,
    (dtype, gates, precision): (Dtype, Gates, ChunkPrecision),
    blocks: ChunkStateBlocks,
    capability: (i32, i32),
) -> StateLaunch<'a> {
    let i = table_index(dtype, gates, precision);
    let wide = blocks == ChunkStateBlocks::Auto && d.value_dim > VALUE_TILE;
    let launch = |func, grid, shared_bytes, (doing, doing_backward), wide| StateLaunch {
        func,
        grid,
        shared_bytes,
        doing,
        doing_backward,
        wide,
    };
    if lp.carry == ChunkCarry::Sequential {
        match (&kernels.sequential_wide[i], sequential_wide_shared_bytes(dtype, gates, precision)) {
            (Some(func), Some(bytes)) if wide && capability.0 >= 9 => launch(
                func,
                lp.wide_sequential_grid,
                bytes,
                ("launching gateloop_chunk_state_seq_wide", "launching gateloop_chunk_state_seq_wide (backward)"),
                true,
            ),
            _ => launch(
                &kernels.sequential[i],
                lp.sequential_grid,
                sequential_shared_bytes(dtype, gates, precision),
                ("launching gateloop_chunk_state_seq", "launching gateloop_chunk_state_seq (backward)"),
                false,
            ),
        }
    } else {
        match (&kernels.state_wide[i], state_wide_shared_bytes(dtype, gates)) {
            (Some(func), Some(bytes)) if wide => launch(
                func,
                lp.wide_grid,
                bytes,
                ("launching gateloop_chunk_state_wide", "launching gateloop_chunk_state_wide (backward)"),
                true,
            ),
            _ => launch(
                &kernels.state[i],
                lp.grid,
                lp.state_shared_bytes,
                ("launching gateloop_chunk_state", "launching gateloop_chunk_state (backward)"),
                false,
            ),
        }
    }
}

impl ChunkKernels {
    /// Looks up every entry point and raises each function's dynamic shared
    /// memory limit to what it needs (once, here), where the device allows it.
    pub(crate) fn load(ctx: &Arc<CudaContext>, module: &Arc<CudaModule>) -> Result<ChunkKernels, GpuError> {
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .doing("querying the opt-in shared memory per block")?
            .max(0) as usize;
        // Entry point `name`, its dynamic shared memory limit raised to
        // `bytes` where the device allows it (a launch past the limit gets
        // the launcher's typed error instead).
        let load = |name: String, bytes: u32| -> Result<CudaFunction, GpuError> {
            let f = module
                .load_function(&name)
                .doing("looking up gateloop_chunk_{state,state_wide,state_seq,state_seq_wide,output,output_wide,output_frag}_*")?;
            if bytes as usize <= max_shared {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                    .doing("raising the chunked kernels' dynamic shared memory limit")?;
            }
            Ok(f)
        };
        let (mut state, mut state_wide, mut sequential, mut sequential_wide) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut output, mut output_wide, mut output_fragments) = (Vec::new(), Vec::new(), Vec::new());
        for dtype in Dtype::ALL {
            for gates in Gates::ALL {
                let (state_bytes, output_bytes) = shared_bytes(dtype, gates);
                let wide_bytes = wide_output_shared_bytes(dtype, gates);
                for precision in ChunkPrecision::ALL {
                    let sequential_bytes = sequential_shared_bytes(dtype, gates, precision);
                    let suffix = format!("{}_{}_{}", dtype.name(), gates.suffix(), precision.name());
                    debug_assert_eq!(state.len(), table_index(dtype, gates, precision));
                    state.push(load(format!("gateloop_chunk_state_{suffix}"), state_bytes)?);
                    state_wide.push(
                        state_wide_shared_bytes(dtype, gates)
                            .map(|bytes| load(format!("gateloop_chunk_state_wide_{suffix}"), bytes))
                            .transpose()?,
                    );
                    sequential.push(load(format!("gateloop_chunk_state_seq_{suffix}"), sequential_bytes)?);
                    sequential_wide.push(
                        sequential_wide_shared_bytes(dtype, gates, precision)
                            .map(|bytes| load(format!("gateloop_chunk_state_seq_wide_{suffix}"), bytes))
                            .transpose()?,
                    );
                    output.push(load(format!("gateloop_chunk_output_{suffix}"), output_bytes)?);
                    output_wide.push(load(format!("gateloop_chunk_output_wide_{suffix}"), wide_bytes)?);
                    // f32 has no fragment kernel (None).
                    output_fragments.push(
                        fragment_output_shared_bytes(dtype, gates)
                            .map(|bytes| load(format!("gateloop_chunk_output_frag_{suffix}"), bytes))
                            .transpose()?,
                    );
                }
            }
        }
        let carry = Gates::ALL
            .iter()
            .map(|g| module.load_function(&format!("gateloop_chunk_carry_{}", g.suffix())))
            .collect::<Result<Vec<_>, _>>()
            .doing("looking up gateloop_chunk_carry_{c,r}")?;
        let carry_packed = Gates::ALL
            .iter()
            .map(|g| module.load_function(&format!("gateloop_chunk_carry_packed_{}", g.suffix())))
            .collect::<Result<Vec<_>, _>>()
            .doing("looking up gateloop_chunk_carry_packed_{c,r}")?;
        let carry_segments = Gates::ALL
            .iter()
            .map(|g| module.load_function(&format!("gateloop_chunk_carry_segments_{}", g.suffix())))
            .collect::<Result<Vec<_>, _>>()
            .doing("looking up gateloop_chunk_carry_segments_{c,r}")?;
        Ok(ChunkKernels {
            state,
            state_wide,
            sequential,
            sequential_wide,
            output,
            output_wide,
            output_fragments,
            carry,
            carry_packed,
            carry_segments,
            max_shared,
        })
    }
}

/// Checks every argument on the host and enqueues the three kernels.
/// `cu_seqlens`: for packed sequences (`d.batch` = N of them), the device
/// address of the N + 1 offsets, checked on the host ([`forward_varlen_into`]);
/// the buffers are then checked as packed (`Buffers::packed`).
fn launch<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    d: &Dims,
    buffers: Buffers<'_, T>,
    config: ChunkConfig,
    cu_seqlens: Option<u64>,
) -> Result<(), GpuError> {
    let gates = Gates::of(buffers.real_gates);
    let packed = cu_seqlens.is_some();
    let buffers = Buffers { packed, ..buffers };
    let lp = plan_rows(d, T::DTYPE, gates, config.carry, packed)?;
    let sequential = lp.carry == ChunkCarry::Sequential;
    let kernels = &gpu.kernels.chunk;
    let i = table_index(T::DTYPE, gates, config.precision);
    let state = forward_state(
        kernels,
        &lp,
        d,
        (T::DTYPE, gates, config.precision),
        config.state_blocks,
        gpu.compute_capability(),
    );
    let state_bytes = state.shared_bytes;
    const OUTPUT: &str = "launching gateloop_chunk_output";
    let (output_kernel, output_grid, output_bytes, output_label) = match config.output {
        // Where V > 64 the wide blocks, each forming its chunk's scores once
        // for 128 columns.
        ChunkOutput::Staged => match lp.staged_output() {
            (true, grid, bytes) => (&kernels.output_wide[i], grid, bytes, "launching gateloop_chunk_output_wide"),
            (false, grid, bytes) => (&kernels.output[i], grid, bytes, OUTPUT),
        },
        ChunkOutput::StagedNarrow => (&kernels.output[i], lp.grid, lp.output_shared_bytes, OUTPUT),
        ChunkOutput::Fragments => match (&kernels.output_fragments[i], lp.fragment_output_shared_bytes) {
            (Some(f), Some(bytes)) => (f, lp.grid, bytes, OUTPUT),
            _ => {
                return Err(InputError::Param {
                    name: "output",
                    value: format!("{:?} with {} inputs", config.output, T::DTYPE),
                    why: "the register-fragment output kernel takes f16 or bf16 inputs (f32: ChunkOutput::Staged)",
                }
                .into());
            }
        },
    };
    let need = output_bytes.max(state_bytes) as usize;
    if need > kernels.max_shared {
        return Err(InputError::Param {
            name: "device",
            value: format!("{} ({} bytes of shared memory per block)", gpu.name(), kernels.max_shared),
            why: "the chunked kernel needs more shared memory per block than this device offers (sm_80 and sm_90 have enough)",
        }
        .into());
    }
    buffers.check(gpu, stream, d, lp.workspace_len, || {
        format!("at least {} f32 ({} chunks)", lp.workspace_len, lp.num_chunks)
    })?;
    let mut params = GateloopChunkParams {
        num_chunks: lp.num_chunks as i64,
        value_tiles: lp.value_tiles as i64,
        shared_bytes: output_bytes as i32,
        state_shared_bytes: state_bytes as i32,
        cu_seqlens: cu_seqlens.map_or(std::ptr::null(), |p| p as usize as *const i64),
        ..GateloopChunkParams::for_dims(d, T::DTYPE.abi())?
    };
    // Held until this function returns, after the launches.
    let bound = buffers.bind(stream, &mut params, true)?;
    let w = bound.workspace.expect("checked: the workspace is never empty") as usize;
    params.ws_decay = w as *mut f32;
    params.ws_state = (w + 4 * lp.decay_len) as *mut f32;
    lp.bind_segments(&mut params, w);
    let segments = lp.carry_segments;

    let block = (THREADS, 1, 1);
    let carry_block = (CARRY_THREADS, 1, 1);
    let output = (output_kernel, (output_grid, 1), block, output_bytes, output_label);
    let state = (state.func, (state.grid, 1), block, state_bytes, state.doing);
    let mut launches = if sequential {
        vec![state, output]
    } else {
        vec![
            state,
            (
                if packed { &kernels.carry_packed[gates.index()] } else { &kernels.carry[gates.index()] },
                (lp.carry_grid, segments),
                carry_block,
                0,
                if packed { "launching gateloop_chunk_carry_packed" } else { "launching gateloop_chunk_carry" },
            ),
            output,
        ]
    };
    if segments > 1 {
        let sums = (
            &kernels.carry_segments[gates.index()],
            (lp.carry_grid, segments - 1),
            carry_block,
            0,
            "launching gateloop_chunk_carry_segments",
        );
        launches.insert(1, sums);
    }
    for (func, (grid, grid_y), block_dim, shared_mem_bytes, doing) in launches {
        let cfg = LaunchConfig { grid_dim: (grid, grid_y, 1), block_dim, shared_mem_bytes };
        let mut launch = stream.launch_builder(func);
        launch.arg(&params);
        // SAFETY: `func` is gateloop_chunk_{state,state_wide,state_seq,state_seq_wide,output,output_wide,output_frag}_{T}_{g}_{prec}
        // or gateloop_chunk_carry_{,packed_,segments_}{g} (packed_ exactly when cu_seqlens is
        // set; segments_ only when the plan's carry_segments S > 1, with
        // grid.y = S − 1, the carry's grid.y = S, as the kernels index the
        // segments, and ws_carry_segments then points at the plan's
        // 4·S·B·H·K·V f32 from segments_offset, inside the checked
        // workspace, written by the segments launch before the carry, next
        // on `stream`, reads them) for this element type T, gate kind g and
        // precision (table_index / gates.index()), whose only parameter is a
        // GateloopChunkParams by value, which is what is pushed. Every
        // pointer in it comes from a live buffer of this context whose
        // length was checked above against the dims in `params` (complex or
        // real f32 for log_gate, h0, h_final according to `gates`, as the
        // entry point reads them; contiguous strides set by for_dims); the
        // workspace holds ≥ lp.workspace_len f32 = ws_decay (decay_len f32)
        // followed by ws_state (B·H·chunks·parts·K·V f32), exactly the
        // extents the kernels index (packed: cu_seqlens holds d.batch + 1
        // offsets the caller checked to rise strictly from 0 to d.len, so
        // every sequence's steps lie in the one batch row the sequence
        // tensors were checked to hold, and its chunk slots, from
        // ⌊cu_i / 64⌋ + i, lie inside the plan's ⌊L / 64⌋ + N per head);
        // the state kernel writes both before the
        // carry kernel (after it on `stream`) reads and rewrites ws_state,
        // before the output kernel reads it (or state_seq writes what those
        // two write, before the output kernel). h0 is null iff HAS_H0 is
        // clear. The geometry is the one `plan_with` computed: blocks of 256 threads
        // (the __launch_bounds__), grids ≤ 2^31 − 1, dynamic shared memory
        // equal to the kernel's own layout size (the output launch's is the
        // staged, wide or fragment kernel's, whichever `output_kernel` is,
        // with its grid: the wide kernel's B·H·chunks·⌈V / 128⌉ blocks are
        // the tiles it computes from dims.value_dim; the state launch's
        // likewise, forward_state's kernel with its grid and bytes: the wide
        // state kernel's B·H·chunks·⌈V / 128⌉ blocks, the wide walk's
        // B·H·⌈V / 128⌉·⌈K / 32⌉, the tiles and slabs each computes from
        // dims; passed in params and
        // checked by the kernel) and ≤ the function's
        // limit raised at load (need ≤ max_shared was checked above). The buffers outlive the
        // launches: borrows are held until this function returns, and
        // cudarc's drop of a CudaSlice waits on the events the guards record.
        launched(stream, func, cfg, unsafe { launch.launch(cfg) }, doing)?;
    }
    Ok(())
}

/// Runs the chunked kernels (complex gates) on `stream` over device buffers,
/// writing `out`. `T` is the element type of q, k, v and y; log_gate, h0
/// and h_final are complex f32 (interleaved pairs). Asynchronous: it enqueues
/// three kernels (two with the sequential carry; `config` is a
/// [`ChunkPrecision`] or a [`ChunkConfig`]) and never synchronizes.
///
/// `workspace` must hold at least [`LaunchPlan::workspace_len`] f32 of
/// [`plan`]`(dims, T::DTYPE, Gates::Complex)` (overwritten; never 0, so never
/// `None`). Checks on the host: dims (K ≤ 256), every buffer's length (the
/// error names the argument), context, alignment of complex buffers and of
/// the workspace, the device's shared memory. It does not read the data, so
/// the gate's domain (Re ≤ 0) is the caller's responsibility
/// ([`super::check::log_gate`] checks it on the device).
pub fn forward_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    launch(gpu, stream, dims, Buffers::forward(inputs, out, workspace), config.into(), None)
}

/// [`forward_into`] for REAL gates (gated linear attention): `inputs.log_gate`
/// is `[B, L, H, K or 1]` real f32 (Re ≤ 0; below −104, −∞ included, a
/// reset), `inputs.h0` and `out.h_final` are `[B, H, K, V]` real f32. The
/// workspace is [`plan`]`(dims, T::DTYPE, Gates::Real)`'s.
pub fn forward_real_into<T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = Buffers::forward(inputs, out, workspace).with_real_gates();
    launch(gpu, stream, dims, buffers, config.into(), None)
}

/// Packed variable-length sequences (fla's `cu_seqlens`), each with its own
/// state: `dims` is the packed problem (`dims.batch` = 1; q, k, v, log_gate
/// and y `[1, L, H, *]`) and `cu_seqlens` its N + 1 offsets (sequence i is
/// steps `cu_seqlens[i] .. cu_seqlens[i + 1]`; 0 first, L last, strictly
/// increasing: [`crate::packing::sequence_starts`]); `inputs.h0` (optional)
/// and `out.h_final` are `[N, H, K, V]` complex f32. Every sequence's chunks
/// start at its first step, so y and h_final\[i\] are [`forward_into`] on
/// sequence i alone with the same `config`, bit for bit, from one launch of
/// each kernel (no reset gate needed, unlike [`crate::packing`]).
///
/// `workspace` must hold at least [`LaunchPlan::workspace_len`] f32 of
/// [`plan_varlen`]`(dims, cu_seqlens, T::DTYPE, Gates::Complex, config.carry)`.
/// The offsets are checked on the host and uploaded on `stream` (one small
/// allocation a call); the other checks and the asynchrony are
/// [`forward_into`]'s.
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = Buffers::forward(inputs, out, workspace);
    varlen(gpu, stream, dims, cu_seqlens, buffers, config.into())
}

/// [`forward_varlen_into`] with real gates ([`forward_real_into`]'s layouts:
/// log_gate `[1, L, H, K or 1]`, h0 and h_final `[N, H, K, V]` real f32;
/// the workspace [`plan_varlen`]'s with [`Gates::Real`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_real_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = Buffers::forward(inputs, out, workspace).with_real_gates();
    varlen(gpu, stream, dims, cu_seqlens, buffers, config.into())
}

/// The body of [`forward_varlen_into`] and [`forward_varlen_real_into`].
fn varlen<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    buffers: Buffers<'_, T>,
    config: ChunkConfig,
) -> Result<(), GpuError> {
    // `launch` checks the buffers against the launch's dims.
    launch::with_offsets(gpu, stream, dims, cu_seqlens, |d, ptr| launch(gpu, stream, d, buffers, config, Some(ptr)))
}

/// Uploads `p`, runs the chunked kernels (f32, exact) on the Gpu's default
/// stream (allocating the workspace), downloads the outputs; synchronizes.
/// Checks the gate domain on the host.
pub fn forward_host(gpu: &Gpu, p: &Problem<'_, f32>) -> Result<Outputs<f32>, GpuError> {
    forward_host_as::<f32>(gpu, p, ChunkPrecision::Exact)
}

/// [`forward_host`] with q, k, v rounded to `T` on the host (log_gate and h0
/// stay f32), y widened back to f32 (exactly), and a choice of precision.
pub fn forward_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<ChunkConfig>,
) -> Result<Outputs<f32>, GpuError> {
    host_forward::<T>(gpu, p, Gates::Complex, config.into())
}

/// The real-gate kernels from host data: `p`'s log_gate and h0 must be real
/// (Im = 0 everywhere, else [`InputError::Value`]); their real parts are
/// uploaded as real f32, q, k, v rounded to `T`. Returns y (widened to f32)
/// and h_final as complex numbers with Im = 0. Synchronizes.
pub fn forward_real_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<ChunkConfig>,
) -> Result<Outputs<f32>, GpuError> {
    host_forward::<T>(gpu, p, Gates::Real, config.into())
}

/// The body of [`forward_host_as`] and [`forward_real_host_as`].
fn host_forward<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    gates: Gates,
    config: ChunkConfig,
) -> Result<Outputs<f32>, GpuError> {
    let real_gates = gates == Gates::Real;
    let workspace_len = |d: &Dims| Ok(plan_with(d, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::forward_host::<T>(gpu, p, real_gates, workspace_len, SYNC_DOING, |s, d, inputs, out, ws| {
        launch(gpu, s, d, with_gates(Buffers::forward(inputs, out, ws), gates), config, None)
    })
}

/// Packed sequences from host data, one launch of each kernel: `p` is
/// `[1, L, H, *]` with no h0 of its own, sequence i is steps
/// `cu_seqlens[i] .. cu_seqlens[i + 1]` and starts from state i of `h0`
/// (`[N, H, K, V]`, or zero); returns y `[1, L, H, V]` (widened to f32) and
/// h_final `[N, H, K, V]`. [`crate::packing::forward_varlen`]'s answer with
/// [`forward_host_as`] on each sequence alone (same `config`), bit for bit
/// (the CLI's packed files take it). `gates`: [`Gates::Real`] needs real
/// log_gate and h0 (else [`InputError::Value`]). Everything is checked
/// before the upload.
pub fn forward_varlen_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[num_complex::Complex<f32>]>,
    config: impl Into<ChunkConfig>,
    gates: Gates,
) -> Result<Outputs<f32>, GpuError> {
    let config = config.into();
    let sequences = crate::packing::check_varlen(p, cu_seqlens, h0)?;
    let states = launch::HostStates::Packed { sequences, h0 };
    let workspace_len = |d: &Dims| Ok(plan_varlen(d, cu_seqlens, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::forward_host_states::<T>(
        gpu,
        p,
        states,
        gates == Gates::Real,
        workspace_len,
        SYNC_DOING,
        |_, d, i, o, w| {
            // forward_host_states launches on the Gpu's stream, which `varlen`
            // takes as its Arc.
            varlen(gpu, gpu.stream(), d, cu_seqlens, with_gates(Buffers::forward(i, o, w), gates), config)
        },
    )
}

/// [`forward_host_as`] (or, with real gates, [`forward_real_host_as`])
/// through the packed launch: `p`'s B batch rows run as B packed sequences
/// of `p.dims.len` steps, [`forward_varlen_into`] on the same buffers read
/// as `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0 and h_final
/// `[B, H, K, V]` either way). Its answer is the batched launch's, bit for
/// bit: so the packed path meets every input the other paths meet
/// (`dispatch::Variant::Packed`, which the fuzzer runs).
pub fn forward_packed_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    config: impl Into<ChunkConfig>,
    gates: Gates,
) -> Result<Outputs<f32>, GpuError> {
    let config = config.into();
    let workspace_len = |d: &Dims| Ok(rows_packed_plan(d, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::forward_host::<T>(gpu, p, gates == Gates::Real, workspace_len, SYNC_DOING, |_, d, i, o, w| {
        // forward_host launches on the Gpu's stream, which `varlen` takes as its Arc.
        forward_rows_packed_into(gpu, gpu.stream(), d, i, o, w, config, gates)
    })
}

/// The plan of the `[B, L, H, *]` problem `dims` through the packed launch
/// ([`forward_rows_packed_into`]).
pub(crate) fn rows_packed_plan(
    dims: &Dims,
    dtype: Dtype,
    gates: Gates,
    carry: ChunkCarry,
) -> Result<LaunchPlan, InputError> {
    let (packed, cu_seqlens) = crate::packing::rows_as_sequences(dims);
    plan_varlen(&packed, &cu_seqlens, dtype, gates, carry)
}

/// The `[B, L, H, *]` problem `dims` through the packed launch: its B batch
/// rows as B packed sequences of L steps, the same buffers read as
/// `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0 and h_final `[B, H,
/// K, V]` either way; the workspace [`rows_packed_plan`]'s); the batched
/// launch's answer, bit for bit. [`forward_packed_host_as`] and the bench's
/// `chunked-varlen` run it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows_packed_into<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    inputs: DeviceInputs<'_, T>,
    out: DeviceOutputs<'_, T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    config: ChunkConfig,
    gates: Gates,
) -> Result<(), GpuError> {
    let (packed, cu_seqlens) = crate::packing::rows_as_sequences(dims);
    varlen(gpu, stream, &packed, &cu_seqlens, with_gates(Buffers::forward(inputs, out, workspace), gates), config)
}

/// `buffers` with `gates`' gate side.
fn with_gates<T>(buffers: Buffers<'_, T>, gates: Gates) -> Buffers<'_, T> {
    if gates == Gates::Real { buffers.with_real_gates() } else { buffers }
}

/// What the host paths' synchronization is doing, for its error.
const SYNC_DOING: &str = "synchronizing after the chunked kernels";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    #[test]
    fn shared_memory_matches_the_kernel_layout() {
        // By hand from cuda/chunk.cu, f32 (TF32, 4 bytes) complex: prefix
        // 5·64·16·4 = 20480, raw k 4096, V split 2·64·68·4 = 34816, K̃ split
        // 2·64·36·4 = 18432, staging 8192.
        assert_eq!(shared_bytes(Dtype::F32, Gates::Complex).0, 20480 + 4096 + 34816 + 18432 + 8192);
        // Output: prefix with padded rows 5·64·20·4 = 25600, raw q, k in
        // padded rows 2·64·20·4 = 10240,
        // slab phase 2·4·(64·36 + 32·68 + 96·36 + 48·36) = 77312 (> final
        // phase 2·2·64·68·4 = 69632), diagonal scores 4096, staging 8192.
        assert_eq!(shared_bytes(Dtype::F32, Gates::Complex).1, 25600 + 10240 + 77312 + 4096 + 8192);
        // Every instantiation (state, output), bytes: the output's padded
        // rows 7168 (complex) or 5120 (real) more than before 2026-12-04.
        assert_eq!(shared_bytes(Dtype::F32, Gates::Complex), (86016, 125440));
        assert_eq!(shared_bytes(Dtype::F32, Gates::Real), (69632, 107520));
        assert_eq!(shared_bytes(Dtype::F16, Gates::Complex), (61440, 90624));
        assert_eq!(shared_bytes(Dtype::Bf16, Gates::Complex), (61440 - 9216, 90624));
        assert_eq!(shared_bytes(Dtype::F16, Gates::Real), (49152, 74752));
        assert_eq!(shared_bytes(Dtype::Bf16, Gates::Real), (49152 - 9216, 74752 - 9216));
        // bf16's value tile is one plane (2·64·72·2 / 2 = 9216 bytes less):
        // its state kernel (and the backward's grad_w) 4 complex or 5 real
        // blocks an H200 SM (228 KiB, 1 KiB reserved a block), 3 or 4 an
        // A100's (164 KiB), where the launch bounds in cuda/chunk.cu count on
        // them.
        let fit = |bytes: u32, kib: u32| kib * 1024 / (bytes + 1024);
        let (complex, real) = (shared_bytes(Dtype::Bf16, Gates::Complex).0, shared_bytes(Dtype::Bf16, Gates::Real).0);
        assert_eq!((fit(complex, 228), fit(real, 228), fit(complex, 164), fit(real, 164)), (4, 5, 3, 4));
        // The wide output: a state slab of 128 columns (complex f32: 2·32·132·4
        // = 33792 in place of 17408), V in halves through the narrow final
        // phase's bytes. Real gates' slab phase stays under the final phase
        // (the same bytes as the narrow launch, and three blocks an SM on
        // sm_90); complex 16-bit keeps two an SM (2 · 98816 ≤ 227 KiB).
        assert_eq!(wide_output_shared_bytes(Dtype::F32, Gates::Complex), 125440 - 17408 + 33792);
        assert_eq!(wide_output_shared_bytes(Dtype::F32, Gates::Real), 107520);
        assert_eq!(wide_output_shared_bytes(Dtype::Bf16, Gates::Complex), 98816);
        assert_eq!(wide_output_shared_bytes(Dtype::F16, Gates::Complex), 98816);
        // bf16 real: its final phase's V one plane (2·64·72·2 + 64·72·2 =
        // 27648), under the wide slab phase's 2·2·(64·24 + 16·136 + 96·24 +
        // 48·24) = 28672: 1024 bytes over the narrow launch's, still three
        // an H200 SM.
        let wide = wide_output_shared_bytes(Dtype::Bf16, Gates::Real);
        assert_eq!((wide, wide - shared_bytes(Dtype::Bf16, Gates::Real).1), (66560, 1024));
        assert!(3 * (wide + 1024) <= 228 * 1024);
        assert_eq!(wide_output_shared_bytes(Dtype::F16, Gates::Real), 74752);
        // The walks: slabs of 16 (complex) or 32 (real) channels, the raw
        // slab in the staging tiles, then the carried state and decays.
        // bf16 real: prefix 3·64·32·4 = 24576, V 64·72·2 = 9216 (one plane),
        // K̃ split 2·64·40·2 = 10240 (Fast: one plane, 5120), staging 8192,
        // X_c's row pad 32·8·4 = 1024, S 32·64·4 = 8192, decays 32·8 = 256:
        // three blocks an H200 SM (1 KiB reserved each), Fast four (its
        // launch bound).
        use ChunkPrecision::{Exact, Fast};
        let real_walk = |p| sequential_shared_bytes(Dtype::Bf16, Gates::Real, p);
        assert_eq!(real_walk(Exact), 24576 + 9216 + 10240 + 8192 + 1024 + 8192 + 256);
        assert_eq!(
            (real_walk(Exact) - real_walk(Fast), fit(real_walk(Exact), 228), fit(real_walk(Fast), 228)),
            (5120, 3, 4)
        );
        // bf16 complex: 20480 + 9216 + 10240 + 8192 + 8192 + 128, four an
        // H200 SM, two an A100's; Fast 5120 less, three an A100's (the fast
        // walk's bounds).
        let walk = |p| sequential_shared_bytes(Dtype::Bf16, Gates::Complex, p);
        assert_eq!(
            (walk(Exact), fit(walk(Exact), 228), fit(walk(Exact), 164)),
            (20480 + 9216 + 10240 + 8192 + 8192 + 128, 4, 2)
        );
        assert_eq!((walk(Exact) - walk(Fast), fit(walk(Fast), 164)), (5120, 3));
        // f32 complex: prefix 5·64·16·4 = 20480, V 34816, K̃ 18432 (Fast
        // 9216: two blocks an SM of either card), staging 8192, S 2·16·64·4 =
        // 8192, decays 16·8 = 128.
        // The wide real walks: S 32·128·4 (8192 more) and a second value
        // tile as the first (bf16 9216, f16 two planes 18432): bf16 Fast
        // three an H200 SM, Exact two (cuda/chunk.cu's launch bounds), f16
        // two; none for complex gates or f32.
        let wide = |t, p| sequential_wide_shared_bytes(t, Gates::Real, p).unwrap();
        assert_eq!(wide(Dtype::Bf16, Fast), real_walk(Fast) + 8192 + 9216);
        assert_eq!(wide(Dtype::Bf16, Exact), real_walk(Exact) + 8192 + 9216);
        assert_eq!(wide(Dtype::F16, Fast), sequential_shared_bytes(Dtype::F16, Gates::Real, Fast) + 8192 + 18432);
        assert_eq!(
            [wide(Dtype::Bf16, Fast), wide(Dtype::Bf16, Exact), wide(Dtype::F16, Fast), wide(Dtype::F16, Exact)]
                .map(|b| fit(b, 228)),
            [3, 2, 2, 2]
        );
        for p in [Exact, Fast] {
            assert_eq!(sequential_wide_shared_bytes(Dtype::F32, Gates::Real, p), None);
            assert_eq!(sequential_wide_shared_bytes(Dtype::Bf16, Gates::Complex, p), None);
        }
        let f32_walk = |p| sequential_shared_bytes(Dtype::F32, Gates::Complex, p);
        assert_eq!(f32_walk(Exact), 20480 + 34816 + 18432 + 8192 + 8192 + 128);
        assert_eq!(
            (f32_walk(Exact) - f32_walk(Fast), fit(f32_walk(Fast), 228), fit(f32_walk(Fast), 164)),
            (9216, 2, 2)
        );
        assert_eq!(sequential_shared_bytes(Dtype::F32, Gates::Real, Exact), 94464 + 1024);
        // X_c's row pad costs no real walk a block an SM on either card.
        for dtype in Dtype::ALL {
            for p in [Exact, Fast] {
                let narrow = sequential_shared_bytes(dtype, Gates::Real, p);
                let wide = sequential_wide_shared_bytes(dtype, Gates::Real, p).unwrap_or(narrow);
                for bytes in [narrow, wide] {
                    for kib in [164, 228] {
                        assert_eq!(fit(bytes, kib), fit(bytes - 1024, kib), "{dtype} {p:?} {bytes} B, {kib} KiB");
                    }
                }
            }
        }
        assert_eq!(sequential_shared_bytes(Dtype::F16, Gates::Complex, Exact), 65664);
        for dtype in Dtype::ALL {
            for gates in Gates::ALL {
                let (a, b) = shared_bytes(dtype, gates);
                let w = wide_output_shared_bytes(dtype, gates);
                for precision in ChunkPrecision::ALL {
                    let q = sequential_shared_bytes(dtype, gates, precision);
                    let qw = sequential_wide_shared_bytes(dtype, gates, precision).unwrap_or(q);
                    assert!(qw.is_multiple_of(128) && qw <= 163 * 1024, "{dtype} {gates:?} {precision:?}: {qw}");
                    // Every carve is a multiple of 128 bytes, and sm_80's opt-in limit (163 KiB) holds.
                    assert!(
                        a.is_multiple_of(128)
                            && b.is_multiple_of(128)
                            && w.is_multiple_of(128)
                            && q.is_multiple_of(128),
                        "{dtype} {gates:?} {precision:?}"
                    );
                    assert!(a.max(b).max(w).max(q) <= 163 * 1024, "{dtype} {gates:?}: {a} {b} {w} {q}");
                }
            }
        }
    }

    #[test]
    fn plan_examples() {
        let p = plan(&dims(2, 65, 3, 5, 65, false), Dtype::F32, Gates::Complex).unwrap();
        assert_eq!((p.num_chunks, p.value_tiles, p.grid), (2, 2, 6 * 2 * 2));
        assert_eq!(p.carry_grid, (6 * 5 * 65usize).div_ceil(256) as u32);
        assert_eq!(p.decay_len, 6 * 2 * 5 * 2);
        assert_eq!(p.workspace_len, p.decay_len + 6 * 2 * 2 * 5 * 65);
        let r = plan(&dims(2, 65, 3, 5, 65, true), Dtype::Bf16, Gates::Real).unwrap();
        assert_eq!((r.decay_len, r.workspace_len), (6 * 2, 6 * 2 + 6 * 2 * 5 * 65));
        let p = plan(&dims(1, 65536, 1, 64, 64, false), Dtype::F16, Gates::Complex).unwrap();
        assert_eq!((p.num_chunks, p.grid), (1024, 1024));
        assert!(matches!(
            plan(&dims(1, 1, 1, 257, 1, false), Dtype::F32, Gates::Real),
            Err(InputError::Param { name: "key_dim", .. })
        ));
        assert!(matches!(
            plan(&dims(1, 0, 1, 1, 1, false), Dtype::F32, Gates::Real),
            Err(InputError::ZeroDim { name: "len" })
        ));
        assert!(matches!(
            plan(&dims(1 << 16, 1 << 16, 1 << 6, 1, 1, false), Dtype::F32, Gates::Complex),
            Err(InputError::TooLarge { .. })
        ));
    }

    /// The carry's segments: as many as bring the threads to 2^19, at most
    /// one per 16 chunks, none empty; one segment for every problem that
    /// fills the GPU or has fewer than 32 chunks; the workspace grows by
    /// 4·S·B·H·K·V f32 after the chunk states; the packed and sequential
    /// carries never segment.
    #[test]
    fn carry_segments_rule() {
        assert_eq!(carry_segments(1024, 4 * 64 * 64), 32); // B1 H4 L65536 K = V = 64
        assert_eq!(carry_segments(1024, 16 * 16), 64); // B1 H1 L65536 K = V = 16
        assert_eq!(carry_segments(64, 8 * 16 * 64 * 64), 1); // B8 H16 L4096: 2^19 threads
        assert_eq!(carry_segments(16, 2 * 3 * 64 * 128), 1);
        assert_eq!(carry_segments(31, 16), 1);
        assert_eq!(carry_segments(32, 16), 2);
        // 65 chunks: 4 segments of 17, the last 14 (⌈65 / 4⌉ = 17, and
        // ⌈65 / 17⌉ = 4: none empty).
        assert_eq!(carry_segments(65, 30), 4);
        assert_eq!(carry_segments(100, 1), 6); // ⌈100 / 6⌉ = 17, ⌈100 / 17⌉ = 6
        let d = dims(1, 65536, 4, 64, 64, false);
        let p = plan(&d, Dtype::Bf16, Gates::Real).unwrap();
        let state = 4 * 64 * 64;
        assert_eq!((p.carry, p.carry_segments), (ChunkCarry::Separate, 32));
        assert_eq!(p.segments_offset, p.decay_len + 1024 * state); // real gates: one part
        assert_eq!(p.workspace_len, p.segments_offset + 4 * 32 * state);
        // The sequential carry: no segments, the same workspace.
        let walk = plan_with(&d, Dtype::Bf16, Gates::Real, ChunkCarry::Sequential).unwrap();
        assert_eq!((walk.carry_segments, walk.workspace_len), (1, p.workspace_len));
        let one = plan(&dims(8, 4096, 16, 64, 64, false), Dtype::F32, Gates::Complex).unwrap();
        assert_eq!((one.carry_segments, one.workspace_len), (1, one.segments_offset));
        let cu = [0, 65536];
        let packed = plan_varlen(&dims(1, 65536, 4, 64, 64, false), &cu, Dtype::F32, Gates::Complex, ChunkCarry::Auto);
        assert_eq!(packed.unwrap().carry_segments, 1);
    }

    /// The wide output launch's grid: one block per 128 value columns of
    /// each chunk (half the narrow grid's blocks at V = 128, and a
    /// part-filled block at V = 70 or 200).
    #[test]
    fn wide_output_grid() {
        for (v, tiles, wide) in [(1, 1, 1), (64, 1, 1), (65, 2, 1), (70, 2, 1), (128, 2, 1), (200, 4, 2), (256, 4, 2)] {
            let d = dims(2, 130, 3, 16, v, false);
            let lp = plan(&d, Dtype::Bf16, Gates::Real).unwrap();
            assert_eq!(lp.value_tiles, tiles, "V = {v}");
            assert_eq!(lp.grid, 2 * 3 * 3 * tiles, "V = {v}");
            assert_eq!(lp.wide_grid, 2 * 3 * 3 * wide, "V = {v}");
        }
    }

    /// ChunkCarry::Auto: the sequential walk for real gates and 16-bit
    /// inputs from SEQUENTIAL_MIN_BLOCKS slabs of 16 on (B·H·value
    /// tiles·⌈K / 16⌉; the real walk's blocks take 32 channels), the separate
    /// carry for complex gates (2026-12-04), for f32 and below the
    /// threshold; a forced carry as asked.
    #[test]
    fn automatic_carry_rule() {
        let big = dims(8, 4096, 16, 64, 64, false); // 8·16·1·4 = 512 slabs of 16
        let small = dims(8, 4096, 16, 48, 64, false); // 8·16·1·3 = 384 slabs of 16
        let carry = |d: &Dims, t, g| plan(d, t, g).unwrap().carry;
        for t in [Dtype::Bf16, Dtype::F16] {
            assert_eq!(plan(&big, t, Gates::Real).unwrap().sequential_grid, 256);
            assert_eq!(plan(&big, t, Gates::Complex).unwrap().sequential_grid, 512);
            // K = 48: two blocks a value tile, the second with 16 channels.
            assert_eq!(plan(&small, t, Gates::Real).unwrap().sequential_grid, 256);
            assert_eq!(carry(&big, t, Gates::Real), ChunkCarry::Sequential);
            assert_eq!(carry(&big, t, Gates::Complex), ChunkCarry::Separate);
            assert_eq!(carry(&small, t, Gates::Real), ChunkCarry::Separate);
        }
        assert_eq!(carry(&big, Dtype::F32, Gates::Real), ChunkCarry::Separate);
        let forced = plan_with(&big, Dtype::Bf16, Gates::Complex, ChunkCarry::Sequential).unwrap();
        assert_eq!(forced.carry, ChunkCarry::Sequential);
    }

    /// Packed: ⌊L / 64⌋ + N chunk slots a head, sequence i's chunks from slot
    /// ⌊cu_i / 64⌋ + i (the kernels' packed_slot_base), no two sequences
    /// sharing one and the last inside the row; workspace rows and the
    /// state and output grids per head, the carry per sequence; the
    /// sequential carry refused, Auto resolved to the separate one.
    #[test]
    fn plan_varlen_gives_each_sequence_its_own_slots() {
        let cu = [0usize, 70, 71, 135, 263, 300];
        let n = cu.len() - 1;
        let d = dims(1, 300, 3, 5, 65, false);
        let p = plan_varlen(&d, &cu, Dtype::Bf16, Gates::Complex, ChunkCarry::Auto).unwrap();
        let slots = 300 / 64 + n;
        assert_eq!((p.num_chunks, p.value_tiles, p.grid), (slots as u64, 2, (3 * slots * 2) as u32));
        assert_eq!(p.carry, ChunkCarry::Separate);
        assert_eq!(p.carry_grid, (n * 3 * 5 * 65usize).div_ceil(256) as u32);
        assert_eq!(p.decay_len, 3 * slots * 5 * 2);
        assert_eq!(p.workspace_len, p.decay_len + 3 * slots * 2 * 5 * 65);
        let mut used = vec![false; slots];
        for i in 0..n {
            let chunks = (cu[i + 1] - cu[i]).div_ceil(CHUNK_LEN);
            for c in 0..chunks {
                let slot = cu[i] / CHUNK_LEN + i + c;
                assert!(slot < slots && !used[slot], "sequence {i} chunk {c}: slot {slot}");
                used[slot] = true;
            }
        }
        assert!(matches!(
            plan_varlen(&d, &cu, Dtype::Bf16, Gates::Complex, ChunkCarry::Sequential),
            Err(InputError::Param { name: "carry", .. })
        ));
        assert!(matches!(
            plan_varlen(&d, &[0, 70, 299], Dtype::F32, Gates::Real, ChunkCarry::Auto),
            Err(InputError::Value { name: "cu_seqlens", .. })
        ));
        // B rows of 128 steps as B sequences: their 2 chunks each, and one
        // empty slot a sequence (its ⌊L / 64⌋ + 1 slots).
        let b = dims(4, 128, 2, 8, 8, false);
        let rows = rows_packed_plan(&b, Dtype::F32, Gates::Complex, ChunkCarry::Auto).unwrap();
        assert_eq!(rows.num_chunks, (4 * 128 / 64 + 4) as u64);
    }

    #[test]
    fn fragment_output_layout() {
        // Prefix tables, raw q and k, S slab and V (split bf16/f16, rows of
        // 64 + 8), diagonal and off-diagonal scores: frag_output_smem_bytes.
        let off = 48 * 52 * 4;
        let complex = 20480 + 8192 + 2 * 32 * 72 * 2 + 2 * 64 * 72 * 2 + 4096 + off;
        let real = 12288 + 8192 + 2 * 16 * 72 * 2 + 2 * 64 * 72 * 2 + 4096 + off;
        for dtype in [Dtype::F16, Dtype::Bf16] {
            assert_eq!(fragment_output_shared_bytes(dtype, Gates::Complex), Some(complex));
            assert_eq!(fragment_output_shared_bytes(dtype, Gates::Real), Some(real));
        }
        assert_eq!(fragment_output_shared_bytes(Dtype::F32, Gates::Complex), None);
        // Two blocks fit an H200 SM (228 KB), and it is less than the staged kernel's.
        assert!(2 * complex < 228 * 1024 && complex < shared_bytes(Dtype::Bf16, Gates::Complex).1);
    }

    #[test]
    fn the_mirror_uses_the_kernel_chunking() {
        let p = crate::cpu::chunked::ChunkParams::default();
        assert_eq!((p.chunk_len, p.sub_chunk_len), (CHUNK_LEN, SUB_CHUNK_LEN));
    }
}
