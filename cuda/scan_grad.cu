// The backward of the fused scan (cuda/scan.cu): gradients of
// L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final) with respect to q, k, v,
// log_gate and h0 (the convention of src/reference/grad.rs).
//
// The adjoint δ_t = ∂L/∂h_t is a linear recurrence run backwards in time
// with conjugated gates,
//
//   δ_t = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t,   δ_L := dh_final, a_L := 1,
//
// whose element at step t is (conj(a_{t+1}), q_t[k] dy_t[v]): the forward's
// scan machinery (cuda/scan.cuh) with time reversed. Per step, with h_{t−1}
// recomputed from chunk-boundary checkpoints:
//
//   dq_t[k] = Σ_v dy_t[v] Re h_t[k, v]       dk_t[k] = Σ_v Re δ_t[k, v] v_t[v]
//   dv_t[v] = Σ_k Re δ_t[k, v] k_t[k]        dg_t[k] = conj(a_t[k]) Σ_v conj(h_{t−1}[k, v]) δ_t[k, v]
//   dh0 = conj(a_0) ⊙ δ_0                    (a per-head gate sums dg over k)
//
// Launches (one stream; the first four only when num_chunks > 1):
//   1–2. the forward's gateloop_scan_reduce / gateloop_scan_carry: the state
//        entering every chunk (the only forward states stored);
//   3.   scan_grad_reduce: the reverse aggregate of every chunk but the first
//        (as the forward's reduce, with time reversed);
//   4.   scan_grad_carry: per (b, h, k, v), the adjoint entering each chunk
//        from its right, D_{nc−1} = dh_final, D_c = A_{c+1} D_{c+1} + B_{c+1};
//   5.   scan_grad: one block per (b, h, chunk). For each value tile (T
//        columns per thread, in order) and each key row (in order):
//        - the forward block scan and the thread's serial re-run from the
//          state entering its steps (exactly scan_forward's steps 1–6),
//          keeping h_{t−1}[s][j] in registers; dq's sum over the tile's
//          columns;
//        - the reverse block scan: the thread's serial fold of its S steps
//          from the last, a Hillis–Steele scan over the lanes with
//          __shfl_down_sync (a lane < 32 − offset combines the value of
//          lane + offset, which is later in time, in front of its own), the
//          warp aggregates through shared memory folded from warp W − 1 down
//          to warp + 1, then the lane's exclusive prefix (lane + 1's
//          inclusive value); the adjoint entering the chunk pushed through
//          them; the serial re-run from the thread's last step down, with
//          dk and the gate's Σ_v conj(h_{t−1}) δ over the tile's columns
//          and dv += Re δ · k_t[k] (registers, over k in order);
//        - the thread owning step t writes dq, dk and the per-channel gate
//          gradient of (t, k) for the first tile and adds to them for the
//          later tiles (it owns them in every tile: no atomics, a fixed
//          order, deterministic); dv and the per-head gate (summed over k
//          in a register) at the end of the tile.
// Steps past L are the identity (a = 1, k = q = v = dy = 0), so the padding
// of the last chunk carries dh_final through unchanged.
//
// Element types: q, k, v, dy and dq, dk, dv are f32, f16 or bf16 (the entry
// point's infix; InputTraits widens each load to f32); log_gate, h0,
// dh_final, dlog_gate, dh0 and the workspace are complex f32 for every type,
// and all arithmetic is f32. Each 16-bit output is rounded once: dv at its
// single store; dq and dk, summed over the value tiles, keep their running
// sums in f32 (the f32 outputs themselves; for 16-bit types with several
// tiles the dq_acc / dk_acc workspace) and the last tile rounds the total.
//
// Memory: the workspace holds the forward's chunk gates and states and the
// reverse ones, 2 · B·H·chunks·K·(V + 1) complex: never O(L·K·V).
//
// src/cpu/scan_grad.rs mirrors this operation for operation (the reverse
// scan there is the forward's CPU scan on the time-reversed chunk, which is
// the same arithmetic in the same order).

#include "scan.cuh"

