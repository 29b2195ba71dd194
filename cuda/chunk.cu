// The chunked mode of GateLoop on tensor cores: surrogate attention inside
// chunks of C = 64 steps, the recurrence between them. The GPU twin of
// src/cpu/chunked.rs: same chunk (64) and sub-chunk (16) lengths, the same
// segmented chunk-local log gates (reset rule Re g < GATELOOP_RESET_LOG_GATE,
// phases reduced mod 2π with the same 3-part Cody–Waite constants), the same
// anchors and the same three passes. READ that module's doc for the algebra;
// this file only maps it onto thread blocks and WMMA tiles.
//
// Per (b, h), chunk c (steps t0 .. t0 + n − 1, n ≤ 64), chunk-local G, θ, R:
//   E(late, early) = 0 if R_late > early, else e^{Re G_late − Re G_early} e^{iθ_late} e^{−iθ_early}
//   U_c   = Σ_m (k_m E(last, m))ᵀ v_m          (state built inside the chunk)
//   A_c   = E(last, −1)                        (decay over the chunk)
//   S_0 = h0,  S_{c+1} = diag(A_c) S_c + U_c,  h_final = S_{num_chunks}
//   y_n   = Re(q_n E(n, −1) S_c)  +  Σ_{m ≤ n in the chunk} score_nm v_m
// Every modulus exponentiated is e^{(≤ 0)} (a difference inside one segment).
//
// Three launches on one stream (one struct, GateloopChunkParams):
//   1. gateloop_chunk_state_*: one block per (b, h, chunk, value tile of 64):
//      U_c (planar: rows 0..K real, K..2K imaginary) into ws_state, and A_c
//      into ws_decay (value tile 0 only). U = K̃ᵀ V is a WMMA GEMM with the
//      key channels in slabs of 16 (2·16 rows of K̃ᵀ per slab), inner dim 64.
//      Where V > 64 (16-bit inputs), gateloop_chunk_state_wide_*: one block
//      per 128 value columns, each slab's prefix and K̃ built once for both
//      64-column products; bit for bit the narrow launch.
//   2. gateloop_chunk_carry_*: one thread per (b, h, key row, value column),
//      sequential over the chunks: S ← A S + U, overwriting U_c with S_c (the
//      state ENTERING chunk c), then h_final. Short: num_chunks FMAs each.
//      With few threads and many chunks (B·H small, L long) in segments
//      of chunks, each a thread (p.carry_segments, chunk_common.cuh "the
//      carry in segments"): gateloop_chunk_carry_segments_* first.
//   3. gateloop_chunk_output_*: one block per (b, h, chunk, value tile):
//      y = Q̃ S_c (inter, inner dim 2K) + P V (intra, inner dim 64), written
//      once. Per key slab: Q̃ (64 × 32) · S slab (32 × 64) into the y
//      accumulators; the six off-diagonal 16 × 16 score blocks (query
//      sub-chunk i > key sub-chunk j, anchor r = last step of j) as
//      q̃ (16 × 32) · k̃ᵀ (32 × 16) into score accumulators; the four diagonal
//      blocks pairwise in f32 (each factor one exp of a direct difference).
//      After the last slab P (64 × 64, causal) · V (64 × 64) on tensor cores.
//      The pass is intra_pass in chunk_common.cuh: the backward's dv kernel
//      runs it too (kAdjoint: K̃ D(c) + Pᵀ dY), so both form P identically.
//      Where V > 64, gateloop_chunk_output_wide_*: one block per (b, h,
//      chunk, 128 value columns), the scores (every slab's q, k rows,
//      anchored rows, diagonal pairs) formed once for both 64-column halves
//      instead of once per half's block; bit for bit the narrow launch.
// Or 1 and 2 as one launch, gateloop_chunk_state_seq_* (chunk_state_seq
// below): one block per (b, h, value tile, key slab of walk_slab channels:
// 16 complex, 32 real) walks the chunks, the
// state of its slab on chip; same workspace, same bits, no U_c round trip.
// The launcher picks it when its grid fills the GPU (src/cuda/chunk.rs
// ChunkCarry).
// Why this split: launches 1 and 3 are fully parallel over (b, h, chunk) —
// B·H = 1 at L = 65536 still gives 1024 blocks per value tile — and the only
// sequential part (2) touches K·V numbers per chunk. Launch 3 recomputes the
// chunk's gate prefix instead of reading it back (it is O(64·K) and cheaper
// than the traffic), so the workspace holds only U/S and A, and y is written
// exactly once (in its element type, rounded once). HBM traffic: q, k, v and
// log_gate are read twice (k, v, gates in 1; q, k, v, gates in 3), the
// workspace (4·parts·K·V bytes per chunk) is written by 1, read and
// rewritten by 2, read by 3.
//
// Tensor cores (nvcuda::wmma, f32 accumulators): f32 inputs use m16n16k8
// TF32 operands, bf16 inputs m16n16k16 bf16 operands, f16 inputs bf16
// operands when exact (f32's exponent range for the decayed rows and the
// carried state; see OpOf in chunk_common.cuh) and f16 operands when fast.
// Operands that are not exactly representable (the decayed q̃, k̃, Q̃, K̃, the
// scores P, the carried state S, f32 inputs) are SPLIT, x = hi + lo with
// hi = round(x), lo = round(x − hi) in the operand type, and
//   a·b ≈ hi_a·hi_b + hi_a·lo_b + lo_a·hi_b      (kTerms = 3, "exact")
// or a·b ≈ hi_a·hi_b                             (kTerms = 1, "fast").
// A raw input tile (V; dY in the backward) of bf16 inputs is exact in bf16
// operands (lo = 0): it is staged and multiplied as hi alone, so its products
// take two terms where exact takes three (raw_tile_terms; the same sums).
// Exact keeps ~2× the operand precision (3xTF32: ~21 bits; f16: ~22 bits,
// but f16's range: operands must stay below 65504 in magnitude, and values
// below 6e-5 lose relative precision to subnormals; bf16: ~16 bits).
//
// Real gates (gated linear attention): the kComplex = false instantiation
// compiles every imaginary part out: log_gate, h0, h_final are REAL f32, the
// GEMMs have inner dimension K instead of 2K, the workspace holds K rows.
//
// Shared memory is dynamic (above 48 KiB: the launcher raises the limit);
// its size is computed by the host with the same layout (src/cuda/chunk.rs)
// and passed in p.shared_bytes, which the kernel checks (a mismatch is a bug:
// it traps rather than overrunning).

