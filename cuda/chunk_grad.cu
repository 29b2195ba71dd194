// The chunked BACKWARD of GateLoop (complex gates): the GPU twin of
// src/cpu/chunked_grad.rs. READ that module's doc for the derivation (the
// pre-phase accumulators acc_q, acc_k, acc_d, the gate gradient from w', u and
// the through term); this file maps its three CPU launches onto thread blocks,
// with the same chunks (64), anchors (last step of each 16-step key
// sub-chunk), segmented chunk-local gate prefix (Block::build_prefix, shared
// with the forward through chunk_common.cuh) and the same formulas.
//
// Launches (one stream; the launcher is src/cuda/chunk_grad.rs):
//   1a. the forward's gateloop_chunk_state (tensor cores): U_c, A_c.
//   1b. grad_w, one block per (b, h, chunk, value tile of 64):
//       W_c = [Re Q̃ | −Im Q̃]ᵀ dY (planar 2K × 64), Q̃_n = q_n E(n, −1), per
//       key slab a (2·16 × 64)·(64 × 64) tensor-core product: the state
//       kernel's K̃ᵀ V with Q̃ for K̃ and dY for V (store_slab_gram).
//   2a. the forward's gateloop_chunk_carry: U_c → S_in(c) (h_final to a sink).
//       (With the forward plan's sequential carry, 1a and 2a are one launch,
//       the forward's gateloop_chunk_state_seq, and 1b and 2b another,
//       grad_w_seq: the same workspace bit for bit, four launches in all.)
//   2b. grad_adjoint_carry, one thread per (b, h, key row, value column):
//       D(last) = dh_final, D(c − 1) = conj(A_c) D(c) + W_c, W_c ← D(c).
//   2c. grad_dh0 (when dh0 is asked for), one thread per state element:
//       dh0 = D(−1), the carry's last step taken again (over what the carry
//       wrote there) on CUDA cores from
//       D(0) and chunk 0's inputs (W_0's tensor-core operands can be f32
//       subnormals that a tensor core may flush: see grad_dh0).
//   3a. grad_qk, one block per (b, h, chunk), looping over key slabs of 16:
//       s = dY Vᵀ (64 × 64, once), then per slab the off-diagonal sub-chunk
//       products s k̃, sᵀ q̃ on the forward's anchored rows, the diagonal
//       sub-chunks in halves (pairs inside, the cross rows between), the
//       inter-chunk products S_in dy_n, D v_n, the
//       pre-phase accumulators of the CPU mirror, dq, dk and the gate
//       gradient (per-head gates: the slabs' w', u and
//       through terms summed in shared memory in slab order, then one scan:
//       deterministic, no atomics); and on the same operands per slab the
//       forward's scores P (causal, summed over every key slab, exactly as
//       the forward's output kernel forms them), into ws_scores.
//   3b. grad_dv, one block per (b, h, chunk, value tile of 64):
//       dv = Pᵀ dY + [Re K̃ | Im K̃] [Re D; Im D], P read from ws_scores:
//       the forward output kernel's pass (intra_pass in chunk_common.cuh)
//       with kAdjoint, K̃ for Q̃, D for S, Pᵀ dY for P V, less the scores.
// Tensor cores: 1b and 3b multiply on tensor cores like the forward (f32
// inputs TF32 m16n16k8, f16 and bf16 inputs bf16 m16n16k16; OpOf picks the
// operand type and says why bf16 for f16), always with three split products (kGradTerms: hi·hi +
// hi·lo + lo·hi, the forward's "exact", ~21 bits for TF32): W_c's and dv's
// products, the anchored off-diagonal score blocks (inner dimension 2·16 per
// slab) and Pᵀ dY; only P's four diagonal 16 × 16 blocks are f32 on CUDA
// cores (in halves: pairwise inside, the cross rows between).
// 3a forms s = dY Vᵀ on tensor cores too (two raw inputs: three split
// products for f32 and f16, one for bf16, exact in its own type), and per
// slab the off-diagonal sub-chunk blocks of the pre-phase accumulators
// (acc_q: s_ij k̃_j, acc_k: s_ijᵀ q̃_ij, inner dimension 16 per pair, on
// put_query_rows' and put_key_rows' operands) and the inter-chunk products S_in dy_n, D v_n
// (three split products each); only the four diagonal 16 × 16 sub-chunk
// blocks (in the forward's halves of 8 steps: pairs m < n inside a half,
// one exp each, and the 8 × 8 block between the halves on the forward's
// cross rows), dq, dk and the gate scans use f32 CUDA-core FMAs, as in the
// forward. 2b is elementwise.
// Every modulus exponentiated is exp of a difference ≤ 0 inside one segment;
// off-diagonal sub-chunk pairs (and those between the halves of a diagonal
// sub-chunk) use the factorisation |E(n, m)| = |E(n, r)| |E(r, m)| at the
// anchor r (both factors ≤ 1, 0 across a reset on either side), the pairs
// inside a half one exp each.
// The gate's terms (w', u) are formed apart from acc_q, acc_k with the modulus
// multiplied LAST (the CPU module doc's "Gate terms: the modulus last"): a
// diagonal pair applies |E(n, m)| after s_nm q_n k_m; an off-diagonal block
// applies the factor the product left out (|E(n, r)| to q_n e^{iθ_n} X,
// |E(r, m)| to k_m e^{−iθ_m} conj(Y)), the CPU mirror's order.
//
// Thread ↔ data maps (256 threads, 8 warps):
//   grad_w:  warp w ↔ the 16 × 16 tile (w / 4, w % 4) of the slab's
//            2·16 × 64 rows of W_c (one accumulator, drained through the
//            warp's staging tile); operands staged by all threads.
//   grad_qk: s = dY Vᵀ: warp w ↔ its tiles (w / 2, 2·(w % 2) + t), t < 2;
//            per slab, the off-diagonal products: offdiag_products' jobs;
//            X = dY S_inᵀ and Y = V Dᵀ: warp w ↔ tile (w / 2, w % 2)
//            of each (real gates: warps 0–3 X, 4–7 Y, tile (w % 4, 0)),
//            and Σ S_in conj(D) of channels w, w + 8 (lane ↔ value
//            column); the rest: key channel d = tid % 16 of the
//            slab, steps n = tid / 16 + 16i (i < 4) for dq, dk; the gate
//            scans: channel tid / 16, steps 16e + tid % 16 (e < 4).
//   grad_dv: warp w ↔ dv tiles (steps 16·(w / 2), columns 16·(2·(w % 2) + t),
//            t < 2) and, w < 6, off-diagonal score block w; the diagonal
//            score blocks thread-strided (the forward output kernel's map).
// Shared memory is dynamic; its size is computed by the host with the same
// layout (src/cuda/chunk_grad.rs: shared_bytes) and checked here (trap).

#include "chunk_common.cuh"

