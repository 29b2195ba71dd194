// Masked surrogate attention (the paper's quadratic mode) on the GPU:
//
//   y_n = Re Σ_{m≤n} Σ_d q_{n,d} k_{m,d} e^{G_{n,d} − G_{m,d}} v_m + Re(q_n e^{G_n} h0)
//   h_final = e^{G_L} h0 + Σ_m e^{G_L − G_m} k_mᵀ v_m,    G = cumsum(log_gate)
//
// Flash-style: time is cut into tiles of T = 64 steps; a block owns one query
// tile I (and 64 columns of v) and walks the key tiles J = I, I−1, ..., 0; the
// L×L score matrix only ever exists as one T×T tile in shared memory.
//
// Anchored log space (no global cumulative sum is ever formed: in f32 its
// phase would lose ~0.01 rad at L = 65536). Every sum is TILE-LOCAL, computed
// once by the prep kernel into a workspace:
//   S_t  (ws_prefix) Σ log_gate from max(tile start, last reset) to t, 0 at a reset,
//        Re S_t compensated: hi in ws_prefix, lo in ws_prefix_lo (below);
//   r_t  (ws_reset)  tile-local index of the last reset ≤ t, or −1;
//   B_t  (ws_suffix) Σ log_gate over (t, tile end], Re = −inf if a reset is in it.
// Each accumulation reduces the phase mod 2π (Cody–Waite, two constants), so
// every phase stays in (−π, π] and keeps f32 ulp ~2e-7 rad whatever L is.
//
// Diagonal tile (m ≤ n in tile I): factor = 0 if r_n > m (a reset in (m, n]),
// else e^{S_n − S_m}, pairwise: a direct in-tile difference, Re ≤ 0, with
//   Re(S_n − S_m) = (hi_n − hi_m) + (lo_n − lo_m).
// Why the compensated sum: after hard-decaying steps (Re g ∈ [−104, −20],
// just above the reset threshold) |Re S| reaches thousands, where the ulp of
// an f32 running sum is ~2.4e-4 and every later small step loses up to half
// of it; a short difference S_n − S_m (a factor near 1) carries that absolute
// error (y rel-L2 ~2e-5 against ~2e-7 for the recurrent path). The prep sums
// Re S with TwoSum, hi = fl(hi + g), lo += its exact rounding error (0 at a
// reset for both); hi_n − hi_m is exact (Sterbenz) whenever the two are
// within a factor 2, which is exactly the dangerous case; otherwise the
// difference is itself large and its relative rounding is harmless. The
// phase needs no compensation (it stays in (−π, π]). The off-diagonal pairs
// use S only as A_n: a large |A_n| makes e^{A_n + Δ} tiny, so the same
// absolute error is harmless there (measured on the CPU mirror: with only
// the diagonal compensated, hard-decaying gates give y rel-L2 ≤ 3.2e-7, the
// f32 recurrent path's level on the same problems).
//
// Off-diagonal tile pair J < I, anchored at the end of tile J:
//   G_n − G_m = A_n + Δ_IJ + B_m,
//   A_n  = Σ over [start I, n]  = S_n, or −inf when r_n ≥ 0 (reset in it);
//   Δ_IJ = Σ_{J<P<I} T_P,  T_P = A at the end of tile P (tile total);
//   B_m  = Σ over (m, end J]    (ws_suffix).
// Every term has Re ≤ 0 (or −inf), so both factors e^{A_n+Δ} and e^{B_m} have
// modulus ≤ 1: nothing overflows, and an underflow only happens where the true
// factor is itself < 1e-38. Δ is carried from pair to pair in shared memory,
// Δ += T_J after pair J, its phase reduced mod 2π on every addition; e^{Δ} is
// folded into the query side:
//   q̃_{n,d} = q_{n,d} e^{A_n + Δ},   k̃_{m,d} = k_{m,d} e^{B_m}.
// A reset anywhere in (m, n] puts a −inf into A, Δ or B, so exactly one
// factor is exp(−inf) = 0: no NaN (−inf is only ever added, never subtracted;
// phases stay finite).
//
// The score, one real GEMM of inner dimension 2K: with Re(xy) = Re x Re y − Im x Im y,
//   score_nm = Σ_d q_nd k_md Re(e^{G_nd − G_md}) = Σ_d Re(q̃_nd k̃_md)
//            = Σ_d [Re q̃_nd · Re k̃_md + (−Im q̃_nd) · Im k̃_md]
//            = ([Re q̃, −Im q̃] · [Re k̃, Im k̃]ᵀ)_nm,
// accumulated in the order d = 0, 1, ... with the Re term before the Im term.
// Plain FMA register tiling (4×4 outputs per thread), not tensor cores: TF32
// (10-bit mantissa) gives ~5e-4 relative error per product, over the 1e-4
// bound this kernel must meet; 3×TF32 splitting is the path to tensor cores.
//
// The h0 term is the same GEMM against [Re h0; Im h0] with Δ = Σ_{P<I} T_P
// once the walk reaches J = 0. Early exit: once every channel has
// Re Δ < −110, every remaining factor is exp(< −110) = 0 exactly in f32, so
// the walk stops (with decay or resets the cost is O(L·span), not O(L²)).
//
// h_final (state kernel): per (rows, columns) block, walk the tiles from the
// last, Δ' = Σ_{P>J} T_P, k̃_m = k_m e^{Δ' + B_m}, h += k̃_m v_m (complex ×
// real), then h += e^{Δ'} h0; same early exit.
//
// The CPU mirror, src/cpu/attention.rs, does the same arithmetic in the same
// order. Inputs: q, k, v and y in f32, f16 or bf16 (the InputTraits<T> hook
// of common.cuh widens each load to f32 and rounds y once, at the store);
// log_gate and the states are complex f32 for every input type; sums,
// workspace and arithmetic are f32 (the prep reads only gates, so its three
// instantiations are the same code).

