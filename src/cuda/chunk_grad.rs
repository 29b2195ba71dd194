//! The chunked BACKWARD on the GPU (`cuda/chunk_grad.cu`): the gradients of
//! L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final) with respect to q, k, v,
//! log_gate and h0, for complex gates ([`backward_into`]) and for real gates
//! (gated linear attention, [`backward_real_into`]: the backward of
//! [`chunk::forward_real_into`], the same kernels with the imaginary part
//! compiled out, as the forward's real-gate kernels). The kernel twin of
//! [`crate::cpu::chunked_grad`] (read its module doc for the derivation):
//! the same chunks of 64, anchored sub-chunks of 16, segmented chunk-local
//! gate prefix (shared with the forward through `cuda/chunk_common.cuh`),
//! the same pre-phase accumulators and the same gate-gradient formulation
//! (w', u and the through term, which avoids the cancellation of the
//! chunk-end state term).
//!
//! # Structure: six launches on one stream (seven with dh0)
//!
//! 1. the forward's `state` kernel ([`super::chunk`], tensor cores, at the
//!    requested [`ChunkPrecision`]): U_c and A_c; and `grad_w`, one block per
//!    (b, h, chunk, 64 value columns): W_c = Σ_n conj(Q̃_n) dy_nᵀ.
//! 2. the forward's `carry` (U_c → S_in(c); h_final into a workspace sink)
//!    and `grad_adjoint_carry`, one thread per (b, h, key row, value
//!    column): D(c − 1) = conj(A_c) D(c) + W_c from D(last) = dh_final,
//!    W_c overwritten by D(c). Then, when dh0 is asked for, `grad_dh0`, one
//!    thread per state element: dh0 = D(−1) = conj(A_0) D(0) + W_0 again on
//!    CUDA cores, from D(0) and chunk 0's inputs (a running product of the
//!    gates, its power of two applied last), because W_0's tensor-core
//!    operands q_n E(n, −1) are f32 subnormals where the first gate is
//!    (e^−90), which a tensor core may flush while dh0 itself is a normal
//!    number (found by `gateloop fuzz --device cuda`; see the kernel).
//!    (When the forward's plan takes [`chunk::ChunkCarry::Sequential`], the
//!    forward's `state` and `carry` are one launch, `state_seq`, and
//!    `grad_w` and the adjoint carry another, `grad_w_seq` (walking the
//!    chunks in reverse with D on chip): the same workspace bit for bit, four
//!    launches in all, five with dh0.)
//! 3. `grad_qk`, one block per (b, h, chunk), walking the key channels in
//!    slabs of 16: s = dY Vᵀ once, then per slab dq, dk and the gate
//!    gradient; and `grad_dv`, one block per (b, h, chunk, value tile):
//!    dv = Pᵀ dY + [Re K̃ | Im K̃]·[Re D; Im D].
//!
//! `grad_w` and `grad_dv` multiply on tensor cores like the forward (TF32
//! operands for f32 inputs, f16 / bf16 their own), always with three split
//! products (the forward's Exact, ~21 bits for TF32): `grad_w` is the state
//! kernel's product with [Re Q̃ | −Im Q̃] and dY for K̃ and V, and `grad_dv`
//! runs the forward output kernel's pass (the scores P formed exactly as the
//! forward forms them: anchored off-diagonal sub-chunk blocks on tensor
//! cores, diagonal blocks pairwise) with K̃ D(c) + Pᵀ dY for Q̃ S_c + P V.
//! `grad_qk` forms s = dY Vᵀ, the off-diagonal sub-chunk blocks of dq and dk
//! (s k̃ and sᵀ q̃ on the forward's anchored rows, as `cpu::chunked_grad`
//! does) and the inter-chunk products S_in dy_n, D v_n on tensor cores too;
//! the four diagonal sub-chunk blocks (pairwise, one exp each), dq, dk and
//! the gate scans compute in f32 on CUDA cores.
//! [`ChunkPrecision`] only selects the forward state kernel of step 1 (Fast:
//! U_c from one TF32 / f16 / bf16 product, about 1e-3 relative).
//!
//! # Packed sequences
//!
//! [`backward_varlen_into`] (and [`backward_varlen_real_into`]) is the
//! backward of [`chunk::forward_varlen_into`]: N sequences packed along
//! time in one batch row, each with its own h0, dh_final and dh0, in one
//! launch of each kernel. The forward's packed layout ([`plan_varlen`]):
//! every sequence's chunks start at its first step, a head's sequences
//! share one row of ⌊L/64⌋ + N chunk slots (decays, S_in(c) and D(c)
//! alike); `grad_w`, `grad_qk` and `grad_dv` run one block per (head, slot
//! [, value tile]) and find their sequence in their prologue (an empty
//! slot's block returns); the carries are the packed ones
//! (`gateloop_chunk_carry_packed_*`, `gateloop_chunk_grad_adjoint_carry_packed_*`),
//! one thread per (sequence, head, key row, value column), and `grad_dh0`
//! reads each sequence's first chunk. Every sequence's gradients are the
//! backward's on it alone, bit for bit. The walking kernels run batched
//! problems only, so the packed launch takes the separate carry.
//!
//! # Outputs, memory, determinism
//!
//! dq, dk, dv are written in the inputs' element type `T` (rounded once);
//! dlog_gate and dh0 are complex f32 (real f32 with real gates). Memory
//! beyond inputs and gradients: the workspace ([`GradPlan::workspace_len`]):
//! the decays, S_in(c) and D(c) (8·B·H·⌈L/64⌉·K·V bytes each, half that with
//! real gates) and an h_final sink (8·B·H·K·V bytes, or 4):
//! O(B·H·(L/64)·K·V), never O(L·K·V). No atomics: every output element is
//! written by one thread, every sum has a fixed order (a per-head gate sums
//! its K channels in a fixed order inside one block), so two runs are
//! bitwise equal.
//!
//! The kernels compile spill-free for sm_80 and sm_90;
//! `tests/gpu_chunked_grad.rs` passed on an H200 (2026-11-30, complex gates;
//! the real-gate kernels came after and have run on the emulated device
//! only, where they are within 4.6e-7 of the f64 reference in f32) and
//! skips without a device.
//!
//! # A training step: the saved forward
//!
//! Steps 1 and 2's forward launches compute what the forward computed (the
//! decays and the chunk states S_in(c)). [`forward_saving_into`] runs the
//! forward into the backward's workspace and returns a [`SavedForward`]
//! holding it; [`backward_saved_into`] reads those states instead of
//! recomputing them (one to three launches fewer, the same gradients bit
//! for bit), after checking that it is that forward's backward (stream,
//! dims, element type, input buffers; packed sequences:
//! [`forward_varlen_saving_into`], [`backward_varlen_saved_into`]). Real
//! gates, bf16:
//!
//! ```
//! use gateloop::Dims;
//! use gateloop::cuda::chunk::{ChunkPrecision, DeviceOutputs, Gates};
//! use gateloop::cuda::chunk_grad::{self, DeviceGradInputs, DeviceGrads, DeviceInputs};
//! use gateloop::cuda::half::bf16;
//! use gateloop::cuda::{Dtype, Gpu};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let gpu = match Gpu::new(0) {
//! #     Ok(gpu) => gpu,
//! #     // The test command's emulated device runs this example with a GPU required.
//! #     Err(e) if std::env::var_os("GATELOOP_REQUIRE_GPU").is_some_and(|v| v == "1") => return Err(e.into()),
//! #     Err(_) => return Ok(()),
//! # };
//! let dims = Dims::new(2, 200, 2, 32, 32); // B, L, H, K, V
//! let s = gpu.stream();
//! let host = |n: usize, t: f32| -> Vec<bf16> { (0..n).map(|i| bf16::from_f32((0.3 * i as f32 + t).sin())).collect() };
//! let q = s.clone_htod(&host(dims.qk_len(), 0.0))?;
//! let k = s.clone_htod(&host(dims.qk_len(), 1.0))?;
//! let v = s.clone_htod(&host(dims.v_len(), 2.0))?;
//! let log_gate = s.clone_htod(&vec![-0.05f32; dims.gate_len()])?; // real gates: log a ≤ 0
//! let (mut y, mut h_final) = (s.alloc_zeros::<bf16>(dims.v_len())?, s.alloc_zeros::<f32>(dims.state_len())?);
//! // The backward's workspace; the forward fills its first part.
//! let plan = chunk_grad::plan(&dims, Dtype::Bf16, Gates::Real)?;
//! let mut workspace = s.alloc_zeros::<f32>(plan.workspace_len)?;
//! let inputs = DeviceInputs { q: &q, k: &k, v: &v, log_gate: &log_gate, h0: None };
//! let out = DeviceOutputs { y: &mut y, h_final: &mut h_final };
//! let saved = chunk_grad::forward_saving_into::<bf16>(
//!     &gpu, s, &dims, Gates::Real, inputs, out, &mut workspace, ChunkPrecision::Exact,
//! )?;
//!
//! // ... the loss, and its gradient dy with respect to y ...
//! let dy = s.clone_htod(&host(dims.v_len(), 3.0))?;
//! let (mut dq, mut dk) = (s.alloc_zeros::<bf16>(dims.qk_len())?, s.alloc_zeros::<bf16>(dims.qk_len())?);
//! let mut dv = s.alloc_zeros::<bf16>(dims.v_len())?;
//! let mut dlog_gate = s.alloc_zeros::<f32>(dims.gate_len())?;
//! let grads = DeviceGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv, dlog_gate: &mut dlog_gate, dh0: None };
//! let upstream = DeviceGradInputs { dy: &dy, dh_final: None };
//! chunk_grad::backward_saved_into::<bf16>(&gpu, s, &dims, inputs, upstream, grads, saved)?;
//! assert!(s.clone_dtoh(&dlog_gate)?.iter().all(|x| x.is_finite()));
//! # Ok(())
//! # }
//! ```

use cudarc::driver::sys::CUfunction_attribute;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use num_complex::Complex;

