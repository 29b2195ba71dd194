// The recurrent mode of GateLoop on the GPU:
//
//   a_t = exp(log_gate_t)
//   h_t = a_t ⊙ h_{t−1} + k_tᵀ v_t      (complex K×V state, a broadcast along V)
//   y_t = Re(Σ_k q_t[k] · h_t[k, :])
//
// Mapping. One thread block per (b, h, tile of 32 state columns). The block
// is 32 × key_groups threads: lane = column of the tile, warp (threadIdx.y) =
// key group g. Thread (g, lane) keeps the state rows k = g·R + i, i < R, of
// its column in registers (R is a template parameter so the state arrays are
// fully unrolled register arrays; rows ≥ K are zero padding that stays
// zero). Nothing but the outputs ever leaves the registers. A group's rows
// are contiguous so that a step's R reads of the staged gates are one base
// address plus constant offsets (interleaved rows, g + i·key_groups, cost an
// address multiply per row and step).
//
// Time is processed in chunks of chunk_len steps. Per chunk:
//   1. stage: the block computes a_t[k] = exp(log_gate) once per (t, k) and
//      stores {Re a, Im a, k_t[k], q_t[k]} as one float4 per (t, k) in shared
//      memory, and the tile's v_t columns; global loads are coalesced along
//      the contiguous last dimension, and each thread issues kLoadsInFlight
//      independent loads before it uses one (staged, common.cuh: one global
//      round trip per batch, not per element; the H200 measured ~0.55 µs per
//      step, the same with 1 and 2 blocks per SM, i.e. latency-bound);
//   2. recur: every thread advances its R rows through the chunk; per step and
//      row it reads one float4 that all 32 lanes of the warp share (a
//      broadcast, no bank conflict), and accumulates its partial readout
//      Σ_{its rows} q·Re h into a register, stored once per step to shared
//      memory [t][g][lane] (conflict free);
//   3. reduce: the block sums the key_groups partials of each (t, column) and
//      writes y with coalesced stores.
// Two __syncthreads per chunk; no atomics; every y element written once.
//
// That is the batched staging (gateloop_recurrent_*): a chunk's loads finish
// before its recurrence starts, so each chunk waits out its global round
// trips. The ahead staging (gateloop_recurrent_ahead_*, kAhead) issues the
// NEXT chunk's loads into registers before step 2 and does step 1's
// exponentials and stores after step 3, so the round trip overlaps the
// recurrence; the barrier after those stores is the chunk's second. Same
// arithmetic, same order: bit for bit the batched kernel's y and h_final.
// Its registers hold at most kAheadItems items a thread (the plan shortens
// the chunk to fit; the ABI header's bound), which costs up to 128
// registers against the batched kernel's 64 at R = 8.
//
// The reduction over K is thus: over a thread's own rows in registers, then
// over the key groups through shared memory, amortised over a whole chunk.
//
// The complex gate: a = 2^(Re·log2 e) · (cos Im, sin Im). A reset,
// Re = −inf, gives exp2f(−inf) = 0 exactly, so a = (±0, ±0) and h_t = k_tᵀv_t.
//
// Real gates (kComplex = false, the gateloop_recurrent_real_* entries; gated
// linear attention): log_gate, h0 and h_final are real f32, a = 2^(g·log2 e),
// and the state is real, R registers a thread instead of 2R; one fmaf a row
// and step where the complex step takes three, and no sincos in the staging.
// The stage keeps its float4 layout (Im a = 0), so the plan is the complex
// one. On the same real gates the complex kernel's steps reduce to exactly
// these operations (its Im parts stay 0), so both give the same bits.
//
// Input types: q, k, v and y have the input type (f32, f16 or bf16; the
// InputTraits<T> hook converts loads/stores, rounding y to nearest even);
// log_gate, the state (h0, h_final) and all arithmetic and accumulation are
// f32 for every input type. One template, one extern "C" entry point per
// (dtype, R).
//
// Decode (GATELOOP_FLAG_STATE_IN_PLACE): the initial state is read from
// h_final and the final state written back over it. Aliasing argument: thread
// (lane, g) of block (b, h, tile) reads exactly the elements
// (b, h, g·R + i, 32·tile + lane), i < R, into registers before the
// time loop, and writes exactly those elements after it; no other thread of
// any block reads or writes them (blocks own disjoint (b, h, tile), threads of
// a block disjoint (row, column)). So every element is read before it is
// written, by its only reader and writer, and the kernel needs no barrier for
// it. The state is accessed through plain (non-restrict, non-__ldg) pointers
// on that path.