#include <math.h>

#include "common.cuh"

namespace gateloop {
namespace attn {

// ---- constants and scalar helpers ----------------------------------------

constexpr int kTile = GATELOOP_ATTENTION_TILE;
constexpr int kVTile = GATELOOP_ATTENTION_VALUE_TILE;
constexpr int kSlab = GATELOOP_ATTENTION_KEY_SLAB;
constexpr int kMaxKey = GATELOOP_ATTENTION_MAX_KEY_DIM;
constexpr int kThreads = GATELOOP_ATTENTION_THREADS;
constexpr int kPad = kTile + 1;  // padded row of the shared tiles (bank spread)
constexpr int kStateRows = GATELOOP_ATTENTION_STATE_KEY_TILE;
constexpr int kStateCols = GATELOOP_ATTENTION_STATE_VALUE_TILE;
static_assert(kThreads == 256 && kTile == 64 && kVTile == 64, "16×16 threads, 4×4 outputs each");
static_assert(kStateCols == 32 && kStateRows == 64, "32 lanes × 8 warps, 8 rows each");
static_assert(kMaxKey <= kThreads, "one thread per channel of Δ");

// Below this Re Δ every factor exp(Re) with Re ≤ Re Δ is exactly 0 in f32
// (the smallest subnormal is e^{−103.3}).
constexpr float kDead = -110.0f;

// 2π = kTwoPiHi + kTwoPiLo; kTwoPiHi has 9 significant bits, so k·kTwoPiHi is
// exact for |k| < 2^15.
constexpr float kTwoPiHi = 6.28125f;
constexpr float kTwoPiLo = 1.9353071795864769e-3f;
constexpr float kInvTwoPi = 0.15915494309189535f;

// x mod 2π into [−π, π] (Cody–Waite). The mirror: cpu::attention::reduce_phase.
__device__ __forceinline__ float reduce_phase(float x) {
    const float k = rintf(x * kInvTwoPi);
    x = fmaf(-k, kTwoPiHi, x);
    return fmaf(-k, kTwoPiLo, x);
}

// e^z for Re z ≤ 0 (or −inf: exactly (±0, ±0)), |Im z| ≤ 2π.
__device__ __forceinline__ float2 cexp(float2 z) {
    const float mag = expf(z.x);
    float s, c;
    sincosf(z.y, &s, &c);
    return make_float2(mag * c, mag * s);
}

__device__ __forceinline__ float2 cadd_reduced(float2 a, float2 b) {
    return make_float2(a.x + b.x, reduce_phase(a.y + b.y));
}

// ---- 1. prep: tile-local sums --------------------------------------------

template <typename input_t>
__device__ __forceinline__ void attention_prep(const GateloopAttentionParams& p) {
    const int64_t gd = p.dims.gate_dim;
    const int64_t len = p.dims.len;
    const int64_t heads = p.dims.heads;
    int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= p.dims.batch * heads * p.num_tiles * gd) return;
    const int64_t c = split_index(idx, gd);
    const int64_t tile = split_index(idx, p.num_tiles);
    const BatchHead bhi = batch_head(idx, heads);
    const int64_t b = bhi.b, h = bhi.h;
    const int64_t t0 = tile * kTile;
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), len - t0));

    const float* __restrict__ gate = complex_seq_row(p.log_gate, p.gate_strides, b, h);
    const int64_t ws = ((b * heads + h) * len + t0) * gd + c;  // (t0, c)
    float2* prefix = reinterpret_cast<float2*>(p.ws_prefix) + ws;
    float* prefix_lo = p.ws_prefix_lo + ws;
    float2* suffix = reinterpret_cast<float2*>(p.ws_suffix) + ws;
    int32_t* reset = p.ws_reset + ws;

    float2 s = make_float2(0.f, 0.f);
    float lo = 0.f;  // the TwoSum compensation of s.x
    int32_t r = -1;
    for (int j = 0; j < n; ++j) {
        const float2 g = load_log_gate(gate, (t0 + j) * p.gate_strides.time + c);
        if (g.x == -INFINITY) {
            s = make_float2(0.f, 0.f);
            lo = 0.f;
            r = j;
        } else {
            const float2 re = two_sum(s.x, g.x);
            s = make_float2(re.x, reduce_phase(s.y + reduce_phase(g.y)));
            lo += re.y;
        }
        prefix[j * gd] = s;
        prefix_lo[j * gd] = lo;
        reset[j * gd] = r;
    }
    float2 bsum = make_float2(0.f, 0.f);
    suffix[(n - 1) * gd] = bsum;
    for (int j = n - 1; j >= 1; --j) {
        const float2 g = load_log_gate(gate, (t0 + j) * p.gate_strides.time + c);
        bsum = cadd_reduced(bsum, make_float2(g.x, reduce_phase(g.y)));  // −inf sticks
        suffix[(j - 1) * gd] = bsum;
    }
}

