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
//   2. gateloop_chunk_carry_*: one thread per (b, h, key row, value column),
//      sequential over the chunks: S ← A S + U, overwriting U_c with S_c (the
//      state ENTERING chunk c), then h_final. Short: num_chunks FMAs each.
//   3. gateloop_chunk_output_*: one block per (b, h, chunk, value tile):
//      y = Q̃ S_c (inter, inner dim 2K) + P V (intra, inner dim 64), written
//      once. Per key slab: Q̃ (64 × 32) · S slab (32 × 64) into the y
//      accumulators; the six off-diagonal 16 × 16 score blocks (query
//      sub-chunk i > key sub-chunk j, anchor r = last step of j) as
//      q̃ (16 × 32) · k̃ᵀ (32 × 16) into score accumulators; the four diagonal
//      blocks pairwise in f32 (each factor one exp of a direct difference).
//      After the last slab P (64 × 64, causal) · V (64 × 64) on tensor cores.
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
// TF32 operands, f16 / bf16 inputs m16n16k16 operands of their own type.
// Operands that are not exactly representable (the decayed q̃, k̃, Q̃, K̃, the
// scores P, the carried state S, f32 inputs) are SPLIT, x = hi + lo with
// hi = round(x), lo = round(x − hi) in the operand type, and
//   a·b ≈ hi_a·hi_b + hi_a·lo_b + lo_a·hi_b      (kTerms = 3, "exact")
// or a·b ≈ hi_a·hi_b                             (kTerms = 1, "fast").
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

#include "chunk_common.cuh"