#include "common.cuh"

namespace gateloop {

// ---- the kernel body -----------------------------------------------------

constexpr int kValueTile = GATELOOP_RECURRENT_VALUE_TILE;
constexpr int kMaxThreads = GATELOOP_RECURRENT_VALUE_TILE * GATELOOP_RECURRENT_MAX_KEY_GROUPS;
static_assert(kValueTile == 32, "one lane per column of the tile");

template <typename input_t, int R, bool kAhead, bool kComplex>
__device__ __forceinline__ void recurrent_forward(const GateloopRecurrentParams& p) {
    using Tr = InputTraits<input_t>;

    const int lane = threadIdx.x;  // column within the tile
    const int group = threadIdx.y; // key group (warp)
    const int key_groups = p.key_groups;
    const int kp = p.padded_key_dim;  // == key_groups * R
    const int chunk = p.chunk_len;
    const int tid = group * kValueTile + lane;
    const int nthreads = kValueTile * key_groups;
    // Staging items of one chunk a thread holds in registers (kAhead).
    constexpr int kAheadItems = R < 16 ? GATELOOP_RECURRENT_AHEAD_ITEMS : GATELOOP_RECURRENT_AHEAD_ITEMS_R16;
    // The plan's promise (the ABI header); a plan that breaks it is a host bug.
    if (kAhead && (chunk * R > kAheadItems * kValueTile || chunk > kAheadItems * key_groups)) __trap();

    // Block → (b, h, tile); 64-bit throughout.
    int64_t blk = blockIdx.x;
    const int64_t tile = split_index(blk, p.value_tiles);
    const BatchHead bhi = batch_head(blk, p.dims.heads);
    const int64_t b = bhi.b, h = bhi.h;

    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const bool per_head_gate = p.dims.gate_dim == 1;
    const int64_t col0 = tile * kValueTile;
    const int64_t col = col0 + lane;
    const bool col_ok = col < value_dim;

    // The block's sequence: batch row b, steps 0 .. L; or packed (the ABI
    // header), sequence b = steps first .. first + len of batch row 0, whose
    // rows below start at step `first` (the state stays indexed by b).
    // Its first step and length are kept in shared memory (the last
    // GATELOOP_RECURRENT_SEQUENCE_BYTES of the block's, after the partial
    // readouts below) and read where needed (the compiler reloads them after
    // each barrier), so they cost no register across the recurrence (held
    // in registers, they made ptxas spill).
    extern __shared__ float4 smem[];
    int64_t* seq_s =
        reinterpret_cast<int64_t*>(reinterpret_cast<float*>(smem + chunk * kp) + chunk * kValueTile * (1 + key_groups));
    const int64_t& seq_first_s = seq_s[0];
    const int64_t& seq_len_s = seq_s[1];
    const bool packed = p.cu_seqlens != nullptr;
    if (tid == 0) {
        seq_s[0] = packed ? p.cu_seqlens[b] : 0;
        seq_s[1] = packed ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.dims.len;
    }
    __syncthreads();
    const int64_t seq_b = packed ? 0 : b;
    const input_t* __restrict__ q = seq_row<input_t>(p.q, p.q_strides, seq_b, h);
    const input_t* __restrict__ k = seq_row<input_t>(p.k, p.k_strides, seq_b, h);
    const input_t* __restrict__ v = seq_row<input_t>(p.v, p.v_strides, seq_b, h);
    // log_gate is complex f32 for every input type (real f32: !kComplex).
    const float* __restrict__ gate =
        kComplex ? complex_seq_row(p.log_gate, p.gate_strides, seq_b, h) : seq_row<float>(p.log_gate, p.gate_strides, seq_b, h);
    input_t* __restrict__ y = seq_row_mut<input_t>(p.y, p.y_strides, seq_b, h);

    // Shared memory: [chunk][kp] float4 {Re a, Im a, k, q}, then [chunk][32]
    // v, then [chunk][key_groups][32] partial readouts, then the sequence
    // (above).
    float4* __restrict__ stage = smem;
    float* __restrict__ v_s = reinterpret_cast<float*>(stage + chunk * kp);
    float* __restrict__ part_s = v_s + chunk * kValueTile;

    // The state of rows group·R + i, column col. In place (decode),
    // the initial state is h_final itself: see the aliasing argument at the
    // top; these are the same elements this thread writes at the end.
    float hr[R], hi[R];
    const bool in_place = (p.flags & GATELOOP_FLAG_STATE_IN_PLACE) != 0;
    const bool has_init = in_place || (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const float* init = static_cast<const float*>(in_place ? p.h_final : p.h0);
    const GateloopStateStrides init_strides = in_place ? p.h_final_strides : p.h0_strides;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int64_t row = group * R + i;
        float2 s = make_float2(0.f, 0.f);
        if (has_init && col_ok && row < key_dim) {
            // Plain loads, not load_gate_side's __ldg: in place, this
            // thread overwrites the element at the end (see the top).
            const int64_t at = state_index(init_strides, b, h, row, col);
            s = kComplex ? reinterpret_cast<const float2*>(init)[at] : make_float2(init[at], 0.f);
        }
        hr[i] = s.x;
        hi[i] = s.y;  // real gates: 0, and never read
    }

    // One staging item: gates, keys and queries of step t0 + idx / kp, row
    // idx % kp; a padding row (≥ K) stages zeros (a = 0, k = q = 0).
    struct Raw {
        float2 g;
        float k, q;
        bool live;
    };
    auto fetch_gate = [&](int64_t t0, int idx) {
        const int tt = idx / kp;
        const int row = idx - tt * kp;
        Raw r{make_float2(0.f, 0.f), 0.f, 0.f, row < key_dim};
        if (r.live) {
            const int64_t t = seq_first_s + t0 + tt;
            const int64_t at = t * p.gate_strides.time + (per_head_gate ? 0 : row);
            r.g = load_gate_side<kComplex>(gate, at);
            r.k = Tr::load(k, t * p.k_strides.time + row);
            r.q = Tr::load(q, t * p.q_strides.time + row);
        }
        return r;
    };
    auto put_gate = [&](int idx, const Raw& r) {
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r.live) {
            const float2 a = gate_of<kComplex>(r.g);
            s = make_float4(a.x, a.y, r.k, r.q);
        }
        stage[idx] = s;
    };
    // One value item: column idx % 32 of the tile at step t0 + idx / 32.
    auto fetch_value = [&](int64_t t0, int idx) {
        const int tt = idx / kValueTile;
        const int64_t c = col0 + (idx - tt * kValueTile);
        return c < value_dim ? Tr::load(v, (seq_first_s + t0 + tt) * p.v_strides.time + c) : 0.f;
    };
    auto put_value = [&](int idx, float x) { v_s[idx] = x; };