namespace gateloop {
namespace scan_grad {

using scan::Agg;
using scan::Block;
using scan::combine_into;
using scan::kFull;
using scan::kMaxThreads;
using scan::kMaxWarps;
using scan::kSteps;
using scan::shfl_down;
using scan::shfl_up;
using scan::step;

__device__ __forceinline__ float2 conj(float2 z) { return make_float2(z.x, -z.y); }

// conj(x) · y + acc (explicit fmaf, mirrored by conj_mul_add in src/cpu/scan_grad.rs).
__device__ __forceinline__ float2 conj_mul_add(float2 x, float2 y, float2 acc) {
    return make_float2(fmaf(x.x, y.x, fmaf(x.y, y.y, acc.x)), fmaf(x.x, y.y, fmaf(-x.y, y.x, acc.y)));
}

// The reverse block scan of one key row: elements (alpha[s], coef[s] · x[s][j])
// taken from the thread's last step down, lanes from 31 down, warps from
// W − 1 down. Returns the lane's inclusive value (its steps and everything
// after them in the warp); `smem` holds the W warp aggregates (each stored
// by lane 0) after the barrier.
template <int T>
__device__ __forceinline__ Agg<T> block_scan_reverse(const float2 (&alpha)[kSteps], const float (&coef)[kSteps],
                                                     const float (&x)[kSteps][T], int lane, int warp, Agg<T>* smem) {
    Agg<T> r;
    r.a = alpha[kSteps - 1];
#pragma unroll
    for (int j = 0; j < T; ++j) r.b[j] = make_float2(coef[kSteps - 1] * x[kSteps - 1][j], 0.f);
#pragma unroll
    for (int s = kSteps - 2; s >= 0; --s) {
#pragma unroll
        for (int j = 0; j < T; ++j) r.b[j] = step(alpha[s], coef[s] * x[s][j], r.b[j]);
        r.a = cmul(alpha[s], r.a);
    }
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
        const Agg<T> earlier = shfl_down(r, offset);
        if (lane + offset < 32) combine_into(earlier, r);
    }
    if (lane == 0) smem[warp] = r;
    __syncthreads();
    return r;
}

// ---- reverse reduce: the reverse aggregate of chunks 1..num_chunks − 1 --------

template <typename input_t, int T>
__device__ __forceinline__ void grad_reduce(const GateloopScanGradParams& g) {
    using Tr = InputTraits<input_t>;
    const GateloopScanParams& p = g.fwd;
    __shared__ Agg<T> warp_agg[2][kMaxWarps];
    const int64_t nc = p.num_chunks;
    int64_t idx = blockIdx.x;
    const int64_t chunk = split_index(idx, nc - 1) + 1;
    const int64_t tile = split_index(idx, g.value_tiles);
    const Block<input_t, T> blk(p, chunk, tile, idx);
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t len = p.dims.len;
    const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h);
    const int64_t col0 = tile * T;

    float dyv[kSteps][T];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
        const int64_t t = blk.t_first + s;
#pragma unroll
        for (int j = 0; j < T; ++j) {
            dyv[s][j] = (t < len && col0 + j < value_dim) ? Tr::load(dy, t * g.dy_strides.time + col0 + j) : 0.f;
        }
    }
    float2 a[kSteps];
    float2 a_next = make_float2(1.f, 0.f);
    float qq[kSteps];
    const int64_t t_next = blk.t_first + kSteps;
    for (int64_t row = 0; row < key_dim; ++row) {
        if (row == 0 || !blk.per_head_gate) {
            blk.load_gate(row, a);
            const int64_t gi = blk.per_head_gate ? 0 : row;
            a_next = t_next < len ? complex_gate(load_complex(blk.gate, t_next * p.gate_strides.time + gi))
                                  : make_float2(1.f, 0.f);
        }
        float2 alpha[kSteps];
#pragma unroll
        for (int s = 0; s < kSteps; ++s) alpha[s] = conj(s + 1 < kSteps ? a[s + 1] : a_next);
        blk.load_row(blk.q, p.q_strides, row, qq);
        Agg<T>* smem = warp_agg[row & 1];
        block_scan_reverse(alpha, qq, dyv, blk.lane, blk.warp, smem);
        if (blk.tid == 0) {
            Agg<T> tot = smem[p.warps - 1];
            for (int w = p.warps - 2; w >= 0; --w) {
                Agg<T> x = smem[w];
                combine_into(tot, x);
                tot = x;
            }
            const int64_t slot = (blk.bh * nc + chunk - 1) * key_dim + row;
            if (tile == 0) reinterpret_cast<float2*>(g.rev_gate)[slot] = tot.a;
            float2* st = reinterpret_cast<float2*>(g.rev_state) + slot * value_dim;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                if (col0 + j < value_dim) st[col0 + j] = tot.b[j];
            }
        }
    }
}