namespace gateloop {
namespace chunk {

using namespace nvcuda;

// ---- 1. chunk state U_c and decay A_c -------------------------------------------

template <typename input_t, class Op, bool kComplex, int kTerms>
__device__ __forceinline__ void chunk_state(const GateloopChunkParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(p.state_shared_bytes, state_smem_bytes<Op, kComplex>());
    Block<input_t, kComplex> blk(p, smem);
    unsigned char* at = smem + prefix_bytes<kComplex>();
    float* kraw = reinterpret_cast<float*>(at);
    at += kChunk * kSlab * 4;
    const Split<Op> vs = carve<Op>(at, kChunk, ld_tile<Op>());
    // K̃ [m][col] row-major, read as the column-major A = K̃ᵀ.
    const Split<Op> kt = carve<Op>(at, kChunk, ld_slab<Op, kComplex>());
    float* staging = reinterpret_cast<float*>(at) + blk.warp * 256;

    const int last = blk.n - 1;

    blk.template load_values<Op, kTerms>(vs);
    for (int64_t d0 = 0; d0 < p.dims.key_dim; d0 += kSlab) {
        if (d0 == 0 || !blk.per_head) blk.build_prefix(d0);
        blk.load_keys(blk.k, p.k_strides, d0, kraw);
        __syncthreads();
        put_state_keys<Op, kTerms>(blk, kraw, kt);
        // A_c = E(last, −1), once per chunk (value tile 0).
        if (blk.vt == 0) {
            for (int j = blk.tid; j < blk.gate_cols(d0); j += kThreads) {
                const int cl = blk.col(j);
                const float w = blk.modulus(last, -1, cl);
                const int64_t ch = blk.per_head ? 0 : d0 + j;
                const int64_t at_ = ((blk.bh * p.num_chunks + blk.chunk) * p.dims.gate_dim + ch) * (kComplex ? 2 : 1);
                if (d0 == 0 || !blk.per_head) {
                    if (kComplex) {
                        p.ws_decay[at_] = w * blk.cos_at(last, cl);
                        p.ws_decay[at_ + 1] = w * blk.sin_at(last, cl);
                    } else {
                        p.ws_decay[at_] = w;
                    }
                }
            }
        }
        __syncthreads();
        store_slab_gram<Op, kTerms>(blk, kt, vs, d0, staging, p.ws_state);
        __syncthreads();
    }
}

// ---- 2. carry over the chunks -------------------------------------------------------

template <bool kComplex>
__device__ __forceinline__ void chunk_carry(const GateloopChunkParams& p) {
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t kv = key_dim * value_dim;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const int64_t bh = e.bh, row = e.row, col = e.col;
    const BatchHead bhi = e.bhi;
    const int64_t nc = p.num_chunks;
    const int64_t gd = p.dims.gate_dim;
    const int64_t ch = gd == 1 ? 0 : row;
    constexpr int kParts = kComplex ? 2 : 1;
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const int64_t hi0 = state_index(p.h0_strides, bhi.b, bhi.h, row, col);
    const int64_t hf = state_index(p.h_final_strides, bhi.b, bhi.h, row, col);
    // Chunk c's rows: re at (c, row), im at (c, K + row).
    const int64_t chunk_stride = kParts * kv;
    float* re = p.ws_state + bh * nc * chunk_stride + row * value_dim + col;
    const float* dec = p.ws_decay + (bh * nc * gd + ch) * kParts;
    if (kComplex) {
        const float2 s0 = has_h0 ? load_complex(p.h0, hi0) : make_float2(0.f, 0.f);
        reinterpret_cast<float2*>(p.h_final)[hf] =
            carry_chunks<false>(re, re + kv, chunk_stride, dec, gd * 2, nc, s0);
    } else {
        float s = has_h0 ? __ldg(p.h0 + hi0) : 0.f;
        for (int64_t c = 0; c < nc; ++c) {
            const float a = dec[c * gd];
            const float u = re[c * chunk_stride];
            re[c * chunk_stride] = s;
            s = fmaf(a, s, u);
        }
        p.h_final[hf] = s;
    }
}

// ---- 3. outputs -------------------------------------------------------------------

// Off-diagonal score block `pair` → (query sub-chunk i, key sub-chunk j), i > j:
// 0:(1,0) 1:(2,0) 2:(3,0) 3:(2,1) 4:(3,1) 5:(3,2) — grouped by key sub-chunk.
__device__ __forceinline__ int pair_query(int pair) {
    return pair < 3 ? pair + 1 : (pair < 5 ? pair - 1 : 3);
}
__device__ __forceinline__ int pair_key(int pair) {
    return pair < 3 ? 0 : (pair < 5 ? 1 : 2);
}
__device__ __forceinline__ int pair_of(int i, int j) {
    return j == 0 ? i - 1 : (j == 1 ? i + 1 : 5);
}

template <typename input_t, class Op, bool kComplex, int kTerms>
__device__ __forceinline__ void chunk_output(const GateloopChunkParams& p) {
    using Tr = InputTraits<input_t>;
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(p.shared_bytes, output_smem_bytes<Op, kComplex>());
    Block<input_t, kComplex> blk(p, smem);
    unsigned char* at = smem + prefix_bytes<kComplex>();
    float* qraw = reinterpret_cast<float*>(at);
    float* kraw = qraw + kChunk * kSlab;
    at += 2 * kChunk * kSlab * 4;
    unsigned char* union_at = at;
    // Slab phase.
    const Split<Op> qe = carve<Op>(at, kChunk, ld_slab<Op, kComplex>());
    const Split<Op> st = carve<Op>(at, slab_width<kComplex>(), ld_tile<Op>());
    const Split<Op> qa = carve<Op>(at, kPairs * kSub, ld_slab<Op, kComplex>());
    // k̃ [m][col] row-major, read as the column-major B = k̃ᵀ.
    const Split<Op> ka = carve<Op>(at, (kSubs - 1) * kSub, ld_slab<Op, kComplex>());
    // Final phase (same bytes).
    unsigned char* fin = union_at;
    const Split<Op> ps = carve<Op>(fin, kChunk, ld_tile<Op>());
    const Split<Op> vs = carve<Op>(fin, kChunk, ld_tile<Op>());
    at = union_at + (output_slab_bytes<Op, kComplex>() > output_final_bytes<Op>() ? output_slab_bytes<Op, kComplex>()
                                                                                 : output_final_bytes<Op>());
    float* pdiag = reinterpret_cast<float*>(at);  // [kSubs][16][16]
    at += kSubs * kSub * kSub * 4;
    float* staging = reinterpret_cast<float*>(at) + blk.warp * 256;

    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int tid = blk.tid;
    const int lane = tid & 31;
    constexpr int kWidth = slab_width<kComplex>();
    // Warp → y tiles (row block yr, column blocks yc, yc + 1) and score block.
    const int yr = blk.warp >> 1;
    const int yc = (blk.warp & 1) * 2;
    const int pair = blk.warp;  // < kPairs: owns that score block
    const int sj = pair < kPairs ? pair_key(pair) : 0;

    Acc<Op> yacc[2];
    wmma::fill_fragment(yacc[0], 0.f);
    wmma::fill_fragment(yacc[1], 0.f);
    Acc<Op> sacc;
    wmma::fill_fragment(sacc, 0.f);
    for (int i = tid; i < kSubs * kSub * kSub; i += kThreads) pdiag[i] = 0.f;

    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        if (d0 == 0 || !blk.per_head) blk.build_prefix(d0);
        blk.load_keys(blk.q, p.q_strides, d0, qraw);
        blk.load_keys(blk.k, p.k_strides, d0, kraw);
        // The state entering the chunk, rows [Re | Im] of the slab's channels.
        for (int i = tid; i < kWidth * kVTile; i += kThreads) {
            const int r = i / kVTile;
            const int c = i - r * kVTile;
            const int part = r / kSlab;
            const int64_t d = d0 + (r - part * kSlab);
            const int64_t col = blk.v0 + c;
            const float x = (d < key_dim && col < value_dim)
                                ? p.ws_state[blk.ws_state_row(part * key_dim + d) + col]
                                : 0.f;
            st.template put<kTerms>(r, c, x);
        }
        __syncthreads();
        put_inter_queries<Op, kTerms>(blk, qraw, qe);
        // Anchored queries of each pair (anchor r = last step of key sub-chunk j):
        // q̃_n = q_n |E(n, r)| e^{iθ_n} as [Re, −Im].
        for (int i = tid; i < kPairs * kSub * kSlab; i += kThreads) {
            const int row = i / kSlab;  // pair · 16 + n − 16 i
            const int j = i - row * kSlab;
            const int pr = row / kSub;
            const int nn = kSub * pair_query(pr) + (row - pr * kSub);
            const int r = kSub * pair_key(pr) + kSub - 1;
            const int cl = blk.col(j);
            const float wq = blk.modulus(nn, r, cl) * qraw[nn * kSlab + j];
            qa.template put<kTerms>(row, j, wq * blk.cos_at(nn, cl));
            if (kComplex) qa.template put<kTerms>(row, kSlab + j, -(wq * blk.sin_at(nn, cl)));
        }
        // Anchored keys: k̃_m = k_m |E(r, m)| e^{−iθ_m} as [Re, Im].
        for (int i = tid; i < (kSubs - 1) * kSub * kSlab; i += kThreads) {
            const int m = i / kSlab;  // key sub-chunks 0 .. kSubs − 2
            const int j = i - m * kSlab;
            const int r = (m / kSub) * kSub + kSub - 1;
            const int cl = blk.col(j);
            const float wk = blk.modulus(r, m, cl) * kraw[i];
            ka.template put<kTerms>(m, j, wk * blk.cos_at(m, cl));
            if (kComplex) ka.template put<kTerms>(m, kSlab + j, -(wk * blk.sin_at(m, cl)));
        }
        // Diagonal blocks, pairwise: score_nm += Σ_d q_nd k_md Re E(n, m)_d.
        for (int i = tid; i < kSubs * kSub * kSub; i += kThreads) {
            const int sb = i / (kSub * kSub);
            const int nn = sb * kSub + (i / kSub) % kSub;
            const int m = sb * kSub + i % kSub;
            if (m > nn) continue;
            const int cols = blk.gate_cols(d0);
            float acc = 0.f;
            if (blk.per_head) {
                float dot = 0.f;
                for (int j = 0; j < kSlab; ++j) dot = fmaf(qraw[nn * kSlab + j], kraw[m * kSlab + j], dot);
                const float cosd = fmaf(blk.cos_at(nn, 0), blk.cos_at(m, 0), blk.sin_at(nn, 0) * blk.sin_at(m, 0));
                acc = blk.modulus(nn, m, 0) * cosd * dot;
            } else {
                for (int j = 0; j < cols; ++j) {
                    const float qk = qraw[nn * kSlab + j] * kraw[m * kSlab + j];
                    const float cosd = fmaf(blk.cos_at(nn, j), blk.cos_at(m, j), blk.sin_at(nn, j) * blk.sin_at(m, j));
                    acc = fmaf(blk.modulus(nn, m, j) * cosd, qk, acc);
                }
            }
            pdiag[i] += acc;
        }
        __syncthreads();
        // y += Q̃ S (inner: this slab's kWidth), rows 16·yr, cols 16·yc, 16·(yc + 1).
        for (int kk = 0; kk < kWidth; kk += Op::kK) {
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                mma_step<Op, kTerms, wmma::row_major, wmma::row_major>(
                    yacc[t], qe.hi_at(16 * yr, kk), qe.lo_at(16 * yr, kk), qe.ld, st.hi_at(kk, 16 * (yc + t)),
                    st.lo_at(kk, 16 * (yc + t)), st.ld);
            }
        }
        // score block (si, sj) += q̃ (pair rows) · k̃ᵀ (key sub-chunk sj).
        if (pair < kPairs) {
            for (int kk = 0; kk < kWidth; kk += Op::kK) {
                mma_step<Op, kTerms, wmma::row_major, wmma::col_major>(
                    sacc, qa.hi_at(kSub * pair, kk), qa.lo_at(kSub * pair, kk), qa.ld, ka.hi_at(kSub * sj, kk),
                    ka.lo_at(kSub * sj, kk), ka.ld);
            }
        }
        __syncthreads();
    }

