// What the kernels of cuda/*.cu share: the input-type hook, complex loads and
// arithmetic, the complex gate, and the (b, h) index math of the ABI's
// sequence and state tensors (cuda/gateloop_abi.h).
//
// A header, not a compilation unit: build.rs compiles only cuda/*.cu, and
// reruns (recompiling every kernel) on any change in cuda/.

#ifndef GATELOOP_COMMON_CUH
#define GATELOOP_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "gateloop_abi.h"

namespace gateloop {

// ---- input-type hook -------------------------------------------------------
//
// q, k, v and y have the kernel's input type (f32, f16 or bf16); loads widen
// to f32, stores round to nearest even. log_gate and the state are complex
// f32 for every input type (see load_complex).

template <typename T>
struct InputTraits;

// Four consecutive elements of a 16-bit input as loaded (a row's channels
// 4g .. 4g + 3, Block::fetch_key_quad): their bits in 8 bytes, two
// registers while the loads are in flight where four widened floats took
// four, widened when stored (widen_quad). The lower address in the low
// half of a word: little-endian, as every CUDA GPU.
template <typename T>
struct Quads16 {
    using Quad = uint2;
    // Elements i .. i + 3 in one load (p + i 8-byte aligned).
    __device__ __forceinline__ static uint2 load_quad(const T* __restrict__ p, int64_t i) {
        return __ldg(reinterpret_cast<const uint2*>(p + i));
    }
    // The first `count` (≤ 4) of them an element a load (any alignment),
    // zero bits (+0) after.
    __device__ __forceinline__ static uint2 load_quad_each(const T* __restrict__ p, int64_t i, int64_t count) {
        const unsigned short* b = reinterpret_cast<const unsigned short*>(p) + i;
        unsigned e[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) e[j] = j < count ? __ldg(b + j) : 0u;
        return make_uint2(e[0] | (e[1] << 16), e[2] | (e[3] << 16));
    }
    __device__ __forceinline__ static float4 widen_quad(uint2 w) {
        using Tr = InputTraits<T>;
        return make_float4(Tr::of_bits(w.x & 0xffffu), Tr::of_bits(w.x >> 16), Tr::of_bits(w.y & 0xffffu),
                           Tr::of_bits(w.y >> 16));
    }
};

template <>
struct InputTraits<float> {
    static constexpr uint32_t kDtype = GATELOOP_DTYPE_F32;
    __device__ __forceinline__ static float load(const float* __restrict__ p, int64_t i) { return __ldg(p + i); }
    // Four consecutive elements as loaded (Quads16 for 16-bit inputs):
    // one 16-byte load (p + i 16-byte aligned), or the first `count` an
    // element a load and zeros after.
    using Quad = float4;
    __device__ __forceinline__ static float4 load_quad(const float* __restrict__ p, int64_t i) {
        return __ldg(reinterpret_cast<const float4*>(p + i));
    }
    __device__ __forceinline__ static float4 load_quad_each(const float* __restrict__ p, int64_t i, int64_t count) {
        float e[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) e[j] = j < count ? __ldg(p + i + j) : 0.f;
        return make_float4(e[0], e[1], e[2], e[3]);
    }
    __device__ __forceinline__ static float4 widen_quad(float4 w) { return w; }
    __device__ __forceinline__ static void store(float* p, int64_t i, float x) { p[i] = x; }
};

template <>
struct InputTraits<__half> : Quads16<__half> {
    static constexpr uint32_t kDtype = GATELOOP_DTYPE_F16;
    __device__ __forceinline__ static float load(const __half* __restrict__ p, int64_t i) {
        return __half2float(p[i]);
    }
    __device__ __forceinline__ static void store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }
    __device__ __forceinline__ static float of_bits(unsigned bits) {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
};

template <>
struct InputTraits<__nv_bfloat16> : Quads16<__nv_bfloat16> {
    static constexpr uint32_t kDtype = GATELOOP_DTYPE_BF16;
    __device__ __forceinline__ static float load(const __nv_bfloat16* __restrict__ p, int64_t i) {
        return __bfloat162float(p[i]);
    }
    __device__ __forceinline__ static void store(__nv_bfloat16* p, int64_t i, float x) {
        p[i] = __float2bfloat16_rn(x);
    }
    __device__ __forceinline__ static float of_bits(unsigned bits) {
        return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
    }
};

// ---- complex f32 -------------------------------------------------------------

// Complex element i of an interleaved (re, im) f32 array (read-only input).
__device__ __forceinline__ float2 load_complex(const float* __restrict__ p, int64_t i) {
    return __ldg(reinterpret_cast<const float2*>(p) + i);
}

// Log gate i, with every reset-class step (Re < GATELOOP_RESET_LOG_GATE, where
// exp is exactly 0 in f32) mapped to Re = −inf: kernels that sum log gates
// then restart at such a step instead of losing the sum's precision to it.
__device__ __forceinline__ float2 load_log_gate(const float* __restrict__ p, int64_t i) {
    float2 g = load_complex(p, i);
    if (g.x < GATELOOP_RESET_LOG_GATE) g.x = -INFINITY;
    return g;
}

constexpr float kLog2e = 1.4426950408889634f;

// |a| = e^{Re log_gate} as 2^(Re · log2 e): a reset (−inf) gives 0 exactly.
// A real gate's a (phase ≡ 0) is this alone.
__device__ __forceinline__ float gate_modulus(float log_gate_re) {
    return exp2f(log_gate_re * kLog2e);
}

// e^x for x ≤ 0 on the SFU: (2^(x·log2 e / 2))², the half power by PTX
// ex2.approx.ftz.f32. Three instructions (FMUL, MUFU.EX2, FMUL), where expf
// is eight (a Cody–Waite reduction, the SFU, a scale: sm_90 SASS, nvdisasm
// 13.x) and exp2f five (its subnormal-result fix-up, predicated). The
// chunked kernels' pairwise and anchored factors |E(late, early)| are one
// such exp each: about a fifth of the 2026-12-04 output launch's
// instructions. Why the square: the half power stays normal down to
// x·log2 e = −252, so results in f32's subnormal range (a gate of
// e^{−90} before the chunk: tests/gpu_chunked_grad.rs,
// dh0_after_a_subnormal_first_gate) keep their value, where the ftz
// instruction alone flushed them to 0. Accuracy: the SFU's 2 ulp (exp2f's
// documented bound; exp2f is this instruction) doubled by the square, plus
// the product's rounding, a relative 2^-24 of x·log2 e, that is |x|·2^-24
// relative in the result, at most 2^-24/e of the largest factor (x = −1):
// about 4 ulp in all, against expf's 2. The emulator (no __CUDA_ARCH__)
// takes exp2f (the fake driver's, perturbed) for the half power, flushed
// alike.
__device__ __forceinline__ float sfu_exp_nonpos(float x) {
    const float half = x * (0.5f * kLog2e);
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(half));
#else
    float r = exp2f(half);
    if (r < 0x1p-126f) r = 0.f;
#endif
    return r * r;
}