// acc[i][j] += Σ_dd qs[dd][ty + 16 i] · ks[dd][tx + 16 j] over the 2·kSlab
// rows of one staged slab: the thread's 4×4 register tile of the
// inner-dimension-2K real GEMM ([Re q̃, −Im q̃] · [Re x̃, Im x̃]ᵀ), in ascending dd.
__device__ __forceinline__ void slab_fma(const float* qs, const float* ks, int ty, int tx, float (&acc)[4][4]) {
#pragma unroll 4
    for (int dd = 0; dd < 2 * kSlab; ++dd) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = qs[dd * kPad + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = ks[dd * kPad + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// A_t: the prefix of the tile up to t, −inf (phase kept) when a reset is in it.
__device__ __forceinline__ float2 prefix_or_dead(const GateloopAttentionParams& p, int64_t w) {
    float2 a = reinterpret_cast<const float2*>(p.ws_prefix)[w];
    if (p.ws_reset[w] >= 0) a.x = -INFINITY;
    return a;
}

// ---- 2. y ------------------------------------------------------------------

template <typename input_t>
__device__ __forceinline__ void attention_y(const GateloopAttentionParams& p) {
    using Tr = InputTraits<input_t>;

    // Union A: the staged GEMM operands qs[2·slab][kPad] | ks[2·slab][kPad],
    // or the diagonal's q, k [slab][kPad], or the score tile ps[kTile][kPad].
    __shared__ float s_a[kTile * kPad];
    // Union B: v tile [kTile][kVTile], or the diagonal's S [kTile][slab]
    // (float2), r [kTile][slab] and lo [kTile][slab].
    __shared__ __align__(16) float s_b[kTile * kVTile];
    __shared__ float2 s_delta[kMaxKey];
    static_assert(2 * 2 * kSlab * kPad <= kTile * kPad, "operands fit in union A");
    static_assert(4 * kTile * kSlab <= kTile * kVTile, "diagonal sums fit in union B");

    float* qs = s_a;
    float* ks = s_a + 2 * kSlab * kPad;
    float* ps = s_a;
    float* vs = s_b;
    float2* gsum = reinterpret_cast<float2*>(s_b);
    int32_t* gres = reinterpret_cast<int32_t*>(s_b + 2 * kTile * kSlab);
    float* glo = s_b + 3 * kTile * kSlab;

    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;

    int64_t blk = blockIdx.x;
    const int64_t vt = split_index(blk, p.value_tiles);
    // Largest query tiles (the longest walks) first.
    const int64_t tile_i = p.num_tiles - 1 - split_index(blk, p.num_tiles);
    const BatchHead bhi = batch_head(blk, p.dims.heads);
    const int64_t b = bhi.b, h = bhi.h;

    const int64_t len = p.dims.len;
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t gd = p.dims.gate_dim;
    const bool per_head = gd == 1;
    const int64_t t0i = tile_i * kTile;
    const int ni = static_cast<int>(min(static_cast<int64_t>(kTile), len - t0i));
    const int64_t v0 = vt * kVTile;

    const input_t* __restrict__ q = seq_row<input_t>(p.q, p.q_strides, b, h);
    const input_t* __restrict__ k = seq_row<input_t>(p.k, p.k_strides, b, h);
    const input_t* __restrict__ v = seq_row<input_t>(p.v, p.v_strides, b, h);
    input_t* __restrict__ y = seq_row_mut<input_t>(p.y, p.y_strides, b, h);
    const int64_t wsb = (b * p.dims.heads + h) * len * gd;  // workspace (t = 0, c = 0)

    for (int c = tid; c < gd; c += kThreads) s_delta[c] = make_float2(0.f, 0.f);

    float acc[4][4];
    float sc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    // Y += P·V_J with the score tile in registers; V_J starts at t0j. Ends
    // with ps and vs still being read: the caller's next barrier (the loop
    // top's __syncthreads_or, or the h0 part's) comes before anything
    // overwrites them or what aliases them (qs, ks, the diagonal's sums).
    auto score_times_v = [&](int64_t t0j, int nj) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) ps[(ty + 16 * i) * kPad + tx + 16 * j] = sc[i][j];
        for (int idx = tid; idx < kTile * kVTile; idx += kThreads) {
            const int m = idx / kVTile;
            const int cc = idx - m * kVTile;
            vs[idx] = (m < nj && v0 + cc < value_dim) ? Tr::load(v, (t0j + m) * p.v_strides.time + v0 + cc) : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int m = 0; m < kTile; ++m) {
            float bv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = vs[m * kVTile + tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float a = ps[(ty + 16 * i) * kPad + m];
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a, bv[j], acc[i][j]);
            }
        }
    };

    // Stages [Re q̃, −Im q̃] of the query tile for channels d0.. into qs, with
    // the current Δ.
    auto stage_query = [&](int64_t d0, int ds) {
        for (int idx = tid; idx < kSlab * kTile; idx += kThreads) {
            const int n = idx / kSlab;
            const int dl = idx - n * kSlab;
            float re = 0.f, im = 0.f;
            if (n < ni && dl < ds) {
                const int64_t d = d0 + dl;
                const int64_t c = per_head ? 0 : d;
                const float2 a = prefix_or_dead(p, wsb + (t0i + n) * gd + c);
                const float2 dl2 = s_delta[c];
                const float2 e = cexp(make_float2(a.x + dl2.x, a.y + dl2.y));
                const float qv = Tr::load(q, (t0i + n) * p.q_strides.time + d);
                re = qv * e.x;
                im = qv * e.y;
            }
            qs[(2 * dl) * kPad + n] = re;
            qs[(2 * dl + 1) * kPad + n] = -im;
        }
    };

    // ---- the diagonal tile: pairwise factors ------------------------------
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        const int ds = static_cast<int>(min(static_cast<int64_t>(kSlab), key_dim - d0));
        const int cols = per_head ? 1 : ds;
        float* qd = s_a;
        float* kd = s_a + kSlab * kPad;
        for (int idx = tid; idx < kSlab * kTile; idx += kThreads) {
            const int n = idx / kSlab;
            const int dl = idx - n * kSlab;
            const bool ok = n < ni && dl < ds;
            qd[dl * kPad + n] = ok ? Tr::load(q, (t0i + n) * p.q_strides.time + d0 + dl) : 0.f;
            kd[dl * kPad + n] = ok ? Tr::load(k, (t0i + n) * p.k_strides.time + d0 + dl) : 0.f;
            if (n < ni && dl < cols) {
                const int64_t w = wsb + (t0i + n) * gd + (per_head ? 0 : d0 + dl);
                gsum[n * kSlab + dl] = reinterpret_cast<const float2*>(p.ws_prefix)[w];
                glo[n * kSlab + dl] = p.ws_prefix_lo[w];
                gres[n * kSlab + dl] = p.ws_reset[w];
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = ty + 16 * i;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int m = tx + 16 * j;
                if (m <= n && n < ni) {
                    float f = 0.f;
                    for (int dl = 0; dl < ds; ++dl) {
                        if (dl == 0 || !per_head) {
                            const int cl = per_head ? 0 : dl;
                            f = 0.f;
                            if (gres[n * kSlab + cl] <= m) {
                                const float2 sn = gsum[n * kSlab + cl];
                                const float2 sm = gsum[m * kSlab + cl];
                                const float re = re_diff(sn.x, glo[n * kSlab + cl], sm.x, glo[m * kSlab + cl]);
                                f = expf(re) * cosf(sn.y - sm.y);
                            }
                        }
                        sc[i][j] = fmaf(qd[dl * kPad + n] * kd[dl * kPad + m], f, sc[i][j]);
                    }
                }
            }
        }
        __syncthreads();
    }
    score_times_v(t0i, ni);

    // ---- off-diagonal pairs, J = I−1 down to 0 ---------------------------
    bool reached_start = true;
    for (int64_t tile_j = tile_i - 1; tile_j >= 0; --tile_j) {
        bool alive = false;
        for (int c = tid; c < gd; c += kThreads) alive |= s_delta[c].x >= kDead;
        if (!__syncthreads_or(alive)) {
            reached_start = false;
            break;
        }
        const int64_t t0j = tile_j * kTile;  // a full tile: only the last one is partial
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) sc[i][j] = 0.f;
        for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
            const int ds = static_cast<int>(min(static_cast<int64_t>(kSlab), key_dim - d0));
            stage_query(d0, ds);
            for (int idx = tid; idx < kSlab * kTile; idx += kThreads) {
                const int m = idx / kSlab;
                const int dl = idx - m * kSlab;
                float re = 0.f, im = 0.f;
                if (dl < ds) {
                    const int64_t d = d0 + dl;
                    const int64_t c = per_head ? 0 : d;
                    const float2 bsum = reinterpret_cast<const float2*>(p.ws_suffix)[wsb + (t0j + m) * gd + c];
                    const float2 e = cexp(bsum);
                    const float kv = Tr::load(k, (t0j + m) * p.k_strides.time + d);
                    re = kv * e.x;
                    im = kv * e.y;
                }
                ks[(2 * dl) * kPad + m] = re;
                ks[(2 * dl + 1) * kPad + m] = im;
            }
            __syncthreads();
            slab_fma(qs, ks, ty, tx, sc);
            __syncthreads();
        }
        // Δ += T_J (other threads read s_delta only after score_times_v's barrier).
        for (int c = tid; c < gd; c += kThreads) {
            const float2 t = prefix_or_dead(p, wsb + (t0j + kTile - 1) * gd + c);
            s_delta[c] = cadd_reduced(s_delta[c], t);
        }
        score_times_v(t0j, kTile);
    }

    // ---- h0: Y += [Re q̃, −Im q̃] · [Re h0; Im h0] with Δ = Σ_{P<I} T_P ------
    if (reached_start && (p.flags & GATELOOP_FLAG_HAS_H0) != 0) {
        __syncthreads();  // score_times_v's reads of ps, vs end before stage_query writes qs, ks
        const float2* h0 = reinterpret_cast<const float2*>(p.h0) + state_index(p.h0_strides, b, h, 0, 0);
        for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
            const int ds = static_cast<int>(min(static_cast<int64_t>(kSlab), key_dim - d0));
            stage_query(d0, ds);
            for (int idx = tid; idx < kSlab * kVTile; idx += kThreads) {
                const int dl = idx / kVTile;
                const int cc = idx - dl * kVTile;
                float2 z = make_float2(0.f, 0.f);
                if (dl < ds && v0 + cc < value_dim) z = h0[(d0 + dl) * p.h0_strides.key + v0 + cc];
                ks[(2 * dl) * kPad + cc] = z.x;
                ks[(2 * dl + 1) * kPad + cc] = z.y;
            }
            __syncthreads();
            slab_fma(qs, ks, ty, tx, acc);
            __syncthreads();
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int n = ty + 16 * i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t cc = v0 + tx + 16 * j;
            if (n < ni && cc < value_dim) Tr::store(y, (t0i + n) * p.y_strides.time + cc, acc[i][j]);
        }
    }
}