use super::abi::{self, GateloopChunkGradParams, GateloopChunkParams};
use super::chunk::{
    self, CARRY_THREADS, ChunkCarry, ChunkConfig, ChunkPrecision, Gates, KEY_SLAB, THREADS, VALUE_TILE, WIDE_TILE,
};
use super::element::{Dtype, Element};
use super::launch::{self, GradBuffers, GradParams, SeqParams};
use super::phases::launched;
use super::{DriverContext, Gpu, GpuError};
use crate::error::InputError;
use crate::problem::{Dims, Problem};
use crate::reference::grad::Grads;

pub use super::launch::{DeviceGradInputs, DeviceGrads, DeviceInputs};

// SAFETY: the bindgen mirror (#[repr(C)]) of the C struct the backward
// kernels take by value, layout pinned on both sides (the header's
// static_assert, bindgen's layout checks, tests/abi.rs); only integers and
// raw device addresses (valid bytes for any value), dereferenced only by the
// kernels, whose launcher (`backward_into`) checks every buffer first.
unsafe impl DeviceRepr for GateloopChunkGradParams {}

/// Bytes of dynamic shared memory of the (grad_w, grad_qk, grad_dv) kernels
/// for element type `dtype`: the layouts in cuda/chunk_grad.cu (the kernels
/// trap if given less). grad_w stages its tensor-core operands exactly as
/// the forward's state kernel does (raw q, the dY tile and [Re Q̃ | −Im Q̃]
/// split in the element's operand type, the warps' staging tiles), so it
/// takes that kernel's bytes (of `gates`); grad_dv runs the forward output
/// kernel's pass (`intra_pass` in cuda/chunk_common.cuh) reading the scores,
/// in that layout less what forming them takes (`adjoint_smem_bytes`;
/// the wide launch's, of 128 value columns, is the same size);
/// grad_qk's is `qk_smem_bytes`: q, k raw and s (f32), a union of the
/// off-diagonal phase (the six 16 × 16 blocks of s, the anchored q̃ per pair
/// and k̃ per key sub-chunk split, reused for their products in f32 and the
/// diagonal sub-chunks' cross rows) and the inter-chunk phase (dY, V, S_in,
/// D over 32 value columns split, 64 for real bf16 inputs, whose dY and V
/// take one plane; reused for X, Y in f32), then a tail: the
/// scores' ten 16 × 16 f32 blocks (summed over the slabs for grad_dv), w', u,
/// the per-head sums and the through terms. The s phase (dY, V split; bf16
/// their hi planes alone), which ends before the tail is first written,
/// overlays the union and the tail from the union's start.
/// Real `gates` take a real gate prefix and operand
/// slabs of K̃ alone, and grad_qk's f32 products X, Y rows of Re alone.
pub fn shared_bytes(dtype: Dtype, gates: Gates) -> (u32, u32, u32) {
    let (c, s, t) = (chunk::CHUNK_LEN, KEY_SLAB, VALUE_TILE);
    let pad = chunk::operand_pad(dtype);
    let split = |rows: usize, ld: usize| chunk::split_bytes(dtype, rows, ld);
    // The slab's operand width (Re and Im, or Re), and the rows of the f32
    // products X, Y: that width and 8 floats of padding against bank
    // conflicts (cuda/chunk_grad.cu: ld_product).
    let (sub, width) = (chunk::SUB_CHUNK_LEN, gates.parts() * s);
    let product_ld = width + 8;
    let (pairs, key_subs) = (c / sub * (c / sub - 1) / 2, c / sub - 1);
    let prefix = chunk::prefix_bytes(gates, true);
    let (w, _) = chunk::shared_bytes(dtype, gates);
    let dv = chunk::adjoint_shared_bytes(dtype, gates, VALUE_TILE);
    // The inter-chunk phase's steps of value columns: 64 for real bf16
    // inputs, else 32; its dY and V raw tiles (one plane for bf16), S_in and
    // D split (cuda/chunk_grad.cu: inter_cols, qk_inter_bytes).
    let inter_cols = if gates == Gates::Real && dtype == Dtype::Bf16 { t } else { t / 2 };
    let inter = (2 * chunk::raw_tile_bytes_cols(dtype, inter_cols) + 2 * split(width, inter_cols + pad))
        .max(2 * c * product_ld * 4);
    let offdiag = split(pairs * sub, sub + pad) + split(pairs * sub, width + pad) + split(key_subs * sub, width + pad);
    // Its products X, Y (f32), then the diagonal sub-chunks' cross rows: 32
    // query and 32 key rows, complex [Re | Im] of the slab, real padded to
    // the prefix row (cuda/chunk_common.cuh: cross_scratch_bytes).
    let cross_ld = if gates == Gates::Complex { 2 * s } else { abi::GATELOOP_CHUNK_PREFIX_LD as usize };
    let offdiag_out = 4 * (pairs + key_subs) * sub * product_ld + 2 * (c / 2) * cross_ld * 4;
    let union = inter.max(offdiag).max(offdiag_out);
    // The tail after the union: the scores P's 6 off-diagonal and 4 diagonal
    // 16 × 16 blocks, summed over the slabs for grad_dv (kQkScoresBytes);
    // w' and u rows padded by one entry (kLdGate) and the per-head sums, a
    // complex an entry (real gates: a float, GateRows); the through terms.
    let tail = 4 * (pairs + c / sub) * sub * sub + 4 * (gates.parts() * 2 * (c * (s + 1) + c) + 2 * s + 2);
    // The s phase's dY and V tiles: one plane each for bf16 inputs, exact in
    // their bf16 operands (carve_terms). They overlay the union and, where
    // longer, the tail, which is first written after the s phase
    // (cuda/chunk_grad.cu: qk_smem_bytes).
    let s_phase = 2 * chunk::raw_tile_bytes(dtype);
    // The prefix tables and raw q, k in padded rows (Block's kLd), s (f32).
    let qk = prefix + 2 * chunk::slab_table_bytes(true) + 4 * c * c + s_phase.max(union + tail);
    (w, qk as u32, dv)
}

/// The launch geometry and workspace of one backward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradPlan {
    /// The forward's plan (its state and carry kernels run first).
    pub forward: chunk::LaunchPlan,
    /// Blocks of grad_qk: B·H·num_chunks (packed: H·num_chunks slots).
    pub qk_grid: u32,
    /// f32 offset of D(c) (after the forward's decays and states).
    pub adj_offset: usize,
    /// f32 offset of the h_final sink.
    pub sink_offset: usize,
    /// f32 offset of the chunks' scores P (B·H·chunks·64·64, written by
    /// grad_qk and read by grad_dv, which then does not form them again).
    pub scores_offset: usize,
    /// f32 of the workspace: the forward's, D (B·H·chunks·parts·K·V), the
    /// sink (parts·B·H·K·V), then the scores (B·H·chunks·64·64: the size of
    /// fla's saved intra-chunk attention); parts = 2 for complex gates, 1
    /// for real. Packed ([`plan_varlen`]): D and the scores over H·slots,
    /// the sink N·H states.
    pub workspace_len: usize,
    /// Dynamic shared memory of grad_w, grad_qk, grad_dv (bytes; grad_dv's
    /// the wide kernel's when `dv_wide`).
    pub shared_bytes: (u32, u32, u32),
    /// Whether grad_dv runs its wide kernel, one block per 128 value columns
    /// (each chunk's gate prefix and K̃ formed once for both 64-column
    /// halves, as the forward's wide output launch forms its scores): where
    /// V > 64.
    pub dv_wide: bool,
    /// Blocks of grad_dv: the forward's `grid`, or `wide_grid` when `dv_wide`.
    pub dv_grid: u32,
}

/// The geometry of the backward for `dims`, element type `dtype` and
/// complex or real `gates` (K ≤ [`chunk::MAX_KEY_DIM`]; every grid ≤ 2^31 − 1).
pub fn plan(dims: &Dims, dtype: Dtype, gates: Gates) -> Result<GradPlan, InputError> {
    plan_with(dims, dtype, gates, ChunkCarry::Auto)
}

/// [`plan`] with a choice of carry (the forward's [`chunk::plan_with`]:
/// [`ChunkCarry::Sequential`] makes the backward's first two launches
/// `state_seq` and `grad_w_seq`). The workspace is the same for both carries.
pub fn plan_with(dims: &Dims, dtype: Dtype, gates: Gates, carry: ChunkCarry) -> Result<GradPlan, InputError> {
    plan_rows(dims, dtype, gates, carry, false)
}

/// The geometry of the packed backward ([`backward_varlen_into`]): `dims`
/// the packed problem's (`[1, L, H, *]`), `cu_seqlens` its N + 1 offsets
/// (checked: [`crate::packing::sequence_starts`]). The forward's packed
/// layout ([`chunk::plan_varlen`]): a head's sequences share one row of
/// ⌊L / 64⌋ + N chunk slots, sequence i's from slot ⌊cu_seqlens\[i\] / 64⌋ + i,
/// for the decays, S_in(c) and D(c) alike; the per-chunk launches run one
/// block per (head, slot[, value tile]), an empty slot's returning at once;
/// the carries one thread per (sequence, head, key row, value column). The
/// carry is the separate one ([`ChunkCarry::Auto`] resolves to it,
/// [`ChunkCarry::Sequential`] is refused): the walking kernels run batched
/// problems only.
pub fn plan_varlen(
    dims: &Dims,
    cu_seqlens: &[usize],
    dtype: Dtype,
    gates: Gates,
    carry: ChunkCarry,
) -> Result<GradPlan, InputError> {
    crate::packing::sequence_starts(dims, cu_seqlens)?;
    plan_rows(&Dims { batch: cu_seqlens.len() - 1, ..*dims }, dtype, gates, carry, true)
}

