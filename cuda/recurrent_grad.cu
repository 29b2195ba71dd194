// The backward of the recurrent mode on the GPU: the adjoint recurrence run
// backwards in time on the forward kernel's mapping (src/reference/grad.rs
// derives it; this file only maps it onto threads).
//
// Per (b, h), with δ̃_t = conj(∂L/∂h_t) (so that it recurs with a, not conj a):
//   δ̃_L       = conj(dh_final) (0 when absent),  a_L = 1
//   δ̃_t       = a_{t+1} ⊙ δ̃_{t+1} + q_tᵀ dy_t
//   dq_t[k]   = Σ_v dy_t[v] Re h_t[k, v]
//   dk_t[k]   = Σ_v v_t[v] Re δ̃_t[k, v]
//   dv_t[v]   = Σ_k k_t[k] Re δ̃_t[k, v]
//   dg_t[k]   = conj(e_t[k]),  e_t = a_t Σ_v h_{t−1} δ̃_t
//   dh0       = conj(a_0) ⊙ conj(δ̃_0)
// The gate term pairs h_{t−1} with δ̃_t, which no single sweep has at the
// same step. The identity e_t = Σ_v h_t δ̃_t − k_t Σ_v v_t δ̃_t would give it
// from one sum per sweep, but it cancels: at a strongly decaying step
// (|a_t| ≪ 1) both sides are O(|k v δ|) and e_t is O(|a_t|), so its f32
// rounding swamps it (the fuzzer's per-element bound failed on 13 of 400
// cases). Instead, per segment of 64 steps t0 … t1, with h_s = h_{t0−1} (the
// state entering it) and d_e = δ̃_{t1}, expanding both factors inside the
// segment (A(i, j) = a_i ⋯ a_j, 1 when j < i; every factor has modulus ≤ 1):
//   e_t = A(t0, t1) I                                   I   = Σ_v h_s d_e
//       + A(t, t1) Σ_{s<t} A(s+1, t−1) k_s X_s          X_s = Σ_v v_s d_e
//       + A(t0, t−1) Σ_{t≤u<t1} A(t, u) q_u Y_u         Y_u = Σ_v h_s dy_u
//       + Σ_{s<t≤u<t1} A(s+1, u) k_s q_u Z_su           Z_su = Σ_v v_s dy_u
// (s, u in the segment): sums of products whose every factor is a product
// of gates, with no cancellation beyond the exact sum's own. The sums over v
// are small products per segment, and the time sums are recurrences that
// only multiply by gates (grad_gate below).
//
// Three launches on one stream (GateloopRecurrentGradParams):
//   1. gateloop_recurrent_grad_fwd_{dtype}_r{R}: the forward recurrence
//      (the forward kernel's block mapping and arithmetic): dq_t over the
//      block's value tile into partial_dq, and the state after every
//      segment's last step into checkpoints;
//   2. gateloop_recurrent_grad_bwd_{dtype}_r{R}: the adjoint recurrence,
//      backwards over the same time chunks: dv (summed over the key groups
//      through shared memory, as the forward's y), dk_t over the tile into
//      partial_dk, δ̃ at every segment's last step into adjoints, and δ_0
//      into dh0;
//   3. gateloop_recurrent_grad_gate_{dtype}: one block per (b, h, segment),
//      one thread per key row: sums the value tiles' dq, dk in order, forms
//      Z, X, Y, I from v, dy and the two checkpoints, the gate gradient by
//      the expansion above, and dh0 = conj(a_0) δ_0.
// Sums over a warp's 32 value columns are shuffle reductions (lane_sums);
// every sum has a fixed order and every output one writer: deterministic,
// no atomics. Memory beyond inputs and gradients: the two checkpoint sets
// (2 · B·H·⌈L/64⌉·K·V complex) and the dq, dk partials (2 · ⌈V/32⌉ ·
// B·H·L·K f32): O(B·H·(L/64)·K·V), never O(L·K·V).
//
// Packed sequences (fwd.cu_seqlens, recurrent_grad::backward_varlen_into;
// the ABI header): block row b of the sweeps is sequence b, its steps
// indexed in the packed row from its first step (GradSeq), its segments
// counted from there; the checkpoints of a head's sequences share one row
// of ⌊L/64⌋ + N slots, and the gate launch's block (h, slot) finds its
// sequence by a binary search over the slot bases (an empty slot returns).
// Each sequence's arithmetic is the batched kernels' on it alone.
//
// Real gates (kComplex = false, the gateloop_recurrent_grad_real_* entries;
// recurrent_grad::backward_real_into): log_gate, h0, dh_final, dlog_gate and
// dh0 are real f32; the sweeps step a real state and adjoint (the complex
// steps at Im a = Im h = 0), the checkpoints and adjoints keep their
// complex layout with Im = 0, and the gate launch runs the expansion above
// on gates of phase 0 and writes Re e (∂L/∂Im g is 0 at real inputs).
//
// q, k, v, dy and dq, dk, dv have the input type (f32, f16 or bf16);
// log_gate, h0, dh_final, dlog_gate, dh0 and every workspace are complex f32
// (the partials f32), and all arithmetic is f32 (each T output rounded once).

#include "common.cuh"

