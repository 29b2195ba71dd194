// The device code of the fused scan (cuda/scan.cu) that its backward
// (cuda/scan_grad.cu) reuses: the element operator, the segment aggregates
// and their warp shuffles, and the per-block context (index math, loads, the
// forward block scan). See cuda/scan.cu for the algorithm and the mapping.
//
// A header, not a compilation unit (build.rs compiles only cuda/*.cu).

#ifndef GATELOOP_SCAN_CUH
#define GATELOOP_SCAN_CUH

#include "common.cuh"

namespace gateloop {
namespace scan {

// ---- complex arithmetic (mirrored exactly by src/cpu/scan.rs; complex_gate,
// cmul and apply are in common.cuh) -------------------------------------------

constexpr int kSteps = GATELOOP_SCAN_STEPS_PER_THREAD;
constexpr int kMaxWarps = GATELOOP_SCAN_MAX_WARPS;
constexpr int kMaxThreads = 32 * kMaxWarps;
constexpr unsigned kFull = 0xffffffffu;

// One element (a, b) with real b = kv applied to h: a · h + kv.
__device__ __forceinline__ float2 step(float2 a, float kv, float2 h) {
    return apply(a, make_float2(kv, 0.f), h);
}

// The segment aggregate of T columns: one shared A, T values of B.
template <int T>
struct Agg {
    float2 a;
    float2 b[T];
};

// earlier • later, in place into `later`.
template <int T>
__device__ __forceinline__ void combine_into(const Agg<T>& earlier, Agg<T>& later) {
#pragma unroll
    for (int j = 0; j < T; ++j) later.b[j] = apply(later.a, later.b[j], earlier.b[j]);
    later.a = cmul(later.a, earlier.a);
}

template <int T>
__device__ __forceinline__ Agg<T> shfl_up(const Agg<T>& x, int offset) {
    Agg<T> r;
    r.a.x = __shfl_up_sync(kFull, x.a.x, offset);
    r.a.y = __shfl_up_sync(kFull, x.a.y, offset);
#pragma unroll
    for (int j = 0; j < T; ++j) {
        r.b[j].x = __shfl_up_sync(kFull, x.b[j].x, offset);
        r.b[j].y = __shfl_up_sync(kFull, x.b[j].y, offset);
    }
    return r;
}

// The value of lane + offset (the reverse scans of the backward).
template <int T>
__device__ __forceinline__ Agg<T> shfl_down(const Agg<T>& x, int offset) {
    Agg<T> r;
    r.a.x = __shfl_down_sync(kFull, x.a.x, offset);
    r.a.y = __shfl_down_sync(kFull, x.a.y, offset);
#pragma unroll
    for (int j = 0; j < T; ++j) {
        r.b[j].x = __shfl_down_sync(kFull, x.b[j].x, offset);
        r.b[j].y = __shfl_down_sync(kFull, x.b[j].y, offset);
    }
    return r;
}

// Step 5 for one thread: hs (the state entering the chunk) pushed through the
// in-order fold of the aggregates of warps 0..warp − 1 (`smem`), then
// through the lane's exclusive prefix `excl` (lane − 1's inclusive value).
template <int T>
__device__ __forceinline__ void enter_thread(const Agg<T>* smem, int warp, int lane, const Agg<T>& excl,
                                             float2 (&hs)[T]) {
    if (warp > 0) {
        Agg<T> pre = smem[0];
        for (int w = 1; w < warp; ++w) {
            Agg<T> x = smem[w];
            combine_into(pre, x);
            pre = x;
        }
#pragma unroll
        for (int j = 0; j < T; ++j) hs[j] = apply(pre.a, pre.b[j], hs[j]);
    }
    if (lane > 0) {
#pragma unroll
        for (int j = 0; j < T; ++j) hs[j] = apply(excl.a, excl.b[j], hs[j]);
    }
}

// The states of key row `row`, value columns col0 .. col0 + T − 1, that a
// chunk's steps enter with (the forward's h, the backward's adjoint from the
// right): slot (bh, chunk, row) of `chunk_states` ([B·H][nc][K][V] complex,
// written by a carry kernel) when the sequence has several chunks, else the
// boundary state `first` (h0, or dh_final; zero when null); zero past V.
template <int T>
__device__ __forceinline__ void entering_states(float2 (&hs)[T], const float* chunk_states, const float* first,
                                                const GateloopStateStrides& first_strides, int64_t nc, int64_t bh,
                                                int64_t chunk, int64_t b, int64_t h, int64_t key_dim,
                                                int64_t value_dim, int64_t row, int64_t col0) {
#pragma unroll
    for (int j = 0; j < T; ++j) {
        const int64_t c = col0 + j;
        float2 s = make_float2(0.f, 0.f);
        if (c < value_dim) {
            if (nc > 1) {
                s = reinterpret_cast<const float2*>(chunk_states)[((bh * nc + chunk) * key_dim + row) * value_dim + c];
            } else if (first != nullptr) {
                s = reinterpret_cast<const float2*>(first)[state_index(first_strides, b, h, row, c)];
            }
        }
        hs[j] = s;
    }
}

// ---- per-block context ---------------------------------------------------

template <typename input_t, int T>
struct Block {
    using Tr = InputTraits<input_t>;