namespace gateloop {
namespace chunk {

// Split products of the backward's tensor-core operands: always three terms
// ("exact"; the f32 backward's GPU tests demand rel L2 ≤ 1e-4).
constexpr int kGradTerms = 3;

// grad_qk's shared memory (grad_w and grad_dv take the forward state and
// output kernels' layouts). After the prefix tables: q, k raw and s (f32,
// live throughout); then, per slab, a union of the off-diagonal phase (the
// six s blocks, the anchored q̃, k̃ as split operands, then their products
// X, Y and the diagonal sub-chunks' cross rows in f32) and the inter-chunk
// phase (dY, V, S_in, D over inter_cols value columns as split operands,
// dY and V of bf16 inputs their hi planes alone; reused for the products X,
// Y in f32); then the tail: P's blocks for
// grad_dv, w', u, the per-head sums and the through terms (f32, live across
// the slab loop). The s phase, before any of those, stages its dY and V
// tiles (split operands; bf16: hi planes alone, carve_terms) from the
// union's first byte on, past its end into the tail where they are longer
// (f16 and f32 inputs, whose tiles take two planes: complex f16 36 864
// bytes against the union's 32 256): the tail is
// first written after the s phase's last barrier (qk_smem_bytes).
// Every region but the tail's last two a multiple of 128 bytes.
// src/cuda/chunk_grad.rs: shared_bytes.
// Value columns a step of the inter-chunk products: 32, and 64 for real
// bf16 (kRawTerms = 1) inputs, whose dY and V tiles take one plane: their
// 64 columns cost 2 KB more than the offdiag phase's bytes, where 64 columns
// halve the steps (each a round trip, two barriers and its addresses
// formed: some 160 of a 32-column step's 223 instructions in the sm_90
// SASS; speed log item 62). Not the others: complex gates' block would
// pass 113 KB (two an H200 SM), real f16's (two planes) the 99 KB of
// sm_86 and sm_89.
template <bool kComplex, int kRawTerms>
__host__ __device__ constexpr int inter_cols() {
    return !kComplex && kRawTerms == 1 ? kVTile : kVTile / 2;
}
// The states' columns a warp's lanes take (a 64-column step: two of them).
constexpr int kInterLanes = 32;
// w' and u rows: one float2 per channel (real gates: a float, GateRows) and
// a pad, so that a half-warp reading one channel's 16 consecutive steps
// (gate_scan) hits 16 bank pairs (16 banks).
constexpr int kLdGate = kSlab + 1;
template <class Op, int kCols>
__host__ __device__ constexpr int ld_inter() {
    return kCols + Op::kPad;
}
// Rows of grad_qk's f32 products X, Y (the off-diagonal and inter-chunk
// phases): the slab's [Re | Im] (real gates: Re) and 8 floats of padding.
// An accumulator store (store_accumulator: 8 bytes a lane at row g, column
// 2t) takes a half-warp over rows g .. g + 3, and at 40 (or 24) floats a
// row those fall on banks 0, 8, 16, 24 (or 0, 24, 16, 8) apart: one
// wavefront a phase, where 2·kSlab = 32 floats put the four rows on the
// same eight banks (four).
template <bool kComplex>
__host__ __device__ constexpr int ld_product() {
    return slab_width<kComplex>() + 8;
}
// dY, V of raw_tile_terms (bf16: one plane), S_in, D split.
template <class Op, bool kComplex, int kRawTerms>
__host__ __device__ constexpr int qk_inter_bytes() {
    constexpr int kCols = inter_cols<kComplex, kRawTerms>();
    constexpr int kTileTerms = raw_terms<kRawTerms, kGradTerms>();
    return cmax(2 * terms_bytes<Op, kTileTerms>(kChunk, ld_inter<Op, kCols>()) +
                    2 * split_bytes<Op>(slab_width<kComplex>(), ld_inter<Op, kCols>()),
                2 * kChunk * ld_product<kComplex>() * 4);
}
// One 16 × 16 block of s per row of sub-chunks (row padding as the others).
template <class Op>
__host__ __device__ constexpr int ld_block() {
    return kSub + Op::kPad;
}
// The off-diagonal phase: s blocks, q̃ per pair, k̃ per key sub-chunk
// (put_query_rows' and put_key_rows' layout); X per pair and Y per key sub-chunk in f32.
template <class Op, bool kComplex>
__host__ __device__ constexpr int qk_offdiag_bytes() {
    return split_bytes<Op>(kPairs * kSub, ld_block<Op>()) + split_bytes<Op>(kPairs * kSub, ld_slab<Op, kComplex>()) +
           split_bytes<Op>((kSubs - 1) * kSub, ld_slab<Op, kComplex>());
}
// X, Y, then the diagonal sub-chunks' cross rows (put_cross_rows).
template <bool kComplex>
__host__ __device__ constexpr int offdiag_out_bytes() {
    return 4 * (kPairs + kSubs - 1) * kSub * ld_product<kComplex>();
}
// The slab phases' union (the s phase's tiles are counted apart: qk_smem_bytes).
template <class Op, bool kComplex, int kRawTerms>
__host__ __device__ constexpr int qk_union_bytes() {
    return cmax(qk_inter_bytes<Op, kComplex, kRawTerms>(),
                cmax(qk_offdiag_bytes<Op, kComplex>(), offdiag_out_bytes<kComplex>() + cross_scratch_bytes<kComplex>()));
}
// The s phase's dY and V tiles, kRawTerms each (one plane for bf16 inputs).
template <class Op, int kRawTerms>
__host__ __device__ constexpr int qk_s_phase_bytes() {
    return 2 * terms_bytes<Op, kRawTerms>(kChunk, ld_tile<Op>());
}
// grad_qk's blocks of the scores P for grad_dv (grad_qk_scores): the six
// off-diagonal and four diagonal 16 × 16 f32 blocks.
constexpr int kQkScoresBytes = 4 * (kPairs + kSubs) * kSub * kSub;
// The tail after the union: P's blocks, w' and u rows and the per-head sums
// (GateRows: a float2 a step, real gates a float), the through terms.
template <bool kComplex>
__host__ __device__ constexpr int qk_tail_bytes() {
    return kQkScoresBytes + 4 * ((kComplex ? 2 : 1) * 2 * (kChunk * kLdGate + kChunk) + 2 * kSlab + 2);
}
// The s phase's tiles overlay the union and, where longer, the tail.
template <class Op, bool kComplex, int kRawTerms>
__host__ __device__ constexpr int qk_smem_bytes() {
    return prefix_bytes<kComplex, kPrefixLd>() + 4 * (2 * kChunk * kPrefixLd + kChunk * kChunk) +
           cmax(qk_s_phase_bytes<Op, kRawTerms>(), qk_union_bytes<Op, kComplex, kRawTerms>() + qk_tail_bytes<kComplex>());
}

// The off-diagonal sub-chunk blocks of one slab on tensor cores, into f32
// products in `out` (the offdiag phase's bytes, once every warp has read its
// operands): per pair (i, j), X_ij = s_ij k̃_j (16 × [Re | Im] of the slab,
// rows of query sub-chunk i: the pre-phase Σ_m s_nm k_m |E(r_j, m)| e^{−iθ_m});
// per key sub-chunk j < 3, Y_j = Σ_{i > j} s_ijᵀ q̃_ij (16 × [Re | −Im], rows
// of key sub-chunk j: the conjugate of Σ_n s_nm q_n |E(n, r_j)| e^{iθ_n}),
// s_ij = s[16 i.., 16 j..]. The query-side factor |E(n, r_j)| of X and the
// key-side factor |E(r_j, m)| of Y are applied by the caller (they differ per
// channel, so they cannot ride in s). Jobs (16 × 16 output tile, 16 inner
// steps per pair): Y(j, half) is 3 − j pairs and goes to warps 2j, 2j + 1;
// the twelve X(pair, half) fill the rest (warps 2, 3 one; 4, 5 two; 6, 7
// three): three pair-products per warp. Real gates (kComplex = false) have
// no Im halves: the jobs with half = 1 are skipped (and the f32 rows have
// no Im columns: ld_product). With X and Y, the diagonal sub-chunks' cross
// rows (put_cross_rows, the forward's) past them (offdiag_out_bytes on:
// the operands' bytes, free once they are read). Ends with a barrier.
template <class Op, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void offdiag_products(const Block<input_t, kComplex, kLd>& blk, const float* ds,
                                                 const float* qraw, const float* kraw, unsigned char* at,
                                                 float* pblocks) {
    constexpr int kLdProduct = ld_product<kComplex>();
    unsigned char* const base = at;
    const Split<Op> sb = carve<Op>(at, kPairs * kSub, ld_block<Op>());
    const Split<Op> qa = carve<Op>(at, kPairs * kSub, ld_slab<Op, kComplex>());
    const Split<Op> ka = carve<Op>(at, (kSubs - 1) * kSub, ld_slab<Op, kComplex>());
    for (int i = blk.tid; i < kPairs * kSub * kSub; i += kThreads) {
        const int pr = i / (kSub * kSub);
        const int r = (i / kSub) % kSub;
        const int c = i % kSub;
        sb.template put<kGradTerms>(pr * kSub + r, c,
                                    ds[(kSub * pair_query(pr) + r) * kChunk + kSub * pair_key(pr) + c]);
    }
    put_query_rows<Op, kGradTerms, false, false>(blk, qraw, qa, nullptr, nullptr);
    put_key_rows<Op, kGradTerms, false>(blk, kraw, ka, nullptr);
    __syncthreads();
    const int w = blk.warp;
    // Jobs of an Im half exist with complex gates only.
    const auto has_half = [](int half) { return kComplex || half == 0; };
    const int ny = w < 2 * (kSubs - 1) ? 1 : 0;
    const int g = (w - 2) / 2;  // w ≥ 2: X jobs x0 .. x0 + nx − 1
    const int nx = w < 2 ? 0 : g + 1;
    const int x0 = w < 2 ? 0 : (g + 1) * (g + (w - 2) % 2);
    Acc<Op> acc[3];
#pragma unroll
    for (int t = 0; t < 3; ++t) {
        wmma::fill_fragment(acc[t], 0.f);
        if (t < ny) {
            const int j = w >> 1;
            const int half = w & 1;
            for (int i = j + 1; i < kSubs && has_half(half); ++i) {
                const int pr = pair_of(i, j);
                // A(m, n) = s_ij[n][m]: the block read column-major.
                for (int kk = 0; kk < kSub; kk += Op::kK) {
                    mma_step<Op, kGradTerms, wmma::col_major, wmma::row_major>(
                        acc[t], sb.hi_at(kSub * pr + kk, 0), sb.lo_at(kSub * pr + kk, 0), sb.ld,
                        qa.hi_at(kSub * pr + kk, kSlab * half), qa.lo_at(kSub * pr + kk, kSlab * half), qa.ld);
                }
            }
        } else if (t - ny < nx) {
            const int x = x0 + t - ny;
            const int pr = x >> 1;
            const int half = x & 1;
            const int km = kSub * pair_key(pr);
            for (int kk = 0; kk < kSub && has_half(half); kk += Op::kK) {
                mma_step<Op, kGradTerms, wmma::row_major, wmma::row_major>(
                    acc[t], sb.hi_at(kSub * pr, kk), sb.lo_at(kSub * pr, kk), sb.ld, ka.hi_at(km + kk, kSlab * half),
                    ka.lo_at(km + kk, kSlab * half), ka.ld);
            }
        }
    }
    // The forward's off-diagonal score block w (intra_pass's product on the
    // same operands), summed over the slabs for grad_dv (grad_qk_scores) in
    // the warp's own f32 block of `pblocks` (held in registers across the
    // slab loop, its accumulator spilled the complex kernels at 128; so did
    // the complex product unrolled).
    if (w < kPairs) {
        Acc<Op> sacc;
        load_accumulator(sacc, pblocks + w * kSub * kSub, kSub);
        add_score_block<Op, kGradTerms, kComplex, kComplex>(sacc, qa, ka, w);
        store_accumulator(pblocks + w * kSub * kSub, sacc, kSub);
    }
    __syncthreads();  // every warp has read its operands: X, Y take their bytes
    float* xo = reinterpret_cast<float*>(base);
    float* yo = xo + kPairs * kSub * kLdProduct;
#pragma unroll
    for (int t = 0; t < 3; ++t) {
        if (t < ny) {
            if (has_half(w & 1)) {
                store_accumulator(yo + (w >> 1) * kSub * kLdProduct + kSlab * (w & 1), acc[t], kLdProduct);
            }
        } else if (t - ny < nx && has_half((x0 + t - ny) & 1)) {
            const int x = x0 + t - ny;
            store_accumulator(xo + (x >> 1) * kSub * kLdProduct + kSlab * (x & 1), acc[t], kLdProduct);
        }
    }
    put_cross_rows(blk, qraw, kraw, reinterpret_cast<float*>(base + offdiag_out_bytes<kComplex>()));
    __syncthreads();
}

// ---- 1b. W_c = Σ_n conj(Q̃_n) dy_nᵀ ----------------------------------------------------

// kCols = kWideCols (gateloop_chunk_grad_w_wide_*, V > 64): one block per
// 128 value columns, as the forward's wide state kernel.
template <typename input_t, bool kComplex, int kCols = kVTile>
__device__ __forceinline__ void grad_w(const GateloopChunkGradParams& g) {
    using Op = typename OpOf<input_t>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int kTileTerms = OpOf<input_t>::kRawTerms;
    constexpr int kTiles = kCols / kVTile;
    // The forward state kernel's layout: raw q for raw k, dY for V, Q̃ for K̃.
    using Smem = StateSmem<Op, kComplex, kTileTerms>;
    check_shared(g.w_shared_bytes, state_block_bytes<Op, kComplex, kTileTerms, kCols>());
    const GateloopChunkParams& p = g.fwd;
    auto blk = Block<input_t, kComplex>::of_tiles(p, smem, kCols);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    // Raw q, the dY tiles, [Re Q̃ | −Im Q̃] [n][col] (read as the column-major A = Q̃ᴴ).
    const Smem sm(smem, blk.warp);
    float* qraw = sm.raw;
    const StateTiles<Op, kTileTerms, kTiles> dys(sm, smem);
    const Split<Op>& qe = sm.slab;
    float* staging = sm.staging;

    dys.template load<raw_tile_terms<input_t, kGradTerms>()>(blk, seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h),
                                                              g.dy_strides);
    for (int64_t d0 = 0; d0 < p.dims.key_dim; d0 += kSlab) {
        // (Not held in the f16 kernels on sm_90: 4 to 8 bytes spilled at their 80.)
        blk.template stage_slab_own<!std::is_same<input_t, __half>::value || GATELOOP_BY_ARCH(true, false)>(
            blk.q, p.q_strides, d0, qraw);
        put_inter_queries<Op, kGradTerms>(blk, qraw, qe);  // own raw queries only: no barrier
        __syncthreads();
        store_slab_grams<Op, kGradTerms, kTiles>(blk, qe, dys.tile, d0, staging, g.ws_adj);
        __syncthreads();  // qe, qraw and the prefix tables are rewritten by the next slab
    }
}

// 1b + 2b in one pass (the sequential carry): one block per (b, h, value
// tile, key slab of walk_slab channels: the forward walk's) walks the chunks
// in reverse (walk_chunks in
// chunk_common.cuh) with its slab of D on chip: per chunk W_c (grad_w's
// product, same operands and order), slot c of ws_adj := D(c), D(c − 1) =
// conj(A_c) D(c) + W_c; dh0 at the end (which grad_dh0, next on the stream,
// writes again). Bit for bit what grad_w followed by the adjoint carry
// writes; W_c never goes through the workspace. (Not writing dh0 here made
// ptxas spill this kernel at its register cap.)
// kCols = kWideCols (real gates, gateloop_chunk_grad_w_seq_wide_*): blocks
// of 128 value columns, as the forward's wide walk (speed log item 52).
template <typename input_t, bool kComplex, int kCols = kVTile>
__device__ __forceinline__ void grad_w_seq(const GateloopChunkGradParams& g) {
    using Op = typename OpOf<input_t>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(g.w_shared_bytes, seq_smem_bytes<Op, input_t, kComplex, kGradTerms, kCols>());
    const GateloopChunkParams& p = g.fwd;
    const bool has_dh_final = (g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH_FINAL) != 0;
    const bool has_dh0 = (g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH0) != 0;
    walk_chunks<true, Op, kGradTerms, input_t, kComplex, kCols>(
        p, smem, has_dh_final ? g.dh_final : nullptr, g.dh_final_strides, g.ws_adj, has_dh0 ? g.dh0 : nullptr,
        g.dh0_strides,
        [&](const WalkBlock<input_t, kComplex>& blk) {
            return WalkRows<input_t>{blk.q, p.q_strides, seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h),
                                     g.dy_strides};
        },
        [&](const WalkBlock<input_t, kComplex>& blk, const WalkSmem<Op, input_t, kComplex, kGradTerms>& sm) {
            // [Re Q̃ | −Im Q̃] and dY, as grad_w stages them.
            put_inter_queries<Op, kGradTerms>(blk, sm.raw, sm.slab);
        });
}

