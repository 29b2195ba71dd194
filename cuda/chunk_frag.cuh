// The chunked forward's output launch on register fragments (mma.sync
// m16n8k16, cuda/mma.cuh): ChunkOutput::Fragments, 16-bit inputs. The same
// result as the staged output launch (intra_pass in chunk_common.cuh, within
// the same bounds, not bit for bit), from the same gate prefix, raw q and k
// slabs, carried state S_c and diagonal pairs, but every product operand
// that belongs to one warp is built in that warp's registers instead of
// being written to shared memory as a split tile and read back by WMMA:
//
//   the inter-chunk rows Q̃ = q E(n, −1) and the anchored off-diagonal rows
//   q̃, k̃ go from the raw slabs (f32, shared) straight into A and B
//   fragments; the scores P stay in accumulators over every key slab and
//   pass through shared memory once, as f32, after the last one; the
//   operands every warp reads, the state slab S and the value tile V, are
//   staged (split hi/lo in the operand type) and read with ldmatrix.trans.
//
// Warp w owns query sub-chunk i = w / 2 (rows 16·i .. 16·i + 15 of the
// chunk) and 32 of the tile's 64 value columns (c0 = 32·(w % 2)):
//   y[rows, c0 .. c0 + 31] = Re(Q̃ S_c) + Σ_{j ≤ i} P_ij V_j
// with P_ij for j < i one anchored product per slab: the anchor of query
// sub-chunk i is r = 16·i − 1 (the step before it), q̃_n = q_n |E(n, r)|
// e^{iθ_n}, k̃_m = k_m |E(r, m)| e^{−iθ_m} for every m ≤ r: both factors ≤ 1,
// 0 across a reset, as the staged pass's per-pair anchors (the last step of
// key sub-chunk j) are. So the whole strip left of the diagonal block is one
// product of inner dimension 2·16 per slab; the two warps of a query
// sub-chunk take alternate n8 tiles of it (8 key columns each: at most 3
// accumulator tiles a warp, which keeps sm_80's 128 registers spill-free)
// and hand them to each other through shared memory after the last slab
// (both need all of P_i for their own value columns). The diagonal blocks
// are the staged pass's (add_diagonal_pairs and add_diagonal_cross, every
// thread of the block).
// After the last slab P's A fragments are read from those two tables.
//
// Precision: as the staged pass's, kTerms = 3 (exact: operands split
// x = hi + lo, hi·hi + hi·lo + lo·hi, the small terms first) or 1 (fast).
// Shared memory (frag_output_smem_bytes; src/cuda/chunk.rs mirrors it):
// prefix tables, raw q and k slabs, S slab and V tile (split), diagonal
// scores, off-diagonal scores: ~70 KB for bf16 complex, against the staged
// pass's ~83.

#ifndef GATELOOP_CHUNK_FRAG_CUH
#define GATELOOP_CHUNK_FRAG_CUH

#include "chunk_common.cuh"
#include "mma.cuh"

namespace gateloop {
namespace chunk {

// The off-diagonal scores' table: rows n − 16 for query steps n ≥ 16,
// columns m < 48, f32, rows padded (a fragment read of 8 rows × 4 column
// pairs then meets at most two of a bank).
constexpr int kOffRows = kChunk - kSub;
constexpr int kOffLd = kChunk - kSub + 4;

template <class Op, bool kComplex>
__host__ __device__ constexpr int frag_output_smem_bytes() {
    return prefix_bytes<kComplex>() + 2 * kChunk * kSlab * 4 + split_bytes<Op>(slab_width<kComplex>(), ld_tile<Op>()) +
           split_bytes<Op>(kChunk, ld_tile<Op>()) + kSubs * kSub * kSub * 4 + kOffRows * kOffLd * 4;
}

namespace frag {

// Split operand fragments of m16n8k16: A (16 × 16) and B (16 × 8), hi and
// (kTerms = 3) lo registers.
struct A16 {
    uint32_t hi[4], lo[4];
};
struct B16 {
    uint32_t hi[2], lo[2];
};

// Register `r` of a fragment from two values (x0 in the low half): hi =
// round(x), lo = round(x − hi) in the operand type (Split::put's split).
template <class Op, int kTerms>
__device__ __forceinline__ void put_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
    using S = typename Op::storage;
    static_assert(sizeof(S) == 2, "16-bit operands");
    S h[2] = {Op::narrow(x0), Op::narrow(x1)};
    memcpy(&hi, h, 4);
    if (kTerms == 3) {
        S l[2] = {Op::narrow(x0 - Op::widen(h[0])), Op::narrow(x1 - Op::widen(h[1]))};
        memcpy(&lo, l, 4);
    }
}

// An A fragment from its 8 elements x[ri][ci]: row g + 8·ri, column
// 2t + (ci % 2) + 8·(ci / 2) (mma.cuh: register ri + 2·(ci / 2)).
template <class Op, int kTerms>
__device__ __forceinline__ void put_a(const float (&x)[2][4], A16& a) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
#pragma unroll
        for (int cp = 0; cp < 2; ++cp) put_pair<Op, kTerms>(x[ri][2 * cp], x[ri][2 * cp + 1], a.hi[ri + 2 * cp], a.lo[ri + 2 * cp]);
    }
}