    const GateloopScanParams& p;
    int lane, warp, tid;
    int64_t bh, b, h, tile, chunk;
    int64_t t_first;  // first step of this thread
    int64_t col0;     // first value column of the tile
    bool per_head_gate;
    const input_t* __restrict__ q;
    const input_t* __restrict__ k;
    const input_t* __restrict__ v;
    const float* __restrict__ gate;  // complex f32 for every input type

    // Block (chunk, tile, bh) from blockIdx.x: chunk fastest over
    // `chunks_in_grid` chunks, then p.value_tiles tiles, then (b, h).
    __device__ __forceinline__ Block(const GateloopScanParams& params, int64_t chunks_in_grid) : p(params) {
        int64_t blk = blockIdx.x;
        const int64_t c = split_index(blk, chunks_in_grid);
        const int64_t t = split_index(blk, p.value_tiles);
        init(c, t, blk);
    }

    // An explicit (chunk, tile, bh): the backward's gradient kernel loops
    // over the value tiles of its chunk.
    __device__ __forceinline__ Block(const GateloopScanParams& params, int64_t chunk_, int64_t tile_, int64_t bh_)
        : p(params) {
        init(chunk_, tile_, bh_);
    }

    __device__ __forceinline__ void init(int64_t chunk_, int64_t tile_, int64_t bh_) {
        lane = threadIdx.x & 31;
        warp = threadIdx.x >> 5;
        tid = threadIdx.x;
        chunk = chunk_;
        tile = tile_;
        bh = bh_;
        const BatchHead bhi = batch_head(bh, p.dims.heads);
        b = bhi.b;
        h = bhi.h;
        t_first = chunk * p.chunk_len + static_cast<int64_t>(tid) * kSteps;
        col0 = tile * T;
        per_head_gate = p.dims.gate_dim == 1;
        q = seq_row<input_t>(p.q, p.q_strides, b, h);
        k = seq_row<input_t>(p.k, p.k_strides, b, h);
        v = seq_row<input_t>(p.v, p.v_strides, b, h);
        gate = complex_seq_row(p.log_gate, p.gate_strides, b, h);
    }

    // v[s][j] of this thread (0 past L or past V).
    __device__ __forceinline__ void load_v(float (&vv)[kSteps][T]) const {
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = t_first + s;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                const int64_t c = col0 + j;
                vv[s][j] = (t < p.dims.len && c < p.dims.value_dim) ? Tr::load(v, t * p.v_strides.time + c) : 0.f;
            }
        }
    }

    // a_t and k_t of key row `row` for this thread's steps (identity past L).
    __device__ __forceinline__ void load_gate(int64_t row, float2 (&a)[kSteps]) const {
        const int64_t g = per_head_gate ? 0 : row;
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = t_first + s;
            a[s] = t < p.dims.len ? complex_gate(load_complex(gate, t * p.gate_strides.time + g))
                                  : make_float2(1.f, 0.f);
        }
    }
    __device__ __forceinline__ void load_key(int64_t row, float (&kk)[kSteps]) const {
        load_row(k, p.k_strides, row, kk);
    }
    // x_t[row] of a [B, L, H, K] tensor (this head's row pointer `x`: k, or q
    // for the backward) for this thread's steps (0 past L).
    __device__ __forceinline__ void load_row(const input_t* __restrict__ x, const GateloopSeqStrides& st, int64_t row,
                                             float (&out)[kSteps]) const {
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = t_first + s;
            out[s] = t < p.dims.len ? Tr::load(x, t * st.time + row) : 0.f;
        }
    }

    // Steps 2–4: the serial fold, the warp scan, the warp aggregates to
    // shared memory. Returns the lane's inclusive warp-scan value; `smem`
    // (this k's buffer) holds the W warp aggregates after the barrier.
    __device__ __forceinline__ Agg<T> block_scan(const float2 (&a)[kSteps], const float (&kk)[kSteps],
                                                 const float (&vv)[kSteps][T], Agg<T>* smem) const {
        Agg<T> x;
        x.a = a[0];
#pragma unroll
        for (int j = 0; j < T; ++j) x.b[j] = make_float2(kk[0] * vv[0][j], 0.f);
#pragma unroll
        for (int s = 1; s < kSteps; ++s) {
#pragma unroll
            for (int j = 0; j < T; ++j) x.b[j] = step(a[s], kk[s] * vv[s][j], x.b[j]);
            x.a = cmul(a[s], x.a);
        }
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
            const Agg<T> earlier = shfl_up(x, offset);
            if (lane >= offset) combine_into(earlier, x);
        }
        if (lane == 31) smem[warp] = x;
        __syncthreads();
        return x;
    }
};

}  // namespace scan
}  // namespace gateloop

#endif  // GATELOOP_SCAN_CUH