/// The body of [`plan_with`] and [`plan_varlen`] (`dims.batch` = N
/// sequences, `dims.len` the packed row's steps when `packed`).
fn plan_rows(dims: &Dims, dtype: Dtype, gates: Gates, carry: ChunkCarry, packed: bool) -> Result<GradPlan, InputError> {
    let forward = chunk::plan_rows(dims, dtype, gates, carry, packed)?;
    let parts = gates.parts();
    let d = dims;
    let nc = forward.num_chunks as usize;
    // Workspace rows: (b, h), or packed a head's sequences in one row. Fits:
    // the forward's plan checked rows·chunks·value_tiles.
    let rows = if packed { d.heads } else { d.batch * d.heads };
    let qk_grid =
        u32::try_from(rows * nc).ok().filter(|&g| g <= i32::MAX as u32).ok_or_else(|| InputError::TooLarge {
            name: "grid",
            shape: format!("[rows·chunks] = {rows}·{nc}"),
            limit: "2^31 - 1 thread blocks".into(),
        })?;
    let state = d.key_dim * d.value_dim;
    let ws_error = || InputError::TooLarge {
        name: "workspace",
        shape: format!("[rows·chunks·{parts}·K·V] twice with {rows} rows of {nc} chunks"),
        limit: "usize::MAX".into(),
    };
    let adj_offset = forward.workspace_len;
    let sink_offset =
        (rows * nc).checked_mul(parts * state).and_then(|a| a.checked_add(adj_offset)).ok_or_else(ws_error)?;
    // The h_final sink: one state per (b, h), packed per (sequence, h).
    let state = d.batch * d.heads * state;
    let sink_end = sink_offset.checked_add(parts * state).ok_or_else(ws_error)?;
    // grad_qk's scores P for grad_dv, a 64 × 64 f32 tile a chunk.
    let c = chunk::CHUNK_LEN;
    let scores_offset = sink_end;
    let workspace_len = (rows * nc).checked_mul(c * c).and_then(|a| a.checked_add(sink_end)).ok_or_else(ws_error)?;
    // grad_dv runs the output launch's pass: the staged output's kernel
    // choice and grid, in its own (smaller) layout.
    let (dv_wide, dv_grid, _) = forward.staged_output();
    let (w_bytes, qk_bytes, narrow_dv_bytes) = shared_bytes(dtype, gates);
    let dv_bytes = if dv_wide { chunk::adjoint_shared_bytes(dtype, gates, WIDE_TILE) } else { narrow_dv_bytes };
    Ok(GradPlan {
        forward,
        qk_grid,
        adj_offset,
        sink_offset,
        scores_offset,
        workspace_len,
        shared_bytes: (w_bytes, qk_bytes, dv_bytes),
        dv_wide,
        dv_grid,
    })
}

/// The backward kernels of one context: `[kernel_index(dtype, gates)]` for
/// grad_w, grad_qk, grad_dv, `[gates.index()]` for the adjoint carry.
pub(crate) struct ChunkGradKernels {
    w: Vec<CudaFunction>,
    /// grad_w in blocks of 128 value columns, where the forward's wide state
    /// kernel exists (16-bit inputs; else `None`).
    w_wide: Vec<Option<CudaFunction>>,
    /// grad_w and the adjoint carry in one walk (the sequential carry).
    w_seq: Vec<CudaFunction>,
    /// That walk in blocks of 128 value columns, where the forward's wide
    /// walk exists (real gates, 16-bit inputs; else `None`).
    w_seq_wide: Vec<Option<CudaFunction>>,
    qk: Vec<CudaFunction>,
    dv: Vec<CudaFunction>,
    /// grad_dv over 128 value columns a block ([`GradPlan::dv_wide`]).
    dv_wide: Vec<CudaFunction>,
    adjoint_carry: Vec<CudaFunction>,
    /// The adjoint carry of packed sequences, `[gates]` (a kernel of its own,
    /// as the forward's packed carry).
    adjoint_carry_packed: Vec<CudaFunction>,
    /// The segmented adjoint carry's first launch, `[gates]`.
    adjoint_carry_segments: Vec<CudaFunction>,
    /// dh0 from D(0) on CUDA cores, per (dtype, gates).
    dh0: Vec<CudaFunction>,
}

fn kernel_index(dtype: Dtype, gates: Gates) -> usize {
    dtype.index() * Gates::ALL.len() + gates.index()
}

impl ChunkGradKernels {
    /// Looks up every entry point and raises each function's dynamic shared
    /// memory limit to what it needs, where the device allows it.
    pub(crate) fn load(module: &Arc<CudaModule>, max_shared: usize) -> Result<Self, GpuError> {
        // gateloop_chunk_grad_{kind}_{dtype}_{g}, its dynamic shared memory
        // limit raised to `bytes` where the device allows it (0: none).
        let load = |kind: &str, dtype: Dtype, gates: Gates, bytes: u32| -> Result<CudaFunction, GpuError> {
            let f = module
                .load_function(&format!("gateloop_chunk_grad_{kind}_{}_{}", dtype.name(), gates.suffix()))
                .doing("looking up gateloop_chunk_grad_{w,w_wide,qk,dv,w_seq,w_seq_wide,dh0,dv_wide}_*")?;
            if bytes > 0 && bytes as usize <= max_shared {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                    .doing("raising the chunked backward kernels' dynamic shared memory limit")?;
            }
            Ok(f)
        };
        let mut tables: [Vec<CudaFunction>; 6] = Default::default();
        let (mut w_wide, mut w_seq_wide) = (Vec::new(), Vec::new());
        for dtype in Dtype::ALL {
            for gates in Gates::ALL {
                let (w_bytes, qk_bytes, dv_bytes) = shared_bytes(dtype, gates);
                let w_seq_bytes = chunk::sequential_shared_bytes(dtype, gates, ChunkPrecision::Exact);
                let dv_wide_bytes = chunk::adjoint_shared_bytes(dtype, gates, WIDE_TILE);
                for (table, kind, bytes) in [
                    (0, "w", w_bytes),
                    (1, "qk", qk_bytes),
                    (2, "dv", dv_bytes),
                    (3, "w_seq", w_seq_bytes),
                    (4, "dh0", 0),
                    (5, "dv_wide", dv_wide_bytes),
                ] {
                    debug_assert_eq!(tables[table].len(), kernel_index(dtype, gates));
                    tables[table].push(load(kind, dtype, gates, bytes)?);
                }
                // The wide kernels where the forward has them (16-bit; the
                // walk's with real gates).
                w_wide.push(
                    chunk::state_wide_shared_bytes(dtype, gates)
                        .map(|bytes| load("w_wide", dtype, gates, bytes))
                        .transpose()?,
                );
                w_seq_wide.push(
                    chunk::sequential_wide_shared_bytes(dtype, gates, ChunkPrecision::Exact)
                        .map(|bytes| load("w_seq_wide", dtype, gates, bytes))
                        .transpose()?,
                );
            }
        }
        let [w, qk, dv, w_seq, dh0, dv_wide] = tables;
        let carries = |prefix: &str| {
            Gates::ALL
                .iter()
                .map(|g| module.load_function(&format!("{prefix}{}", g.suffix())))
                .collect::<Result<Vec<_>, _>>()
                .doing("looking up gateloop_chunk_grad_adjoint_carry_{,packed_}*")
        };
        let adjoint_carry = carries("gateloop_chunk_grad_adjoint_carry_")?;
        let adjoint_carry_packed = carries("gateloop_chunk_grad_adjoint_carry_packed_")?;
        let adjoint_carry_segments = carries("gateloop_chunk_grad_adjoint_carry_segments_")?;
        Ok(ChunkGradKernels {
            w,
            w_wide,
            w_seq,
            w_seq_wide,
            qk,
            dv,
            dv_wide,
            adjoint_carry,
            adjoint_carry_packed,
            adjoint_carry_segments,
            dh0,
        })
    }
}

/// Runs the chunked backward (complex gates) on `stream` over device
/// buffers, writing `grads_out`. `T` is the element type of q, k, v, dy and
/// of dq, dk, dv; log_gate, h0, dh_final, dlog_gate and dh0 are complex f32
/// (interleaved pairs). Asynchronous: it enqueues six kernels (seven with dh0; four and five with the sequential carry) and never
/// synchronizes.
///
/// `config`: a [`ChunkPrecision`] (the forward state kernel's products; the
/// automatic carry) or a [`ChunkConfig`], whose `carry` picks the forward
/// plan's carry as [`chunk::plan_with`] does (so [`ChunkCarry::Sequential`]
/// forces `state_seq` and `grad_w_seq`); its `output` is unused (the
/// backward runs no output launch). `workspace` must hold at least
/// [`GradPlan::workspace_len`] f32 of [`plan`]`(dims, T::DTYPE)` (the same
/// for every carry; overwritten). `grads_out.dh0` is required
/// when `inputs.h0` is given (and, given without h0, receives the gradient
/// of the implicit zero initial state). Checks on the host: dims (K ≤ 256),
/// every buffer's length (the error names the argument), the dh0 rule,
/// context, alignment of complex buffers and of the workspace, the device's
/// shared memory. It does not read the data: the gate's domain (Re ≤ 0) is
/// the caller's responsibility ([`super::check::log_gate`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn cudarc::driver::DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = GradBuffers { inputs, grad_in, grads: grads_out, workspace, real_gates: false, packed: false };
    launch_backward(gpu, stream, dims, buffers, config.into(), None, ForwardStates::Recompute)
}

/// [`backward_into`] for REAL gates (gated linear attention, the backward of
/// [`chunk::forward_real_into`]): `inputs.log_gate` is `[B, L, H, K or 1]`
/// real f32, `inputs.h0`, `grad_in.dh_final` and `grads_out.dh0` are
/// `[B, H, K, V]` real f32 and `grads_out.dlog_gate` has log_gate's real
/// layout (∂L/∂log_gate). The same launches with the imaginary part
/// compiled out (`gateloop_chunk_grad_*_r`); the workspace is
/// [`plan`]`(dims, T::DTYPE, Gates::Real)`'s.
#[allow(clippy::too_many_arguments)]
pub fn backward_real_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn cudarc::driver::DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = GradBuffers { inputs, grad_in, grads: grads_out, workspace, real_gates: true, packed: false };
    launch_backward(gpu, stream, dims, buffers, config.into(), None, ForwardStates::Recompute)
}