    // kAhead: a thread's items of the next chunk (item u = flat index
    // tid + u · nthreads), loaded before the current chunk's recurrence
    // and stored after it; the plan keeps a chunk within kAheadItems items
    // per thread (checked above).
    Raw ahead_gate[kAhead ? kAheadItems : 1];
    float ahead_value[kAhead ? kAheadItems : 1];
    auto fetch_ahead = [&](int64_t t0, int n) {
#pragma unroll
        for (int u = 0; u < kAheadItems; ++u) {
            const int idx = tid + u * nthreads;
            if (idx < n * kp) ahead_gate[u] = fetch_gate(t0, idx);
        }
#pragma unroll
        for (int u = 0; u < kAheadItems; ++u) {
            const int idx = tid + u * nthreads;
            if (idx < n * kValueTile) ahead_value[u] = fetch_value(t0, idx);
        }
    };
    auto put_ahead = [&](int n) {
#pragma unroll
        for (int u = 0; u < kAheadItems; ++u) {
            const int idx = tid + u * nthreads;
            if (idx < n * kp) put_gate(idx, ahead_gate[u]);
        }
#pragma unroll
        for (int u = 0; u < kAheadItems; ++u) {
            const int idx = tid + u * nthreads;
            if (idx < n * kValueTile) put_value(idx, ahead_value[u]);
        }
    };