// ---- reverse carry: the adjoint entering each chunk from its right -----------

__device__ __forceinline__ void grad_carry(const GateloopScanGradParams& g) {
    const GateloopScanParams& p = g.fwd;
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const int64_t bh = e.bh, row = e.row, col = e.col;
    const BatchHead bhi = e.bhi;
    const int64_t nc = p.num_chunks;

    float2 s = make_float2(0.f, 0.f);
    if (g.dh_final != nullptr) {
        s = reinterpret_cast<const float2*>(g.dh_final)[state_index(g.dh_final_strides, bhi.b, bhi.h, row, col)];
    }
    float2* st = reinterpret_cast<float2*>(g.rev_state) + (bh * nc * key_dim + row) * value_dim + col;
    const float2* ga = reinterpret_cast<const float2*>(g.rev_gate) + bh * nc * key_dim + row;
    const int64_t st_stride = key_dim * value_dim;
    st[(nc - 1) * st_stride] = s;
    for (int64_t c = nc - 2; c >= 0; --c) {
        s = apply(ga[c * key_dim], st[c * st_stride], s);
        st[c * st_stride] = s;
    }
}

// ---- the gradients ------------------------------------------------------------

// dq or dk element i: the sum over the value tiles of the partials, in tile
// order, in f32 (in `acc`, which for f32 is `out` itself), stored in the
// element type by the last tile (rounded once).
template <typename input_t>
__device__ __forceinline__ void tile_sum(input_t* out, float* acc, int64_t i, int64_t tile, int64_t tiles,
                                         float partial) {
    const float sum = tile == 0 ? partial : acc[i] + partial;
    if (tile == tiles - 1) {
        InputTraits<input_t>::store(out, i, sum);
    } else {
        acc[i] = sum;
    }
}

// The f32 running sums of dq or dk (the (b, h) row of `acc`): the output
// itself for f32, else the workspace `acc` (only read with several tiles).
template <typename input_t>
__device__ __forceinline__ float* tile_acc(input_t* out, float* acc, const GateloopSeqStrides& s, int64_t b,
                                           int64_t h) {
    if constexpr (InputTraits<input_t>::kDtype == GATELOOP_DTYPE_F32) {
        return out;
    } else {
        return acc == nullptr ? nullptr : seq_row_mut<float>(acc, s, b, h);
    }
}

// dlog_gate element i (complex f32 for every type): the partial for the
// first tile, out[i] + partial after it.
__device__ __forceinline__ void tile_sum(float2* out, int64_t i, int64_t tile, float2 partial) {
    if (tile == 0) {
        out[i] = partial;
    } else {
        const float2 o = out[i];
        out[i] = make_float2(o.x + partial.x, o.y + partial.y);
    }
}