/// The backward of [`chunk::forward_varlen_into`]: packed sequences,
/// sequence i the steps `cu_seqlens[i] .. cu_seqlens[i + 1]` of the one
/// batch row of q, k, v, log_gate, dy (`dims` = `[1, L, H, *]`) and of the
/// gradients dq, dk, dv, dlog_gate written there; h0, dh_final and dh0
/// `[N, H, K, V]`, state i sequence i's. Every sequence's gradients are
/// [`backward_into`]'s on that sequence alone with the same `config`, bit
/// for bit (its chunks start at its first step), in one launch of each
/// kernel (the separate carry: [`plan_varlen`]). `workspace`: at least
/// [`plan_varlen`]`(dims, cu_seqlens, T::DTYPE, Gates::Complex,
/// config.carry).workspace_len` f32. The offsets are checked on the host and
/// uploaded on `stream` (one small allocation a call); the other checks and
/// the asynchrony are [`backward_into`]'s.
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn cudarc::driver::DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = GradBuffers { inputs, grad_in, grads: grads_out, workspace, real_gates: false, packed: true };
    varlen_backward(gpu, stream, dims, cu_seqlens, buffers, config.into())
}

/// [`backward_varlen_into`] with real gates ([`backward_real_into`]'s
/// layouts: log_gate, h0, dh_final, dlog_gate, dh0 real f32; the workspace
/// [`plan_varlen`]'s with [`Gates::Real`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_real_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn cudarc::driver::DevicePtrMut<f32>>,
    config: impl Into<ChunkConfig>,
) -> Result<(), GpuError> {
    let buffers = GradBuffers { inputs, grad_in, grads: grads_out, workspace, real_gates: true, packed: true };
    varlen_backward(gpu, stream, dims, cu_seqlens, buffers, config.into())
}

/// A forward's chunk states S_in(c) and decays A_c, left in the backward's
/// workspace for [`backward_saved_into`]: the training pattern, a forward
/// and then the backward of the same inputs, without the backward's first
/// launches, which recompute exactly these values (the forward's state
/// kernel and carry, or its walk `state_seq`; on 2026-12-04's H200 about a
/// tenth of the chunked fwd+bwd). The same gradients bit for bit: the
/// forward wrote what the backward would (one kernel, one plan).
///
/// Made by [`forward_saving_into`] (or [`forward_varlen_saving_into`]), it
/// holds the workspace, so nothing else writes it until the backward, and
/// what the backward must match: the stream, dims, element type, gate kind,
/// the [`ChunkConfig`] (the backward runs with it) and the device addresses of
/// q, k, v, log_gate and h0 (checked: the same buffers; that their contents
/// are unchanged since the forward is the caller's to keep, as with any
/// saved activation). Dropped unused, it releases the workspace. Memory:
/// the forward's part of the backward's workspace,
/// B·H·⌈L / 64⌉·parts·K·V f32 and the decays, within issue 5's
/// O(B·H·(L/64)·K·V).
#[must_use = "pass it to backward_saved_into (dropped, the workspace is free again)"]
pub struct SavedForward<'w> {
    workspace: &'w mut dyn DevicePtrMut<f32>,
    dims: Dims,
    dtype: Dtype,
    gates: Gates,
    config: ChunkConfig,
    inputs: InputAddresses,
    /// The forward's stream (its handle): the backward runs on it, after
    /// the forward's writes in stream order.
    stream: usize,
    /// The packed forward's sequence offsets (`forward_varlen_saving_into`),
    /// or none (batched).
    cu_seqlens: Option<Vec<usize>>,
}

impl std::fmt::Debug for SavedForward<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedForward")
            .field("dims", &self.dims)
            .field("dtype", &self.dtype)
            .field("gates", &self.gates)
            .field("config", &self.config)
            .field("inputs", &self.inputs)
            .field("cu_seqlens", &self.cu_seqlens)
            .finish_non_exhaustive()
    }
}

impl SavedForward<'_> {
    /// The gate kind of the forward (so of the backward it serves).
    pub fn gates(&self) -> Gates {
        self.gates
    }
    /// The config the forward ran with, and the backward will.
    pub fn config(&self) -> ChunkConfig {
        self.config
    }
}

/// The device addresses of a call's q, k, v, log_gate and h0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InputAddresses {
    q: u64,
    k: u64,
    v: u64,
    log_gate: u64,
    h0: Option<u64>,
}

impl InputAddresses {
    fn of<T>(stream: &CudaStream, inputs: &DeviceInputs<'_, T>) -> Self {
        // Each guard, dropped at once, records a read on `stream`, as the
        // launches' own do.
        InputAddresses {
            q: inputs.q.device_ptr(stream).0,
            k: inputs.k.device_ptr(stream).0,
            v: inputs.v.device_ptr(stream).0,
            log_gate: inputs.log_gate.device_ptr(stream).0,
            h0: inputs.h0.map(|h| h.device_ptr(stream).0),
        }
    }
}

/// The chunked forward ([`chunk::forward_into`], or with [`Gates::Real`]
/// [`chunk::forward_real_into`], whose layouts `gates` then picks) into
/// `out`, its chunk states kept for [`backward_saved_into`]: `workspace`
/// must hold at least [`GradPlan::workspace_len`] f32 of
/// [`plan_with`]`(dims, T::DTYPE, gates, config.carry)`, the backward's
/// (the forward uses its first [`chunk::LaunchPlan::workspace_len`]). The
/// forward's checks and asynchrony, and a typed error for a workspace too
/// short for the backward.
#[allow(clippy::too_many_arguments)]
pub fn forward_saving_into<'w, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    gates: Gates,
    inputs: DeviceInputs<'_, T>,
    out: chunk::DeviceOutputs<'_, T>,
    workspace: &'w mut dyn DevicePtrMut<f32>,
    config: impl Into<ChunkConfig>,
) -> Result<SavedForward<'w>, GpuError> {
    let config = config.into();
    save_forward(stream, dims, None, inputs, out, workspace, config, gates, |i, o, w| match gates {
        Gates::Complex => chunk::forward_into(gpu, stream, dims, i, o, w, config),
        Gates::Real => chunk::forward_real_into(gpu, stream, dims, i, o, w, config),
    })
}

/// [`forward_saving_into`] for packed sequences
/// ([`chunk::forward_varlen_into`] or [`chunk::forward_varlen_real_into`]:
/// their layouts and offsets; `workspace` at least [`plan_varlen`]`(dims,
/// cu_seqlens, T::DTYPE, gates, config.carry)`'s), for
/// [`backward_varlen_saved_into`].
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_saving_into<'w, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    gates: Gates,
    inputs: DeviceInputs<'_, T>,
    out: chunk::DeviceOutputs<'_, T>,
    workspace: &'w mut dyn DevicePtrMut<f32>,
    config: impl Into<ChunkConfig>,
) -> Result<SavedForward<'w>, GpuError> {
    let config = config.into();
    save_forward(stream, dims, Some(cu_seqlens), inputs, out, workspace, config, gates, |i, o, w| match gates {
        Gates::Complex => chunk::forward_varlen_into(gpu, stream, dims, cu_seqlens, i, o, w, config),
        Gates::Real => chunk::forward_varlen_real_into(gpu, stream, dims, cu_seqlens, i, o, w, config),
    })
}

/// The body of [`forward_saving_into`] and [`forward_varlen_saving_into`]: the backward's plan
/// (`cu_seqlens`: packed sequences) and workspace checked, the inputs'
/// addresses noted, the forward launched by `run` into the workspace.
#[allow(clippy::too_many_arguments)]
fn save_forward<'w, 'i, 'o, T: Element>(
    stream: &CudaStream,
    dims: &Dims,
    cu_seqlens: Option<&[usize]>,
    inputs: DeviceInputs<'i, T>,
    out: chunk::DeviceOutputs<'o, T>,
    workspace: &'w mut dyn DevicePtrMut<f32>,
    config: ChunkConfig,
    gates: Gates,
    run: impl FnOnce(
        DeviceInputs<'i, T>,
        chunk::DeviceOutputs<'o, T>,
        Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), GpuError>,
) -> Result<SavedForward<'w>, GpuError> {
    let gp = match cu_seqlens {
        Some(cu) => plan_varlen(dims, cu, T::DTYPE, gates, config.carry)?,
        None => plan_with(dims, T::DTYPE, gates, config.carry)?,
    };
    if workspace.len() < gp.workspace_len {
        return Err(InputError::Length {
            name: "workspace",
            expected: gp.workspace_len,
            actual: workspace.len(),
            shape: format!("the backward's workspace, at least {} f32 (chunk_grad::plan_with)", gp.workspace_len),
        }
        .into());
    }
    let addresses = InputAddresses::of(stream, &inputs);
    run(inputs, out, Some(&mut *workspace as &mut dyn DevicePtrMut<f32>))?;
    Ok(SavedForward {
        workspace,
        dims: *dims,
        dtype: T::DTYPE,
        gates,
        config,
        inputs: addresses,
        stream: stream.cu_stream() as usize,
        cu_seqlens: cu_seqlens.map(<[usize]>::to_vec),
    })
}

/// The backward of the forward `saved` came from ([`backward_into`], or with
/// real gates [`backward_real_into`], with its config), reading the chunk
/// states that forward left instead of recomputing them: the same
/// gradients bit for bit, one to three launches fewer. `stream` must be the
/// forward's and `inputs` the forward's buffers (checked by address, with
/// dims and element type: a typed error names what differs); `grad_in` and
/// `grads_out` as
/// [`backward_into`]'s. The workspace is `saved`'s, overwritten past the
/// forward's part (the states themselves stay as the forward left them).
pub fn backward_saved_into<'a, 'w: 'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    saved: SavedForward<'w>,
) -> Result<(), GpuError> {
    let (buffers, config) = saved.into_buffers(stream, dims, None, inputs, grad_in, grads_out)?;
    launch_backward(gpu, stream, dims, buffers, config, None, ForwardStates::Saved)
}