    if constexpr (kAhead) {
        const int n = static_cast<int>(min(static_cast<int64_t>(chunk), seq_len_s));
        fetch_ahead(0, n);
        put_ahead(n);
        __syncthreads();
    }
    for (int64_t t0 = 0; t0 < seq_len_s; t0 += chunk) {
        const int64_t len = seq_len_s;
        const int n = static_cast<int>(min(static_cast<int64_t>(chunk), len - t0));
        const int64_t t1 = t0 + chunk;
        const int n_next = t1 < len ? static_cast<int>(min(static_cast<int64_t>(chunk), len - t1)) : 0;

        // 1. Batched: stage gates, k, q, then the tile's v, kLoadsInFlight
        // loads per thread in flight (staged). Ahead: issue the next chunk's
        // loads now (this chunk was staged at the end of the previous
        // iteration), so that their round trip overlaps this chunk's
        // recurrence.
        if constexpr (kAhead) {
            if (n_next > 0) fetch_ahead(t1, n_next);
        } else {
            staged<kLoadsInFlight>(
                tid, n * kp, nthreads, [&](int idx) { return fetch_gate(t0, idx); }, put_gate);
            staged<kLoadsInFlight>(
                tid, n * kValueTile, nthreads, [&](int idx) { return fetch_value(t0, idx); }, put_value);
            __syncthreads();
        }

        // 2. recur through the chunk. Each step's reads and its store walk
        // pointers stepped by a constant (no per-step index arithmetic). Not
        // unrolled: ptxas's unroll by two saved a few instructions a step for
        // 12 to 17 more registers (R = 8: 76 on sm_90, one resident block
        // fewer per SM on large grids). As written: ~68 SASS instructions a
        // step at R = 8 (48 of them the arithmetic), 64 registers.
        {
            const float* v_t = v_s + lane;
            const float4* st = stage + group * R;
            float* part_t = part_s + group * kValueTile + lane;
            const int part_step = key_groups * kValueTile;
#pragma unroll 1
            for (int tt = 0; tt < n; ++tt) {
                const float vv = *v_t;
                float acc = 0.f;
#pragma unroll
                for (int i = 0; i < R; ++i) {
                    const float4 s = st[i];
                    // Real gates: the complex step with Im a = Im h = 0
                    // (the same bits as the complex kernel's on such gates).
                    if constexpr (kComplex) {
                        recur(s.x, s.y, hr[i], hi[i], s.z * vv);
                    } else {
                        hr[i] = fmaf(s.x, hr[i], s.z * vv);
                    }
                    acc = fmaf(s.w, hr[i], acc);
                }
                *part_t = acc;
                v_t += kValueTile;
                st += kp;
                part_t += part_step;
            }
        }
        __syncthreads();

        // 3. reduce over key groups, write y. (Batched: the next chunk's
        // staging only touches stage/v_s, which nobody reads after the
        // barrier above; the next partials are written after the next
        // staging barrier.)
        for (int idx = tid; idx < n * kValueTile; idx += nthreads) {
            const int tt = idx / kValueTile;
            const int c = idx - tt * kValueTile;
            const int64_t cc = col0 + c;
            if (cc < value_dim) {
                const float* ps = part_s + tt * key_groups * kValueTile + c;
                float sum = 0.f;
                for (int j = 0; j < key_groups; ++j) sum += ps[j * kValueTile];
                Tr::store(y, (seq_first_s + t0 + tt) * p.y_strides.time + cc, sum);
            }
        }

        // 4. Ahead: stage the next chunk (stage and v_s: their last readers,
        // step 2, passed the barrier above). The barrier after it also
        // orders step 3's reads of part_s before the next step 2's writes.
        if constexpr (kAhead) {
            if (n_next > 0) {
                put_ahead(n_next);
                __syncthreads();
            }
        }
    }