// ---- 2b. the adjoint carry ------------------------------------------------------------

// kPacked (gateloop_chunk_grad_adjoint_carry_packed_*, fwd.cu_seqlens): e.bhi.b
// is the sequence, its chunks in head h's row from its first slot (the
// forward's chunk_carry<kPacked>, and a kernel of its own for the same reason).
// kSums: the segmented carry's first launch instead (batched only): the
// segments' local sums and decay products (grid.y = carry_segments − 1).
template <bool kComplex, bool kPacked, bool kSums = false>
__device__ __forceinline__ void grad_adjoint_carry(const GateloopChunkGradParams& g) {
    const GateloopChunkParams& p = g.fwd;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const CarryRow row = carry_row<kPacked>(p, e);
    const CarrySlots cs = carry_slots<kComplex ? 2 : 1>(p, g.ws_adj, e, row.first_slot);
    if constexpr (kSums) {
        static_assert(!kPacked, "packed sequences keep one walk each");
        carry_segment_sums<true, kComplex>(p, cs, p.dims.key_dim * p.dims.value_dim, row.chunks);
        return;
    }
    const float2 d_last = (g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH_FINAL) != 0
                              ? load_gate_side<kComplex>(g.dh_final, state_index(g.dh_final_strides, e.bhi.b,
                                                                                  e.bhi.h, e.row, e.col))
                              : make_float2(0.f, 0.f);
    // D(c − 1) = conj(A_c) D(c) + W_c, each slot W_c replaced by D(c); the
    // last, D(−1), is dh0 with W_0 from the tensor cores, written as
    // grad_w_seq writes it and written again by grad_dh0, next on the stream.
    const int64_t kv = p.dims.key_dim * p.dims.value_dim;
    // Segmented (batched only; chunk_common.cuh, "the carry in segments"):
    // segment blockIdx.y of the reversed visits, after
    // gateloop_chunk_grad_adjoint_carry_segments_* on the stream.
    const CarryWalk w = carry_walk<kComplex, kPacked>(p, row.chunks, d_last);
    const float2 s = carry_chunks<true, kComplex>(cs, kv, row.chunks, w.s_in, w.visits.lo, w.visits.hi);
    if ((g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH0) != 0 && w.last) {
        store_gate_side<kComplex>(g.dh0, state_index(g.dh0_strides, e.bhi.b, e.bhi.h, e.row, e.col), s);
    }
}

// ---- 2c. dh0 ---------------------------------------------------------------------------

// dh0 = D(−1) = conj(A_0) D(0) + W_0, W_0 = Σ_{n < n_0} conj(q_n E(n, −1)) dy_n
// (n_0 = min(L, 64)), one thread per state element, from slot 0 of ws_adj
// (D(0), which both carries leave there) and chunk 0's inputs, on CUDA cores.
// Why not the carry's own last step: every term of dh0 carries the first
// gate a_0, and where |a_0| is tiny (a strongly decaying or underflowing
// first step, e^-90 ≈ 8e-40) W_0's tensor-core operand q_n E(n, −1) is an
// f32 subnormal, which a tensor core may flush to zero (whether they keep
// subnormal operands is not documented; the emulator flushes them, the
// worse case), while dh0, that operand times q·dy, is a normal number:
// `gateloop fuzz --device cuda --targets grad` (seed 2032, case 33, L = 1:
// dh0 = 0 for 3.4e-37; case 281, Underflow gates) in f32, f16 and bf16.
// Here E(n, −1) = a_0 ⋯ a_n is a running product P_n = P_{n−1} a_n
// (multiply-only: relative error ~n·u at any magnitude, no exp of a long
// sum), held as P · 2^ex with |P| ≥ 2^−64 (rescaled by 2^64 exactly when it
// falls below), and the power of two is applied last, to conj(P) q_n dy_n
// and to conj(P) D(0) (ldexpf): nothing before the last rounding is
// subnormal unless dh0's term itself is. A reset (Re g below
// GATELOOP_RESET_LOG_GATE: a = 0) zeroes P, every later term and A_0. The
// cost: K·V threads of ≤ 64 steps, one exp and sincos each, once per head.
// Packed sequences (fwd.cu_seqlens): b is the sequence, its steps from
// cu_seqlens[b] in the one batch row, D(0) in its first slot of head h's row
// (a branch here, not a kernel of its own: this launch is K·V threads per
// head once, its registers no bound on anything).
template <typename input_t, bool kComplex>
__device__ __forceinline__ void grad_dh0(const GateloopChunkGradParams& g) {
    using Tr = InputTraits<input_t>;
    const GateloopChunkParams& p = g.fwd;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const int64_t b = e.bhi.b, h = e.bhi.h;
    // The sequence's batch row, first step, steps and first workspace slot
    // (the carries' carry_row).
    int64_t row_b = b, first = 0, len = p.dims.len, first_slot = carry_row<false>(p, e).first_slot;
    if (const int64_t* cu = p.cu_seqlens) {
        row_b = 0;
        first = cu[b];
        len = cu[b + 1] - first;
        first_slot = carry_row<true>(p, e).first_slot;
    }
    const int64_t ch = p.dims.gate_dim == 1 ? 0 : e.row;
    const float* __restrict__ gate =
        (kComplex ? complex_seq_row(p.log_gate, p.gate_strides, row_b, h)
                  : seq_row<float>(p.log_gate, p.gate_strides, row_b, h)) +
        (kComplex ? 2 : 1) * first * p.gate_strides.time;
    const input_t* __restrict__ q = seq_row<input_t>(p.q, p.q_strides, row_b, h) + first * p.q_strides.time;
    const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, row_b, h) + first * g.dy_strides.time;
    const int n0 = static_cast<int>(min(static_cast<int64_t>(kChunk), len));
    float2 pr = make_float2(1.f, 0.f);  // E(n, −1) = pr · 2^ex
    int ex = 0;
    float2 w = make_float2(0.f, 0.f);  // W_0
    for (int n = 0; n < n0; ++n) {
        const int64_t gi = n * p.gate_strides.time + ch;
        float2 a;
        if constexpr (kComplex) {
            a = complex_gate(load_log_gate(gate, gi));
        } else {
            const float lg = __ldg(gate + gi);
            a = make_float2(lg < GATELOOP_RESET_LOG_GATE ? 0.f : gate_modulus(lg), 0.f);
        }
        pr = cmul(pr, a);
        if (pr.x == 0.f && pr.y == 0.f) break;  // a reset: this and every later term, and A_0, are 0
        while (fmaxf(fabsf(pr.x), fabsf(pr.y)) < 0x1p-64f) {
            pr = make_float2(pr.x * 0x1p64f, pr.y * 0x1p64f);
            ex -= 64;
        }
        const float s = Tr::load(q, n * p.q_strides.time + e.row) * Tr::load(dy, n * g.dy_strides.time + e.col);
        w.x += ldexpf(pr.x * s, ex);
        w.y += ldexpf(-pr.y * s, ex);
    }
    // conj(A_0) D(0), A_0 = E(n_0 − 1, −1) (0 after a reset, where the loop
    // left pr = 0).
    const int64_t kv = p.dims.key_dim * p.dims.value_dim;
    const CarrySlots cs = carry_slots<kComplex ? 2 : 1>(p, g.ws_adj, e, first_slot);
    const float2 d = make_float2(cs.re[0], kComplex ? cs.re[kv] : 0.f);
    const float2 ad = make_float2(fmaf(pr.x, d.x, pr.y * d.y), fmaf(pr.x, d.y, -(pr.y * d.x)));
    const float2 dh0 = make_float2(ldexpf(ad.x, ex) + w.x, ldexpf(ad.y, ex) + w.y);
    store_gate_side<kComplex>(g.dh0, state_index(g.dh0_strides, b, h, e.row, e.col), dh0);
}

// ---- 3a. dq, dk and the gate gradient -------------------------------------------------

// The gate gradient of one gate column over the chunk's first n steps
// (cpu::chunked_grad launch3_chunk's last part): g_t = conj(Σ_{t ≤ r < R} w'_r
// + u_t^excl), R the first reset step after t (the running sum restarts at
// each reset step, whose gradient is 0), u_t^excl = start + Σ_{r < t} u_r and
// start = A ⊙ Σ_j S_in conj(D). Taken by the 16 lanes of a half-warp
// (`lane` 0 … 15), the chunk's 64 steps as 4 rows of 16: step n = 16·e +
// lane, so the half-warp reads 16 consecutive steps of the column at once
// (conflict-free with the rows padded to kLdGate). Each row is scanned across
// the lanes by shuffles (Hillis–Steele: the prefix of u forwards, the
// reset-segmented suffix of w' backwards, as pairs (sum up to the first
// reset, reset seen) combined (A, B) → (A.seen ? A.sum : A.sum + B.sum,
// A.seen ∨ B.seen)), the rows joined through a carry. Every thread of the
// block must call it (the shuffles are warp-wide, and the emulator's are
// block-wide): write(n, g) is called for each step n < blk.n of the lane;
// the caller drops what a dead column or half-warp computed. Replaces a
// serial walk over the 64 steps by one thread per column while the block
// waited at a barrier; a fixed order, so still deterministic.
constexpr int kScanLanes = 16;
constexpr int kScanRows = kChunk / kScanLanes;