    // P (64 × 64, causal) into its split operand: the score blocks pass
    // through the warps' staging tiles, the diagonal from pdiag, zeros above.
    if (pair < kPairs) wmma::store_matrix_sync(staging, sacc, 16, wmma::mem_row_major);
    __syncthreads();
    float* staging0 = staging - blk.warp * 256;
    for (int i = tid; i < kChunk * kChunk; i += kThreads) {
        const int nn = i / kChunk;
        const int m = i - nn * kChunk;
        const int bi = nn / kSub, bj = m / kSub;
        const int rr = nn - bi * kSub, cc = m - bj * kSub;
        float x = 0.f;
        if (bj == bi) {
            x = cc <= rr ? pdiag[(bi * kSub + rr) * kSub + cc] : 0.f;
        } else if (bj < bi) {
            x = staging0[pair_of(bi, bj) * 256 + rr * 16 + cc];
        }
        ps.template put<kTerms>(nn, m, x);
    }
    blk.template load_values<Op, kTerms>(vs);
    __syncthreads();
    // y += P V, the inner loop stopping at the diagonal block.
    for (int kk = 0; kk < kSub * (yr + 1); kk += Op::kK) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            mma_step<Op, kTerms, wmma::row_major, wmma::row_major>(yacc[t], ps.hi_at(16 * yr, kk), ps.lo_at(16 * yr, kk),
                                                                   ps.ld, vs.hi_at(kk, 16 * (yc + t)),
                                                                   vs.lo_at(kk, 16 * (yc + t)), vs.ld);
        }
    }
    __syncthreads();  // the staging tiles held score blocks read by everyone
    input_t* __restrict__ y = seq_row_mut<input_t>(p.y, p.y_strides, blk.b, blk.h);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
        drain<Op>(yacc[t], staging, lane, [&](int r, int c, float x) {
            const int nn = 16 * yr + r;
            const int64_t col = blk.v0 + 16 * (yc + t) + c;
            if (nn < blk.n && col < value_dim) Tr::store(y, (blk.t0 + nn) * p.y_strides.time + col, x);
        });
    }
}

}  // namespace chunk
}  // namespace gateloop