/// [`backward_saved_into`] for packed sequences: the backward
/// ([`backward_varlen_into`], or with real gates
/// [`backward_varlen_real_into`]) of the forward `saved` came from
/// ([`forward_varlen_saving_into`]), whose `cu_seqlens` these must equal.
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_saved_into<'a, 'w: 'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads_out: DeviceGrads<'a, T>,
    saved: SavedForward<'w>,
) -> Result<(), GpuError> {
    let (buffers, config) = saved.into_buffers(stream, dims, Some(cu_seqlens), inputs, grad_in, grads_out)?;
    launch::with_offsets(gpu, stream, dims, cu_seqlens, |d, ptr| {
        launch_backward(gpu, stream, d, buffers, config, Some(ptr), ForwardStates::Saved)
    })
}

impl<'w> SavedForward<'w> {
    /// The buffers and config of a backward call on `stream` with `dims`,
    /// `cu_seqlens` (none: batched) and these arguments, its workspace this
    /// forward's, where the call is this forward's backward: else a typed
    /// error naming `saved` and what differs.
    fn into_buffers<'a, T: Element>(
        self,
        stream: &CudaStream,
        dims: &Dims,
        cu_seqlens: Option<&[usize]>,
        inputs: DeviceInputs<'a, T>,
        grad_in: DeviceGradInputs<'a, T>,
        grads: DeviceGrads<'a, T>,
    ) -> Result<(GradBuffers<'a, T>, ChunkConfig), GpuError>
    where
        'w: 'a,
    {
        self.check(stream, dims, cu_seqlens, T::DTYPE, &inputs)?;
        let real_gates = self.gates == Gates::Real;
        let workspace = Some(self.workspace as &mut dyn DevicePtrMut<f32>);
        let packed = cu_seqlens.is_some();
        Ok((GradBuffers { inputs, grad_in, grads, workspace, real_gates, packed }, self.config))
    }

    /// Whether a backward call on `stream` with `dims`, `cu_seqlens` (none:
    /// batched), element type `dtype` and `inputs` is this forward's: a
    /// typed error naming `saved` and what differs, if not.
    fn check<T>(
        &self,
        stream: &CudaStream,
        dims: &Dims,
        cu_seqlens: Option<&[usize]>,
        dtype: Dtype,
        inputs: &DeviceInputs<'_, T>,
    ) -> Result<(), GpuError> {
        let differs = |value: String, why: &'static str| -> Result<(), GpuError> {
            Err(InputError::Param { name: "saved", value, why }.into())
        };
        if self.stream != stream.cu_stream() as usize {
            return differs(format!("stream {:#x}", self.stream), "the backward runs on the saved forward's stream");
        }
        if self.dims != *dims {
            return differs(format!("{:?}", self.dims), "the saved forward ran on other dims");
        }
        if self.cu_seqlens.as_deref() != cu_seqlens {
            return differs(
                format!("cu_seqlens {:?}", self.cu_seqlens),
                "the saved forward ran on other sequences (a packed forward and a batched one each have their own backward)",
            );
        }
        if self.dtype != dtype {
            return differs(format!("{:?}", self.dtype), "the saved forward ran on another element type");
        }
        if self.inputs != InputAddresses::of(stream, inputs) {
            return differs(
                format!("{:?}", self.inputs),
                "the saved forward read other buffers (q, k, v, log_gate or h0, or h0 given to one call only)",
            );
        }
        Ok(())
    }
}

/// Whether a backward recomputes the forward's chunk states and decays
/// (its first launches) or finds them in its workspace, where a
/// [`SavedForward`]'s forward left them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ForwardStates {
    Recompute,
    Saved,
}

/// The body of [`backward_varlen_into`] and [`backward_varlen_real_into`]
/// (`launch_backward` checks the buffers against the launch's dims).
fn varlen_backward<T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    cu_seqlens: &[usize],
    buffers: GradBuffers<'_, T>,
    config: ChunkConfig,
) -> Result<(), GpuError> {
    launch::with_offsets(gpu, stream, dims, cu_seqlens, |d, ptr| {
        launch_backward(gpu, stream, d, buffers, config, Some(ptr), ForwardStates::Recompute)
    })
}

