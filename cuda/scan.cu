// The parallel (associative-scan) mode of GateLoop on the GPU, with the
// readout fused in:
//
//   e_t = (a_t, k_tᵀ v_t),   (A_i, B_i) • (A_j, B_j) = (A_j A_i, A_j B_i + B_j)
//   h_t = second component of the inclusive •-prefix of e_0..e_t (seeded by h0)
//   y_t = Re(Σ_k q_t[k] · h_t[k, :])
//
// a_t is diagonal, so the K×V state is K·V independent complex scalar scans
// whose 'A' component depends only on (t, k). No per-step state ever reaches
// global memory: states live in registers, y is reduced over K in registers.
//
// Mapping. A block of 32·W threads (W = p.warps ≤ GATELOOP_SCAN_MAX_WARPS)
// covers one time chunk of chunk_len = S·32·W steps (S =
// GATELOOP_SCAN_STEPS_PER_THREAD) of one (b, h) and one tile of T value
// columns (T = 1, 2 or 4, the template parameter / entry point suffix).
// Thread (w, l) owns the S consecutive steps starting at (32·w + l)·S of the
// chunk and the T columns of the tile: it holds v[S][T] and y[S][T] in
// registers for the whole kernel and loops over every key row k = 0..K−1
// (in order, so y's sum over k has the reference's order):
//   1. load a_t[k] = exp(log_gate) (once for a per-head gate), k_t[k];
//   2. serial fold of its S elements → the segment aggregate (A, B[T]);
//   3. warp scan: Hillis–Steele over the 32 lanes with __shfl_up_sync
//      (offsets 1, 2, 4, 8, 16; a lane ≥ offset combines the lane-offset
//      value in front of its own); lane 31 holds the warp's aggregate;
//   4. warps through shared memory: lane 31 of every warp stores its
//      aggregate (double-buffered by k's parity: one __syncthreads per k);
//      warp w folds the aggregates of warps 0..w−1 in order;
//   5. carry: the state entering the chunk (from the carry pass, or h0 for a
//      single chunk) is pushed through the warp prefix, then through the
//      lane's exclusive prefix (the inclusive value of lane − 1, one more
//      shuffle), giving the state before the thread's first step;
//   6. re-run the S steps serially from that state, accumulating
//      y[s][j] += q_t[k] · Re h (fused readout); the thread owning step L−1
//      writes h_final.
// Steps past L are the identity element (a = 1, k = q = v = 0).
//
// Carry across chunks (a short separate pass rather than decoupled
// look-back: deterministic, no inter-block spin-waits, no reliance on block
// scheduling order). When num_chunks > 1:
//   reduce:  every chunk but the last computes its aggregate exactly as in
//            steps 1–4 (the block aggregate is the in-order fold of all W
//            warp aggregates) and writes A to chunk_gate, B to chunk_state
//            (one complex per (chunk, k, v): chunk-boundary states only);
//   carry:   one thread per (b, h, k, v) walks the chunks in order,
//            h ← A_c h + B_c, overwriting chunk_state[c] with the state
//            entering chunk c (num_chunks dependent FMAs per thread);
//   forward: steps 1–6 above.
// The inputs are read twice (reduce, forward); the chunk states are 8 bytes
// per (b, h, chunk, k, v), 1/(S·32·W) of a per-step state.
//
// Numerics: A is a product of |a| ≤ 1 numbers (no inverse ever formed). A
// reset a = 0 (Re log_gate = −inf → exp2f(−inf) = 0) makes every combine
// through it drop what came before exactly (0·finite = 0).
// All complex arithmetic is written with explicit fmaf so its rounding is
// pinned (no compiler contraction choices); src/cpu/scan.rs mirrors it
// operation for operation. q, k, v and y are f32, f16 or bf16 (entry point
// infix; InputTraits widens each load to f32, y is rounded once at the
// store); log_gate, h0, h_final and the workspace are complex f32 for every
// type, and all arithmetic is f32.

#include "scan.cuh"