__device__ __forceinline__ float2 shfl_up2(float2 x, int lanes) {
    return make_float2(__shfl_up_sync(0xffffffffu, x.x, lanes), __shfl_up_sync(0xffffffffu, x.y, lanes));
}
// !kComplex: a real value, its Im half the constant 0 (not shuffled).
template <bool kComplex = true>
__device__ __forceinline__ float2 shfl_down2(float2 x, int lanes) {
    return make_float2(__shfl_down_sync(0xffffffffu, x.x, lanes),
                       kComplex ? __shfl_down_sync(0xffffffffu, x.y, lanes) : 0.f);
}
__device__ __forceinline__ float2 add2(float2 x, float2 y) {
    return make_float2(x.x + y.x, x.y + y.y);
}

// grad_qk's w' and u rows and per-head sums: a complex (float2) a step, or
// with real gates a float (their Im parts are 0: half the bytes, which lets
// two f32 real grad_qk blocks share an H200 SM). Read as float2 either way.
template <bool kComplex>
struct GateRows {
    static constexpr int kParts = kComplex ? 2 : 1;
    float* p;
    __device__ __forceinline__ float2 get(int i) const {
        if constexpr (kComplex) {
            return reinterpret_cast<const float2*>(p)[i];
        } else {
            return make_float2(p[i], 0.f);
        }
    }
    __device__ __forceinline__ void set(int i, float2 x) const {
        if constexpr (kComplex) {
            reinterpret_cast<float2*>(p)[i] = x;
        } else {
            p[i] = x.x;
        }
    }
    // Column j of rows of stride ld (a step's entry: (n·ld) + j).
    __device__ __forceinline__ GateRows column(int j) const { return GateRows{p + kParts * j}; }
};

template <class B, bool kComplex, class Write>
__device__ __forceinline__ void gate_scan(const B& blk, GateRows<kComplex> w, GateRows<kComplex> u, int stride,
                                          float2 start, int cl, bool zero_first, int lane, Write write) {
    const float2 zero = make_float2(0.f, 0.f);
    // Forwards: u^excl of the lane's step in each row.
    float2 uex[kScanRows];
    float2 carry = start;
#pragma unroll
    for (int e = 0; e < kScanRows; ++e) {
        const int n = kScanLanes * e + lane;
        const float2 x = n < blk.n ? u.get(n * stride) : zero;
        float2 incl = x;
#pragma unroll
        for (int lanes = 1; lanes < kScanLanes; lanes <<= 1) {
            const float2 y = shfl_up2(incl, lanes);
            if (lane >= lanes) incl = add2(y, incl);
        }
        const float2 before = shfl_up2(incl, 1);
        uex[e] = lane == 0 ? carry : add2(carry, before);
        carry = add2(carry, shfl_down2(incl, kScanLanes - 1 - lane));  // + the row's total (lane 15's)
    }
    // Backwards: the reset-segmented suffix of w', rows last to first.
    float2 later = zero;  // the rows after this one: sum up to their first reset
    bool later_reset = false;
#pragma unroll
    for (int e = kScanRows - 1; e >= 0; --e) {
        const int n = kScanLanes * e + lane;
        const bool live = n < blk.n;
        const bool reset = live && blk.rst[blk.at(n, cl)] == n;
        float2 sum = live && !reset ? w.get(n * stride) : zero;
        bool seen = reset;
#pragma unroll
        for (int lanes = 1; lanes < kScanLanes; lanes <<= 1) {
            const float2 y = shfl_down2(sum, lanes);
            const bool y_seen = __shfl_down_sync(0xffffffffu, seen ? 1.f : 0.f, lanes) != 0.f;
            if (lane + lanes < kScanLanes) {
                if (!seen) sum = add2(sum, y);
                seen = seen || y_seen;
            }
        }
        if (!seen) sum = add2(sum, later);
        seen = seen || later_reset;
        float2 g = make_float2(sum.x + uex[e].x, -(sum.y + uex[e].y));
        // A reset step's gradient is 0; so is the very first step's without
        // h0 (it multiplies a zero state).
        if (reset || (n == 0 && zero_first)) g = zero;
        if (live) write(n, g);
        // The row's lane 0 holds the suffix from the row's first step on.
        later = shfl_up2(sum, lane);
        later_reset = __shfl_up_sync(0xffffffffu, seen ? 1.f : 0.f, lane) != 0.f;
    }
}

// The block's chunk's [kChunk][kChunk] tile of ws_scores (grad_qk writes
// it, grad_dv reads it).
template <class B, typename T>
__device__ __forceinline__ T* scores_tile(const B& blk, T* ws_scores) {
    return ws_scores + (blk.bh * blk.p.num_chunks + blk.chunk) * kChunk * kChunk;
}
// The chunk's causal scores P, summed over every slab, from `pblocks` into
// its tile of ws_scores: the off-diagonal blocks (offdiag_products'
// add_score_block) and the diagonal ones (add_half_pairs,
// add_diagonal_cross), each element the forward's (intra_pass: the same
// operands, operations and order), so grad_dv reads the P it would have
// formed, bit for bit. Entries above the diagonal are not written (grad_dv
// takes them as 0). After the slab loop's last barrier.
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void grad_qk_scores(const Block<input_t, kComplex, kLd>& blk, const float* pblocks,
                                               float* ws_scores) {
    float* tile = scores_tile(blk, ws_scores);
    for (int i = blk.tid; i < (kPairs + kSubs) * kSub * kSub; i += kThreads) {
        const int b = i / (kSub * kSub), r = i / kSub % kSub, c = i % kSub;
        if (b < kPairs) {
            tile[(kSub * pair_query(b) + r) * kChunk + kSub * pair_key(b) + c] = pblocks[i];
        } else if (c <= r) {
            const int sb = b - kPairs;
            tile[(sb * kSub + r) * kChunk + sb * kSub + c] = pblocks[i];
        }
    }
}