namespace gateloop {

// The block's dynamic shared memory, declared where cuda/recurrent.cu
// declares it (namespace gateloop, float4): the CPU emulator's drivers
// define that one symbol for both files.
__device__ __forceinline__ float4* recurrent_dynamic_shared() {
    extern __shared__ float4 smem[];
    return smem;
}

namespace recurrent_grad {

constexpr int kTile = GATELOOP_RECURRENT_VALUE_TILE;
constexpr int kSegment = GATELOOP_RECURRENT_GRAD_SEGMENT;
static_assert(kTile == 32, "one lane per column of the tile");

__host__ __device__ constexpr int log2_of(int n) { return n <= 1 ? 0 : 1 + log2_of(n / 2); }

// Sums each of the kN values x[j] (kN a power of two ≤ 32) over the warp's
// 32 lanes, as a reduce-scatter: at each lane-bit from 16 down, every lane
// keeps one half of its values and adds its partner's copy of that half
// (kN/2 shuffles), until one value is left, which the remaining bits sum.
// 31 shuffles for kN = 32 instead of 32 · 5. On return x[0] of lane l is
// the full sum of value l >> (5 − log2 kN), the same bits in every lane that
// holds it. All 32 lanes must call it (warp-uniform control flow).
template <int kN, int kOffset>
__device__ __forceinline__ void lane_sums_from(float* x, int lane) {
    if constexpr (kN > 1) {
        constexpr int kHalf = kN / 2;
        const bool upper = (lane & kOffset) != 0;
#pragma unroll
        for (int j = 0; j < kHalf; ++j) {
            const float send = upper ? x[j] : x[j + kHalf];
            const float keep = upper ? x[j + kHalf] : x[j];
            x[j] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
        }
        if constexpr (kOffset > 1) lane_sums_from<kHalf, kOffset / 2>(x, lane);
    } else {
        x[0] += __shfl_xor_sync(0xffffffffu, x[0], kOffset);
        if constexpr (kOffset > 1) lane_sums_from<1, kOffset / 2>(x, lane);
    }
}

// lane_sums_from over all five lane bits; returns which value this lane
// holds, or −1 for the lanes that hold a copy another lane stores.
template <int kN>
__device__ __forceinline__ int lane_sums(float (&x)[kN], int lane) {
    static_assert(kN >= 1 && kN <= 32 && (kN & (kN - 1)) == 0, "a power of two up to the warp");
    lane_sums_from<kN, 16>(x, lane);
    constexpr int kShift = 5 - log2_of(kN);
    return (lane & ((1 << kShift) - 1)) == 0 ? lane >> kShift : -1;
}

// Stores the lane's share of the kRows sums over the warp (state rows
// row0 … row0 + kRows − 1) into a [.., K] f32 row `out` (rows ≥ K are
// padding: not stored).
template <int kRows>
__device__ __forceinline__ void store_row_sums(float (&x)[kRows], int lane, int row0, int64_t key_dim, float* out) {
    const int j = lane_sums(x, lane);
    if (j >= 0 && row0 + j < key_dim) out[row0 + j] = x[0];
}

// Log gate i of a complex (kComplex) or real f32 gate row, resets mapped to
// Re = −inf as load_log_gate does; a real gate reads as (g, 0).
template <bool kComplex>
__device__ __forceinline__ float2 log_gate_side(const float* __restrict__ row, int64_t i) {
    if constexpr (kComplex) {
        return load_log_gate(row, i);
    } else {
        const float g = __ldg(row + i);
        return make_float2(g < GATELOOP_RESET_LOG_GATE ? -INFINITY : g, 0.f);
    }
}

// Where the sequence of a (b, h) lives: batch row b, steps 0 .. L, and
// rows b·H + h of the [B·H, segments, K, V] checkpoints and of the
// [value_tiles, B·H, L, K] partials; or, packed (fwd.cu_seqlens, the ABI
// header), sequence b = steps cu[b] .. cu[b + 1] of batch row 0, and head
// h's rows of [H, segments, K, V] checkpoints from slot ⌊cu[b] / 64⌋ + b
// (packed_slot_base in common.cuh: no two sequences share a slot; ⌊L / 64⌋
// + N slots, the plan's `segments` when packed) and of [value_tiles, H, L,
// K] partials from step cu[b]. Its states (h0, dh_final, dh0) are state b either way. The gate
// launch's row pointers start at the sequence's first step (seq_steps), so
// it indexes steps 0 .. len − 1 as in the batched case; the sweeps index
// the steps first .. end of the batch row (Sweep::first, Sweep::end).
struct GradSeq {
    int64_t row_b;  // the batch row of its steps (0 when packed)
    int64_t first;  // its first step in that row
    int64_t len;    // its steps
    int64_t ws_row; // its row of the checkpoints and partials: b·H + h, or h
    int64_t seg0;   // its first checkpoint slot in that row
};

__device__ __forceinline__ GradSeq grad_seq(const GateloopRecurrentParams& p, int64_t b, int64_t h) {
    if (p.cu_seqlens == nullptr) return GradSeq{b, 0, p.dims.len, b * p.dims.heads + h, 0};
    const int64_t first = p.cu_seqlens[b];
    return GradSeq{0, first, p.cu_seqlens[b + 1] - first, h, packed_slot_base<kSegment>(p.cu_seqlens, b)};
}

// Rows of the [value_tiles, rows, L, K] partial sums: B·H, or H when packed.
__device__ __forceinline__ int64_t partial_rows(const GateloopRecurrentParams& p) {
    return p.cu_seqlens == nullptr ? p.dims.batch * p.dims.heads : p.dims.heads;
}

// The (row_b, h) row of a [B, L, H, D] tensor from the sequence's first
// step (complex f32 rows: `parts` = 2 f32 an element).
template <typename T, int kParts = 1>
__device__ __forceinline__ T* seq_steps(T* base, const GateloopSeqStrides& s, const GradSeq& sq, int64_t h) {
    return base + kParts * (sq.row_b * s.batch + h * s.head + sq.first * s.time);
}

// What both sweeps share: the block's (b, h, value tile), its rows and
// shared-memory layout, and the staging of one time chunk.
template <typename input_t, int R, bool kComplex>
struct Sweep {
    using Tr = InputTraits<input_t>;
    const GateloopRecurrentGradParams& g;
    const GateloopRecurrentParams& p;
    int lane, group, key_groups, kp, chunk, tid, nthreads;
    int64_t tile, b, h, col0, col, key_dim, value_dim;
    bool col_ok, per_head_gate;
    const input_t* __restrict__ q;
    const input_t* __restrict__ k;
    const input_t* __restrict__ v;
    const input_t* __restrict__ dy;
    const float* __restrict__ gate;
    // Shared memory: [chunk][kp] float4 (per sweep), then [chunk][32] v and
    // dy, then [chunk][key_groups][32] partial sums over the rows (the
    // backward sweep's dv), then the sequence (sequence_s).
    float4* stage;
    float* v_s;
    float* dy_s;
    float* part_s;