// d += A·B with split operands, the small cross terms first (mma_step's order).
template <class Op, int kTerms>
__device__ __forceinline__ void mma_split(float (&d)[4], const A16& a, const B16& b) {
    using S = typename Op::storage;
    if (kTerms == 3) {
        mma::mma_16816<S>(d, a.lo, b.hi);
        mma::mma_16816<S>(d, a.hi, b.lo);
    }
    mma::mma_16816<S>(d, a.hi, b.hi);
}

// The B fragments of two adjacent n8 tiles (columns c .. c + 7 and c + 8 ..
// c + 15) over rows k .. k + 15 of a staged row-major split operand, by
// ldmatrix .x4.trans: lane 8j + r addresses row k + 8·(j % 2) + r at column
// c + 8·(j / 2), so registers 0, 1 are the first tile's b0, b1 and 2, 3 the
// second's (mma.cuh's ldmatrix note).
template <class Op, int kTerms>
__device__ __forceinline__ void load_b_pair(const Split<Op>& x, int k, int c, int lane, B16& first, B16& second) {
    const int j = lane >> 3, r = lane & 7;
    const int row = k + 8 * (j & 1) + r, col = c + 8 * (j >> 1);
    uint32_t t[4];
    mma::ldmatrix<4, true>(t, x.hi_at(row, col));
    first.hi[0] = t[0];
    first.hi[1] = t[1];
    second.hi[0] = t[2];
    second.hi[1] = t[3];
    if (kTerms == 3) {
        mma::ldmatrix<4, true>(t, x.lo_at(row, col));
        first.lo[0] = t[0];
        first.lo[1] = t[1];
        second.lo[0] = t[2];
        second.lo[1] = t[3];
    }
}

}  // namespace frag