// The diagonal sub-chunks' pairs inside each half of kPiece steps (m < n,
// both in one half; the block between the halves is an anchored one) for
// dq̂ and dk̂, pairwise, a thread per (half, channel d):
//   pq[n] = Σ_{m < n} s_nm |E(n, m)| k_m e^{−iθ_m}   (row n's slot of pq),
//   pk[m] = Σ_{n > m} s_nm |E(n, m)| q_n e^{iθ_n}    (row m's slot of pk),
// each pair's factor s_nm |E(n, m)| formed once for both sums (a thread per
// row formed it in the query row's loop and again in the key row's: twice
// the exps and table reads, and the row's q, k and entries read again for
// every pair). The half's eight rows in registers, the pairs fully
// unrolled; sums from 0 in order of m (pq) and n (pk). Rows past the
// chunk's end (n ≥ blk.n) pair with none: their sums stay 0. Real gates: no
// Im parts. The last kPieces·kSlab threads (four warps; add_half_pairs
// takes the first 160); call between barriers, the slots idle.
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void add_half_pair_sums(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                                   const float* kraw, const float* ds, GateRows<kComplex> pk,
                                                   GateRows<kComplex> pq) {
    static_assert(kPieces * kSlab <= kThreads, "a thread per half and channel");
    const int item = blk.tid - (kThreads - kPieces * kSlab);
    if (item < 0) return;
    const int d = item % kSlab;
    const int h0 = item / kSlab * kPiece;
    const int cl = blk.col(d);
    // Row h0 + r's q e^{iθ}, k e^{−iθ} and gate entries.
    float2 qt[kPiece], kt[kPiece], sq[kPiece], sk[kPiece];
    float re[kPiece], lo[kPiece];
    int32_t rs[kPiece];
#pragma unroll
    for (int r = 0; r < kPiece; ++r) {
        const int n = h0 + r;
        const float q = qraw[blk.at(n, d)], k = kraw[blk.at(n, d)];
        const auto e = blk.late_entry(n, cl);
        if constexpr (kComplex) {
            qt[r] = make_float2(q * e.cs, q * e.sn);
            kt[r] = make_float2(k * e.cs, -(k * e.sn));
        } else {
            qt[r] = make_float2(q, 0.f);
            kt[r] = make_float2(k, 0.f);
        }
        re[r] = e.re;
        lo[r] = e.lo;
        rs[r] = e.reset;
        sq[r] = make_float2(0.f, 0.f);
        sk[r] = make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int r = 1; r < kPiece; ++r) {
        const int n = h0 + r;
        if (n < blk.n) {
#pragma unroll
            for (int m = 0; m < r; ++m) {
                const float x = ds[n * kChunk + h0 + m] *
                                Block<input_t, kComplex, kLd>::modulus_between(re[r], lo[r], rs[r], h0 + m, re[m], lo[m]);
                sq[r].x = fmaf(x, kt[m].x, sq[r].x);
                sk[m].x = fmaf(x, qt[r].x, sk[m].x);
                if constexpr (kComplex) {
                    sq[r].y = fmaf(x, kt[m].y, sq[r].y);
                    sk[m].y = fmaf(x, qt[r].y, sk[m].y);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < kPiece; ++r) {
        pq.set((h0 + r) * kLdGate + d, sq[r]);
        pk.set((h0 + r) * kLdGate + d, sk[r]);
    }
}

template <typename input_t, bool kComplex>
__device__ __forceinline__ void grad_qk(const GateloopChunkGradParams& g) {
    using Tr = InputTraits<input_t>;
    using Op = typename OpOf<input_t>::type;
    constexpr int kRawTerms = OpOf<input_t>::kRawTerms;  // dY, V are raw inputs
    // dY, V in the inter-chunk products against S_in, D (split, kGradTerms).
    constexpr int kTileTerms = raw_tile_terms<input_t, kGradTerms>();
    // Real gates: no Im parts (θ ≡ 0: cos_at 1, sin_at 0, the Im halves of the
    // products never formed and read as 0), log_gate, dlog_gate and the
    // states real f32.
    constexpr int kParts = kComplex ? 2 : 1;
    constexpr int kLdProduct = ld_product<kComplex>();
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(g.qk_shared_bytes, qk_smem_bytes<Op, kComplex, kRawTerms>());
    if (g.ws_scores == nullptr) __trap();  // the launcher always sets it: a bug
    const GateloopChunkParams& p = g.fwd;
    Block<input_t, kComplex, kPrefixLd> blk(p, smem, 1);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    float* f = reinterpret_cast<float*>(smem + prefix_bytes<kComplex, kPrefixLd>());
    float* qraw = f;
    f += kChunk * kPrefixLd;
    float* kraw = f;
    f += kChunk * kPrefixLd;
    float* ds = f;  // [kChunk][kChunk]: s_nm = dy_n · v_m
    f += kChunk * kChunk;
    // The s phase | per slab the off-diagonal phase, then the inter-chunk phase.
    unsigned char* union_at = reinterpret_cast<unsigned char*>(f);
    f = reinterpret_cast<float*>(union_at + qk_union_bytes<Op, kComplex, kRawTerms>());
    // P for grad_dv (kQkScoresBytes): [kPairs][16][16] off-diagonal blocks
    // (wmma accumulators: 32-byte aligned, as every region up to here),
    // then [kSubs][16][16] diagonal blocks.
    float* pblocks = f;
    float* pdiag = f + kPairs * kSub * kSub;
    f += kQkScoresBytes / 4;
    const GateRows<kComplex> wpr{f};  // [kChunk][kLdGate]: w'_n of channel d
    f += kParts * kChunk * kLdGate;
    const GateRows<kComplex> upr{f};  // [kChunk][kLdGate]: u_n of channel d
    f += kParts * kChunk * kLdGate;
    const GateRows<kComplex> head_w{f};  // [kChunk]: per-head sums over the channels
    f += kParts * kChunk;
    const GateRows<kComplex> head_u{f};  // [kChunk]
    f += kParts * kChunk;
    float2* through = reinterpret_cast<float2*>(f);  // [kSlab]: Σ_j S_in conj(D) per channel
    f += 2 * kSlab;
    float2* head_through = reinterpret_cast<float2*>(f);  // [1]

    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int tid = blk.tid;
    const bool zero_first = blk.first_chunk() && (p.flags & GATELOOP_FLAG_HAS_H0) == 0;
    const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h);

    // s = dY Vᵀ on tensor cores, over every value tile in order: warp w owns
    // the 16 × 16 tiles (w / 2, 2·(w % 2) + t) of s, t < 2. dY and V are
    // staged as split operands from the union's first byte, f16 and f32
    // inputs' past its end into the tail (the slab phase's buffers are idle
    // until the first slab's tables; build_prefix's barriers keep them until
    // every warp is done; the tail is first written below, after the loop's
    // last barrier) and the accumulators stored straight into ds.
    {
        unsigned char* at = union_at;
        const Split<Op> dys = carve_terms<Op, kRawTerms>(at, kChunk, ld_tile<Op>());
        // V [m][c] row-major, read as the column-major B = Vᵀ.
        const Split<Op> vs = carve_terms<Op, kRawTerms>(at, kChunk, ld_tile<Op>());
        const int sr = blk.warp >> 1;
        const int sc = (blk.warp & 1) * 2;
        Acc<Op> sacc[2];
        wmma::fill_fragment(sacc[0], 0.f);
        wmma::fill_fragment(sacc[1], 0.f);
        for (int64_t v0 = 0; v0 < value_dim; v0 += kVTile) {
            blk.template load_tile<Op, kRawTerms>(dy, g.dy_strides, v0, dys);
            blk.template load_tile<Op, kRawTerms>(blk.v, p.v_strides, v0, vs);
            __syncthreads();
            // Two inner steps at a time: fully unrolled, the f16 kernel's
            // three split products held more fragments than 128 registers.
#pragma unroll 2
            for (int kk = 0; kk < kVTile; kk += Op::kK) {
                mma_split_steps<Op, kRawTerms, kRawTerms, wmma::row_major, wmma::col_major, 2>(
                    [&](int t) -> Acc<Op>& { return sacc[t]; }, dys.hi_at(16 * sr, kk), dys.lo_at(16 * sr, kk), dys.ld,
                    [&](int t) { return vs.hi_at(16 * (sc + t), kk); }, [&](int t) { return vs.lo_at(16 * (sc + t), kk); },
                    vs.ld);
            }
            __syncthreads();  // the next tile overwrites dY, V
        }
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            store_accumulator(ds + 16 * sr * kChunk + 16 * (sc + t), sacc[t], kChunk);
        }
    }
    // The s phase's tiles are dead (its loop ended on a barrier): the tail.
    for (int i = tid; i < kChunk; i += kThreads) {
        head_w.set(i, make_float2(0.f, 0.f));
        head_u.set(i, make_float2(0.f, 0.f));
    }
    // The chunk's scores P for grad_dv (grad_qk_scores), summed over the slabs.
    for (int i = tid; i < (kPairs + kSubs) * kSub * kSub; i += kThreads) pblocks[i] = 0.f;
    if (tid == 0) head_through[0] = make_float2(0.f, 0.f);
    // (ds and the head sums are read after the first slab's barriers.)

    // Thread tid's channel d and local row nb (rows nb + 16 i) in the padded
    // tables' order: a warp's half-warps on local rows four apart (80 words,
    // the other 16 banks), so that their reads of a row's q, k and table
    // entries take one wavefront where rows side by side (20 words apart)
    // met on four banks; warps 0–3 still hold the first halves' rows.
    const AnchoredSlot<kPrefixLd> row_slot(tid);
    const int d = row_slot.col;
    const int nb = row_slot.row0;
    input_t* __restrict__ dq_out = seq_row_mut<input_t>(g.dq, g.dq_strides, blk.b, blk.h);
    input_t* __restrict__ dk_out = seq_row_mut<input_t>(g.dk, g.dk_strides, blk.b, blk.h);
    float* dgate = g.dlog_gate + kParts * (blk.b * g.dgate_strides.batch + blk.h * g.dgate_strides.head);
    const float* dec = p.ws_decay + (blk.bh * p.num_chunks + blk.chunk) * p.dims.gate_dim * kParts;
    // The chunk's decay A_c of gate column ch. Plain loads: through the
    // read-only path (load_gate_side's __ldg) sm_80's ptxas spilled 4 bytes in
    // the 16-bit complex kernel.
    const auto decay = [&](int64_t ch) { return make_float2(dec[ch * kParts], kComplex ? dec[ch * kParts + 1] : 0.f); };

    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        // Ends with a barrier. Key quads (Block::key_quads) but for f16
        // inputs with complex gates (4 to 16 bytes spilled at 128 registers).
        blk.template stage_slab<true, true, true, !(kComplex && std::is_same<input_t, __half>::value)>(d0, qraw,
                                                                                                      kraw);
        offdiag_products<Op>(blk, ds, qraw, kraw, union_at, pblocks);
        // P's diagonal blocks as intra_pass forms them: the pairs inside the
        // halves, then the block between them from the cross rows
        // offdiag_products put (read here, before the inter-chunk phase takes
        // their bytes; complex: rolled, as at 128 registers it spilled).
        // The pairs two key rows a thread, but one in the complex bf16
        // kernel on sm_80, which spilled 4 bytes at 128 with two.
        constexpr int kPairKeys =
            kComplex && std::is_same<input_t, __nv_bfloat16>::value && GATELOOP_BY_ARCH(true, false) ? 1 : 2;
        add_half_pairs<kPairKeys>(blk, qraw, kraw, d0, pdiag);
        const float* const cross_rows = reinterpret_cast<const float*>(union_at + offdiag_out_bytes<kComplex>());
        add_diagonal_cross<kComplex, kComplex>(tid, cross_rows, pdiag);
        const float* xo = reinterpret_cast<const float*>(union_at);  // X per pair [pair][16][Re | Im]
        const float* yo = xo + kPairs * kSub * kLdProduct;           // Y per key sub-chunk [j][16][Re | −Im]
        // The pairs inside each half (add_half_pair_sums, the last four
        // warps) into upr and wpr, for the rows' loop below.
        add_half_pair_sums(blk, qraw, kraw, ds, upr, wpr);
        __syncthreads();
        const int cl = blk.col(d);
        // Row n = nb + 16 i (sub-chunk i, local row nb) of the pre-phase
        // accumulators acc_q[n] = Σ_{m < n} s_nm |E(n, m)| k_m e^{−iθ_m},
        // acc_k[n] = Σ_{m > n} s_mn |E(m, n)| q_m e^{iθ_m}
        // (cpu::chunked_grad: anchored_block, diagonal_blocks):
        //   off the diagonal, from the products: acc_q[n] += |E(n, r_j)| X_ij[n]
        //   for j < i; acc_k[n] += |E(r_i, n)| conj(Y_i[n]);
        //   sub-chunk i in the forward's halves of kPiece steps
        //   (add_diagonal_pairs): the 8 × 8 block between the halves from
        //   the cross rows (put_cross_rows, anchor a = the first half's last
        //   step) as one more anchored block: a second-half row takes
        //   X = Σ_m s_nm k̃_m over the first half's steps and |E(n, a)|, a
        //   first-half row Y = Σ_m s_mn [Re q̃_m | −Im q̃_m] over the second
        //   half's and |E(a, n)| (warps 0–3 hold first-half rows, 4–7
        //   second-half ones: no divergence);
        //   inside the row's half, pairwise: the sums add_half_pair_sums
        //   left in the row's slots of wpr (acc_q) and upr (acc_k).
        // Their part of the gate term w'_n = q_n dq̂_n − k_n dk̂_n is formed
        // after the inter-chunk phase from the finished sums (w'_n is q_n
        // e^{iθ_n} times acc_q's whole sum less k_n e^{−iθ_n} times acc_k's:
        // no gate accumulators beside them). acc_k waits out that phase in
        // this thread's own slot of upr (free until the slab's end, which
        // overwrites it): registers fewer live across that phase's staging
        // and tensor-core products, part of what keeps the kernel within 128
        // without spilling (two blocks per SM).
        const bool second = nb >= kPiece;
        const float* const cross = cross_rows + (second ? kCrossRows * cross_ld<kComplex>() : 0);
        float2 aq[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = nb + kSub * i;
            float2 oq = make_float2(0.f, 0.f), ok = make_float2(0.f, 0.f);
            // An anchored block's product (X = s k̃ read (xr, xi), or
            // Y = sᵀ [Re q̃ | −Im q̃] read (yr, yi)) and the factor w it left
            // out. Real gates: no Im parts.
            const auto add_q = [&](float w, float xr, float xi) {
                oq.x = fmaf(w, xr, oq.x);
                if constexpr (kComplex) oq.y = fmaf(w, xi, oq.y);
            };
            const auto add_k = [&](float w, float yr, float yi) {
                ok.x = fmaf(w, yr, ok.x);
                if constexpr (kComplex) ok.y = fmaf(-w, yi, ok.y);
            };
            for (int j = 0; j < i; ++j) {
                const float* x = xo + (pair_of(i, j) * kSub + nb) * kLdProduct;
                add_q(blk.modulus_within(n, kSub * j + kSub - 1, cl), x[d], kComplex ? x[kSlab + d] : 0.f);
            }
            if (i < kSubs - 1) {
                const float* y = yo + (i * kSub + nb) * kLdProduct;
                add_k(blk.modulus_within(kSub * i + kSub - 1, n, cl), y[d], kComplex ? y[kSlab + d] : 0.f);
            }
            {
                // Σ over the other half's steps m (cross rows kPiece·i + c) of
                // s[n][m] (second half: s_at = row n of s, step 1) or s[m][n]
                // (column n, step kChunk) times the row's entry.
                const auto cross_sum = [&](const float* s_at, int step) {
                    float xr = 0.f, xi = 0.f;
#pragma unroll
                    for (int c = 0; c < kPiece; ++c) {
                        const float smn = s_at[c * step];
                        const int row = kPiece * i + c;
                        xr = fmaf(smn, cross[cross_at<kComplex>(row, d >> 2) + (d & 3)], xr);
                        if (kComplex) xi = fmaf(smn, cross[cross_at<kComplex>(row, (kSlab + d) >> 2) + (d & 3)], xi);
                    }
                    return make_float2(xr, xi);
                };
                const int anchor = cross_anchor(i);
                if (second) {
                    const float2 x = cross_sum(ds + n * kChunk + kSub * i, 1);
                    add_q(blk.modulus_within(n, anchor, cl), x.x, x.y);
                } else {
                    const float2 y = cross_sum(ds + (kSub * i + kPiece) * kChunk + n, kChunk);
                    add_k(blk.modulus_within(anchor, n, cl), y.x, y.y);
                }
            }
            // The pairs inside the row's half last.
            const float2 pq = wpr.get(n * kLdGate + d), pk = upr.get(n * kLdGate + d);
            aq[i] = make_float2(oq.x + pq.x, oq.y + pq.y);
            upr.set(n * kLdGate + d, make_float2(ok.x + pk.x, ok.y + pk.y));
        }
        // Through the state on tensor cores: X = dY S_inᵀ (row n: x_n = S_in dy_n)
        // and Y = V Dᵀ (y_n = D v_n), 64 × [Re | Im] of the slab's channels,
        // inner dimension every value column in steps of kCols (the
        // warps' tiles: below). Σ_j S_in conj(D) per channel in
        // f32 from the workspace values staged for those products: warp w
        // sums channels w and w + 8 over the value columns (one per lane,
        // then shuffles in a fixed order: deterministic).
        float2 xs[4], ys[4];
        {
            constexpr int kCols = inter_cols<kComplex, kRawTerms>();
            constexpr int kLdInter = ld_inter<Op, kCols>();
            unsigned char* at = union_at;
            const Split<Op> dyh = carve_terms<Op, kTileTerms>(at, kChunk, kLdInter);
            const Split<Op> vh = carve_terms<Op, kTileTerms>(at, kChunk, kLdInter);
            // S_in, D rows [j][c] row-major, read as the column-major B = S_inᵀ, Dᵀ.
            const Split<Op> sh = carve<Op>(at, slab_width<kComplex>(), kLdInter);
            const Split<Op> dh = carve<Op>(at, slab_width<kComplex>(), kLdInter);
            // Complex: warp w ↔ tile (w / 2, w % 2) — the Re (0) or Im (1)
            // columns — of both X and Y. Real gates have no Im tiles, so
            // their 8 tiles go one to a warp: warps 0–3 X (rows 16·w), warps
            // 4–7 Y (rows 16·(w − 4)), one accumulator each.
            const int xr = kComplex ? blk.warp >> 1 : blk.warp & 3;
            const int xc = kComplex ? blk.warp & 1 : 0;
            const bool real_y = !kComplex && blk.warp >= 4;  // this warp forms Y (real gates)
            Acc<Op> xacc, yacc;
            wmma::fill_fragment(xacc, 0.f);
            if (kComplex) wmma::fill_fragment(yacc, 0.f);
            // Σ_c S_in conj(D) of the slot's channels (rows row0 + kStep·i of
            // the slab) at its column (and that + 32·h: a 64-column step's
            // halves h), summed over the columns by the warp after the loop
            // (the warp's lanes are the columns; a thread's columns in
            // order, as in steps of 32).
            const TileSlot<kInterLanes> slot(tid);
            constexpr int kStep = TileSlot<kInterLanes>::kStep;
            constexpr int kChannels = StateRows<kInterLanes>::kPerPart;  // a thread's channels
            constexpr int kHalves = kCols / kInterLanes;
            static_assert(kInterLanes == 32 && kStep * kChannels == kSlab, "a warp's lanes are the columns of a slab's channels");
            float2 thr[kChannels];
#pragma unroll
            for (int i = 0; i < kChannels; ++i) thr[i] = make_float2(0.f, 0.f);
            // Whether dY and V rows are 16-byte aligned: at column 0 so at
            // every step's v0 (kCols 16-bit elements, a multiple of 16 bytes).
            bool vector = false;
            if constexpr (stored_as_loaded<input_t, Op, kTileTerms>()) {
                static_assert(kCols * sizeof(input_t) % 16 == 0, "a step keeps a row's 16-byte alignment");
                vector = blk.vector_rows(dy, g.dy_strides, 0, value_dim) && blk.vector_rows(blk.v, p.v_strides, 0, value_dim);
            }
            for (int64_t v0 = 0; v0 < value_dim; v0 += kCols) {
                __syncthreads();  // the previous step's operands are consumed
                // (dy, v) and (S_in, D) pairs, staged (stage_tile): loads in
                // flight together, addresses stepped from the thread's first.
                const auto stage_each = [&] {
                    const TileSlot<kCols> tile(tid);
                    constexpr int kTileStep = TileSlot<kCols>::kStep;
                    const bool col_in = v0 + tile.col < value_dim;
                    const int64_t dy_first = opaque((blk.t0 + tile.row0) * g.dy_strides.time + v0 + tile.col);
                    const int64_t v_first = opaque((blk.t0 + tile.row0) * p.v_strides.time + v0 + tile.col);
                    const int64_t dy_step = opaque(kTileStep * g.dy_strides.time);
                    const int64_t v_step = opaque(kTileStep * p.v_strides.time);
                    stage_tile<kChunk, kCols>(
                        tile,
                        [&](int u, int n, int) {
                            if (!col_in || n >= blk.n) return make_float2(0.f, 0.f);
                            return make_float2(Tr::load(dy, dy_first + u * dy_step),
                                               Tr::load(blk.v, v_first + u * v_step));
                        },
                        [&](int n, int c, float2 x) {
                            dyh.template put<kTileTerms>(n, c, x.x);
                            vh.template put<kTileTerms>(n, c, x.y);
                        });
                };
                // S_in and D of channel row0 + kStep·u at the slot's column
                // + 32·h, both parts (Re, Im) of each in one item: (Re S,
                // Im S, Re D, Im D), tile rows (Re) u·kStep + row0 and kSlab
                // + that (Im), column slot.col + 32·h.
                // Their loads issued first and held (kStatesFirst), in
                // flight with the tiles' (one round trip a step for 16-byte
                // tiles, two for the elementwise ones, where the tiles'
                // stores had waited for theirs before S_in and D were
                // loaded: two and three); not in the complex f16 kernel on
                // sm_80 (4 bytes spilled at its 128). A 64-column step
                // (kAsync) issues its 16-byte tiles first, by cp.async: no
                // register holds them (its two groups a tensor a thread,
                // loaded into registers, took ptxas to 128 registers and
                // longer code in the rest of the slab loop), no store waits
                // for them, so S_in and D load after them in the same round
                // trip (before them, held across the elementwise staging
                // of unaligned rows, they spilled 20 bytes); a 32-column
                // step's one group a tensor stays a load into registers
                // (cp.async's wait and addresses were ~10 instructions more
                // a step in the complex bf16 kernel).
                constexpr bool kAsync = stored_as_loaded<input_t, Op, kTileTerms>() && kHalves == 2;
                constexpr bool kStatesFirst = !kAsync && (!(kComplex && std::is_same<input_t, __half>::value) ||
                                                          GATELOOP_BY_ARCH(false, true));
                const StateRows<kInterLanes> rows(blk, slot, d0, v0);
                constexpr int kStateItems = kSlab / kStep;
                float4 sd[kHalves][kStateItems];
                const auto fetch_states = [&] {
#pragma unroll
                    for (int h = 0; h < kHalves; ++h) {
                        const bool col_in = h == 0 || v0 + kInterLanes * h + slot.col < value_dim;
#pragma unroll
                        for (int u = 0; u < kStateItems; ++u) {
                            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
                            if (col_in && rows.live(u)) {
                                const int64_t re = rows.at(0, u) + kInterLanes * h;
                                if (kComplex) {
                                    const int64_t im = rows.at(1, u) + kInterLanes * h;
                                    x = make_float4(p.ws_state[re], p.ws_state[im], g.ws_adj[re], g.ws_adj[im]);
                                } else {
                                    x = make_float4(p.ws_state[re], 0.f, g.ws_adj[re], 0.f);
                                }
                            }
                            sd[h][u] = x;
                        }
                    }
                };
                // bf16: both tiles as they came, 16 bytes a load, where
                // their rows are aligned (Block::issue_groups_async, waited
                // for before the barrier below; Block::load_groups).
                if constexpr (kAsync) {
                    if (vector) {
                        blk.template issue_own_groups_async<kCols>(dy, g.dy_strides, v0, value_dim, dyh);
                        blk.template issue_own_groups_async<kCols>(blk.v, p.v_strides, v0, value_dim, vh);
                    }
                }
                if constexpr (kStatesFirst) fetch_states();
                if constexpr (stored_as_loaded<input_t, Op, kTileTerms>() && !kAsync) {
                    if (vector) {
                        blk.template load_groups<kCols, 0>(dy, g.dy_strides, v0, value_dim,
                                                           [&](int t, int c, uint4 w) { dyh.put_group(t, c, w); });
                        blk.template load_groups<kCols, 0>(blk.v, p.v_strides, v0, value_dim,
                                                           [&](int t, int c, uint4 w) { vh.put_group(t, c, w); });
                    }
                }
                if (!vector) stage_each();
                if constexpr (!kStatesFirst) fetch_states();
#pragma unroll
                for (int h = 0; h < kHalves; ++h) {
#pragma unroll
                    for (int u = 0; u < kStateItems; ++u) {
                        const float4 x = sd[h][u];
                        // Real gates: x.y = x.w = 0, and thr is never −0 (it
                        // starts at +0; a rounded sum is −0 only when both
                        // addends are), so the fmaf of those zeros, which
                        // nvcc keeps, goes with the same values; Im stays 0.
                        if constexpr (kComplex) {
                            thr[u] = make_float2(fmaf(x.x, x.z, fmaf(x.y, x.w, thr[u].x)),
                                                 fmaf(x.y, x.z, fmaf(-x.x, x.w, thr[u].y)));
                        } else {
                            thr[u].x = fmaf(x.x, x.z, thr[u].x);
                        }
                        const int r = slot.row0 + u * kStep, c = slot.col + kInterLanes * h;
                        sh.template put<kGradTerms>(r, c, x.x);
                        dh.template put<kGradTerms>(r, c, x.z);
                        if (kComplex) {
                            sh.template put<kGradTerms>(kSlab + r, c, x.y);
                            dh.template put<kGradTerms>(kSlab + r, c, x.w);
                        }
                    }
                }
                if (kAsync && vector) cp_async_wait_all();  // this thread's tile copies, before the barrier
                __syncthreads();
                if (kComplex) {
                    for (int kk = 0; kk < kCols; kk += Op::kK) {
                        mma_split_step<Op, kTileTerms, kGradTerms, wmma::row_major, wmma::col_major>(
                            xacc, dyh.hi_at(16 * xr, kk), dyh.lo_at(16 * xr, kk), dyh.ld, sh.hi_at(16 * xc, kk),
                            sh.lo_at(16 * xc, kk), sh.ld);
                        mma_split_step<Op, kTileTerms, kGradTerms, wmma::row_major, wmma::col_major>(
                            yacc, vh.hi_at(16 * xr, kk), vh.lo_at(16 * xr, kk), vh.ld, dh.hi_at(16 * xc, kk),
                            dh.lo_at(16 * xc, kk), dh.ld);
                    }
                } else {
                    // X = dY S_inᵀ or Y = V Dᵀ: the same product of other
                    // operands, V and D one split operand past dY and S_in
                    // (carved just above in that order, each pair with one
                    // shape, so carve's own step is the distance of both
                    // planes): an offset, not a second set of pointers (at
                    // 128 registers, those spilled).
                    using S = typename Op::storage;
                    constexpr int kPastDy = terms_bytes<Op, kTileTerms>(kChunk, kLdInter) / static_cast<int>(sizeof(S));
                    constexpr int kPastS = split_bytes<Op>(slab_width<kComplex>(), kLdInter) / static_cast<int>(sizeof(S));
                    const int a_shift = real_y ? kPastDy : 0;
                    const int b_shift = real_y ? kPastS : 0;
#pragma unroll 1
                    for (int kk = 0; kk < kCols; kk += Op::kK) {
                        mma_split_step<Op, kTileTerms, kGradTerms, wmma::row_major, wmma::col_major>(
                            xacc, dyh.hi_at(16 * xr, kk) + a_shift, dyh.lo_at(16 * xr, kk) + a_shift, dyh.ld,
                            sh.hi_at(0, kk) + b_shift, sh.lo_at(0, kk) + b_shift, sh.ld);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < kChannels; ++i) {
#pragma unroll
                for (int lanes = 16; lanes > 0; lanes >>= 1) {
                    thr[i] = add2(thr[i], shfl_down2<kComplex>(thr[i], lanes));
                }
                if (slot.col == 0) through[slot.row0 + kStep * i] = thr[i];  // 0 past K
            }
            __syncthreads();  // every warp is done with the operands: X, Y take their bytes
            float* xy = reinterpret_cast<float*>(union_at);  // X then Y, [kChunk][kLdProduct] each
            float* const y_at = xy + kChunk * kLdProduct;
            if (kComplex) {
                store_accumulator(xy + 16 * xr * kLdProduct + 16 * xc, xacc, kLdProduct);
                store_accumulator(y_at + 16 * xr * kLdProduct + 16 * xc, yacc, kLdProduct);
            } else {
                store_accumulator((real_y ? y_at : xy) + 16 * xr * kLdProduct, xacc, kLdProduct);
            }
            __syncthreads();
            const auto im_of = [&](const float* row) { return kComplex ? row[kSlab + d] : 0.f; };
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int n = nb + 16 * i;
                xs[i] = make_float2(xy[n * kLdProduct + d], im_of(xy + n * kLdProduct));
                ys[i] = make_float2(xy[(kChunk + n) * kLdProduct + d], im_of(xy + (kChunk + n) * kLdProduct));
            }
        }
        const int last = blk.n - 1;
        const float cl_last = blk.cos_at(last, cl), sl_last = blk.sin_at(last, cl);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = nb + 16 * i;
            // acc_q += |E(n, −1)| (S_in dy_n); acc_d = |E(last, n)| e^{iθ_last} conj(D v_n).
            const float wi = blk.modulus(n, -1, cl);
            const float wl = n < blk.n ? blk.modulus_within(last, n, cl) : 0.f;
            const float qn = qraw[blk.at(n, d)], kn = kraw[blk.at(n, d)];
            const float2 ak = upr.get(n * kLdGate + d);
            // dq = Re dq̂, dk = Re (dk̂ + dk̂ᴰ), before the self pair's terms;
            // w'_n = q_n dq̂ − k_n dk̂ (the self pair left out: it cancels
            // exactly), u_n = k_n dk̂ᴰ.
            float dq, dk;
            if constexpr (kComplex) {
                const float2 aqi = make_float2(fmaf(wi, xs[i].x, aq[i].x), fmaf(wi, xs[i].y, aq[i].y));
                const float2 yd = make_float2(fmaf(cl_last, ys[i].x, sl_last * ys[i].y),
                                              fmaf(sl_last, ys[i].x, -(cl_last * ys[i].y)));
                // dq̂ = e^{iθ} acc_q, dk̂ = e^{−iθ} acc_k, dk̂ᴰ = e^{−iθ} acc_d
                // with acc_d = |E(last, n)| e^{iθ_last} conj(D v_n), its
                // modulus applied last.
                const float cn = blk.cos_at(n, cl), sn = blk.sin_at(n, cl);
                const float2 dqh = make_float2(fmaf(cn, aqi.x, -(sn * aqi.y)), fmaf(sn, aqi.x, cn * aqi.y));
                const float2 dkh = make_float2(fmaf(cn, ak.x, sn * ak.y), fmaf(cn, ak.y, -(sn * ak.x)));
                const float2 dkd = make_float2(fmaf(cn, yd.x, sn * yd.y), fmaf(cn, yd.y, -(sn * yd.x)));
                dq = dqh.x;
                dk = dkh.x + wl * dkd.x;
                wpr.set(n * kLdGate + d,
                        make_float2(fmaf(qn, dqh.x, -(kn * dkh.x)), fmaf(qn, dqh.y, -(kn * dkh.y))));
                upr.set(n * kLdGate + d, make_float2(wl * (kn * dkd.x), wl * (kn * dkd.y)));
            } else {
                // Real gates (θ ≡ 0): the same values from the real parts
                // alone (nvcc folds neither the products by the tables'
                // constant 0 nor the fmaf by their 1).
                dq = fmaf(wi, xs[i].x, aq[i].x);
                dk = ak.x + wl * ys[i].x;
                wpr.set(n * kLdGate + d, make_float2(fmaf(qn, dq, -(kn * ak.x)), 0.f));
                upr.set(n * kLdGate + d, make_float2(wl * (kn * ys[i].x), 0.f));
            }
            const float s_nn = ds[n * kChunk + n];
            const int64_t ch = d0 + d;
            if (n < blk.n && ch < key_dim) {
                Tr::store(dq_out, (blk.t0 + n) * g.dq_strides.time + ch, fmaf(kn, s_nn, dq));
                Tr::store(dk_out, (blk.t0 + n) * g.dk_strides.time + ch, fmaf(qn, s_nn, dk));
            }
        }
        __syncthreads();
        if (!blk.per_head) {
            // A half-warp per channel (gate_scan; every thread calls it).
            const int j = tid / kScanLanes;
            const bool live = d0 + j < key_dim;
            const float2 a = live ? decay(d0 + j) : make_float2(0.f, 0.f);
            gate_scan(blk, wpr.column(j), upr.column(j), kLdGate, cmul(a, through[j]), j, zero_first, tid % kScanLanes,
                      [&](int n, float2 x) {
                          if (live) store_gate_side<kComplex>(dgate, (blk.t0 + n) * g.dgate_strides.time + d0 + j, x);
                      });
        } else {
            // Per-head gate: the channels' terms summed in a fixed order
            // (slab by slab, channel by channel).
            if (tid < kChunk) {
                float2 sw = head_w.get(tid), su = head_u.get(tid);
                for (int j = 0; j < kSlab; ++j) {
                    sw = add2(sw, wpr.get(tid * kLdGate + j));
                    su = add2(su, upr.get(tid * kLdGate + j));
                }
                head_w.set(tid, sw);
                head_u.set(tid, su);
            } else if (tid == kChunk) {
                float2 t = head_through[0];
                for (int j = 0; j < kSlab; ++j) t = add2(t, through[j]);
                head_through[0] = t;
            }
        }
        __syncthreads();  // wpr, upr, through, the tables are rewritten by the next slab
    }
    grad_qk_scores(blk, pblocks, g.ws_scores);
    if (blk.per_head) {
        // One column: every thread scans it (gate_scan), the first half-warp writes.
        gate_scan(blk, head_w, head_u, 1, cmul(decay(0), head_through[0]), 0, zero_first,
                  tid % kScanLanes,
                  [&](int n, float2 x) {
                      if (tid < kScanLanes) store_gate_side<kComplex>(dgate, (blk.t0 + n) * g.dgate_strides.time, x);
                  });
    }
}