// exp of a complex log gate: a = 2^(Re·log2 e) · (cos Im, sin Im).
// Re = −inf → exactly (±0, ±0) (Im is finite).
__device__ __forceinline__ float2 complex_gate(float2 log_gate) {
    const float mag = gate_modulus(log_gate.x);
    float s, c;
    sincosf(log_gate.y, &s, &c);
    return make_float2(mag * c, mag * s);
}

// a = exp(log gate) for complex gates (kComplex), or its modulus alone for
// a real gate: the complex formula's value at phase 0, exactly.
template <bool kComplex>
__device__ __forceinline__ float2 gate_of(float2 log_gate) {
    return kComplex ? complex_gate(log_gate) : make_float2(gate_modulus(log_gate.x), 0.f);
}

// Element i of a gate-side f32 tensor (a state, its gradient, a log gate's
// gradient, a decay): an interleaved complex pair, or with real gates one
// f32 (Im reads as 0 and is not stored).
template <bool kComplex>
__device__ __forceinline__ float2 load_gate_side(const float* p, int64_t i) {
    return kComplex ? load_complex(p, i) : make_float2(__ldg(p + i), 0.f);
}
template <bool kComplex>
__device__ __forceinline__ void store_gate_side(float* p, int64_t i, float2 x) {
    if constexpr (kComplex) {
        reinterpret_cast<float2*>(p)[i] = x;
    } else {
        p[i] = x.x;
    }
}

// x · y (explicit fmaf: the rounding is pinned, src/cpu/scan.rs mirrors it).
__device__ __forceinline__ float2 cmul(float2 x, float2 y) {
    return make_float2(fmaf(x.x, y.x, -(x.y * y.y)), fmaf(x.x, y.y, x.y * y.x));
}

// a · h + b (explicit fmaf, mirrored by src/cpu/scan.rs).
__device__ __forceinline__ float2 apply(float2 a, float2 b, float2 h) {
    return make_float2(fmaf(a.x, h.x, fmaf(-a.y, h.y, b.x)), fmaf(a.x, h.y, fmaf(a.y, h.x, b.y)));
}