/// The body of every backward: `buffers` (complex or real gate-side
/// tensors, as its `real_gates` says) checked and bound, the launches
/// enqueued. `cu_seqlens`: for packed sequences (`d.batch` = N of them), the
/// device address of the N + 1 offsets, checked on the host
/// ([`backward_varlen_into`]); the buffers are then checked as packed.
fn launch_backward<'a, T: Element>(
    gpu: &Gpu,
    stream: &CudaStream,
    dims: &Dims,
    buffers: GradBuffers<'a, T>,
    config: ChunkConfig,
    cu_seqlens: Option<u64>,
    states: ForwardStates,
) -> Result<(), GpuError> {
    let gates = Gates::of(buffers.real_gates);
    let packed = cu_seqlens.is_some();
    let buffers = GradBuffers { packed, ..buffers };
    let d = dims;
    let precision = config.precision;
    let gp = plan_rows(d, T::DTYPE, gates, config.carry, packed)?;
    let lp = gp.forward;
    let fwd_kernels = &gpu.kernels.chunk;
    let kernels = &gpu.kernels.chunk_grad;
    let (w_bytes, qk_bytes, dv_bytes) = gp.shared_bytes;
    // The carries as the forward's plan takes them: the state, grad_w and
    // both carry launches, or state_seq and grad_w_seq (each a walk over the
    // chunks with the state on chip; the same workspace bit for bit).
    let sequential = lp.carry == ChunkCarry::Sequential;
    // (The forward's state launch at the call's precision, the wide one
    // where the forward takes it; grad_w's or grad_w_seq's, of three terms,
    // Exact's.)
    let state = chunk::forward_state(
        fwd_kernels,
        &lp,
        d,
        (T::DTYPE, gates, precision),
        config.state_blocks,
        gpu.compute_capability(),
    );
    let state_bytes = state.shared_bytes;
    // grad_w or grad_w_seq in the state launch's blocks: 128 value columns
    // where that launch is the wide one (the same bits in either blocks).
    let dtype = kernel_index(T::DTYPE, gates);
    let wide_w = match (sequential, state.wide) {
        (true, true) => kernels.w_seq_wide[dtype]
            .as_ref()
            .zip(chunk::sequential_wide_shared_bytes(T::DTYPE, gates, ChunkPrecision::Exact))
            .map(|(f, bytes)| (f, lp.wide_sequential_grid, bytes, "launching gateloop_chunk_grad_w_seq_wide")),
        (false, true) => kernels.w_wide[dtype]
            .as_ref()
            .zip(chunk::state_wide_shared_bytes(T::DTYPE, gates))
            .map(|(f, bytes)| (f, lp.wide_grid, bytes, "launching gateloop_chunk_grad_w_wide")),
        (_, false) => None,
    };
    let (w_func, w_grid, w_bytes, w_doing) = wide_w.unwrap_or(if sequential {
        (&kernels.w_seq[dtype], lp.sequential_grid, lp.sequential_shared_bytes, "launching gateloop_chunk_grad_w_seq")
    } else {
        (&kernels.w[dtype], lp.grid, w_bytes, "launching gateloop_chunk_grad_w")
    });
    let need = w_bytes.max(qk_bytes).max(dv_bytes).max(state_bytes) as usize;
    if need > fwd_kernels.max_shared {
        return Err(InputError::Param {
            name: "device",
            value: format!("{} ({} bytes of shared memory per block)", gpu.name(), fwd_kernels.max_shared),
            why: "the chunked backward needs more shared memory per block than this device offers (sm_80 and sm_90 have enough)",
        }
        .into());
    }
    let has_dh_final = buffers.grad_in.dh_final.is_some();
    let has_dh0 = buffers.grads.dh0.is_some();
    buffers.check(gpu, stream, d, gp.workspace_len, || {
        format!("at least {} f32 ({} chunks)", gp.workspace_len, lp.num_chunks)
    })?;
    let mut params = GateloopChunkGradParams {
        fwd: GateloopChunkParams {
            num_chunks: lp.num_chunks as i64,
            value_tiles: lp.value_tiles as i64,
            shared_bytes: lp.output_shared_bytes as i32,
            state_shared_bytes: state_bytes as i32,
            cu_seqlens: cu_seqlens.map_or(std::ptr::null(), |p| p as usize as *const i64),
            ..GateloopChunkParams::for_dims(d, T::DTYPE.abi())?
        },
        grad_flags: if has_dh_final { abi::GATELOOP_GRAD_FLAG_HAS_DH_FINAL } else { 0 }
            | if has_dh0 { abi::GATELOOP_GRAD_FLAG_HAS_DH0 } else { 0 },
        w_shared_bytes: w_bytes as i32,
        qk_shared_bytes: qk_bytes as i32,
        dv_shared_bytes: dv_bytes as i32,
        ..Default::default()
    };
    params.set_grad_strides(d)?;
    // Held until this function returns, after the launches.
    let (ptrs, _bound) = buffers.bind(stream, &mut params.fwd)?;
    params.set_grad_pointers(&ptrs);
    // `check` refused a missing or short workspace (the plan's is never empty).
    let ws = ptrs.workspace.ok_or(InputError::Length {
        name: "workspace",
        expected: gp.workspace_len,
        actual: 0,
        shape: "a workspace (none given)".into(),
    })?;
    let at = |offset: usize| (ws as usize + 4 * offset) as *mut f32;
    params.fwd.ws_decay = at(0);
    params.fwd.ws_state = at(lp.decay_len);
    params.fwd.h_final = at(gp.sink_offset);
    params.ws_adj = at(gp.adj_offset);
    // grad_qk writes the scores P there and grad_dv reads them.
    params.ws_scores = at(gp.scores_offset);
    lp.bind_segments(&mut params.fwd, ws as usize);
    let segments = lp.carry_segments;

    let block = (THREADS, 1, 1);
    let carry_block = (CARRY_THREADS, 1, 1);
    enum Arg<'p> {
        Fwd(&'p GateloopChunkParams),
        Grad(&'p GateloopChunkGradParams),
    }
    // The carries of packed sequences are kernels of their own.
    let g = gates.index();
    let (carry, carry_doing, adjoint_carry, adjoint_doing) = if packed {
        (
            &fwd_kernels.carry_packed[g],
            "launching gateloop_chunk_carry_packed (backward)",
            &kernels.adjoint_carry_packed[g],
            "launching gateloop_chunk_grad_adjoint_carry_packed",
        )
    } else {
        (
            &fwd_kernels.carry[g],
            "launching gateloop_chunk_carry (backward)",
            &kernels.adjoint_carry[g],
            "launching gateloop_chunk_grad_adjoint_carry",
        )
    };
    // The forward's launches (states and decays into the workspace) only
    // where no forward left them there (ForwardStates::Saved).
    let recompute = states == ForwardStates::Recompute;
    let state_launch = (state.func, (state.grid, 1), block, state_bytes, Arg::Fwd(&params.fwd), state.doing_backward);
    let w_launch = (w_func, (w_grid, 1), block, w_bytes, Arg::Grad(&params), w_doing);
    let mut launches = if sequential {
        let mut v = Vec::with_capacity(5);
        if recompute {
            v.push(state_launch);
        }
        v.push(w_launch);
        v
    } else {
        // In segments (S > 1), each carry's segment sums come first
        // (chunk_common.cuh, "the carry in segments").
        let sums = segments > 1;
        let mut v = Vec::with_capacity(8);
        if recompute {
            v.push(state_launch);
        }
        v.push(w_launch);
        if recompute && sums {
            v.push((
                &fwd_kernels.carry_segments[g],
                (lp.carry_grid, segments - 1),
                carry_block,
                0,
                Arg::Fwd(&params.fwd),
                "launching gateloop_chunk_carry_segments (backward)",
            ));
        }
        if recompute {
            v.push((carry, (lp.carry_grid, segments), carry_block, 0, Arg::Fwd(&params.fwd), carry_doing));
        }
        if sums {
            v.push((
                &kernels.adjoint_carry_segments[g],
                (lp.carry_grid, segments - 1),
                carry_block,
                0,
                Arg::Grad(&params),
                "launching gateloop_chunk_grad_adjoint_carry_segments",
            ));
        }
        v.push((adjoint_carry, (lp.carry_grid, segments), carry_block, 0, Arg::Grad(&params), adjoint_doing));
        v
    };
    if has_dh0 {
        launches.push((
            &kernels.dh0[dtype],
            (lp.carry_grid, 1),
            carry_block,
            0,
            Arg::Grad(&params),
            "launching gateloop_chunk_grad_dh0",
        ));
    }
    let (dv_kernel, dv_label) = if gp.dv_wide {
        (&kernels.dv_wide[dtype], "launching gateloop_chunk_grad_dv_wide")
    } else {
        (&kernels.dv[dtype], "launching gateloop_chunk_grad_dv")
    };
    launches.extend([
        (&kernels.qk[dtype], (gp.qk_grid, 1), block, qk_bytes, Arg::Grad(&params), "launching gateloop_chunk_grad_qk"),
        (dv_kernel, (gp.dv_grid, 1), block, dv_bytes, Arg::Grad(&params), dv_label),
    ]);
    for (func, (grid, grid_y), block_dim, shared_mem_bytes, arg, doing) in launches {
        let cfg = LaunchConfig { grid_dim: (grid, grid_y, 1), block_dim, shared_mem_bytes };
        let mut launch = stream.launch_builder(func);
        match arg {
            Arg::Fwd(p) => launch.arg(p),
            Arg::Grad(p) => launch.arg(p),
        };
        // SAFETY: each `func` takes exactly the struct pushed: the forward's
        // gateloop_chunk_state{,_wide}_{T}_{g}_{prec} and gateloop_chunk_carry_{,packed_,segments_}{g}, or
        // gateloop_chunk_state_seq{,_wide}_{T}_{g}_{prec} (chunk::forward_state's,
        // with its grid and bytes), a GateloopChunkParams
        // (params.fwd), the gateloop_chunk_grad_*_{T}_{g} entries (grad_w_wide
        // and grad_w_seq_wide with the wide state launch's grid and their
        // Exact wide bytes, the tiles they compute from dims) and
        // gateloop_chunk_grad_adjoint_carry_{,packed_,segments_}{g} a GateloopChunkGradParams, by
        // value, g the gate kind `gates` (kernel_index, table_index; packed_
        // exactly when cu_seqlens is set: then it holds d.batch + 1 offsets the
        // caller checked to rise strictly from 0 to d.len, so every
        // sequence's steps lie in the one batch row the sequence tensors were
        // checked to hold (`buffers.packed`), and its chunk slots, from
        // ⌊cu_i / 64⌋ + i, inside the plan's ⌊L / 64⌋ + N per head). Every
        // pointer comes from a live buffer of this context whose length was
        // checked above against the dims in the params (complex f32 for
        // log_gate, h0, dh_final, dlog_gate, dh0 with complex gates, real f32
        // with real ones, as the g entries read them; contiguous strides); the
        // workspace holds ≥ gp.workspace_len f32, carved as ws_decay
        // (decay_len), ws_state and ws_adj (rows·chunks·parts·K·V each, rows B·H or packed H) and the
        // h_final sink (parts·B·H·K·V), the scores ws_scores
        // (rows·chunks·64·64: grad_qk writes a chunk's tile before grad_dv,
        // next on the stream, reads it), and when the plan's carry_segments S >
        // 1 (batched, separate carry: both segments_ launches present, grid.y
        // S − 1, the carries' S, as the kernels index them) the segments'
        // 4·S·B·H·K·V f32 at segments_offset inside the forward's part (each
        // segments_ launch writes them before its carry reads them, next on
        // the stream), exactly the extents the kernels index,
        // each written before it is read in stream order (state and grad_w,
        // then the carries, or state_seq then grad_w_seq, which reads nothing
        // the former writes but leaves the same slots; then grad_dh0, which
        // reads slot 0 of ws_adj, the inputs and writes dh0 only; then grad_qk
        // and grad_dv; with ForwardStates::Saved the state launches are left
        // out and the decays and states they write are there already,
        // written by the forward of the same plan (SavedForward: the same
        // dims, offsets, element type, gates, config and input buffers, the
        // workspace held by it since) earlier on
        // this same stream, whose carry segments, if any, the adjoint
        // carry's own segments launch rewrites before reading). h0, dh_final, dh0 are
        // null iff their flag is clear. Geometry as `plan` computed: blocks
        // of the __launch_bounds__ sizes, grids ≤ 2^31 − 1 (grad_dv's the
        // wide kernel's B·H·chunks·⌈V / 128⌉ exactly when it is
        // gateloop_chunk_grad_dv_wide_{T}_{g}, whose tiles it computes from
        // dims.value_dim the same way), dynamic shared
        // memory equal to each kernel's own layout (checked by the kernel)
        // and ≤ the limit raised at load (need ≤ max_shared checked above).
        // The borrows (`_bound`) are held until this function returns, and
        // cudarc's drop of a CudaSlice waits on the events they record.
        launched(stream, func, cfg, unsafe { launch.launch(cfg) }, doing)?;
    }
    Ok(())
}

/// Uploads `p` and the upstream gradients, runs the backward (f32, exact)
/// on the Gpu's default stream, downloads the gradients; synchronizes.
pub fn backward_host(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
) -> Result<Grads<f32>, GpuError> {
    backward_host_as::<f32>(gpu, p, dy, dh_final, ChunkPrecision::Exact)
}

/// [`backward_host`] with q, k, v and dy rounded to `T` on the host
/// (log_gate, h0, dh_final stay f32), dq, dk, dv computed in `T` and widened
/// back to f32 (exactly), and a choice of precision for the forward state
/// kernel and of carry (`config`, as [`backward_into`]'s). `dh0` is `Some` exactly when `p.h0` is. Checks the gate domain on
/// the host.
pub fn backward_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    config: impl Into<ChunkConfig>,
) -> Result<Grads<f32>, GpuError> {
    host_backward::<T>(gpu, p, dy, dh_final, Gates::Complex, config.into(), ForwardStates::Recompute)
}

/// The real-gate backward ([`backward_real_into`]) from host data: `p`'s
/// log_gate and h0 and `dh_final` must be real (Im = 0 everywhere, else
/// [`InputError::Value`]); their real parts are uploaded as real f32, q, k,
/// v and dy rounded to `T`. Returns dq, dk, dv (widened to f32) and
/// dlog_gate, dh0 as complex numbers with Im = 0: the gradients with
/// respect to the real log gate and the real h0 (the real parts of the
/// complex-gate gradients at the same real inputs). Synchronizes.
pub fn backward_real_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    config: impl Into<ChunkConfig>,
) -> Result<Grads<f32>, GpuError> {
    host_backward::<T>(gpu, p, dy, dh_final, Gates::Real, config.into(), ForwardStates::Recompute)
}