// ---- 3b. dv -----------------------------------------------------------------------

// The forward output kernel's pass with kAdjoint (chunk_common.cuh:
// intra_pass): the scores P as grad_qk formed them (exactly as the forward
// forms them) read from ws_scores, dv = [Re K̃ | Im K̃] [Re D; Im D] per slab
// and Pᵀ dY after the last, on tensor cores. The output kernel's shared
// layout less what forming P takes (adjoint_smem_bytes: no raw q, anchored
// rows or diagonal blocks), and its kCols: kWideCols for the wide launch
// (gateloop_chunk_grad_dv_wide_*, V > 64), one block per 128 columns of dv.
template <typename input_t, bool kComplex, int kCols = kVTile>
__device__ __forceinline__ void grad_dv(const GateloopChunkGradParams& g) {
    using Op = typename OpOf<input_t>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(g.dv_shared_bytes, adjoint_smem_bytes<Op, kComplex, OpOf<input_t>::kRawTerms, kCols>());
    auto blk = Block<input_t, kComplex, kPrefixLd>::of_tiles(g.fwd, smem, kCols);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h);
    input_t* __restrict__ dv = seq_row_mut<input_t>(g.dv, g.dv_strides, blk.b, blk.h);
    // P as grad_qk wrote it (grad_qk_scores, earlier on the stream).
    if (g.ws_scores == nullptr) __trap();  // the launcher always sets it: a bug
    const float* scores = scores_tile(blk, static_cast<const float*>(g.ws_scores));
    intra_pass<Op, kGradTerms, true, kCols>(blk, smem, g.ws_adj, dy, g.dy_strides, dv, g.dv_strides, scores);
}

}  // namespace chunk
}  // namespace gateloop