// ---- 3. h_final ------------------------------------------------------------

template <typename input_t>
__device__ __forceinline__ void attention_state(const GateloopAttentionParams& p) {
    using Tr = InputTraits<input_t>;
    __shared__ float2 s_kt[kTile * kStateRows];  // k̃ [m][row]
    __shared__ float s_v[kTile * kStateCols];     // v [m][col]
    __shared__ float2 s_delta[kStateRows];        // Δ' of each row's channel

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    constexpr int kRows = kStateRows / (kThreads / 32);  // 8 rows per thread

    int64_t blk = blockIdx.x;
    const int64_t vt = split_index(blk, p.state_value_tiles);
    const int64_t kt = split_index(blk, p.state_key_tiles);
    const BatchHead bhi = batch_head(blk, p.dims.heads);
    const int64_t b = bhi.b, h = bhi.h;

    const int64_t len = p.dims.len;
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int64_t gd = p.dims.gate_dim;
    const bool per_head = gd == 1;
    const int64_t k0 = kt * kStateRows;
    const int64_t c0 = vt * kStateCols;
    const int64_t col = c0 + lane;

    const input_t* __restrict__ k = seq_row<input_t>(p.k, p.k_strides, b, h);
    const input_t* __restrict__ v = seq_row<input_t>(p.v, p.v_strides, b, h);
    const int64_t wsb = (b * p.dims.heads + h) * len * gd;

    if (tid < kStateRows) s_delta[tid] = make_float2(0.f, 0.f);
    float hr[kRows], hi[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) hr[i] = hi[i] = 0.f;

    bool reached_start = true;
    for (int64_t tile_j = p.num_tiles - 1; tile_j >= 0; --tile_j) {
        const bool alive = tid < kStateRows && k0 + tid < key_dim && s_delta[tid].x >= kDead;
        if (!__syncthreads_or(alive)) {
            reached_start = false;
            break;
        }
        const int64_t t0j = tile_j * kTile;
        const int nj = static_cast<int>(min(static_cast<int64_t>(kTile), len - t0j));
        for (int idx = tid; idx < kTile * kStateRows; idx += kThreads) {
            const int m = idx / kStateRows;
            const int rl = idx - m * kStateRows;
            float2 val = make_float2(0.f, 0.f);
            if (m < nj && k0 + rl < key_dim) {
                const int64_t c = per_head ? 0 : k0 + rl;
                const float2 bsum = reinterpret_cast<const float2*>(p.ws_suffix)[wsb + (t0j + m) * gd + c];
                const float2 dl = s_delta[rl];
                const float2 e = cexp(make_float2(bsum.x + dl.x, bsum.y + dl.y));
                const float kv = Tr::load(k, (t0j + m) * p.k_strides.time + k0 + rl);
                val = make_float2(kv * e.x, kv * e.y);
            }
            s_kt[idx] = val;
        }
        for (int idx = tid; idx < kTile * kStateCols; idx += kThreads) {
            const int m = idx / kStateCols;
            const int64_t cc = c0 + (idx - m * kStateCols);
            s_v[idx] = (m < nj && cc < value_dim) ? Tr::load(v, (t0j + m) * p.v_strides.time + cc) : 0.f;
        }
        __syncthreads();
#pragma unroll 2
        for (int m = 0; m < kTile; ++m) {
            const float vv = s_v[m * kStateCols + lane];
#pragma unroll
            for (int i = 0; i < kRows; ++i) {
                const float2 kk = s_kt[m * kStateRows + warp + 8 * i];
                hr[i] = fmaf(kk.x, vv, hr[i]);
                hi[i] = fmaf(kk.y, vv, hi[i]);
            }
        }
        // No barrier here: Δ' is not read by this tile's product, and the
        // next tile's staging (which reads Δ' and overwrites s_kt, s_v) waits
        // at the loop top's __syncthreads_or, the h0 term below at the
        // barrier after the loop.
        if (tid < kStateRows && k0 + tid < key_dim) {
            const int64_t c = per_head ? 0 : k0 + tid;
            s_delta[tid] = cadd_reduced(s_delta[tid], prefix_or_dead(p, wsb + (t0j + nj - 1) * gd + c));
        }
    }
    __syncthreads();

    const bool has_h0 = (p.flags & GATELOOP_FLAG_HAS_H0) != 0;
    const float2* h0 = reinterpret_cast<const float2*>(p.h0) + state_index(p.h0_strides, b, h, 0, 0);
    float2* h_final = reinterpret_cast<float2*>(p.h_final) + state_index(p.h_final_strides, b, h, 0, 0);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
        const int rl = warp + 8 * i;
        const int64_t row = k0 + rl;
        if (row < key_dim && col < value_dim) {
            float re = hr[i], im = hi[i];
            if (has_h0 && reached_start) {
                const float2 e = cexp(s_delta[rl]);
                const float2 z = h0[row * p.h0_strides.key + col];
                re = re + (e.x * z.x - e.y * z.y);
                im = im + (e.x * z.y + e.y * z.x);
            }
            h_final[row * p.h_final_strides.key + col] = make_float2(re, im);
        }
    }
}

}  // namespace attn
}  // namespace gateloop

// ---- entry points ----------------------------------------------------------

#define GATELOOP_ATTENTION_ENTRIES(DTYPE, TYPE)                                                     \
    extern "C" __global__ void __launch_bounds__(GATELOOP_ATTENTION_PREP_THREADS)                   \
        gateloop_attention_prep_##DTYPE(const GateloopAttentionParams p) {                          \
        gateloop::attn::attention_prep<TYPE>(p);                                                     \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GATELOOP_ATTENTION_THREADS, 2)                     \
        gateloop_attention_##DTYPE(const GateloopAttentionParams p) {                               \
        gateloop::attn::attention_y<TYPE>(p);                                                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GATELOOP_ATTENTION_THREADS, 2)                     \
        gateloop_attention_state_##DTYPE(const GateloopAttentionParams p) {                         \
        gateloop::attn::attention_state<TYPE>(p);                                                    \
    }

GATELOOP_ATTENTION_ENTRIES(f32, float)
GATELOOP_ATTENTION_ENTRIES(f16, __half)
GATELOOP_ATTENTION_ENTRIES(bf16, __nv_bfloat16)