    __device__ __forceinline__ Sweep(const GateloopRecurrentGradParams& params, float4* smem)
        : g(params), p(params.fwd) {
        lane = threadIdx.x;
        group = threadIdx.y;
        key_groups = p.key_groups;
        kp = p.padded_key_dim;
        chunk = p.chunk_len;
        tid = group * kTile + lane;
        nthreads = kTile * key_groups;
        int64_t blk = blockIdx.x;
        tile = split_index(blk, p.value_tiles);
        const BatchHead bhi = batch_head(blk, p.dims.heads);
        b = bhi.b;
        h = bhi.h;
        key_dim = p.dims.key_dim;
        value_dim = p.dims.value_dim;
        per_head_gate = p.dims.gate_dim == 1;
        col0 = tile * kTile;
        col = col0 + lane;
        col_ok = col < value_dim;
        const int64_t rb = row_b();
        q = seq_row<input_t>(p.q, p.q_strides, rb, h);
        k = seq_row<input_t>(p.k, p.k_strides, rb, h);
        v = seq_row<input_t>(p.v, p.v_strides, rb, h);
        dy = seq_row<input_t>(g.dy, g.dy_strides, rb, h);
        gate = kComplex ? complex_seq_row(p.log_gate, p.gate_strides, rb, h)
                        : seq_row<float>(p.log_gate, p.gate_strides, rb, h);
        stage = smem;
        v_s = reinterpret_cast<float*>(stage + chunk * kp);
        dy_s = v_s + chunk * kTile;
        part_s = dy_s + chunk * kTile;
        if (tid == 0) {
            const GradSeq sq = grad_seq(p, b, h);
            volatile int64_t* ss = sequence_s();
            ss[0] = sq.first;
            ss[1] = sq.first + sq.len;
            ss[2] = sq.ws_row * g.segments + sq.seg0;
            ss[3] = (tile * partial_rows(p) + sq.ws_row) * p.dims.len * key_dim;
        }
        __syncthreads();  // sequence_s
    }

    // The block's sequence (GradSeq) as the sweeps use it. The sweeps
    // index the steps of its batch row (row_b: the row pointers above are
    // arithmetic on the block's index, as in the batched case), from
    // first() to end(), chunks and segments counted from first(); its first
    // checkpoint ck0() = ws_row · segments + seg0, its rows of the partials
    // from part0() = (tile · rows + ws_row) · L · K. Kept in the
    // GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES after the staging
    // (sequence_s), batched or packed alike, and read (volatile) at each
    // use, so they cost no register across the sweep: held in registers
    // (loads when packed), with the row pointers offset by the first step,
    // or chosen by a branch on the packing at each use, or read once and
    // kept (a plain shared read), they made a sweep spill at R = 8.
    __device__ __forceinline__ volatile int64_t* sequence_s() const {
        return reinterpret_cast<volatile int64_t*>(part_s + chunk * key_groups * kTile);
    }
    __device__ __forceinline__ int64_t first() const { return sequence_s()[0]; }
    __device__ __forceinline__ int64_t end() const { return sequence_s()[1]; }
    __device__ __forceinline__ int64_t ck0() const { return sequence_s()[2]; }
    __device__ __forceinline__ int64_t part0() const { return sequence_s()[3]; }
    __device__ __forceinline__ int64_t row_b() const { return p.cu_seqlens == nullptr ? b : 0; }

    // One staged row item: a log gate, and two inputs of the row.
    struct RowRaw {
        float2 log_gate;
        float x, y;
    };

    // Stages steps t0 .. t0 + n − 1: per (step, row) {a, x, y} from the
    // RowRaw that row_raw(t, row) loads for a live row (a padding row
    // stages zeros: log gate −inf), the gate exponentiated after the batch's
    // loads; per (step, column) v and dy. kLoadsInFlight items a thread at a
    // time.
    template <class RowLoad>
    __device__ __forceinline__ void stage_chunk(int64_t t0, int n, RowLoad row_raw) const {
        staged<kLoadsInFlight>(
            tid, n * kp, nthreads,
            [&](int idx) {
                const int tt = idx / kp;
                const int row = idx - tt * kp;
                return row < key_dim ? row_raw(t0 + tt, row) : RowRaw{make_float2(-INFINITY, 0.f), 0.f, 0.f};
            },
            [&](int idx, const RowRaw& r) {
                const float2 a = gate_of<kComplex>(r.log_gate);
                stage[idx] = make_float4(a.x, a.y, r.x, r.y);
            });
        staged<kLoadsInFlight>(
            tid, n * kTile, nthreads,
            [&](int idx) {
                const int tt = idx / kTile;
                const int64_t c = col0 + (idx - tt * kTile);
                const int64_t t = t0 + tt;
                return c < value_dim ? make_float2(Tr::load(v, t * p.v_strides.time + c),
                                                   Tr::load(dy, t * g.dy_strides.time + c))
                                     : make_float2(0.f, 0.f);
            },
            [&](int idx, float2 x) {
                v_s[idx] = x.x;
                dy_s[idx] = x.y;
            });
    }

    // The log gate of step t, state row `row`.
    __device__ __forceinline__ float2 log_gate_at(int64_t t, int row) const {
        return log_gate_side<kComplex>(gate, t * p.gate_strides.time + (per_head_gate ? 0 : row));
    }