/// The body of [`backward_host_as`], [`backward_real_host_as`] and (`states`
/// [`ForwardStates::Saved`]) [`backward_saved_host_as`].
fn host_backward<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    gates: Gates,
    config: ChunkConfig,
    states: ForwardStates,
) -> Result<Grads<f32>, GpuError> {
    let real_gates = gates == Gates::Real;
    let workspace_len = |d: &Dims| Ok(plan_with(d, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::backward_host::<T>(
        gpu,
        p,
        dy,
        dh_final,
        real_gates,
        workspace_len,
        SYNC_DOING,
        |s, d, inputs, grad_in, grads, w| {
            if states == ForwardStates::Recompute {
                let buffers = GradBuffers { inputs, grad_in, grads, workspace: w, real_gates, packed: false };
                return launch_backward(gpu, s, d, buffers, config, None, ForwardStates::Recompute);
            }
            // The plan's workspace is never empty (its decays and states).
            let w = w.ok_or(InputError::Param {
                name: "workspace",
                value: "none".into(),
                why: "the chunked backward needs one",
            })?;
            // The training pair: the forward into the backward's workspace
            // (y and h_final on the device, dropped), then the backward
            // reading its chunk states. backward_host runs on the Gpu's
            // stream, which allocates.
            let mut y = gpu.stream().alloc_zeros::<T>(d.v_len()).doing("allocating y")?;
            let mut h_final =
                gpu.stream().alloc_zeros::<f32>(gates.parts() * d.state_len()).doing("allocating h_final")?;
            let out = chunk::DeviceOutputs { y: &mut y, h_final: &mut h_final };
            let saved = forward_saving_into(gpu, s, d, gates, inputs, out, w, config)?;
            backward_saved_into(gpu, s, d, inputs, grad_in, grads, saved)
        },
    )
}

/// [`backward_varlen_into`] from host data: `p` is the packed problem
/// (`[1, L, H, *]`, no h0 of its own; [`crate::packing::backward_varlen`]'s
/// contract), `h0` and `dh_final` `[N, H, K, V]`; returns dq, dk, dv
/// (widened to f32), dlog_gate in the packed layout and, when `h0` is
/// given, dh0 `[N, H, K, V]`: [`crate::packing::backward_varlen`]'s answer
/// with [`backward_host_as`] on each sequence alone (same `config`), bit for
/// bit. `gates`: [`Gates::Real`] runs [`backward_varlen_real_into`] and needs
/// real log_gate, h0 and dh_final (else [`InputError::Value`]). Everything
/// is checked before the upload.
#[allow(clippy::too_many_arguments)]
pub fn backward_varlen_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    cu_seqlens: &[usize],
    h0: Option<&[Complex<f32>]>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    config: impl Into<ChunkConfig>,
    gates: Gates,
) -> Result<Grads<f32>, GpuError> {
    let config = config.into();
    let sequences = crate::packing::check_varlen(p, cu_seqlens, h0)?;
    let real_gates = gates == Gates::Real;
    let workspace_len = |d: &Dims| Ok(plan_varlen(d, cu_seqlens, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::backward_host_states::<T>(
        gpu,
        p,
        launch::HostStates::Packed { sequences, h0 },
        dy,
        dh_final,
        real_gates,
        workspace_len,
        SYNC_DOING,
        |_, d, inputs, grad_in, grads, w| {
            let buffers = GradBuffers { inputs, grad_in, grads, workspace: w, real_gates, packed: true };
            // backward_host_states runs on the Gpu's stream, which the
            // upload of the offsets takes as its Arc.
            varlen_backward(gpu, gpu.stream(), d, cu_seqlens, buffers, config)
        },
    )
}

/// [`backward_host_as`] (or, with real gates, [`backward_real_host_as`])
/// through the packed launches: `p`'s B batch rows as B packed sequences of
/// `p.dims.len` steps, [`backward_varlen_into`] on the same buffers read as
/// `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0, dh_final and dh0
/// `[B, H, K, V]` either way). The batched backward's gradients, bit for
/// bit: so the packed path meets every input the others meet
/// (`dispatch::Variant::Packed`, which the fuzzer runs).
pub fn backward_packed_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    config: impl Into<ChunkConfig>,
    gates: Gates,
) -> Result<Grads<f32>, GpuError> {
    let config = config.into();
    let workspace_len = |d: &Dims| Ok(rows_packed_plan(d, T::DTYPE, gates, config.carry)?.workspace_len);
    launch::backward_host::<T>(
        gpu,
        p,
        dy,
        dh_final,
        gates == Gates::Real,
        workspace_len,
        SYNC_DOING,
        |_, d, i, g, o, w| {
            // backward_host launches on the Gpu's stream, which the upload of the
            // offsets takes as its Arc.
            backward_rows_packed_into(gpu, gpu.stream(), d, i, g, o, w, config, gates)
        },
    )
}

/// The plan of the `[B, L, H, *]` problem `dims` through the packed launches
/// ([`backward_rows_packed_into`]).
pub(crate) fn rows_packed_plan(
    dims: &Dims,
    dtype: Dtype,
    gates: Gates,
    carry: ChunkCarry,
) -> Result<GradPlan, InputError> {
    let (packed, cu_seqlens) = crate::packing::rows_as_sequences(dims);
    plan_varlen(&packed, &cu_seqlens, dtype, gates, carry)
}

/// The backward of the `[B, L, H, *]` problem `dims` through the packed
/// launches: its B batch rows as B packed sequences of L steps, the same
/// buffers read as `[1, B·L, H, *]` with cu_seqlens 0, L, .., B·L (h0,
/// dh_final and dh0 `[B, H, K, V]` either way; the workspace
/// [`rows_packed_plan`]'s); the batched backward's gradients, bit for bit.
/// [`backward_packed_host_as`] and the bench's `chunked-grad-varlen` run it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_rows_packed_into<'a, T: Element>(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    dims: &Dims,
    inputs: DeviceInputs<'a, T>,
    grad_in: DeviceGradInputs<'a, T>,
    grads: DeviceGrads<'a, T>,
    workspace: Option<&'a mut dyn cudarc::driver::DevicePtrMut<f32>>,
    config: ChunkConfig,
    gates: Gates,
) -> Result<(), GpuError> {
    let (packed, cu_seqlens) = crate::packing::rows_as_sequences(dims);
    let buffers = GradBuffers { inputs, grad_in, grads, workspace, real_gates: gates == Gates::Real, packed: true };
    varlen_backward(gpu, stream, &packed, &cu_seqlens, buffers, config)
}

/// What the host paths' synchronization is doing, for its error.
const SYNC_DOING: &str = "synchronizing after the chunked backward";

/// [`backward_host_as`] (with `gates` [`Gates::Real`],
/// [`backward_real_host_as`]) through the training pair: the forward into
/// the backward's workspace ([`forward_saving_into`], y and h_final on the
/// device and dropped), then [`backward_saved_into`]; the same gradients
/// bit for bit (`gateloop grad --variant saved`, which the fuzzer runs).
/// Synchronizes.
pub fn backward_saved_host_as<T: Element>(
    gpu: &Gpu,
    p: &Problem<'_, f32>,
    dy: &[f32],
    dh_final: Option<&[Complex<f32>]>,
    config: impl Into<ChunkConfig>,
    gates: Gates,
) -> Result<Grads<f32>, GpuError> {
    host_backward::<T>(gpu, p, dy, dh_final, gates, config.into(), ForwardStates::Saved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::dims;

    /// grad_dv's wide launch: more than one value tile of 64; its grid the
    /// forward's wide grid, its bytes the wide layout's.
    #[test]
    fn wide_dv_rule() {
        for (v, gates, wide) in [
            (64, Gates::Real, false),
            (65, Gates::Real, true),
            (128, Gates::Real, true),
            (64, Gates::Complex, false),
            (128, Gates::Complex, true),
            (200, Gates::Complex, true),
        ] {
            for dtype in Dtype::ALL {
                let gp = plan(&dims(1, 200, 2, 40, v, false), dtype, gates).unwrap();
                assert_eq!(gp.dv_wide, wide, "V = {v} {gates:?} {dtype}");
                let lp = gp.forward;
                let (grid, bytes) = if wide {
                    (lp.wide_grid, chunk::adjoint_shared_bytes(dtype, gates, WIDE_TILE))
                } else {
                    (lp.grid, shared_bytes(dtype, gates).2)
                };
                assert_eq!((gp.dv_grid, gp.shared_bytes.2), (grid, bytes), "V = {v} {gates:?} {dtype}");
            }
        }
    }

    #[test]
    fn shared_memory_matches_the_kernel_layout() {
        // By hand from cuda/chunk_grad.cu: prefix 20480 (grad_w), 25600 with
        // the padded rows of grad_qk and grad_dv (their raw q, k 2·64·20·4 =
        // 10240, also padded); grad_w (f32, TF32
        // operands): q raw 4096, dY split 2·64·68·4 = 34816, [Re Q̃ | −Im Q̃]
        // split 2·64·36·4 = 18432, staging 8·16·16·4 = 8192; grad_qk: q, k raw
        // 8192, s 16384, then max(the s phase's dY, V splits 2·34816 = 69632,
        // the union and the tail): the union max(off-diagonal phase s blocks
        // 2·96·20·4 = 15360 + q̃ 2·96·36·4 = 27648 + k̃ 2·48·36·4 = 13824 =
        // 56832 (its products in padded rows 4·9·16·40 = 23040 and cross
        // rows 2·32·32·4 = 8192), inter-chunk dY, V splits 2·2·64·36·4 =
        // 36864 and S_in, D splits 2·2·32·36·4 = 18432) = 56832; the tail:
        // the score blocks for grad_dv 4·(6 + 4)·16·16 = 10240, w', u
        // 2·64·17·8 = 17408, head sums 1024, through 128 + 8 = 28808;
        // grad_dv (the output pass): q, k raw
        // 8192, the slab phase's splits [Re K̃ | Im K̃] 2·64·36·4 = 18432, D
        // slab 2·32·68·4 = 17408, anchored q̃ 2·96·36·4 = 27648, k̃
        // 2·48·36·4 = 13824 (77312 > the final phase's P, dY splits
        // 2·2·64·68·4 = 69632), diagonal scores 4096, staging 8192, less
        // (adjoint_smem_bytes) raw q 5120, q̃, k̃ and the diagonal scores:
        // prefix, raw k, max(18432 + 17408, 69632), staging.
        let tail = 10240 + 17408 + 1024 + 136;
        let qk = 25600 + 10240 + 16384 + 56832 + tail;
        let dv = 25600 + 5120 + 69632 + 8192;
        assert_eq!(shared_bytes(Dtype::F32, Gates::Complex), (20480 + 4096 + 34816 + 18432 + 8192, qk, dv));
        // f16 / bf16 operands (row padding 8): grad_w's dY split 2·64·72·2 =
        // 18432 (bf16 one plane), Q̃ split 2·64·40·2 = 10240; grad_qk's s phase 2·2·2·64·72 =
        // 36864 (bf16's one plane each 18432) inside the union (off-diagonal
        // 2·2·(96·24 + 96·40 + 48·40) = 32256, its products and cross rows
        // 31232, inter-chunk 2·2·2·64·40 + 2·2·2·32·40 = 30720) and the tail;
        // grad_dv's union max(K̃ and D slab 2·2·(64·40 + 32·72) = 19456, P
        // and dY 2·2·2·64·72 = 36864, bf16 27648).
        // grad_w's bf16 dY tile is one plane (9216 bytes less), as the state
        // kernel's V, and so is grad_dv's in its final phase (P and dY
        // 18432 + 9216 = 27648, over the slab phase's 19456).
        for (dtype, dy_tile) in [(Dtype::F16, 18432), (Dtype::Bf16, 9216)] {
            let qk = 25600 + 10240 + 16384 + 32256 + tail;
            let dv = 25600 + 5120 + 18432 + dy_tile + 8192;
            assert_eq!(shared_bytes(dtype, Gates::Complex), (20480 + 4096 + dy_tile + 10240 + 8192, qk, dv));
            // Two complex 16-bit grad_qk blocks fit an H200 SM (228 KiB, 1
            // KiB reserved a block).
            assert!(2 * (qk + 1024) <= 228 * 1024, "{dtype}");
        }
        // Real gates: prefix 3·64·16·4 = 12288 (grad_qk's padded 3·64·20·4 =
        // 15360); grad_w the real forward state kernel's, grad_dv the
        // prefix, raw k 5120, its union and staging; grad_qk's slab operands 16 wide (S_in, D splits
        // of 16 rows, q̃ and k̃ of 16 columns) and its f32 products' rows
        // 16 + 8. f32: union max(inter-chunk 2·18432 + 2·2·16·36·4 = 46080,
        // off-diagonal 15360 + 2·96·20·4 + 2·48·20·4 = 38400, products
        // 4·9·16·24 = 13824 and cross rows 2·32·20·4 = 5120) = 46080; the
        // tail with w', u rows and head sums of floats (GateRows): 10240 +
        // 4352 + 4352 + 512 + 136 = 19592, and 46080 + 19592 under the s
        // phase's 69632, which sets the bytes: two blocks an H200 SM.
        let real_tail = 10240 + 2 * 64 * 17 * 4 + 2 * 64 * 4 + 136;
        assert_eq!(real_tail, 19592);
        let (w, _) = chunk::shared_bytes(Dtype::F32, Gates::Real);
        assert_eq!(w, 12288 + 4096 + 34816 + 2 * 64 * 20 * 4 + 8192);
        // grad_dv's union max(K̃ and D slab 2·64·20·4 + 2·16·68·4 = 18944,
        // P and dY 69632).
        let dv = 15360 + 5120 + 69632 + 8192;
        assert_eq!(shared_bytes(Dtype::F32, Gates::Real), (w, 15360 + 10240 + 16384 + 69632, dv));
        assert!(2 * (shared_bytes(Dtype::F32, Gates::Real).1 + 1024) <= 228 * 1024);
        // 16-bit: union max(inter-chunk, off-diagonal 2·2·(96·24 + 96·24 +
        // 48·24) = 23040, products and cross rows 18944), the inter-chunk
        // phase f16's steps of 32 columns (2·2·2·64·40 + 2·2·2·16·40 =
        // 25600) and bf16's of 64 with dY and V one plane (2·2·64·72 +
        // 2·2·2·16·72 = 27648), with the real tail longer than the s phase
        // (36864, bf16 18432); grad_dv's max(2·2·(64·24 + 16·72) = 10752,
        // 36864, bf16 27648).
        for (dtype, dy_tile, union) in [(Dtype::F16, 18432, 25600), (Dtype::Bf16, 9216, 27648)] {
            let (w, _) = chunk::shared_bytes(dtype, Gates::Real);
            let dv = 15360 + 5120 + 18432 + dy_tile + 8192;
            let qk = 15360 + 10240 + 16384 + union + real_tail;
            assert_eq!(shared_bytes(dtype, Gates::Real), (w, qk, dv));
            // Two real 16-bit grad_qk blocks an H200 SM; bf16's under the
            // 99 KB opt-in of sm_86 and sm_89 as well.
            assert!(2 * (qk + 1024) <= 228 * 1024 && qk <= 99 * 1024, "{dtype}");
        }
        // Four real bf16 grad_dv blocks an H200 SM (its launch bound).
        assert!(4 * (shared_bytes(Dtype::Bf16, Gates::Real).2 + 1024) <= 228 * 1024);
        // The wide dv launch's (128 value columns): the same bytes, its wider
        // D slab inside the union.
        for dtype in Dtype::ALL {
            for gates in Gates::ALL {
                let narrow = shared_bytes(dtype, gates).2;
                assert_eq!(chunk::adjoint_shared_bytes(dtype, gates, WIDE_TILE), narrow, "{dtype} {gates:?}");
            }
        }
        for dtype in Dtype::ALL {
            for gates in Gates::ALL {
                let (w, qk, dv) = shared_bytes(dtype, gates);
                assert!(w.max(qk).max(dv) <= 163 * 1024, "{dtype} {gates:?}: sm_80's opt-in limit");
                assert!(
                    w.is_multiple_of(128) && dv.is_multiple_of(128),
                    "{dtype} {gates:?}: every carve a multiple of 128 bytes"
                );
            }
        }
    }

    #[test]
    fn plan_examples() {
        let d = dims(2, 65, 3, 5, 65, false);
        let g = plan(&d, Dtype::Bf16, Gates::Complex).unwrap();
        let f = chunk::plan(&d, Dtype::Bf16, Gates::Complex).unwrap();
        assert_eq!(g.forward, f);
        assert_eq!(g.qk_grid, 6 * 2);
        assert_eq!(g.adj_offset, f.workspace_len);
        assert_eq!(g.sink_offset, f.workspace_len + 6 * 2 * 2 * 5 * 65);
        // Then grad_qk's scores for grad_dv: a 64 × 64 tile a chunk.
        assert_eq!(g.scores_offset, g.sink_offset + 2 * 6 * 5 * 65);
        assert_eq!(g.workspace_len, g.scores_offset + 6 * 2 * 64 * 64);
        // Every region starts at an even f32 (8-byte aligned complex pairs).
        assert!(f.decay_len.is_multiple_of(2) && g.adj_offset.is_multiple_of(2) && g.sink_offset.is_multiple_of(2));
        // Real gates: one f32 per state element.
        let r = plan(&d, Dtype::Bf16, Gates::Real).unwrap();
        let fr = chunk::plan(&d, Dtype::Bf16, Gates::Real).unwrap();
        assert_eq!(r.adj_offset, fr.workspace_len);
        assert_eq!(r.sink_offset, fr.workspace_len + 6 * 2 * 5 * 65);
        assert_eq!(r.scores_offset, r.sink_offset + 6 * 5 * 65);
        assert_eq!(r.workspace_len, r.sink_offset + 6 * 5 * 65 + 6 * 2 * 64 * 64);
        assert!(matches!(
            plan(&dims(1, 1, 1, 257, 1, false), Dtype::F32, Gates::Complex),
            Err(InputError::Param { name: "key_dim", .. })
        ));
    }

    #[test]
    fn plan_varlen_takes_the_forwards_slots() {
        // 5 sequences in 300 steps, 3 heads: the forward's packed plan
        // (⌊300/64⌋ + 5 slots a head), D over the same slots, the sink one
        // state per (sequence, head).
        let cu = [0usize, 70, 71, 135, 263, 300];
        let d = dims(1, 300, 3, 5, 65, false);
        let g = plan_varlen(&d, &cu, Dtype::Bf16, Gates::Complex, ChunkCarry::Auto).unwrap();
        let f = chunk::plan_varlen(&d, &cu, Dtype::Bf16, Gates::Complex, ChunkCarry::Auto).unwrap();
        let slots = 300 / 64 + 5;
        assert_eq!(g.forward, f);
        assert_eq!(g.qk_grid, (3 * slots) as u32);
        assert_eq!(g.adj_offset, f.workspace_len);
        assert_eq!(g.sink_offset, f.workspace_len + 3 * slots * 2 * 5 * 65);
        assert_eq!(g.workspace_len, g.sink_offset + 2 * 5 * 3 * 5 * 65 + 3 * slots * 64 * 64);
        assert!(matches!(
            plan_varlen(&d, &cu, Dtype::Bf16, Gates::Real, ChunkCarry::Sequential),
            Err(InputError::Param { name: "carry", .. })
        ));
        assert!(matches!(
            plan_varlen(&d, &[0, 70, 301], Dtype::F32, Gates::Complex, ChunkCarry::Auto),
            Err(InputError::Value { name: "cu_seqlens", .. })
        ));
        // B rows as B sequences: the forward's rows plan, real gates.
        let b = dims(4, 128, 2, 8, 8, true);
        let r = rows_packed_plan(&b, Dtype::F32, Gates::Real, ChunkCarry::Auto).unwrap();
        let slots = 4 * 128 / 64 + 4;
        assert_eq!(r.forward, chunk::rows_packed_plan(&b, Dtype::F32, Gates::Real, ChunkCarry::Auto).unwrap());
        assert_eq!(r.workspace_len, r.forward.workspace_len + 2 * slots * 64 + 4 * 2 * 64 + 2 * slots * 64 * 64);
    }
}