// The output launch (gateloop_chunk_output_frag_*): one block per (b, h,
// chunk, value tile), as chunk_output.
template <typename input_t, class Op, bool kComplex, int kTerms>
__device__ __forceinline__ void chunk_output_frag(const GateloopChunkParams& p) {
    using Tr = InputTraits<input_t>;
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(p.shared_bytes, frag_output_smem_bytes<Op, kComplex>());
    Block<input_t, kComplex> blk(p, smem);
    if (!blk.has_chunk()) return;  // an empty packed slot: the whole block, before any barrier
    constexpr int kWidth = slab_width<kComplex>();
    constexpr int kSteps = kWidth / 16;  // k-steps of a slab: [Re | Im] or Re
    unsigned char* at = smem + prefix_bytes<kComplex>();
    float* qraw = reinterpret_cast<float*>(at);
    float* kraw = qraw + kChunk * kSlab;
    at += 2 * kChunk * kSlab * 4;
    const Split<Op> st = carve<Op>(at, kWidth, ld_tile<Op>());
    const Split<Op> vs = carve<Op>(at, kChunk, ld_tile<Op>());
    float* pdiag = reinterpret_cast<float*>(at);  // [kSubs][16][16]
    float* poff = pdiag + kSubs * kSub * kSub;    // [kOffRows][kOffLd]
    static_assert(cross_scratch_bytes<kComplex>() <= kOffRows * kOffLd * 4, "the cross rows fit poff");

    const int64_t key_dim = p.dims.key_dim;
    const int lane = blk.tid & 31;
    const int g = mma::group(lane), t4 = mma::thread_in_group(lane);
    const int sub = blk.warp >> 1;        // query sub-chunk: rows 16·sub ..
    const int half = blk.warp & 1;
    const int c0 = 32 * half;             // value columns c0 .. c0 + 31 of the tile
    const int anchor = kSub * sub - 1;    // its off-diagonal anchor (sub ≥ 1)
    static_assert(kWarps == 2 * kSubs && kVTile == 64, "two warps per query sub-chunk, 32 columns each");

    float yacc[4][4];
    // This warp's n8 tiles of P left of the diagonal block: tile u holds key
    // columns 8·nt .. 8·nt + 7, nt = 2·u + half.
    float sacc[kSubs - 1][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) yacc[i][e] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kSubs - 1; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[i][e] = 0.f;
    }
    for (int i = blk.tid; i < kSubs * kSub * kSub; i += kThreads) pdiag[i] = 0.f;
    // The value tile, read after the slab loop (whose barriers order it).
    blk.template load_values<Op, kTerms>(vs);
    // The state rows in groups of four (fetch_state_quads) but for complex
    // gates (ptxas spilled 32 bytes in their Fast launches on sm_90).
    const bool quads = !kComplex && state_quads(p.ws_state, p.dims.value_dim);

    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        // Ends with a barrier. The slab's loads held in one round trip but in
        // the complex launches on sm_90 (at 128 registers they spilled 16
        // bytes); the state rows' loads issued inside it, across the
        // prefix's scans, but in those launches (4 items spilled 56 bytes).
        constexpr int kParts = kComplex ? 2 : 1;
        constexpr int kItems = state_row_items<kParts, kVTile>();
        stage_slab_and_state_rows<true, !kComplex || GATELOOP_BY_ARCH(true, false), kParts, kVTile,
                                  kComplex ? GATELOOP_BY_ARCH(kItems, 0) : kItems, false, true>(
            blk, d0, qraw, kraw, blk.v0, [&](int r, int c, auto x) { st.template put<kTerms>(r, c, x); }, p.ws_state,
            quads);
        __syncthreads();

        // This lane's query rows n = 16·sub + g + 8·ri and channels
        // j = 2t + (ci % 2) + 8·(ci / 2) of the A fragments: q |E(n, early)|
        // e^{iθ_n} as [Re | −Im], early = −1 (Q̃) or the anchor (q̃).
        auto query_rows = [&](int early, frag::A16 (&a)[kSteps]) {
            float re[2][4], im[2][4];
#pragma unroll
            for (int ri = 0; ri < 2; ++ri) {
                const int nn = kSub * sub + g + 8 * ri;
#pragma unroll
                for (int ci = 0; ci < 4; ++ci) {
                    const int j = 2 * t4 + (ci & 1) + 8 * (ci >> 1);
                    const int cl = blk.col(j);
                    const float2 x = blk.phased(blk.modulus(nn, early, cl) * qraw[blk.at(nn, j)], nn, cl);
                    re[ri][ci] = x.x;
                    im[ri][ci] = x.y;
                }
            }
            frag::put_a<Op, kTerms>(re, a[0]);
            if (kComplex) frag::put_a<Op, kTerms>(im, a[kSteps - 1]);
        };

        // y += Q̃ S (inner: the slab's [Re | Im] rows), 4 n8 tiles.
        {
            frag::A16 qe[kSteps];
            query_rows(-1, qe);
#pragma unroll
            for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
                for (int pp = 0; pp < 2; ++pp) {
                    frag::B16 b0, b1;
                    frag::load_b_pair<Op, kTerms>(st, 16 * ks, c0 + 16 * pp, lane, b0, b1);
                    frag::mma_split<Op, kTerms>(yacc[2 * pp], qe[ks], b0);
                    frag::mma_split<Op, kTerms>(yacc[2 * pp + 1], qe[ks], b1);
                }
            }
        }
        // P left of the diagonal block += q̃ k̃ᵀ, one anchor per query sub-chunk.
        if (sub > 0) {
            frag::A16 qa[kSteps];
            query_rows(anchor, qa);
#pragma unroll
            for (int u = 0; u < kSubs - 1; ++u) {
                const int nt = 2 * u + half;
                if (nt >= 2 * sub) break;
                // B (k = channel, n = key step m = 8·nt + g): k |E(r, m)| e^{−iθ_m}
                // as [Re | Im], channels 2t + (e % 2) + 8·(e / 2).
                const int m = 8 * nt + g;
                float re[4], im[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = 2 * t4 + (e & 1) + 8 * (e >> 1);
                    const int cl = blk.col(j);
                    const float2 x = blk.phased(blk.modulus_within(anchor, m, cl) * kraw[blk.at(m, j)], m, cl);
                    re[e] = x.x;
                    im[e] = x.y;
                }
                frag::B16 kb[kSteps];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    frag::put_pair<Op, kTerms>(re[2 * r], re[2 * r + 1], kb[0].hi[r], kb[0].lo[r]);
                    if (kComplex) frag::put_pair<Op, kTerms>(im[2 * r], im[2 * r + 1], kb[kSteps - 1].hi[r], kb[kSteps - 1].lo[r]);
                }
#pragma unroll
                for (int ks = 0; ks < kSteps; ++ks) frag::mma_split<Op, kTerms>(sacc[u], qa[ks], kb[ks]);
            }
        }
        // The cross rows in poff, idle until the slab loop ends. The pairs
        // one key row a thread (two spilled 4 to 72 bytes at 128, complex
        // on sm_90).
        add_diagonal_pairs<1>(blk, qraw, kraw, d0, pdiag, poff);
        __syncthreads();
        add_diagonal_cross<kComplex>(blk.tid, poff, pdiag);
        __syncthreads();
    }

    // The off-diagonal tiles into poff (element e of a tile: row g + 8·(e / 2),
    // column 2t + e % 2), for both warps of the query sub-chunk.