    // Whether step t is the last of its segment (or of the sequence).
    __device__ __forceinline__ bool segment_end(int64_t t) const { return (t - first() + 1) % kSegment == 0 || t == end() - 1; }
    // The sequence's segment of step t.
    __device__ __forceinline__ int64_t segment_of(int64_t t) const { return (t - first()) / kSegment; }
    // Element (row, col) of the sequence's segment s in a [rows, segments,
    // K, V] complex workspace (the checkpoints, the adjoints; GradSeq).
    __device__ __forceinline__ int64_t checkpoint_at(int64_t s, int row) const {
        return ((ck0() + s) * key_dim + row) * value_dim + col;
    }
    // Step t of the row in this tile's partial sums ([value_tiles, rows, L,
    // K] f32).
    __device__ __forceinline__ float* partial_row(float* base, int64_t t) const {
        return base + part0() + t * key_dim;
    }
};

// ---- 1. the forward sweep ------------------------------------------------------

template <typename input_t, int R, bool kComplex>
__device__ __forceinline__ void grad_forward(const GateloopRecurrentGradParams& g) {
    using Tr = InputTraits<input_t>;
    using W = Sweep<input_t, R, kComplex>;
    const W w(g, recurrent_dynamic_shared());
    const GateloopRecurrentParams& p = g.fwd;

    float hr[R], hi[R];  // real gates: hi unused (the real step below)
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int row = w.group * R + i;
        float2 s = make_float2(0.f, 0.f);
        if (has_h0 && w.col_ok && row < w.key_dim) {
            s = load_gate_side<kComplex>(p.h0, state_index(p.h0_strides, w.b, w.h, row, w.col));
        }
        hr[i] = s.x;
        hi[i] = s.y;
    }

    float2* ck = reinterpret_cast<float2*>(g.checkpoints);
    for (int64_t t0 = w.first(); t0 < w.end(); t0 += w.chunk) {
        const int n = static_cast<int>(min(static_cast<int64_t>(w.chunk), w.end() - t0));
        // {a_t, k_t}: the forward kernel's step.
        w.stage_chunk(t0, n, [&](int64_t t, int row) {
            return typename W::RowRaw{w.log_gate_at(t, row), Tr::load(w.k, t * p.k_strides.time + row), 0.f};
        });
        __syncthreads();

        const float4* st = w.stage + w.group * R;
        float* out = w.partial_row(g.partial_dq, t0);
#pragma unroll 1
        for (int tt = 0; tt < n; ++tt) {
            const float vv = w.v_s[tt * kTile + w.lane];
            const float dd = w.dy_s[tt * kTile + w.lane];
            float x[R];
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const float4 s = st[i];
                // Real gates: the complex step at Im a = Im h = 0 (the
                // same values; its zero Im parts may differ in sign).
                if constexpr (kComplex) {
                    recur(s.x, s.y, hr[i], hi[i], s.z * vv);
                } else {
                    hr[i] = fmaf(s.x, hr[i], s.z * vv);
                }
                x[i] = dd * hr[i];
            }
            store_row_sums<R>(x, w.lane, w.group * R, w.key_dim, out);
            st += w.kp;
            out += w.key_dim;
        }

        // Chunks divide the segment (the plan's chunk_len | 64), so a
        // segment ends at a chunk's last step.
        const int64_t last = t0 + n - 1;
        if (w.segment_end(last) && w.col_ok) {
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const int row = w.group * R + i;
                if (row < w.key_dim) {
                    ck[w.checkpoint_at(w.segment_of(last), row)] = make_float2(hr[i], kComplex ? hi[i] : 0.f);
                }
            }
        }
        __syncthreads();  // the stage's readers are done before the next chunk's staging
    }
}

// ---- 2. the backward sweep ------------------------------------------------------

template <typename input_t, int R, bool kComplex>
__device__ __forceinline__ void grad_backward(const GateloopRecurrentGradParams& g) {
    using Tr = InputTraits<input_t>;
    using W = Sweep<input_t, R, kComplex>;
    const W w(g, recurrent_dynamic_shared());
    const GateloopRecurrentParams& p = g.fwd;

    // δ̃ = conj(δ) of rows group·R + i, column col: conj(dh_final) at t = L.
    float dr[R], di[R];  // real gates: di unused
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int row = w.group * R + i;
        float2 s = make_float2(0.f, 0.f);
        if (g.dh_final != nullptr && w.col_ok && row < w.key_dim) {
            s = load_gate_side<kComplex>(g.dh_final, state_index(g.dh_final_strides, w.b, w.h, row, w.col));
        }
        dr[i] = s.x;
        di[i] = -s.y;
    }

    float2* adj = reinterpret_cast<float2*>(g.adjoints);
    input_t* dv = seq_row_mut<input_t>(g.dv, g.dv_strides, w.row_b(), w.h);
    const int part_step = w.key_groups * kTile;
    const int64_t chunks = (w.end() - w.first() + w.chunk - 1) / w.chunk;
    for (int64_t c = chunks - 1; c >= 0; --c) {
        const int64_t t0 = w.first() + c * w.chunk;
        const int n = static_cast<int>(min(static_cast<int64_t>(w.chunk), w.end() - t0));
        // {a_{t+1}, k_t, q_t}: the step from δ̃_{t+1} to δ̃_t (a_L = 1).
        w.stage_chunk(t0, n, [&](int64_t t, int row) {
            // log a_L = 0: a_L = 1 exactly.
            return typename W::RowRaw{
                t + 1 < w.end() ? w.log_gate_at(t + 1, row) : make_float2(0.f, 0.f),
                Tr::load(w.k, t * p.k_strides.time + row), Tr::load(w.q, t * p.q_strides.time + row)};
        });
        __syncthreads();

        const float4* st = w.stage + (n - 1) * w.kp + w.group * R;
        float* part_t = w.part_s + (n - 1) * part_step + w.group * kTile + w.lane;
        const int64_t last = t0 + n - 1;
        float* out = w.partial_row(g.partial_dk, last);
        // Step tt: δ̃_{t0+tt} from δ̃_{t0+tt+1}, its dv partial and dk_t.
        auto step = [&](int tt) {
            const float vv = w.v_s[tt * kTile + w.lane];
            const float dd = w.dy_s[tt * kTile + w.lane];
            float x[R];
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const float4 s = st[i];
                if constexpr (kComplex) {
                    recur(s.x, s.y, dr[i], di[i], s.w * dd);
                } else {
                    dr[i] = fmaf(s.x, dr[i], s.w * dd);
                }
                acc = fmaf(s.z, dr[i], acc);
                x[i] = vv * dr[i];
            }
            *part_t = acc;
            store_row_sums<R>(x, w.lane, w.group * R, w.key_dim, out);
            st -= w.kp;
            part_t -= part_step;
            out -= w.key_dim;
        };
        step(n - 1);
        // δ̃ at a segment's last step (a chunk's last: chunk_len | 64): the
        // d_e of the segment's gate gradient.
        if (w.segment_end(last) && w.col_ok) {
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const int row = w.group * R + i;
                if (row < w.key_dim) {
                    adj[w.checkpoint_at(w.segment_of(last), row)] = make_float2(dr[i], kComplex ? di[i] : 0.f);
                }
            }
        }