// ---- entry points -----------------------------------------------------------------
//
// gateloop_chunk_grad_{w,w_seq,qk,dv}_{dtype}_{c,r}: dtype of q, k, v, dy,
// dq, dk, dv; c = complex gates, r = real gates (gated linear attention:
// log_gate, h0, dh_final, dlog_gate, dh0 real f32, the imaginary part
// compiled out as in the forward's r kernels). gateloop_chunk_grad_adjoint_carry_{c,r}
// and gateloop_chunk_grad_dh0_{dtype}_{c,r} (below).
//
// W_MIN, SEQ_MIN, QK_MIN, DV_MIN: the blocks per SM grad_w, grad_w_seq,
// grad_qk and grad_dv are compiled for, by the forward's rule (cuda/chunk.cu):
// for 16-bit inputs the most blocks their shared memory lets an SM hold where
// ptxas compiles them spill-free under that register cap, else the next
// count below. grad_w and grad_w_seq have the layouts of the forward's state
// kernel and walk (complex 60 and 64 KB, real 48 and 68 KB, bf16 9 KB less
// each: its dY tile one plane; the real walk's blocks take 32 channels,
// walk_slab): on sm_90 grad_w 3 (bf16 4 complex, 5 real: 56 and 44
// registers), grad_w_seq 3 (f16 real 2: 8 bytes spilled at 3; bf16 complex
// 4); on sm_80 grad_w 2 (f16 real: 3 and 4 spill; bf16 3 complex, 4 real),
// grad_w_seq 1 f16 complex (two resident all the same), 2 bf16 complex and
// real. grad_qk 2 (111 KB complex, 85 KB real f16, 87 KB real bf16 with
// its 64-column inter-chunk steps, the scores' blocks included: two an
// H200 SM, one an A100's; so real bf16 1 on sm_80, where it spilled 8 bytes
// at 128 registers) and grad_dv 2 on
// sm_80, 3 on sm_90 (adjoint_smem_bytes: 74 KB complex, 64 KB real; 76 to
// 80 registers at 3; bf16 real 4, its 55 KB with dY one plane, 63 and 64
// registers): with one block per
// SM (8 warps) every barrier of the block idled the SM — the gate prefix,
// the staging, the per-channel gate scans.
// f32: grad_w 2, grad_w_seq 1, grad_qk 1 (135 KB; real 109 KB, two on
// sm_90 at 128 registers: its w', u rows of floats, GateRows), grad_dv 1
// on sm_80 and 2 on sm_90 (106 KB complex, 96 KB real: twice on sm_90;
// 112 registers complex, 96 real).