template <typename input_t, int T>
__device__ __forceinline__ void grad(const GateloopScanGradParams& g) {
    using Tr = InputTraits<input_t>;
    const GateloopScanParams& p = g.fwd;
    __shared__ Agg<T> fwd_agg[2][kMaxWarps];
    __shared__ Agg<T> rev_agg[2][kMaxWarps];
    const int64_t nc = p.num_chunks;
    int64_t idx = blockIdx.x;
    const int64_t chunk = split_index(idx, nc);
    const int64_t bh = idx;
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t len = p.dims.len;
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const bool per_head = p.dims.gate_dim == 1;

    for (int64_t tile = 0; tile < g.value_tiles; ++tile) {
        const Block<input_t, T> blk(p, chunk, tile, bh);
        const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h);
        input_t* __restrict__ dq = seq_row_mut<input_t>(g.dq, g.dq_strides, blk.b, blk.h);
        input_t* __restrict__ dk = seq_row_mut<input_t>(g.dk, g.dk_strides, blk.b, blk.h);
        float* dq_acc = tile_acc(dq, g.dq_acc, g.dq_strides, blk.b, blk.h);
        float* dk_acc = tile_acc(dk, g.dk_acc, g.dk_strides, blk.b, blk.h);
        float2* __restrict__ dgate = reinterpret_cast<float2*>(g.dlog_gate) +
                                     (blk.b * g.dgate_strides.batch + blk.h * g.dgate_strides.head);
        const int64_t t_next = blk.t_first + kSteps;

        float vv[kSteps][T];
        blk.load_v(vv);
        float dyv[kSteps][T];
        float dvv[kSteps][T];
        float2 dg_head[kSteps];
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = blk.t_first + s;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                const int64_t c = blk.col0 + j;
                dyv[s][j] = (t < len && c < value_dim) ? Tr::load(dy, t * g.dy_strides.time + c) : 0.f;
                dvv[s][j] = 0.f;
            }
            dg_head[s] = make_float2(0.f, 0.f);
        }
        float2 a[kSteps];
        float2 a_next = make_float2(1.f, 0.f);
        float kk[kSteps];
        float qq[kSteps];
        for (int64_t row = 0; row < key_dim; ++row) {
            if (row == 0 || !per_head) {
                blk.load_gate(row, a);
                const int64_t gi = per_head ? 0 : row;
                a_next = t_next < len ? complex_gate(load_complex(blk.gate, t_next * p.gate_strides.time + gi))
                                      : make_float2(1.f, 0.f);
            }
            blk.load_key(row, kk);
            blk.load_row(blk.q, p.q_strides, row, qq);

            // The forward: h_{t−1} of the thread's steps, dq.
            float2 hp[kSteps][T];
            {
                Agg<T>* smem = fwd_agg[row & 1];
                const Agg<T> incl = blk.block_scan(a, kk, vv, smem);
                const Agg<T> excl = shfl_up(incl, 1);
                float2 hs[T];
                scan::entering_states(hs, p.chunk_state, has_h0 ? p.h0 : nullptr, p.h0_strides, nc, bh, chunk, blk.b,
                                      blk.h, key_dim, value_dim, row, blk.col0);
                scan::enter_thread(smem, blk.warp, blk.lane, excl, hs);
#pragma unroll
                for (int s = 0; s < kSteps; ++s) {
                    const int64_t t = blk.t_first + s;
                    float part = 0.f;
#pragma unroll
                    for (int j = 0; j < T; ++j) {
                        hp[s][j] = hs[j];
                        hs[j] = step(a[s], kk[s] * vv[s][j], hs[j]);
                        part = fmaf(dyv[s][j], hs[j].x, part);
                    }
                    if (t < len) tile_sum(dq, dq_acc, t * g.dq_strides.time + row, tile, g.value_tiles, part);
                }
            }

            // The adjoint, backwards: dk, dv, the gate, dh0.
            float2 alpha[kSteps];
#pragma unroll
            for (int s = 0; s < kSteps; ++s) alpha[s] = conj(s + 1 < kSteps ? a[s + 1] : a_next);
            Agg<T>* smem = rev_agg[row & 1];
            const Agg<T> incl = block_scan_reverse(alpha, qq, dyv, blk.lane, blk.warp, smem);
            const Agg<T> excl = shfl_down(incl, 1);
            float2 ds[T];
            scan::entering_states(ds, g.rev_state, g.dh_final, g.dh_final_strides, nc, bh, chunk, blk.b, blk.h, key_dim,
                                  value_dim, row, blk.col0);
            // Through the aggregates of the later warps (from the last),
            // then the lane's exclusive prefix.
            if (blk.warp < p.warps - 1) {
                Agg<T> pre = smem[p.warps - 1];
                for (int w = p.warps - 2; w > blk.warp; --w) {
                    Agg<T> x = smem[w];
                    combine_into(pre, x);
                    pre = x;
                }
#pragma unroll
                for (int j = 0; j < T; ++j) ds[j] = apply(pre.a, pre.b[j], ds[j]);
            }
            if (blk.lane < 31) {
#pragma unroll
                for (int j = 0; j < T; ++j) ds[j] = apply(excl.a, excl.b[j], ds[j]);
            }
#pragma unroll
            for (int s = kSteps - 1; s >= 0; --s) {
                const int64_t t = blk.t_first + s;
                float dk_part = 0.f;
                float2 da = make_float2(0.f, 0.f);
#pragma unroll
                for (int j = 0; j < T; ++j) {
                    ds[j] = step(alpha[s], qq[s] * dyv[s][j], ds[j]);  // δ_t
                    dk_part = fmaf(ds[j].x, vv[s][j], dk_part);
                    dvv[s][j] = fmaf(ds[j].x, kk[s], dvv[s][j]);
                    da = conj_mul_add(hp[s][j], ds[j], da);
                }
                const float2 conj_a = conj(a[s]);
                const float2 dgate_part = cmul(conj_a, da);
                if (t < len) {
                    tile_sum(dk, dk_acc, t * g.dk_strides.time + row, tile, g.value_tiles, dk_part);
                    if (!per_head) tile_sum(dgate, t * g.dgate_strides.time + row, tile, dgate_part);
                }
                dg_head[s] = make_float2(dg_head[s].x + dgate_part.x, dg_head[s].y + dgate_part.y);
                if (t == 0 && g.dh0 != nullptr) {
                    float2* d0 = reinterpret_cast<float2*>(g.dh0) + state_index(g.dh0_strides, blk.b, blk.h, row, 0);
#pragma unroll
                    for (int j = 0; j < T; ++j) {
                        if (blk.col0 + j < value_dim) d0[blk.col0 + j] = cmul(conj_a, ds[j]);
                    }
                }
            }
        }

        input_t* __restrict__ dv = seq_row_mut<input_t>(g.dv, g.dv_strides, blk.b, blk.h);
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            const int64_t t = blk.t_first + s;
            if (t >= len) continue;