#pragma unroll 1
        for (int tt = n - 2; tt >= 0; --tt) step(tt);
        __syncthreads();

        // dv over the key groups (the forward's y reduction).
        for (int idx = w.tid; idx < n * kTile; idx += w.nthreads) {
            const int tt = idx / kTile;
            const int cl = idx - tt * kTile;
            const int64_t cc = w.col0 + cl;
            if (cc < w.value_dim) {
                const float* ps = w.part_s + tt * part_step + cl;
                float sum = 0.f;
                for (int j = 0; j < w.key_groups; ++j) sum += ps[j * kTile];
                Tr::store(dv, (t0 + tt) * g.dv_strides.time + cc, sum);
            }
        }
        // The next chunk's staging writes stage, v_s and dy_s, whose last
        // readers passed the barrier above; part_s is next written after the
        // next staging barrier, which this loop's readers reach first.
    }

    // δ_0 = conj(δ̃_0) into dh0; the gate launch multiplies it by conj(a_0).
    if (g.dh0 != nullptr && w.col_ok) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int row = w.group * R + i;
            if (row < w.key_dim) {
                store_gate_side<kComplex>(g.dh0, state_index(g.dh0_strides, w.b, w.h, row, w.col),
                                          make_float2(dr[i], -di[i]));
            }
        }
    }
}

// ---- 3. dq, dk, the gate gradient and dh0 ------------------------------------------

constexpr int kGateBlock = GATELOOP_RECURRENT_GRAD_GATE_BLOCK;
static_assert(kGateBlock >= 128, "one thread per key row (the launcher's K ≤ 128)");
// Value columns of h_s and d_e a thread holds in registers at once.
constexpr int kVChunk = 16;
// Steps of term 4 that share one pass over the segment (grad_gate).
constexpr int kTermSteps = 8;
// Steps whose per-head gate sums over the rows run at once, one thread each.
constexpr int kSumSteps = 16;
static_assert(GATELOOP_RECURRENT_GRAD_GATE_SHARED_BYTES == 4 * (kSegment * (kSegment + 1) + 2 * kSegment * kVChunk),
              "the gate launch's dynamic shared memory");
// The per-head sums' table (a padded row of kGateBlock + 1 per step, so
// the kSumSteps summing threads read distinct banks) lies over Z.
static_assert(8 * kSumSteps * (kGateBlock + 1) <= 4 * kSegment * (kSegment + 1), "the row sums fit over Z");