#define GATELOOP_CHUNK_GRAD_ENTRIES(DTYPE, TYPE, GATE, CPLX, W_MIN, SEQ_MIN, QK_MIN, DV_MIN)              \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, W_MIN)                           \
        gateloop_chunk_grad_w_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                           \
        gateloop::chunk::grad_w<TYPE, CPLX>(g);                                                             \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, SEQ_MIN)                         \
        gateloop_chunk_grad_w_seq_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                       \
        gateloop::chunk::grad_w_seq<TYPE, CPLX>(g);                                                         \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, QK_MIN)                          \
        gateloop_chunk_grad_qk_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                          \
        gateloop::chunk::grad_qk<TYPE, CPLX>(g);                                                            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, DV_MIN)                          \
        gateloop_chunk_grad_dv_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                          \
        gateloop::chunk::grad_dv<TYPE, CPLX>(g);                                                            \
    }

GATELOOP_CHUNK_GRAD_ENTRIES(f32, float, c, true, 2, 1, 1, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_GRAD_ENTRIES(f16, __half, c, true, GATELOOP_BY_ARCH(2, 3), GATELOOP_BY_ARCH(1, 3), 2,
                            GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_ENTRIES(bf16, __nv_bfloat16, c, true, GATELOOP_BY_ARCH(3, 4), GATELOOP_BY_ARCH(2, 4), 2,
                            GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_ENTRIES(f32, float, r, false, 2, 1, GATELOOP_BY_ARCH(1, 2), GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_GRAD_ENTRIES(f16, __half, r, false, GATELOOP_BY_ARCH(2, 3), 2, 2,
                            GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_ENTRIES(bf16, __nv_bfloat16, r, false, GATELOOP_BY_ARCH(4, 5), GATELOOP_BY_ARCH(2, 3),
                            GATELOOP_BY_ARCH(1, 2), GATELOOP_BY_ARCH(2, 4))

// gateloop_chunk_grad_dv_wide_{dtype}_{c,r}: grad_dv over 128 value
// columns a block (V > 64), in the same bytes as grad_dv
// (adjoint_smem_bytes: the wide state slab fits the union). MIN as
// grad_dv's, spill-free on sm_80 and sm_90 (sm_90: real f16 and complex
// bf16 80 registers at 3 an SM, real bf16 64 at 4, complex f16 2 (24 bytes
// spilled at 3);
// f32 128 at 2, 1 on sm_80, which their 96 and 106 KB do not fit twice).
#define GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(DTYPE, TYPE, GATE, CPLX, MIN)                                      \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                             \
        gateloop_chunk_grad_dv_wide_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                     \
        gateloop::chunk::grad_dv<TYPE, CPLX, gateloop::chunk::kWideCols>(g);                                \
    }
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(f32, float, c, true, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(f16, __half, c, true, 2)
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(bf16, __nv_bfloat16, c, true, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(f32, float, r, false, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(f16, __half, r, false, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_DV_WIDE_ENTRY(bf16, __nv_bfloat16, r, false, GATELOOP_BY_ARCH(2, 4))

// gateloop_chunk_grad_w_wide_{f16,bf16}_{c,r}: grad_w in blocks of 128 value
// columns (V > 64, the separate carry: the forward's wide state kernel,
// chunk.cu, whose layout and MIN it takes).
#define GATELOOP_CHUNK_GRAD_W_WIDE_ENTRY(DTYPE, TYPE, GATE, CPLX, MIN)                                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                             \
        gateloop_chunk_grad_w_wide_##DTYPE##_##GATE(const GateloopChunkGradParams g) {                      \
        gateloop::chunk::grad_w<TYPE, CPLX, gateloop::chunk::kWideCols>(g);                                  \
    }
GATELOOP_CHUNK_GRAD_W_WIDE_ENTRY(f16, __half, c, true, 2)
GATELOOP_CHUNK_GRAD_W_WIDE_ENTRY(f16, __half, r, false, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_W_WIDE_ENTRY(bf16, __nv_bfloat16, c, true, GATELOOP_BY_ARCH(2, 3))
GATELOOP_CHUNK_GRAD_W_WIDE_ENTRY(bf16, __nv_bfloat16, r, false, GATELOOP_BY_ARCH(3, 4))

// gateloop_chunk_grad_w_seq_wide_{f16,bf16}_r: grad_w_seq in blocks of 128
// value columns (V > 64, real gates: the forward's wide walk, chunk.cu).
// MIN by the rule above: the forward's Exact wide walk's bytes (bf16 76
// KB, f16 94 KB), two an H200 SM; one on sm_80 (at two it spilled there,
// and the launcher takes the narrow walks on sm_80).
#define GATELOOP_CHUNK_GRAD_W_SEQ_WIDE_ENTRY(DTYPE, TYPE, MIN)                                             \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, MIN)                             \
        gateloop_chunk_grad_w_seq_wide_##DTYPE##_r(const GateloopChunkGradParams g) {                       \
        gateloop::chunk::grad_w_seq<TYPE, false, gateloop::chunk::kWideCols>(g);                             \
    }
GATELOOP_CHUNK_GRAD_W_SEQ_WIDE_ENTRY(f16, __half, GATELOOP_BY_ARCH(1, 2))
GATELOOP_CHUNK_GRAD_W_SEQ_WIDE_ENTRY(bf16, __nv_bfloat16, GATELOOP_BY_ARCH(1, 2))

// gateloop_chunk_grad_adjoint_carry_{c,r}, and
// gateloop_chunk_grad_adjoint_carry_packed_{c,r} for packed sequences
// (fwd.cu_seqlens non-NULL; the bounds of the forward's packed carry).
#define GATELOOP_CHUNK_ADJOINT_CARRY_ENTRY(NAME, CPLX, PACKED, BOUNDS)        \
    extern "C" __global__ void __launch_bounds__ BOUNDS NAME(const GateloopChunkGradParams g) { \
        gateloop::chunk::grad_adjoint_carry<CPLX, PACKED>(g);                  \
    }
GATELOOP_CHUNK_ADJOINT_CARRY_ENTRY(gateloop_chunk_grad_adjoint_carry_c, true, false, (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_ADJOINT_CARRY_ENTRY(gateloop_chunk_grad_adjoint_carry_r, false, false, (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_ADJOINT_CARRY_ENTRY(gateloop_chunk_grad_adjoint_carry_packed_c, true, true,
                                   (GATELOOP_CHUNK_CARRY_THREADS, 2))
GATELOOP_CHUNK_ADJOINT_CARRY_ENTRY(gateloop_chunk_grad_adjoint_carry_packed_r, false, true,
                                   (GATELOOP_CHUNK_CARRY_THREADS, 2))

// gateloop_chunk_grad_adjoint_carry_segments_{c,r}: the segmented adjoint
// carry's first launch (fwd.carry_segments > 1, batched problems).
#define GATELOOP_CHUNK_ADJOINT_SEGMENTS_ENTRY(NAME, CPLX)                                                  \
    extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS) NAME(const GateloopChunkGradParams g) { \
        gateloop::chunk::grad_adjoint_carry<CPLX, false, true>(g);                                           \
    }
GATELOOP_CHUNK_ADJOINT_SEGMENTS_ENTRY(gateloop_chunk_grad_adjoint_carry_segments_c, true)
GATELOOP_CHUNK_ADJOINT_SEGMENTS_ENTRY(gateloop_chunk_grad_adjoint_carry_segments_r, false)

// gateloop_chunk_grad_dh0_{dtype}_{c,r}: dtype of q and dy.
#define GATELOOP_CHUNK_GRAD_DH0_ENTRY(DTYPE, TYPE, GATE, CPLX)                       \
    extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS)       \
        gateloop_chunk_grad_dh0_##DTYPE##_##GATE(const GateloopChunkGradParams g) {  \
        gateloop::chunk::grad_dh0<TYPE, CPLX>(g);                                    \
    }
GATELOOP_CHUNK_GRAD_DH0_ENTRY(f32, float, c, true)
GATELOOP_CHUNK_GRAD_DH0_ENTRY(f16, __half, c, true)
GATELOOP_CHUNK_GRAD_DH0_ENTRY(bf16, __nv_bfloat16, c, true)
GATELOOP_CHUNK_GRAD_DH0_ENTRY(f32, float, r, false)
GATELOOP_CHUNK_GRAD_DH0_ENTRY(f16, __half, r, false)
GATELOOP_CHUNK_GRAD_DH0_ENTRY(bf16, __nv_bfloat16, r, false)