namespace gateloop {
namespace scan {

// ---- reduce: chunk aggregates --------------------------------------------

template <typename input_t, int T>
__device__ __forceinline__ void scan_reduce(const GateloopScanParams& p) {
    __shared__ Agg<T> warp_agg[2][kMaxWarps];
    const Block<input_t, T> blk(p, p.num_chunks - 1);
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t nc = p.num_chunks;

    float vv[kSteps][T];
    blk.load_v(vv);
    float2 a[kSteps];
    float kk[kSteps];
    for (int64_t row = 0; row < key_dim; ++row) {
        if (row == 0 || !blk.per_head_gate) blk.load_gate(row, a);
        blk.load_key(row, kk);
        Agg<T>* smem = warp_agg[row & 1];
        blk.block_scan(a, kk, vv, smem);
        if (blk.tid == 0) {
            Agg<T> tot = smem[0];
            for (int w = 1; w < p.warps; ++w) {
                Agg<T> x = smem[w];
                combine_into(tot, x);
                tot = x;
            }
            if (blk.tile == 0) {
                reinterpret_cast<float2*>(p.chunk_gate)[(blk.bh * nc + blk.chunk) * key_dim + row] = tot.a;
            }
            float2* st = reinterpret_cast<float2*>(p.chunk_state) + ((blk.bh * nc + blk.chunk + 1) * key_dim + row) * value_dim;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                if (blk.col0 + j < value_dim) st[blk.col0 + j] = tot.b[j];
            }
        }
    }
}

// ---- forward: re-scan each chunk from its entering state, fused readout --

template <typename input_t, int T>
__device__ __forceinline__ void scan_forward(const GateloopScanParams& p) {
    using Tr = InputTraits<input_t>;
    __shared__ Agg<T> warp_agg[2][kMaxWarps];
    const Block<input_t, T> blk(p, p.num_chunks);
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t len = p.dims.len;
    const int64_t nc = p.num_chunks;
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    // The thread whose segment holds step L − 1 writes h_final.
    const bool owns_last = blk.t_first <= len - 1 && len - 1 < blk.t_first + kSteps;
    const input_t* __restrict__ q = blk.q;

    float vv[kSteps][T];
    blk.load_v(vv);
    float yy[kSteps][T];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
        for (int j = 0; j < T; ++j) yy[s][j] = 0.f;
    }
    float2 a[kSteps];
    float kk[kSteps];
    for (int64_t row = 0; row < key_dim; ++row) {
        if (row == 0 || !blk.per_head_gate) blk.load_gate(row, a);
        blk.load_key(row, kk);
        Agg<T>* smem = warp_agg[row & 1];
        const Agg<T> incl = blk.block_scan(a, kk, vv, smem);
        // The lane's exclusive prefix: lane − 1's inclusive value.
        const Agg<T> excl = shfl_up(incl, 1);

        // The state entering the chunk.
        float2 hs[T];
        entering_states(hs, p.chunk_state, has_h0 ? p.h0 : nullptr, p.h0_strides, nc, blk.bh, blk.chunk, blk.b, blk.h,
                        key_dim, value_dim, row, blk.col0);
        // Through the aggregates of the earlier warps (in order), then
        // through the lane's exclusive prefix.
        enter_thread(smem, blk.warp, blk.lane, excl, hs);
        // The S steps again, from the entering state, with the readout.
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = blk.t_first + s;
            const float qq = t < len ? Tr::load(q, t * p.q_strides.time + row) : 0.f;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                hs[j] = step(a[s], kk[s] * vv[s][j], hs[j]);
                yy[s][j] = fmaf(qq, hs[j].x, yy[s][j]);
            }
        }
        if (owns_last) {
            float2* hf = reinterpret_cast<float2*>(p.h_final) + state_index(p.h_final_strides, blk.b, blk.h, row, 0);
#pragma unroll
            for (int j = 0; j < T; ++j) {
                if (blk.col0 + j < value_dim) hf[blk.col0 + j] = hs[j];
            }
        }
    }

    input_t* __restrict__ y = seq_row_mut<input_t>(p.y, p.y_strides, blk.b, blk.h);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
        const int64_t t = blk.t_first + s;