// One block per (b, h, segment), thread `row` per key row: dq, dk (the value
// tiles' partials summed in order), dlog_gate by the expansion in the
// header (per-head gates: the rows' e_t summed in row order), dh0.
template <typename input_t, bool kComplex>
__device__ __forceinline__ void grad_gate(const GateloopRecurrentGradParams& g) {
    using Tr = InputTraits<input_t>;
    const GateloopRecurrentParams& p = g.fwd;
    // Dynamic shared memory (the file's one declaration, as the sweeps'):
    // Z_su = Σ_v v_s dy_u (s < u), then the staged v and dy columns; the
    // per-head gate's rows of e_t, once Z is read, over Z.
    float* base = reinterpret_cast<float*>(recurrent_dynamic_shared());
    auto z = reinterpret_cast<float (*)[kSegment + 1]>(base);
    auto vs = reinterpret_cast<float (*)[kVChunk]>(base + kSegment * (kSegment + 1));
    auto dys = vs + kSegment;
    auto rows_e = reinterpret_cast<float2 (*)[kGateBlock + 1]>(base);

    const int tid = threadIdx.x;
    int64_t blk = blockIdx.x;
    // Block (b·H + h, segment), or packed (h, slot): sequence b's segment
    // slot − base(b), for the b whose slots hold it; a slot past its
    // sequence's end is empty (GradSeq), its block returns here, before any
    // barrier, as a whole.
    const int64_t slot = split_index(blk, g.segments);
    BatchHead bhi;
    int64_t seg = slot;
    if (p.cu_seqlens == nullptr) {
        bhi = batch_head(blk, p.dims.heads);
    } else {
        const int64_t b = packed_sequence_of<kSegment>(p.cu_seqlens, p.dims.batch, slot);
        bhi = BatchHead{b, blk};
        seg = slot - packed_slot_base<kSegment>(p.cu_seqlens, b);
    }
    const GradSeq sq = grad_seq(p, bhi.b, bhi.h);
    const int64_t key_dim = p.dims.key_dim, value_dim = p.dims.value_dim, len = sq.len;
    const int64_t t0 = seg * kSegment;
    if (t0 >= len) return;
    const int n = static_cast<int>(min(static_cast<int64_t>(kSegment), len - t0));
    const bool per_head = p.dims.gate_dim == 1;
    // A thread past K (the block is kGateBlock threads for every K ≤ 128)
    // stages and sums Z with the others and meets every barrier, but skips
    // the per-row sums and recurrences: its warps would otherwise redo row
    // 0's, the launch's heaviest work (its 64-step arrays live in local
    // memory), for nothing: at K = 64 half the block's threads. (It points
    // at row 0, whose addresses are valid, and stores nothing.)
    const bool live = tid < key_dim;
    const int row = live ? tid : 0;
    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const input_t* q = seq_steps(static_cast<const input_t*>(p.q), p.q_strides, sq, bhi.h);
    const input_t* k = seq_steps(static_cast<const input_t*>(p.k), p.k_strides, sq, bhi.h);
    const input_t* v = seq_steps(static_cast<const input_t*>(p.v), p.v_strides, sq, bhi.h);
    const input_t* dy = seq_steps(static_cast<const input_t*>(g.dy), g.dy_strides, sq, bhi.h);
    const float* gate = seq_steps<const float, kComplex ? 2 : 1>(p.log_gate, p.gate_strides, sq, bhi.h);
    const int64_t ck0 = sq.ws_row * g.segments + sq.seg0;  // the sequence's first checkpoint
    // h_s: the state entering the segment (none: 0); d_e: δ̃ at its last step.
    const float2* ck = reinterpret_cast<const float2*>(g.checkpoints);
    // (the checkpoints are complex for either gate kind; h0 is real with
    // real gates: hs_at reads both)
    const float2* hs_row = seg > 0 ? ck + ((ck0 + seg - 1) * key_dim + row) * value_dim : nullptr;
    const int64_t h0_row = state_index(p.h0_strides, bhi.b, bhi.h, row, 0);
    const bool has_hs = seg > 0 || has_h0;
    auto hs_at = [&](int64_t col) { return seg > 0 ? hs_row[col] : load_gate_side<kComplex>(p.h0, h0_row + col); };
    const float2* de_row = reinterpret_cast<const float2*>(g.adjoints) + ((ck0 + seg) * key_dim + row) * value_dim;

    // X_s = Σ_v v_s d_e, Y_u = Σ_v h_s dy_u, I = Σ_v h_s d_e (this row), and
    // Z (the block's), over the value columns kVChunk at a time.
    float2 X[kSegment], Y[kSegment];
    for (int t = 0; t < n; ++t) X[t] = Y[t] = make_float2(0.f, 0.f);
    float2 I = make_float2(0.f, 0.f);
    for (int64_t v0 = 0; v0 < value_dim; v0 += kVChunk) {
        const int width = static_cast<int>(min(static_cast<int64_t>(kVChunk), value_dim - v0));
        __syncthreads();  // the previous columns' readers are done
        for (int idx = tid; idx < n * kVChunk; idx += kGateBlock) {
            const int t = idx / kVChunk, j = idx - (idx / kVChunk) * kVChunk;
            const bool in = j < width;
            vs[t][j] = in ? Tr::load(v, (t0 + t) * p.v_strides.time + v0 + j) : 0.f;
            dys[t][j] = in ? Tr::load(dy, (t0 + t) * g.dy_strides.time + v0 + j) : 0.f;
        }
        __syncthreads();
        for (int idx = tid; idx < n * n; idx += kGateBlock) {
            const int s = idx / n, u = idx - (idx / n) * n;
            if (s < u) {
                float acc = v0 == 0 ? 0.f : z[s][u];
#pragma unroll
                for (int j = 0; j < kVChunk; ++j) acc = fmaf(vs[s][j], dys[u][j], acc);
                z[s][u] = acc;
            }
        }
        if (!live) continue;  // the next iteration's first barrier, or the one below
        float2 hj[kVChunk], ej[kVChunk];
#pragma unroll
        for (int j = 0; j < kVChunk; ++j) {
            const bool in = j < width;
            hj[j] = in && has_hs ? hs_at(v0 + j) : make_float2(0.f, 0.f);
            ej[j] = in ? de_row[v0 + j] : make_float2(0.f, 0.f);
            const float2 c = cmul(hj[j], ej[j]);
            I.x += c.x;
            I.y += c.y;
        }
        for (int t = 0; t < n; ++t) {
            float2 x = X[t], y = Y[t];
#pragma unroll
            for (int j = 0; j < kVChunk; ++j) {
                x = make_float2(fmaf(vs[t][j], ej[j].x, x.x), fmaf(vs[t][j], ej[j].y, x.y));
                y = make_float2(fmaf(dys[t][j], hj[j].x, y.x), fmaf(dys[t][j], hj[j].y, y.y));
            }
            X[t] = x;
            Y[t] = y;
        }
    }
    __syncthreads();  // z complete

    // The segment's gates and this row's q, k; then e_t into E (over Y).
    float2 A[kSegment];
    float2* E = Y;  // e_t, over Y_t (read only by the backward loop below)
    if (live) {
        float qv[kSegment], kv[kSegment];
        for (int t = 0; t < n; ++t) {
            const int64_t tt = t0 + t;
            A[t] = gate_of<kComplex>(log_gate_side<kComplex>(gate, tt * p.gate_strides.time + (per_head ? 0 : row)));
            qv[t] = Tr::load(q, tt * p.q_strides.time + row);
            kv[t] = Tr::load(k, tt * p.k_strides.time + row);
        }
        // Backwards: S_t = Σ_{t≤u<t1} A(t, u) q_u Y_u = a_t (q_t Y_t + S_{t+1}),
        // AT_t = A(t, t1).
        float2 S[kSegment], AT[kSegment];
        S[n - 1] = make_float2(0.f, 0.f);
        AT[n - 1] = A[n - 1];
        for (int t = n - 2; t >= 0; --t) {
            S[t] = cmul(A[t], make_float2(fmaf(qv[t], Y[t].x, S[t + 1].x), fmaf(qv[t], Y[t].y, S[t + 1].y)));
            AT[t] = cmul(A[t], AT[t + 1]);
        }
        const float2 term1 = cmul(AT[0], I);
        // Forwards: R_t = Σ_{s<t} A(s+1, t−1) k_s X_s, Af = A(t0, t−1), and
        // F(u) = Σ_{s<t} A(s+1, t) k_s Z_su for u ≥ t (term 4: Σ_u q_u A(t+1, u) F(u)).
        // Term 4 is the launch's O(64²) work a row, and F, q and the gates
        // are arrays in local memory: kTermSteps steps t share one pass over
        // u, each F(u) loaded once and carried through the steps' updates in
        // a register (stored once, where a later step reads it), q_u and
        // a_{u+1} loaded once for all of them. Each sum, product and update
        // is the one-step-at-a-time loop's, in its order: the same bits.
        float2 F[kSegment];
        for (int u = 0; u < n; ++u) F[u] = make_float2(0.f, 0.f);
        float2 R = make_float2(0.f, 0.f), Af = make_float2(1.f, 0.f);
        for (int t0b = 0; t0b < n; t0b += kTermSteps) {
            // Per step t = t0b + i: e4 = Σ_{t≤u<n−1} q_u A(t+1, u) F_t(u),
            // P = A(t+1, u) as u advances, and the step's update of F,
            // F_{t+1}(u) = a_{t+1} (k_t Z_tu + F_t(u)) for u > t.
            float2 e4[kTermSteps], P[kTermSteps], a_next[kTermSteps];
            float k_t[kTermSteps];
#pragma unroll
            for (int i = 0; i < kTermSteps; ++i) {
                const int t = t0b + i;
                e4[i] = make_float2(0.f, 0.f);
                P[i] = make_float2(1.f, 0.f);
                a_next[i] = t + 1 < n ? A[t + 1] : make_float2(0.f, 0.f);
                k_t[i] = t < n ? kv[t] : 0.f;
            }
            // u's local loads are issued one u ahead (nothing in the pass
            // writes F(u + 1) before it is read), so each pass waits on
            // local memory once, not once a u.
            float2 f_ahead = make_float2(0.f, 0.f), a_ahead = make_float2(0.f, 0.f);
            float q_ahead = 0.f;
            if (t0b < n - 1) f_ahead = F[t0b], q_ahead = qv[t0b], a_ahead = A[t0b + 1];
            for (int u = t0b; u < n - 1; ++u) {
                float2 f = f_ahead;  // F_{t0b}(u)
                const float qu = q_ahead;
                const float2 au = a_ahead;
                if (u + 1 < n - 1) f_ahead = F[u + 1], q_ahead = qv[u + 1], a_ahead = A[u + 2];
#pragma unroll
                for (int i = 0; i < kTermSteps; ++i) {
                    const int t = t0b + i;
                    if (u >= t) {  // f is F_t(u): the steps before t updated it
                        const float2 c = cmul(P[i], f);
                        e4[i] = make_float2(fmaf(qu, c.x, e4[i].x), fmaf(qu, c.y, e4[i].y));
                        P[i] = cmul(P[i], au);
                        if (u > t) f = cmul(a_next[i], make_float2(fmaf(k_t[i], z[t][u], f.x), f.y));
                    }
                }
                if (u >= t0b + kTermSteps) F[u] = f;  // read by the next steps
            }
#pragma unroll
            for (int i = 0; i < kTermSteps; ++i) {
                const int t = t0b + i;
                if (t < n) {
                    const float2 e2 = cmul(AT[t], R), e3 = cmul(Af, S[t]);
                    E[t] = make_float2(((term1.x + e2.x) + e3.x) + e4[i].x, ((term1.y + e2.y) + e3.y) + e4[i].y);
                    R = cmul(A[t], R);
                    R = make_float2(fmaf(kv[t], X[t].x, R.x), fmaf(kv[t], X[t].y, R.y));
                    Af = cmul(Af, A[t]);
                }
            }
        }
    }  // live

    // dq, dk: the value tiles' partials, in tile order.
    const int64_t tile_stride = partial_rows(p) * p.dims.len * key_dim;
    input_t* dq = seq_steps(static_cast<input_t*>(g.dq), g.dq_strides, sq, bhi.h);
    input_t* dk = seq_steps(static_cast<input_t*>(g.dk), g.dk_strides, sq, bhi.h);
    if (live) {
        for (int t = 0; t < n; ++t) {
            const int64_t at = (sq.ws_row * p.dims.len + sq.first + t0 + t) * key_dim + row;
            float sq = 0.f, sk = 0.f;
            for (int64_t u = 0; u < p.value_tiles; ++u) {
                sq += g.partial_dq[u * tile_stride + at];
                sk += g.partial_dk[u * tile_stride + at];
            }
            Tr::store(dq, (t0 + t) * g.dq_strides.time + row, sq);
            Tr::store(dk, (t0 + t) * g.dk_strides.time + row, sk);
        }
    }
    // dlog_gate = conj(e); 0 at a reset (a = 0: e is 0 there, and the
    // reference defines it so).
    // Real gates: dlog_gate is real, Re e alone (Im e is 0).
    constexpr int kParts = kComplex ? 2 : 1;
    const int64_t dg0 = sq.row_b * g.dgate_strides.batch + bhi.h * g.dgate_strides.head + sq.first * g.dgate_strides.time;
    auto put_gate = [&](int t, int col, float2 e) {
        const int64_t tt = t0 + t;
        const bool reset = gate[kParts * (tt * p.gate_strides.time + col)] < GATELOOP_RESET_LOG_GATE;
        const float2 conj_e = reset ? make_float2(0.f, 0.f) : make_float2(e.x, -e.y);
        store_gate_side<kComplex>(g.dlog_gate, dg0 + tt * g.dgate_strides.time + col, conj_e);
    };
    if (!per_head) {
        if (live) {
            for (int t = 0; t < n; ++t) put_gate(t, row, E[t]);
        }
    } else {
        // Per-head gate: e_t summed over the rows in row order. The rows
        // write kSumSteps steps' e_t into a table, then thread j sums step
        // j's column: kSumSteps chains at once instead of one thread
        // summing every step in turn between two barriers.
        for (int tb = 0; tb < n; tb += kSumSteps) {
            __syncthreads();  // Z's last readers (term 4), or the previous steps' summing threads, are done
#pragma unroll
            for (int i = 0; i < kSumSteps; ++i) {
                rows_e[i][tid] = live && tb + i < n ? E[tb + i] : make_float2(0.f, 0.f);
            }
            __syncthreads();
            if (tid < kSumSteps && tb + tid < n) {
                float2 sum = make_float2(0.f, 0.f);
                for (int r = 0; r < key_dim; ++r) {
                    sum.x += rows_e[tid][r].x;
                    sum.y += rows_e[tid][r].y;
                }
                put_gate(tb + tid, 0, sum);
            }
        }
    }
    // dh0 = conj(a_0) δ_0 (the backward sweep left δ_0 there).
    if (seg == 0 && g.dh0 != nullptr && live) {
        const int64_t at = state_index(g.dh0_strides, bhi.b, bhi.h, row, 0);
        if constexpr (kComplex) {
            const float2 ca0 = make_float2(A[0].x, -A[0].y);
            float2* d = reinterpret_cast<float2*>(g.dh0) + at;
            for (int64_t col = 0; col < value_dim; ++col) d[col] = cmul(ca0, d[col]);
        } else {
            float* d = g.dh0 + at;
            for (int64_t col = 0; col < value_dim; ++col) d[col] *= A[0].x;
        }
    }
}

}  // namespace recurrent_grad
}  // namespace gateloop