#include <type_traits>

#include "chunk_common.cuh"
#include "chunk_frag.cuh"

namespace gateloop {
namespace chunk {

using namespace nvcuda;

// ---- 1. chunk state U_c and decay A_c -------------------------------------------

// kCols = kWideCols (gateloop_chunk_state_wide_*, V > 64): one block per
// 128 value columns, the slab's raw keys, prefix and K̃ built once for both
// tiles' products (store_slab_grams), where two narrow blocks each built
// them; the same U_c and A_c bit for bit.
template <typename input_t, class Op, bool kComplex, int kTerms, int kCols = kVTile>
__device__ __forceinline__ void chunk_state(const GateloopChunkParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int kTileTerms = OpOf<input_t>::kRawTerms;
    constexpr int kTiles = kCols / kVTile;
    using Smem = StateSmem<Op, kComplex, kTileTerms>;
    check_shared(p.state_shared_bytes, state_block_bytes<Op, kComplex, kTileTerms, kCols>());
    auto blk = Block<input_t, kComplex>::of_tiles(p, smem, kCols);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    // Raw k, the V tiles, K̃ [m][col] (read as the column-major A = K̃ᵀ).
    const Smem sm(smem, blk.warp);
    float* kraw = sm.raw;
    const StateTiles<Op, kTileTerms, kTiles> vs(sm, smem);
    const Split<Op>& kt = sm.slab;
    float* staging = sm.staging;

    const int last = blk.n - 1;

    vs.template load<raw_tile_terms<input_t, kTerms>()>(blk, blk.v, p.v_strides);
    for (int64_t d0 = 0; d0 < p.dims.key_dim; d0 += kSlab) {
        // No barrier between these two: each thread reads back only the
        // raw keys it loaded (put_state_keys); kt's last readers, the
        // previous slab's product, finished at the loop's closing barrier.
        blk.stage_slab_own(blk.k, p.k_strides, d0, kraw);
        put_state_keys<Op, kTerms>(blk, kraw, kt);
        if (blk.vt == 0) {
            for (int j = blk.tid; j < blk.gate_cols(d0); j += kThreads) {
                store_decay(blk, d0, j, chunk_decay(blk, j, last));
            }
        }
        __syncthreads();
        store_slab_grams<Op, kTerms, kTiles>(blk, kt, vs.tile, d0, staging, p.ws_state);
        __syncthreads();
    }
}

// ---- 2. carry over the chunks -------------------------------------------------------

// kPacked (gateloop_chunk_carry_packed_*, p.cu_seqlens): e.bhi.b is the
// sequence, its chunks in head h's row from its first slot. A kernel of its
// own rather than a branch here: the branch took the batched carry from 95
// to 124 registers (real gates 66 to 107, sm_90), a block fewer per SM for
// a kernel that hides its loads' latency with resident warps.
// kSums: the segmented carry's first launch instead (batched only): the
// segments' local sums and decay products (grid.y = carry_segments − 1, the
// last segment's not needed).
template <bool kComplex, bool kPacked, bool kSums = false>
__device__ __forceinline__ void chunk_carry(const GateloopChunkParams& p) {
    const int64_t kv = p.dims.key_dim * p.dims.value_dim;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    if constexpr (kSums) {
        static_assert(!kPacked, "packed sequences keep one walk each");
        const CarryRow row = carry_row<false>(p, e);
        carry_segment_sums<false, kComplex>(p, carry_slots<kComplex ? 2 : 1>(p, p.ws_state, e, row.first_slot), kv,
                                            row.chunks);
        return;
    }
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const int64_t hi0 = state_index(p.h0_strides, e.bhi.b, e.bhi.h, e.row, e.col);
    const int64_t hf = state_index(p.h_final_strides, e.bhi.b, e.bhi.h, e.row, e.col);
    // Chunk c's rows: re at (c, row), im at (c, K + row), from e's row of slots.
    const CarryRow row = carry_row<kPacked>(p, e);
    const CarrySlots cs = carry_slots<kComplex ? 2 : 1>(p, p.ws_state, e, row.first_slot);
    const float2 s0 = has_h0 ? load_gate_side<kComplex>(p.h0, hi0) : make_float2(0.f, 0.f);
    // Segmented (batched only): segment blockIdx.y of carry_segments
    // (chunk_common.cuh, "the carry in segments"), after
    // gateloop_chunk_carry_segments_* on the stream. One call of
    // carry_chunks either way: two inlined copies took the complex carry
    // from 95 to 174 registers (sm_90), one block an SM instead of two.
    const CarryWalk w = carry_walk<kComplex, kPacked>(p, row.chunks, s0);
    const float2 s = carry_chunks<false, kComplex>(cs, kv, row.chunks, w.s_in, w.visits.lo, w.visits.hi);
    if (w.last) store_gate_side<kComplex>(p.h_final, hf, s);
}

// ---- 1 + 2 in one pass: the state and the carry, walking the chunks -------------

// One block per (b, h, value tile, key slab of walk_slab channels) (slab
// fastest) walks the chunks in order (walk_chunks in chunk_common.cuh):
// per chunk U_c (the state
// kernel's product, same operands and order) and A_c, slot c of ws_state :=
// the state entering chunk c, S ← A_c ⊙ S + U_c; h_final at the end. It
// writes what launches 1 and 2 write, bit for bit (tests/cpu_chunked_emu.rs),
// in one pass: U_c never goes through the workspace (its write, and the
// carry's read of it, are half the forward's workspace traffic), k, v and
// log_gate are read once, at the price of the chunks' parallelism
// (B·H·value_tiles·slabs blocks instead of B·H·chunks·value_tiles): the
// launcher's plan picks it only for grids that fill the GPU.
// kCols = kWideCols (real gates: the wide walk, gateloop_chunk_state_seq_wide_*):
// a block takes 128 value columns, two value tiles, for which its gate
// prefix, key slab and slab operand are built once where two blocks each
// built them (most of a chunk's instructions); the same bits.
template <typename input_t, class Op, bool kComplex, int kTerms, int kCols = kVTile>
__device__ __forceinline__ void chunk_state_seq(const GateloopChunkParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(p.state_shared_bytes, seq_smem_bytes<Op, input_t, kComplex, kTerms, kCols>());
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    walk_chunks<false, Op, kTerms, input_t, kComplex, kCols>(
        p, smem, has_h0 ? p.h0 : nullptr, p.h0_strides, p.ws_state, p.h_final, p.h_final_strides,
        [&](const WalkBlock<input_t, kComplex>& blk) {
            return WalkRows<input_t>{blk.k, p.k_strides, blk.v, p.v_strides};
        },
        [&](const WalkBlock<input_t, kComplex>& blk, const WalkSmem<Op, input_t, kComplex, kTerms>& sm) {
            // K̃ (the walk stores A_c to ws_decay).
            put_state_keys<Op, kTerms>(blk, sm.raw, sm.slab);
        });
}

// ---- 3. outputs -------------------------------------------------------------------

// kCols: value columns a block (kVTile, p.value_tiles of them; or
// kWideCols, the wide launch, ⌈V / kWideCols⌉ blocks a chunk, which forms
// each chunk's scores once for 128 columns: intra_pass).
template <typename input_t, class Op, bool kComplex, int kTerms, int kCols = kVTile>
__device__ __forceinline__ void chunk_output(const GateloopChunkParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(p.shared_bytes, output_smem_bytes<Op, kComplex, OpOf<input_t>::kRawTerms, kCols>());
    auto blk = Block<input_t, kComplex, kPrefixLd>::of_tiles(p, smem, kCols);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    intra_pass<Op, kTerms, false, kCols>(blk, smem, p.ws_state, blk.v, p.v_strides,
                                         seq_row_mut<input_t>(p.y, p.y_strides, blk.b, blk.h), p.y_strides);
}

}  // namespace chunk
}  // namespace gateloop