// One state element through one step of the recurrence, h ← a·h + inc with
// a real increment inc (k·v forward, q·dy in the adjoint): the recurrent
// kernels' step, one definition for all of them (cuda/recurrent.cu,
// cuda/recurrent_grad.cu).
__device__ __forceinline__ void recur(float a_re, float a_im, float& re, float& im, float inc) {
    const float nr = fmaf(a_re, re, fmaf(-a_im, im, inc));
    const float ni = fmaf(a_re, im, a_im * re);
    re = nr;
    im = ni;
}

// ---- compensated sums ------------------------------------------------------------

// a + b as the f32 sum and its exact rounding error (Knuth's TwoSum, no
// ordering of |a|, |b| assumed; exact because nvcc neither reassociates nor
// contracts additions without fast-math). The chunked and attention kernels
// keep their local Re Σ log_gate as (running sum, running sum of the errors):
// after hard-decaying steps the sum reaches thousands, where its ulp
// (~2.4e-4) would otherwise stay in every short difference. Mirror:
// cpu::two_sum.
__device__ __forceinline__ float2 two_sum(float a, float b) {
    const float s = a + b;
    const float bp = s - a;
    return make_float2(s, (a - (s - bp)) + (b - bp));
}

// Re(G_late − G_early) from compensated sums (hi, lo): cpu::re_diff. The hi
// difference is exact when the two lie within a factor 2 (Sterbenz), the case
// of a short, non-negligible difference.
__device__ __forceinline__ float re_diff(float late, float late_lo, float early, float early_lo) {
    return (late - early) + (late_lo - early_lo);
}

// ---- staging global memory ------------------------------------------------------

// kLoadsInFlight: the batch the kernels use. A loop that loads and stores
// one item per iteration waits a whole global round trip per item: nvcc does
// not move a guarded load above the previous item's store: the sm_90 SASS of
// the chunked output kernel (nvdisasm, 2026-11-30) issued one LDG, waited and
// stored for each of its ~30 items per thread per key slab, the recurrence
// likewise, and the H200 profiled both as latency-bound with DRAM 5-7% busy.
constexpr int kLoadsInFlight = 4;

// Items base .. base + kBatch − 1 that satisfy live(u): fetch(u) for each
// (global loads issued back to back, into registers), then put(u, value)
// for each. The one batching step of staged and staged_items.
template <int kBatch, class Live, class Fetch, class Put>
__device__ __forceinline__ void stage_batch(int base, Live live, Fetch fetch, Put put) {
    using T = decltype(fetch(0));
    T x[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
        if (live(base + u)) x[u] = fetch(base + u);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
        if (live(base + u)) put(base + u, x[u]);
    }
}

// Items i = first, first + stride, … < count (a count known at run time),
// kBatch at a time (stage_batch).
template <int kBatch, class Fetch, class Put>
__device__ __forceinline__ void staged(int first, int count, int stride, Fetch fetch, Put put) {
    for (int base = first; base < count; base += kBatch * stride) {
        stage_batch<kBatch>(
            0, [&](int u) { return base + u * stride < count; }, [&](int u) { return fetch(base + u * stride); },
            [&](int u, decltype(fetch(0)) x) { put(base + u * stride, x); });
    }
}

// Items u = 0 … kItems − 1 of one thread (a count known at compile time),
// kBatch at a time, fully unrolled: the callers index item u from a base
// they compute once, so an item costs its load, its conversion and its
// store, not the ~30 instructions of 64-bit index arithmetic, bounds tests
// and branches the per-item flat index took (nvdisasm, sm_90: the H200's
// instruction mix of the chunked kernels was ~60% integer and control
// instructions, 2026-11-30 profile).
template <int kItems, int kBatch, class Fetch, class Put>
__device__ __forceinline__ void staged_items(Fetch fetch, Put put) {
#pragma unroll
    for (int base = 0; base < kItems; base += kBatch) {
        stage_batch<kBatch>(base, [](int u) { return u < kItems; }, fetch, put);
    }
}