// ---- entry points ---------------------------------------------------------------
//
// gateloop_recurrent_grad_{fwd,bwd}_{dtype}_r{R}: the two sweeps, the forward
// kernel's geometry (grid B·H·⌈V/32⌉, block 32 × key_groups, R rows a
// thread); gateloop_recurrent_grad_gate_{dtype}: 1-D, one thread per
// (b, h, segment, gate column).

// Launch bounds: R ≥ 8, up to 16 key groups (512 threads: at most 128
// registers); R < 8, one key group, where __launch_bounds__(32) left sm_90's
// ptxas at 64 registers with spills, so the cap is explicit. The gate
// launch likewise. R = 16 (K > 128) is not compiled: its backward sweep
// spills under 512 threads' 128 registers (the launcher refuses K > 128).
#define GATELOOP_RECURRENT_GRAD_SWEEPS(NAME, DTYPE, TYPE, R, BOUNDS, COMPLEX)                        \
    extern "C" __global__ void BOUNDS gateloop_recurrent_grad_##NAME##fwd_##DTYPE##_r##R(            \
        const GateloopRecurrentGradParams p) {                                                       \
        gateloop::recurrent_grad::grad_forward<TYPE, R, COMPLEX>(p);                                 \
    }                                                                                                \
    extern "C" __global__ void BOUNDS gateloop_recurrent_grad_##NAME##bwd_##DTYPE##_r##R(            \
        const GateloopRecurrentGradParams p) {                                                       \
        gateloop::recurrent_grad::grad_backward<TYPE, R, COMPLEX>(p);                                \
    }