// ---- entry points -----------------------------------------------------------------
//
// gateloop_chunk_{state,output}_{dtype}_{c,r}_{exact,fast}: dtype of q, k, v,
// y; c = complex gates, r = real gates; exact = 3 split products, fast = 1.
// gateloop_chunk_carry_{c,r}.

// STATE_MIN, SEQ_MIN, OUTPUT_MIN: the blocks per SM each kernel is compiled
// for (its register cap: 1 → 255 registers a thread, 2 → 128, 3 → 80,
// 4 → 64). A second resident block runs while the first waits at a barrier
// (the gate prefix, the operand staging, the walk's loads). For 16-bit
// inputs: the most blocks that the kernel's shared memory lets an SM hold
// (H200: 228 KB, A100: 164 KB; 1 KB more per block) where ptxas compiles it
// spill-free under that cap (build.rs rejects spills), else the next count
// below; GATELOOP_BY_ARCH where sm_80 and sm_90 differ. Shared memory, and
// the counts on sm_90 (sm_80):
//   state   complex 60 KB: 3 (2), bf16 51 KB: 4 (3)
//           real 48 KB: 4 (2 exact, 3 fast), bf16 39 KB: 5 (4)
//   walk    complex 64 KB: fast 3 (1), bf16 fast 50 KB: 4 (3); exact 1 (1):
//           it spills 8 bytes at 3, and at 1 takes 112 registers (sm_80:
//           107), two resident all the same
//           real 69 KB (32 channels a block: walk_slab): 3 (2), f16 exact 2
//           (2: it spilled 4 bytes at 3; bf16 exact fits 3 with its Gram
//           product rolled, slab_gram's kRolled), bf16 fast 55 KB: 4 (2)
//           (the real walks 1 KB more since speed log item 59, X_c's row
//           pad: the same counts)
//   output  complex 82 KB: 2 (2)   real 68 KB: 3 (2)
// (bf16 state kernels and walks: their value tile one plane, the lo plane a
// bf16 input never has, speed log item 47; Fast walks: their one-term slab
// operand one plane, item 49, the f32 complex fast walk then 2 (2).)
// (A count above what the arch's shared memory holds only caps registers:
// where a cap of 4 compiles spill-free and 3 does not, 4 it is.)
// The real-gate walks took 52 KB and 4 an SM (64 registers) with slabs of
// 16 channels; at 32 (speed log item 30) the prefix tables and the carried
// state double, the raw slab moves into the staging tiles' bytes, and 3 fit.
// WIDE_MIN: the wide output launch's, the same as OUTPUT_MIN: its four
// accumulators a warp fit the same caps spill-free (sm_90: real 16-bit 80
// registers at 3 an SM, complex 123-128 at 2, f32 real 128 at 2, f32
// complex 128-168 at 1, its 139 KB), in the same shared memory for real
// gates (its V passes in halves through the narrow final phase's bytes)
// and 8 KB more for complex (98816 B: still 2 an SM on sm_90); f32 real
// exact at 1 on sm_80 (8 bytes spilled at 2, which its 105 KB do not fit
// there). For the
// walk the count is its grid's waves: at B8 L4096 H16 K = V = 64 its 512
// blocks (complex gates) are two waves at 2 per SM of an H200's 132; the
// real-gate walk's 256 blocks one at 2 or 3.
// f32 kernels: 2 where two blocks fit and ptxas stays within 128 registers
// spill-free on sm_80 and sm_90, else 1 (not re-examined for more).
#define GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, GATE, CPLX, PREC, TERMS, STATE_MIN, SEQ_MIN, OUTPUT_MIN, WIDE_MIN) \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, STATE_MIN)                     \
        gateloop_chunk_state_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                     \
        gateloop::chunk::chunk_state<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, SEQ_MIN)                       \
        gateloop_chunk_state_seq_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                 \
        gateloop::chunk::chunk_state_seq<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, OUTPUT_MIN)                    \
        gateloop_chunk_output_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                    \
        gateloop::chunk::chunk_output<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                         \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, WIDE_MIN)                      \
        gateloop_chunk_output_wide_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {               \
        gateloop::chunk::chunk_output<TYPE, gateloop::chunk::OP, CPLX, TERMS, gateloop::chunk::kWideCols>(p); \
    }