// Asks L2 for the line holding *a: a hint that holds no register and waits
// for nothing (PTX prefetch.global.L2). The emulator reads the byte instead,
// so that AddressSanitizer checks every prefetched address is inside its
// tensor. The chunked kernels' sequential walks, which stage chunk after
// chunk in one block, prefetch the next chunk's inputs while they load this
// one's, so that those loads find L2, not DRAM: where kPrefetchAhead, sm_90
// and newer (sm_80's ptxas spends registers on it that cost resident
// blocks), and the emulator. (The recurrence, which stages the same way,
// does not: both ways tried, per staged item and as a phase of its own,
// took sm_90's ptxas from 64 registers to 66 and to 122 at R = 8.)
__device__ __forceinline__ void prefetch_l2(const void* a) {
#ifdef __CUDA_ARCH__
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
#else
    (void)*static_cast<const volatile unsigned char*>(a);
#endif
}
// prefetch_l2 where `live`, as a predicated instruction (no branch).
__device__ __forceinline__ void prefetch_l2_if(const void* a, bool live) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %1, 0;\n\t@p prefetch.global.L2 [%0];\n\t}" ::"l"(a),
        "r"(static_cast<int>(live)));
#else
    if (live) (void)*static_cast<const volatile unsigned char*>(a);
#endif
}
// f(std::integral_constant<int, u>{}) for u = kFirst .. kLast − 1, u a
// constant expression in f (a generic lambda), where an unrolled loop's
// index is a constant only after optimization.
template <int kFirst, int kLast, class F>
__device__ __forceinline__ void for_const(F f) {
    if constexpr (kFirst < kLast) {
        f(std::integral_constant<int, kFirst>{});
        for_const<kFirst + 1, kLast>(f);
    }
}
// A 4-byte copy from global to shared memory that the thread does not wait
// for (cp.async, sm_80 and newer): base[kOffset] = *src where `live`, else
// 0 (src is then not read). kOffset is an immediate of the instruction, so
// that a loop's copies share one base register. The copies a thread issued
// since its last cp_async_wait_all are complete when that returns; other
// threads see them after a barrier that follows it. Until then nothing may
// read or write base[kOffset]. The emulator (and an arch without cp.async)
// copies at once.
template <int kOffset>
__device__ __forceinline__ void cp_async_f32(float* base, const float* src, bool live) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(base));
    asm volatile("cp.async.ca.shared.global [%0+%3], [%1], 4, %2;" ::"r"(to), "l"(src), "r"(live ? 4 : 0),
                 "n"(4 * kOffset)
                 : "memory");
#else
    base[kOffset] = live ? *src : 0.f;
#endif
}
// cp_async_f32 for 16 bytes (both addresses 16-byte aligned), bypassing
// L1 (.cg: the data is read once, from shared memory): the 16 bytes at
// base + kOffsetBytes := *src where `live`, else zeros.
template <int kOffsetBytes>
__device__ __forceinline__ void cp_async_16(void* base, const void* src, bool live) {
    static_assert(kOffsetBytes % 16 == 0, "16-byte aligned");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(base));
    asm volatile("cp.async.cg.shared.global [%0+%3], [%1], 16, %2;" ::"r"(to), "l"(src), "r"(live ? 16 : 0),
                 "n"(kOffsetBytes)
                 : "memory");
#else
    *reinterpret_cast<uint4*>(static_cast<unsigned char*>(base) + kOffsetBytes) =
        live ? *static_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
// Closes the batch of copies issued so far (a commit group).
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits for every copy the thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
constexpr bool kPrefetchAhead = true;
#else
constexpr bool kPrefetchAhead = false;
#endif

// GATELOOP_BY_ARCH(sm80, sm90): a launch bound's blocks per SM that differs
// by arch: the first below sm_90 (written for an A100's 164 KB of shared
// memory per SM, and walks without the L2 prefetch; sm_86 and sm_89 hold
// 100 KB, where the count only caps registers), the second for sm_90 and
// newer (228 KB) and for the host pass, which ignores it. ptxas allocates
// registers under a cap differently per arch, so a count that compiles
// spill-free on one may spill on the other (the entry tables in chunk.cu and
// chunk_grad.cu say which count each kernel takes, and why).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define GATELOOP_BY_ARCH(sm80, sm90) sm80
#else
#define GATELOOP_BY_ARCH(sm80, sm90) sm90
#endif

// ---- index math ----------------------------------------------------------------

// x, as a value the compiler cannot see through. A staging loop's address
// of item u is first + u·step with step = kStep · stride; left visible, nvcc
// re-derives it as (row + kStep·u) · stride, a 64-bit multiply per item
// (three IMADs and the carries), instead of stepping a base by a
// constant multiple (sm_90 SASS, nvdisasm 13.2). The emulator (g++, no
// __CUDA_ARCH__) takes the value as it is.
__device__ __forceinline__ int64_t opaque(int64_t x) {
#ifdef __CUDA_ARCH__
    asm("mov.b64 %0, %0;" : "+l"(x));
#endif
    return x;
}