// The register cap as __maxnreg__ (which excludes __launch_bounds__); the
// CPU emulator's fake driver reads a kernel's thread limit from its launch
// bounds instead, so it sees those.
#ifdef GATELOOP_KERNEL_EMULATOR
#define GATELOOP_REGISTER_CAP(threads, registers) __launch_bounds__(threads)
#else
#define GATELOOP_REGISTER_CAP(threads, registers) __maxnreg__(registers)
#endif
#define GATELOOP_ONE_GROUP GATELOOP_REGISTER_CAP(GATELOOP_RECURRENT_VALUE_TILE, 128)
#define GATELOOP_KEY_GROUPS __launch_bounds__(GATELOOP_RECURRENT_VALUE_TILE * GATELOOP_RECURRENT_MAX_KEY_GROUPS)

#define GATELOOP_RECURRENT_GRAD_ENTRIES(NAME, DTYPE, TYPE, COMPLEX)                                  \
    GATELOOP_RECURRENT_GRAD_SWEEPS(NAME, DTYPE, TYPE, 1, GATELOOP_ONE_GROUP, COMPLEX)                \
    GATELOOP_RECURRENT_GRAD_SWEEPS(NAME, DTYPE, TYPE, 2, GATELOOP_ONE_GROUP, COMPLEX)                \
    GATELOOP_RECURRENT_GRAD_SWEEPS(NAME, DTYPE, TYPE, 4, GATELOOP_ONE_GROUP, COMPLEX)                \
    GATELOOP_RECURRENT_GRAD_SWEEPS(NAME, DTYPE, TYPE, 8, GATELOOP_KEY_GROUPS, COMPLEX)               \
    extern "C" __global__ void GATELOOP_REGISTER_CAP(GATELOOP_RECURRENT_GRAD_GATE_BLOCK, 128)        \
        gateloop_recurrent_grad_##NAME##gate_##DTYPE(                                                \
        const GateloopRecurrentGradParams p) {                                                       \
        gateloop::recurrent_grad::grad_gate<TYPE, COMPLEX>(p);                                       \
    }

GATELOOP_RECURRENT_GRAD_ENTRIES(, f32, float, true)
GATELOOP_RECURRENT_GRAD_ENTRIES(, f16, __half, true)
GATELOOP_RECURRENT_GRAD_ENTRIES(, bf16, __nv_bfloat16, true)
// Real gates (recurrent_grad::backward_real_into): log_gate, h0, dh_final,
// dlog_gate and dh0 real f32; the workspace as for complex gates.
GATELOOP_RECURRENT_GRAD_ENTRIES(real_, f32, float, false)
GATELOOP_RECURRENT_GRAD_ENTRIES(real_, f16, __half, false)
GATELOOP_RECURRENT_GRAD_ENTRIES(real_, bf16, __nv_bfloat16, false)