// Exact entries take OpOf<TYPE>::type (bf16 splits for f16 inputs: see OpOf);
// fast entries the input's own operand type.
GATELOOP_CHUNK_ENTRIES(f32, float, OpTf32, c, true, exact, 3, 2, 1, 1, 1)
GATELOOP_CHUNK_ENTRIES(f32, float, OpTf32, c, true, fast, 1, 2, 2, 1, 1)
GATELOOP_CHUNK_ENTRIES(f32, float, OpTf32, r, false, exact, 3, 2, 1, 1, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_ENTRIES(f32, float, OpTf32, r, false, fast, 1, 2, 2, 2, 2)
GATELOOP_CHUNK_ENTRIES(f16, __half, OpBf16, c, true, exact, 3, GATELOOP_BY_ARCH(2, 3), 1, 2, 2)
GATELOOP_CHUNK_ENTRIES(f16, __half, OpF16, c, true, fast, 1, GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(1, 3), 2, 2)
GATELOOP_CHUNK_ENTRIES(f16, __half, OpBf16, r, false, exact, 3,
                       GATELOOP_BY_ARCH(2, 4), 2, GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_ENTRIES(f16, __half, OpF16, r, false, fast, 1,
                       GATELOOP_BY_ARCH(3, 4), GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_ENTRIES(bf16, __nv_bfloat16, OpBf16, c, true, exact, 3, GATELOOP_BY_ARCH(3, 4), 1, 2, 2)
GATELOOP_CHUNK_ENTRIES(bf16, __nv_bfloat16, OpBf16, c, true, fast, 1,
                       GATELOOP_BY_ARCH(3, 4), GATELOOP_BY_ARCH(3, 4), 2, 2)
GATELOOP_CHUNK_ENTRIES(bf16, __nv_bfloat16, OpBf16, r, false, exact, 3,
                       GATELOOP_BY_ARCH(4, 5), GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_ENTRIES(bf16, __nv_bfloat16, OpBf16, r, false, fast, 1,
                       GATELOOP_BY_ARCH(4, 5), GATELOOP_BY_ARCH(2, 4), GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(2, 3))

// gateloop_chunk_state_seq_wide_{f16,bf16}_r_{exact,fast}: the real-gate
// walk in blocks of 128 value columns (chunk_state_seq's kCols), for V > 64
// (src/cuda/chunk.rs: ChunkStateBlocks). MIN by the rule above on sm_90, shared
// memory (sequential_wide_shared_bytes): bf16 Fast 72 KB: 3; bf16 Exact 77
// KB, f16 Fast 90 KB and Exact 95 KB (their tiles two planes): 2, but f16
// Fast compiled for 3 (80 registers; at 2 ptxas spilled 4 bytes). On sm_80
// 1: at 2 (128 registers) ptxas spilled 8 to 40 bytes, and the launcher's
// ChunkStateBlocks::Auto takes the narrow walk there.
#define GATELOOP_CHUNK_WIDE_WALK_ENTRY(DTYPE, TYPE, OP, PREC, TERMS, MIN)                                    \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                            \
        gateloop_chunk_state_seq_wide_##DTYPE##_r_##PREC(const GateloopChunkParams p) {                     \
        gateloop::chunk::chunk_state_seq<TYPE, gateloop::chunk::OP, false, TERMS, gateloop::chunk::kWideCols>(p); \
    }
GATELOOP_CHUNK_WIDE_WALK_ENTRY(f16, __half, OpBf16, exact, 3, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_WIDE_WALK_ENTRY(f16, __half, OpF16, fast, 1, GATELOOP_BY_ARCH(1, 3))
GATELOOP_CHUNK_WIDE_WALK_ENTRY(bf16, __nv_bfloat16, OpBf16, exact, 3, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_WIDE_WALK_ENTRY(bf16, __nv_bfloat16, OpBf16, fast, 1, GATELOOP_BY_ARCH(1, 3))

// gateloop_chunk_state_wide_{f16,bf16}_{c,r}_{exact,fast}: the state kernel
// in blocks of 128 value columns (chunk_state's kCols), for V > 64 with the
// separate carry (src/cuda/chunk.rs: ChunkStateBlocks). MIN by the rule
// above, shared memory (state_block_bytes: the narrow layout and a second
// value tile): bf16 complex 60 KB, real 48 KB: 3 and 4 an H200 SM, 2 and 3
// on sm_80; f16 complex 78 KB, real 66 KB (tiles of two planes): 2 and 3,
// 2 and 2. One block a chunk's 128 columns where two blocks (4 and 5 an SM
// for bf16) each built the slab's prefix and K̃; f32 keeps the narrow
// kernel (one block an SM complex).
#define GATELOOP_CHUNK_WIDE_STATE_ENTRY(DTYPE, TYPE, OP, GATE, CPLX, PREC, TERMS, MIN)                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                            \
        gateloop_chunk_state_wide_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                  \
        gateloop::chunk::chunk_state<TYPE, gateloop::chunk::OP, CPLX, TERMS, gateloop::chunk::kWideCols>(p); \
    }
GATELOOP_CHUNK_WIDE_STATE_ENTRY(f16, __half, OpBf16, c, true, exact, 3, 2)
GATELOOP_CHUNK_WIDE_STATE_ENTRY(f16, __half, OpF16, c, true, fast, 1, 2)
GATELOOP_CHUNK_WIDE_STATE_ENTRY(f16, __half, OpBf16, r, false, exact, 3, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_WIDE_STATE_ENTRY(f16, __half, OpF16, r, false, fast, 1, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_WIDE_STATE_ENTRY(bf16, __nv_bfloat16, OpBf16, c, true, exact, 3, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_WIDE_STATE_ENTRY(bf16, __nv_bfloat16, OpBf16, c, true, fast, 1, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_WIDE_STATE_ENTRY(bf16, __nv_bfloat16, OpBf16, r, false, exact, 3, GATELOOP_BY_ARCH(3, 4))
GATELOOP_CHUNK_WIDE_STATE_ENTRY(bf16, __nv_bfloat16, OpBf16, r, false, fast, 1, GATELOOP_BY_ARCH(3, 4))

// gateloop_chunk_output_frag_{f16,bf16}_{c,r}_{exact,fast}: the output launch
// on register fragments (cuda/chunk_frag.cuh), 16-bit inputs only (m16n8k16
// operands), the same operand types as the staged entries. MIN: blocks per SM
// (2: 128 registers, spill-free on sm_80 and sm_90; ~60 KB of shared memory),
// except the complex entries on sm_80, whose 128 spilled (4 bytes Exact once
// the factors took the SFU's exp, sfu_exp_nonpos; 64 Fast once the diagonal
// blocks took the cross rows, add_diagonal_cross): one block an SM there.
#define GATELOOP_CHUNK_FRAG_ENTRY(DTYPE, TYPE, OP, GATE, CPLX, PREC, TERMS, MIN)                        \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                        \
        gateloop_chunk_output_frag_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {             \
        gateloop::chunk::chunk_output_frag<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                  \
    }

GATELOOP_CHUNK_FRAG_ENTRY(f16, __half, OpBf16, c, true, exact, 3, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_FRAG_ENTRY(f16, __half, OpF16, c, true, fast, 1, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_FRAG_ENTRY(f16, __half, OpBf16, r, false, exact, 3, 2)
GATELOOP_CHUNK_FRAG_ENTRY(f16, __half, OpF16, r, false, fast, 1, 2)
GATELOOP_CHUNK_FRAG_ENTRY(bf16, __nv_bfloat16, OpBf16, c, true, exact, 3, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_FRAG_ENTRY(bf16, __nv_bfloat16, OpBf16, c, true, fast, 1, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_FRAG_ENTRY(bf16, __nv_bfloat16, OpBf16, r, false, exact, 3, 2)
GATELOOP_CHUNK_FRAG_ENTRY(bf16, __nv_bfloat16, OpBf16, r, false, fast, 1, 2)

static_assert(std::is_same<gateloop::chunk::OpOf<float>::type, gateloop::chunk::OpTf32>::value &&
                  std::is_same<gateloop::chunk::OpOf<__half>::type, gateloop::chunk::OpBf16>::value &&
                  std::is_same<gateloop::chunk::OpOf<__nv_bfloat16>::type, gateloop::chunk::OpBf16>::value,
              "the Exact entry points use OpOf's operand types (the backward's)");

// gateloop_chunk_carry_{c,r}, and gateloop_chunk_carry_packed_{c,r} for
// packed sequences (p.cu_seqlens non-NULL). BOUNDS: the __launch_bounds__
// arguments. The packed carry's loop bound is its sequence's, no longer
// the constant num_chunks, and unbounded it took 156 registers (sm_90), one
// block an SM: 2 blocks an SM cap it at 128, spill-free on sm_80 and sm_90.
// The batched carry likewise since it runs in segments (a visit range in
// place of the constant num_chunks): unbounded it took 174 registers
// (complex, sm_90; it had 95), at 2 blocks an SM 79 (complex) and 112 to 128
// (real: it had 66; at 3 it spills), spill-free on sm_80 and sm_90; the
// backward's adjoint carries the same (complex 188 unbounded, had 175: 71
// to 77 now).
#define GATELOOP_CHUNK_CARRY_ENTRY(NAME, CPLX, PACKED, BOUNDS)                   \
    extern "C" __global__ void __launch_bounds__ BOUNDS NAME(const GateloopChunkParams p) { \
        gateloop::chunk::chunk_carry<CPLX, PACKED>(p);                           \
    }
GATELOOP_CHUNK_CARRY_ENTRY(gateloop_chunk_carry_c, true, false, (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_CARRY_ENTRY(gateloop_chunk_carry_r, false, false, (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_CARRY_ENTRY(gateloop_chunk_carry_packed_c, true, true, (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_CARRY_ENTRY(gateloop_chunk_carry_packed_r, false, true, (GATELOOP_CHUNK_CARRY_THREADS, 2))

// gateloop_chunk_carry_segments_{c,r}: the segmented carry's first launch.
#define GATELOOP_CHUNK_CARRY_SEGMENTS_ENTRY(NAME, CPLX)                                          \
    extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS) NAME(const GateloopChunkParams p) { \
        gateloop::chunk::chunk_carry<CPLX, false, true>(p);                                        \
    }
GATELOOP_CHUNK_CARRY_SEGMENTS_ENTRY(gateloop_chunk_carry_segments_c, true)
GATELOOP_CHUNK_CARRY_SEGMENTS_ENTRY(gateloop_chunk_carry_segments_r, false)