#pragma unroll
        for (int j = 0; j < T; ++j) {
            if (t < len && blk.col0 + j < value_dim) Tr::store(y, t * p.y_strides.time + blk.col0 + j, yy[s][j]);
        }
    }
}

// ---- carry: the state entering each chunk --------------------------------

__device__ __forceinline__ void scan_carry(const GateloopScanParams& p) {
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const int64_t bh = e.bh, row = e.row, col = e.col;
    const BatchHead bhi = e.bhi;
    const int64_t nc = p.num_chunks;
    const int64_t b = bhi.b, h = bhi.h;

    float2 s = make_float2(0.f, 0.f);
    if ((p.flags & GATELOOP_FLAG_HAS_H0) != 0) {
        s = reinterpret_cast<const float2*>(p.h0)[state_index(p.h0_strides, b, h, row, col)];
    }
    float2* st = reinterpret_cast<float2*>(p.chunk_state) + (bh * nc * key_dim + row) * value_dim + col;
    const float2* ga = reinterpret_cast<const float2*>(p.chunk_gate) + bh * nc * key_dim + row;
    const int64_t st_stride = key_dim * value_dim;
    st[0] = s;
    for (int64_t c = 1; c < nc; ++c) {
        const float2 agg_a = ga[(c - 1) * key_dim];
        const float2 agg_b = st[c * st_stride];
        s = apply(agg_a, agg_b, s);
        st[c * st_stride] = s;
    }
}

}  // namespace scan
}  // namespace gateloop

// ---- entry points ----------------------------------------------------------

// FWD_MIN_BLOCKS: the forward's __launch_bounds__ occupancy hint. 0 leaves
// ptxas its own register budget (every entry that fits it without spilling);
// the 16-bit T = 2 forwards pass 1 (one block of kMaxThreads per SM, so up to
// 255 registers a thread: ~167 used), because under the default budget (128
// registers) they spilled 44 bytes on sm_90 — the widening loads keep a few
// more values live than f32's.
#define GATELOOP_SCAN_ENTRIES(DTYPE, TYPE, T, FWD_MIN_BLOCKS)                                 \
    extern "C" __global__ void __launch_bounds__(gateloop::scan::kMaxThreads)                 \
        gateloop_scan_reduce_##DTYPE##_v##T(const GateloopScanParams p) {                     \
        gateloop::scan::scan_reduce<TYPE, T>(p);                                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(gateloop::scan::kMaxThreads, FWD_MIN_BLOCKS) \
        gateloop_scan_forward_##DTYPE##_v##T(const GateloopScanParams p) {                    \
        gateloop::scan::scan_forward<TYPE, T>(p);                                             \
    }

static_assert(4 == GATELOOP_SCAN_MAX_VALUE_TILE, "one entry point per T in {1, 2, 4}");

GATELOOP_SCAN_ENTRIES(f32, float, 1, 0)
GATELOOP_SCAN_ENTRIES(f32, float, 2, 0)
GATELOOP_SCAN_ENTRIES(f32, float, 4, 0)
GATELOOP_SCAN_ENTRIES(f16, __half, 1, 0)
GATELOOP_SCAN_ENTRIES(f16, __half, 2, 1)
GATELOOP_SCAN_ENTRIES(f16, __half, 4, 0)
GATELOOP_SCAN_ENTRIES(bf16, __nv_bfloat16, 1, 0)
GATELOOP_SCAN_ENTRIES(bf16, __nv_bfloat16, 2, 1)
GATELOOP_SCAN_ENTRIES(bf16, __nv_bfloat16, 4, 0)

extern "C" __global__ void __launch_bounds__(GATELOOP_SCAN_CARRY_BLOCK)
    gateloop_scan_carry(const GateloopScanParams p) {
    gateloop::scan::scan_carry(p);
}