#pragma unroll
    for (int u = 0; u < kSubs - 1; ++u) {
        const int nt = 2 * u + half;
        if (nt >= 2 * sub) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            poff[(kSub * (sub - 1) + g + 8 * (e >> 1)) * kOffLd + 8 * nt + 2 * t4 + (e & 1)] = sacc[u][e];
        }
    }
    __syncthreads();

    // y += Σ_{j ≤ sub} P_{sub, j} V_j: P's A fragments from poff (j < sub)
    // and pdiag (j = sub; complete since the loop's last barrier), V from
    // the staged tile.
#pragma unroll
    for (int kb = 0; kb < kSubs; ++kb) {
        if (kb > sub) break;
        // Element (ri, ci) of the fragment: row g + 8·ri, column
        // 2t + (ci % 2) + 8·(ci / 2) of block (sub, kb).
        const float* blk_p = kb < sub ? poff + kSub * (sub - 1) * kOffLd + kSub * kb : pdiag + kSub * kSub * sub;
        const int ld = kb < sub ? kOffLd : kSub;
        float x[2][4];
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
#pragma unroll
            for (int ci = 0; ci < 4; ++ci) x[ri][ci] = blk_p[(g + 8 * ri) * ld + 2 * t4 + (ci & 1) + 8 * (ci >> 1)];
        }
        frag::A16 pa;
        frag::put_a<Op, kTerms>(x, pa);
#pragma unroll
        for (int pp = 0; pp < 2; ++pp) {
            frag::B16 b0, b1;
            frag::load_b_pair<Op, kTerms>(vs, kSub * kb, c0 + 16 * pp, lane, b0, b1);
            frag::mma_split<Op, kTerms>(yacc[2 * pp], pa, b0);
            frag::mma_split<Op, kTerms>(yacc[2 * pp + 1], pa, b1);
        }
    }

    // y: element e of tile nt is (row g + 8·(e / 2), column c0 + 8·nt + 2t + e % 2).
    input_t* out = seq_row_mut<input_t>(p.y, p.y_strides, blk.b, blk.h);
    const int64_t value_dim = p.dims.value_dim;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
        const int row = kSub * sub + g + 8 * ri;
        if (row >= blk.n) continue;
        const int64_t base = (blk.t0 + row) * p.y_strides.time;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int64_t col = blk.v0 + c0 + 8 * nt + 2 * t4 + e;
                if (col < value_dim) Tr::store(out, base + col, yacc[nt][2 * ri + e]);
            }
        }
    }
}

}  // namespace chunk
}  // namespace gateloop

#endif  // GATELOOP_CHUNK_FRAG_CUH