// ---- entry points -----------------------------------------------------------------
//
// gateloop_chunk_{state,output}_{dtype}_{c,r}_{exact,fast}: dtype of q, k, v,
// y; c = complex gates, r = real gates; exact = 3 split products, fast = 1.
// gateloop_chunk_carry_{c,r}.

#define GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, GATE, CPLX, PREC, TERMS)                                  \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, 1)                             \
        gateloop_chunk_state_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                     \
        gateloop::chunk::chunk_state<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                          \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, 1)                             \
        gateloop_chunk_output_##DTYPE##_##GATE##_##PREC(const GateloopChunkParams p) {                    \
        gateloop::chunk::chunk_output<TYPE, gateloop::chunk::OP, CPLX, TERMS>(p);                         \
    }

#define GATELOOP_CHUNK_DTYPE(DTYPE, TYPE, OP)                          \
    GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, c, true, exact, 3)         \
    GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, c, true, fast, 1)          \
    GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, r, false, exact, 3)        \
    GATELOOP_CHUNK_ENTRIES(DTYPE, TYPE, OP, r, false, fast, 1)

GATELOOP_CHUNK_DTYPE(f32, float, OpTf32)
GATELOOP_CHUNK_DTYPE(f16, __half, OpF16)
GATELOOP_CHUNK_DTYPE(bf16, __nv_bfloat16, OpBf16)

extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS)
    gateloop_chunk_carry_c(const GateloopChunkParams p) {
    gateloop::chunk::chunk_carry<true>(p);
}
extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS)
    gateloop_chunk_carry_r(const GateloopChunkParams p) {
    gateloop::chunk::chunk_carry<false>(p);
}