// Peels the fastest-varying index of extent n off a flattened block index:
// returns idx % n and leaves idx / n in idx.
__device__ __forceinline__ int64_t split_index(int64_t& idx, int64_t n) {
    const int64_t r = idx % n;
    idx /= n;
    return r;
}

// (b, h) of a flattened b · heads + h.
struct BatchHead {
    int64_t b, h;
};
__device__ __forceinline__ BatchHead batch_head(int64_t bh, int64_t heads) {
    return BatchHead{bh / heads, bh % heads};
}

// Packed variable-length sequences (cu_seqlens, the ABI header) cut into
// slots of kSlotLen steps per head (the recurrent backward's checkpoint
// segments, the chunked forward's chunks), each sequence's slots counted
// from its first step: sequence b's first slot is ⌊cu[b] / kSlotLen⌋ + b.
// It needs ⌈len_b / kSlotLen⌉ ≤ ⌊len_b / kSlotLen⌋ + 1 slots, and the next
// sequence's base is ⌊cu[b + 1] / kSlotLen⌋ − ⌊cu[b] / kSlotLen⌋ + 1 ≥
// ⌊len_b / kSlotLen⌋ + 1 further, so no two sequences share a slot; the
// last ends by ⌊L / kSlotLen⌋ + N slots (the plans' count when packed).
template <int kSlotLen>
__device__ __forceinline__ int64_t packed_slot_base(const int64_t* cu, int64_t b) {
    return cu[b] / kSlotLen + b;
}
// The sequence of N whose slots hold `slot`: the last b with base(b) ≤ slot
// (a binary search; the slot may lie past that sequence's last step: an
// empty slot, which the caller recognizes).
template <int kSlotLen>
__device__ __forceinline__ int64_t packed_sequence_of(const int64_t* cu, int64_t sequences, int64_t slot) {
    int64_t lo = 0, hi = sequences - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (packed_slot_base<kSlotLen>(cu, mid) <= slot) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The state element [bh][row][col] of a [B·H, K, V] state that thread
// (blockIdx.x, threadIdx.x) of a one-thread-per-element launch owns (the
// carry kernels of scan, chunked and their backwards); false past the end.
struct StateElement {
    int64_t bh, row, col;
    BatchHead bhi;
};
// The state element of the thread, B·H·K·V in order, by grid.x (grid.y,
// where a launch has one, splits the element's work: the carry's segments).
__device__ __forceinline__ int64_t state_thread() {
    return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ bool state_element(const GateloopDims& d, StateElement& e) {
    const int64_t kv = d.key_dim * d.value_dim;
    const int64_t idx = state_thread();
    if (idx >= d.batch * d.heads * kv) return false;
    e.bh = idx / kv;
    e.row = (idx - e.bh * kv) / d.value_dim;
    e.col = idx - e.bh * kv - e.row * d.value_dim;
    e.bhi = batch_head(e.bh, d.heads);
    return true;
}

// The (b, h) row of a [B, L, H, D] sequence tensor of element type T:
// element (t, d) is at [t · s.time + d].
template <typename T>
__device__ __forceinline__ const T* seq_row(const void* base, const GateloopSeqStrides& s, int64_t b, int64_t h) {
    return static_cast<const T*>(base) + b * s.batch + h * s.head;
}
template <typename T>
__device__ __forceinline__ T* seq_row_mut(void* base, const GateloopSeqStrides& s, int64_t b, int64_t h) {
    return static_cast<T*>(base) + b * s.batch + h * s.head;
}

// The (b, h) row of a [B, L, H, D] complex f32 tensor (log_gate), as
// interleaved f32: strides count complex elements, hence the factor 2;
// complex element (t, d) is load_complex(row, t · s.time + d).
__device__ __forceinline__ const float* complex_seq_row(const float* base, const GateloopSeqStrides& s, int64_t b,
                                                        int64_t h) {
    return base + 2 * (b * s.batch + h * s.head);
}

// Offset, in complex elements, of state element (b, h, row, col) of a
// [B, H, K, V] state.
__device__ __forceinline__ int64_t state_index(const GateloopStateStrides& s, int64_t b, int64_t h, int64_t row,
                                               int64_t col) {
    return b * s.batch + h * s.head + row * s.key + col;
}

}  // namespace gateloop

#endif  // GATELOOP_COMMON_CUH