    // h_final (in place: the elements read above, by this same thread).
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int64_t row = group * R + i;
        if (col_ok && row < key_dim) {
            store_gate_side<kComplex>(p.h_final, state_index(p.h_final_strides, b, h, row, col),
                                      make_float2(hr[i], hi[i]));
        }
    }
}

}  // namespace gateloop

// ---- entry points: gateloop_recurrent_[real_][ahead_]<dtype>_r<R> --------
//
// gateloop_recurrent_{dtype}_r{R}: batched staging (load, stage, recur in
// turn). gateloop_recurrent_ahead_{dtype}_r{R}: the next chunk's loads in
// flight during each chunk's recurrence (RecurrentStaging::Ahead in
// src/cuda/recurrent.rs). gateloop_recurrent_real_{,ahead_}{dtype}_r{R}: the
// same with real gates (gated linear attention: log_gate, h0, h_final real
// f32; recurrent::forward_real_into).

#define GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, R, AHEAD, COMPLEX)                        \
    extern "C" __global__ void __launch_bounds__(gateloop::kMaxThreads)                       \
        gateloop_recurrent_##NAME##DTYPE##_r##R(const GateloopRecurrentParams p) {            \
        gateloop::recurrent_forward<TYPE, R, AHEAD, COMPLEX>(p);                              \
    }

static_assert(16 == GATELOOP_RECURRENT_MAX_ROWS, "one entry point per R in {1, 2, 4, 8, 16}");

#define GATELOOP_RECURRENT_ENTRIES(NAME, DTYPE, TYPE, AHEAD, COMPLEX)  \
    GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, 1, AHEAD, COMPLEX)    \
    GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, 2, AHEAD, COMPLEX)    \
    GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, 4, AHEAD, COMPLEX)    \
    GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, 8, AHEAD, COMPLEX)    \
    GATELOOP_RECURRENT_ENTRY(NAME, DTYPE, TYPE, 16, AHEAD, COMPLEX)

GATELOOP_RECURRENT_ENTRIES(, f32, float, false, true)
GATELOOP_RECURRENT_ENTRIES(, f16, __half, false, true)
GATELOOP_RECURRENT_ENTRIES(, bf16, __nv_bfloat16, false, true)
GATELOOP_RECURRENT_ENTRIES(ahead_, f32, float, true, true)
GATELOOP_RECURRENT_ENTRIES(ahead_, f16, __half, true, true)
GATELOOP_RECURRENT_ENTRIES(ahead_, bf16, __nv_bfloat16, true, true)
GATELOOP_RECURRENT_ENTRIES(real_, f32, float, false, false)
GATELOOP_RECURRENT_ENTRIES(real_, f16, __half, false, false)
GATELOOP_RECURRENT_ENTRIES(real_, bf16, __nv_bfloat16, false, false)
GATELOOP_RECURRENT_ENTRIES(real_ahead_, f32, float, true, false)
GATELOOP_RECURRENT_ENTRIES(real_ahead_, f16, __half, true, false)
GATELOOP_RECURRENT_ENTRIES(real_ahead_, bf16, __nv_bfloat16, true, false)