#pragma unroll
            for (int j = 0; j < T; ++j) {
                if (blk.col0 + j < value_dim) Tr::store(dv, t * g.dv_strides.time + blk.col0 + j, dvv[s][j]);
            }
            if (per_head) tile_sum(dgate, t * g.dgate_strides.time, tile, dg_head[s]);
        }
    }
}

}  // namespace scan_grad
}  // namespace gateloop

// ---- entry points ----------------------------------------------------------
//
// The gradient kernel states a minimum of 1 block per SM (up to 255
// registers a thread): with the bare thread bound, ptxas (sm_80) capped the
// f32 _v1 variant at 128 registers and spilled; with it, _v1 uses ~150 and
// _v2 ~200 registers, spill-free, for every element type.
// REDUCE_MIN_BLOCKS: the reverse reduce's occupancy hint. 0 leaves ptxas its
// own register budget (every entry that fits it without spilling); the
// 16-bit T = 1 reduces pass 4 (blocks of kMaxThreads per SM: at most 64
// registers a thread, ~62 used), because under the default budget ptxas
// (sm_90) chose 48 registers for them and spilled 4 bytes.

#define GATELOOP_SCAN_GRAD_ENTRIES(DTYPE, TYPE, T, REDUCE_MIN_BLOCKS)                          \
    extern "C" __global__ void __launch_bounds__(gateloop::scan::kMaxThreads, REDUCE_MIN_BLOCKS) \
        gateloop_scan_grad_reduce_##DTYPE##_v##T(const GateloopScanGradParams p) {             \
        gateloop::scan_grad::grad_reduce<TYPE, T>(p);                                          \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(gateloop::scan::kMaxThreads, 1)               \
        gateloop_scan_grad_##DTYPE##_v##T(const GateloopScanGradParams p) {                    \
        gateloop::scan_grad::grad<TYPE, T>(p);                                                 \
    }

static_assert(2 == GATELOOP_SCAN_GRAD_MAX_VALUE_TILE, "one entry point per T in {1, 2}");

GATELOOP_SCAN_GRAD_ENTRIES(f32, float, 1, 0)
GATELOOP_SCAN_GRAD_ENTRIES(f32, float, 2, 0)
GATELOOP_SCAN_GRAD_ENTRIES(f16, __half, 1, 4)
GATELOOP_SCAN_GRAD_ENTRIES(f16, __half, 2, 0)
GATELOOP_SCAN_GRAD_ENTRIES(bf16, __nv_bfloat16, 1, 4)
GATELOOP_SCAN_GRAD_ENTRIES(bf16, __nv_bfloat16, 2, 0)

extern "C" __global__ void __launch_bounds__(GATELOOP_SCAN_CARRY_BLOCK)
    gateloop_scan_grad_carry(const GateloopScanGradParams p) {
    gateloop::scan_grad::grad_carry(p);
}
