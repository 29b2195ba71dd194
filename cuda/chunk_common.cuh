// What the chunked kernels share (cuda/chunk.cu, the forward; cuda/chunk_grad.cu,
// the backward): the tile constants, the tensor-core operand types and split
// products, the per-block context with the chunk-local segmented gate prefix
// (cpu::chunked::Scratch::build_prefix), and the shared-memory carving helpers.
// A header, not a compilation unit (build.rs compiles cuda/*.cu only).

#ifndef GATELOOP_CHUNK_COMMON_CUH
#define GATELOOP_CHUNK_COMMON_CUH

#include <mma.h>

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace gateloop {
namespace chunk {

using namespace nvcuda;

constexpr int kChunk = GATELOOP_CHUNK_LEN;          // 64 steps
constexpr int kSub = GATELOOP_CHUNK_SUB_LEN;        // 16 steps
constexpr int kSlab = GATELOOP_CHUNK_KEY_SLAB;      // 16 key channels per slab
constexpr int kWalkSlabReal = GATELOOP_CHUNK_WALK_SLAB_REAL;  // 32: a real-gate walk block's channels
constexpr int kVTile = GATELOOP_CHUNK_VALUE_TILE;   // 64 value columns per block
constexpr int kWideCols = GATELOOP_CHUNK_WIDE_TILE;  // 128: the wide output blocks'
constexpr int kThreads = GATELOOP_CHUNK_THREADS;    // 256
constexpr int kWarps = kThreads / 32;
constexpr int kSubs = kChunk / kSub;                // 4 sub-chunks
constexpr int kPairs = kSubs * (kSubs - 1) / 2;     // 6 off-diagonal blocks
constexpr int kPrefixSeg = GATELOOP_CHUNK_PREFIX_SEG;  // 8 steps per prefix segment
constexpr int kPrefixSegs = kChunk / kPrefixSeg;
static_assert(kPrefixSegs * kSlab <= kThreads, "one thread per (prefix segment, channel)");
static_assert(kChunk == 64 && kSub == 16 && kSlab == 16 && kVTile == 64 && kWideCols == 2 * kVTile && kThreads == 256 &&
                  kWalkSlabReal == 2 * kSlab,
              "the warp ↔ tile maps below assume these sizes");
static_assert(kPairs <= kWarps, "one warp per off-diagonal score block");

// Row stride (f32) of the gate prefix tables and raw q, k rows in the
// kernels with pairwise loops (Block's kLd): kSlab channels and 4 of
// padding. Why: the pairwise loops read one 16-byte channel group (LDS.128)
// of eight consecutive rows per quarter-warp; 64-byte rows put those eight
// reads on two of the eight 16-byte bank groups, a 4-way conflict. On the
// H200 (2026-12-04 profile) such reads were 44% to 57% of the output and
// dv launches' shared-memory wavefronts, in launches bound by the
// L1/shared pipe (80% to 88% busy). 80-byte rows put any eight consecutive
// rows on eight groups (5·t mod 8). 25% more table bytes, in the kernels
// that read them so (Block's kLd; src/cuda/chunk.rs: prefix_bytes).
constexpr int kPrefixLd = GATELOOP_CHUNK_PREFIX_LD;
static_assert(kPrefixLd >= kSlab && kPrefixLd % 4 == 0 && (kPrefixLd / 4) % 2 == 1,
              "whole 16-byte rows, an odd number of 16-byte groups");

// ---- operand types -----------------------------------------------------------

// TF32: f32 storage rounded to 10 explicit mantissa bits; m16n16k8.
struct OpTf32 {
    using storage = float;
    using elem = wmma::precision::tf32;
    static constexpr int kK = 8;
    static constexpr int kPad = 4;  // row padding (elements): ld stays a multiple of 16 bytes
    __device__ __forceinline__ static storage narrow(float x) { return wmma::__float_to_tf32(x); }
    __device__ __forceinline__ static float widen(storage x) { return x; }
};
struct OpF16 {
    using storage = __half;
    using elem = __half;
    static constexpr int kK = 16;
    static constexpr int kPad = 8;
    __device__ __forceinline__ static storage narrow(float x) { return __float2half_rn(x); }
    __device__ __forceinline__ static float widen(storage x) { return __half2float(x); }
};
struct OpBf16 {
    using storage = __nv_bfloat16;
    using elem = __nv_bfloat16;
    static constexpr int kK = 16;
    static constexpr int kPad = 8;
    __device__ __forceinline__ static storage narrow(float x) { return __float2bfloat16_rn(x); }
    __device__ __forceinline__ static float widen(storage x) { return __bfloat162float(x); }
};

// The operand type of each element type's EXACT products (the forward's
// Exact entry points name the same pairs; the backward, always exact and
// templated on the element type only, looks it up here): f32 inputs → TF32,
// bf16 → bf16, and f16 → bf16 too, not f16. Exact splits the operands that
// are not inputs — decayed rows q|E(n, −1)|, k|E(last, m)|, the carried
// states S, D — and those leave f16's range: a first gate of e^{−17} puts
// every q|E(n, −1)| of a chunk below f16's smallest subnormal (the backward's
// dh0 came out 0: tests/cpu_chunked_emu.rs), and a state of |a| = 1 over a
// long sequence passes f16's 65504. bf16 has f32's exponent range; its split
// hi + lo holds 16 significant bits (2^-17 relative, the f32 bounds' needs
// with room), and an f16 input (11 bits) exactly. Fast keeps f16 operands
// for f16 inputs (one product, fla's precision and range). kRawTerms: the
// split products a product of two raw inputs needs for f32 accuracy (3 for
// f32 through TF32 and for f16 through bf16, whose dropped lo·lo is below
// 2^-18 relative; 1 for bf16, exact in its own type).
template <typename input_t>
struct OpOf;
template <>
struct OpOf<float> {
    using type = OpTf32;
    static constexpr int kRawTerms = 3;
};
template <>
struct OpOf<__half> {
    using type = OpBf16;
    static constexpr int kRawTerms = 3;
};
template <>
struct OpOf<__nv_bfloat16> {
    using type = OpBf16;
    static constexpr int kRawTerms = 1;
};
// The split terms of a raw input tile (v or dy) in a product with a split
// operand of kTerms: a bf16 input is exact in a bf16 operand (its lo plane
// would be 0), so that plane is neither staged nor multiplied (the products
// dropped are exact zeros: the same sums bit for bit); f32 and f16 inputs
// take kTerms. Stage such a tile with these terms and multiply it with
// mma_split_step's term count for its side. By the input's kRawTerms
// (OpOf) where a layout knows that and not the input type.
template <int kRawTerms, int kTerms>
__host__ __device__ constexpr int raw_terms() {
    return kRawTerms == 1 ? 1 : kTerms;
}
template <typename input_t, int kTerms>
__host__ __device__ constexpr int raw_tile_terms() {
    return raw_terms<OpOf<input_t>::kRawTerms, kTerms>();
}

// Leading dimension of a tile of kCols value columns (kVTile, or the wide
// output launch's kWideCols for the state slab it stages).
template <class Op, int kCols = kVTile>
__host__ __device__ constexpr int ld_tile() {
    return kCols + Op::kPad;
}
// Four consecutive elements, stored at once (their alignment).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
    T v[4];
};

// A split operand matrix in shared memory: hi and lo planes of `rows × ld`.
template <class Op>
struct Split {
    typename Op::storage* hi;
    typename Op::storage* lo;
    int ld;
    // Element (r, c) := x, as hi + lo (lo only for three terms).
    template <int kTerms>
    __device__ __forceinline__ void put(int r, int c, float x) const {
        const typename Op::storage h = Op::narrow(x);
        hi[r * ld + c] = h;
        if (kTerms == 3) lo[r * ld + c] = Op::narrow(x - Op::widen(h));
    }
    // Elements (r, c .. c + 3) := x.x .. x.w, each as put's, one store a
    // plane (c a multiple of 4: 8 bytes for 16-bit storage, 16 for TF32).
    template <int kTerms>
    __device__ __forceinline__ void put(int r, int c, float4 x) const {
        using Q = Quad<typename Op::storage>;
        const Q h{{Op::narrow(x.x), Op::narrow(x.y), Op::narrow(x.z), Op::narrow(x.w)}};
        *reinterpret_cast<Q*>(hi + r * ld + c) = h;
        if (kTerms == 3) {
            // Formed, then stored whole (as h): built in place, g++ (the
            // emulator, its bank model) wrote it element by element.
            const Q l{{Op::narrow(x.x - Op::widen(h.v[0])), Op::narrow(x.y - Op::widen(h.v[1])),
                       Op::narrow(x.z - Op::widen(h.v[2])), Op::narrow(x.w - Op::widen(h.v[3]))}};
            *reinterpret_cast<Q*>(lo + r * ld + c) = l;
        }
    }
    // Elements (r, c .. c + 7) := eight values in w as loaded, hi alone (a
    // tile stored as loaded: stored_as_loaded; 16-byte aligned).
    __device__ __forceinline__ void put_group(int r, int c, uint4 w) const {
        static_assert(sizeof(typename Op::storage) == 2, "eight 16-bit elements");
        *reinterpret_cast<uint4*>(hi + r * ld + c) = w;
    }
    __device__ __forceinline__ const typename Op::storage* hi_at(int r, int c) const { return hi + r * ld + c; }
    __device__ __forceinline__ const typename Op::storage* lo_at(int r, int c) const { return lo + r * ld + c; }
};

// Whether a raw input tile of input_t staged with kTerms is its own hi
// plane, as loaded: one term of the input's own 16-bit type (bf16 into bf16
// operands, and f16 into f16 ones, Fast; not f32 into TF32, which rounds).
// Block::load_tile stages such tiles 16 bytes at a time, as they came: the
// bits put<1> stores (narrow(widen(x)) = x), a NaN's payload aside.
template <typename input_t, class Op, int kTerms>
__host__ __device__ constexpr bool stored_as_loaded() {
    return sizeof(input_t) == 2 && kTerms == 1 && std::is_same<typename Op::storage, input_t>::value;
}

template <class Op>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, Op::kK, float>;

// wmma::load_matrix_sync of an A or B operand that lies in shared memory
// (every Split plane does: carve), bf16 and TF32 as the same PTX
// instruction with the .shared state space; f16 as wmma loads it. Why: nvcc
// infers the state space of the f16 loads (wmma.load ... .shared.f16, which
// ptxas issues as one LDSM a fragment) but not of the bf16 and TF32 ones,
// whose generic wmma.load became four generic 32-bit loads (LD.E, 64-bit
// addresses) a fragment in every chunked kernel's products (sm_90 SASS,
// 2026-12-06); with .shared, one LDSM a bf16 fragment, shared loads for
// TF32. The same fragment registers in the same order (the instruction
// defines them), so the same products bit for bit. Volatile, as ldmatrix in
// mma.cuh (kept in order with the barriers that publish the planes), so
// nvcc no longer merges two loads of one fragment as it did the builtin's:
// the products load each once (mma_split_step, mma_split_steps). The
// kernel emulator's wmma reads the pointer as given, after checking that it
// lies in the block's shared memory (emu_expect_shared).
template <class Use, int kK, class Elem, class Layout, typename T>
__device__ __forceinline__ void load_operand(wmma::fragment<Use, 16, 16, kK, Elem, Layout>& f, const T* p,
                                             unsigned ld) {
#if defined(__CUDA_ARCH__)
    constexpr bool kBf16 = std::is_same<Elem, __nv_bfloat16>::value;
    if constexpr (kBf16 || std::is_same<Elem, wmma::precision::tf32>::value) {
        static_assert(kK == (kBf16 ? 16 : 8) && sizeof(f.x) == 16, "four 32-bit registers a fragment");
        constexpr bool kA = std::is_same<Use, wmma::matrix_a>::value;
        constexpr bool kRow = std::is_same<Layout, wmma::row_major>::value;
        const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
        uint32_t r[4];
#define GATELOOP_WMMA_LOAD_SHARED(AB, LAYOUT, SHAPE_TYPE)                                                \
    asm volatile("wmma.load." AB ".sync.aligned." LAYOUT "." SHAPE_TYPE " {%0,%1,%2,%3}, [%4], %5;\n" \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                       \
                 : "r"(at), "r"(ld))
#define GATELOOP_WMMA_LOAD_SHARED_ANY(SHAPE_TYPE)          \
    if constexpr (kA && kRow) {                            \
        GATELOOP_WMMA_LOAD_SHARED("a", "row", SHAPE_TYPE); \
    } else if constexpr (kA) {                             \
        GATELOOP_WMMA_LOAD_SHARED("a", "col", SHAPE_TYPE); \
    } else if constexpr (kRow) {                           \
        GATELOOP_WMMA_LOAD_SHARED("b", "row", SHAPE_TYPE); \
    } else {                                               \
        GATELOOP_WMMA_LOAD_SHARED("b", "col", SHAPE_TYPE); \
    }
        if constexpr (kBf16) {
            GATELOOP_WMMA_LOAD_SHARED_ANY("m16n16k16.shared.bf16")
        } else {
            GATELOOP_WMMA_LOAD_SHARED_ANY("m16n16k8.shared.tf32")
        }
#undef GATELOOP_WMMA_LOAD_SHARED_ANY
#undef GATELOOP_WMMA_LOAD_SHARED
        memcpy(&f.x[0], r, sizeof(r));
        return;
    }
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_expect_shared(p, "load_operand");
#endif
    wmma::load_matrix_sync(f, p, ld);
}

// wmma::store_matrix_sync (row-major) of an f32 accumulator into shared
// memory, and wmma::load_matrix_sync of one from it: TF32's (m16n16k8) as
// the same PTX instructions with the .shared state space, for
// load_operand's reason (nvcc's were generic: four ST.E.64 a fragment, on
// 64-bit addresses; these are four STS.64, LDS.64); the 16-bit products'
// (m16n16k16) by wmma, whose state space nvcc infers for them. The same
// elements in the same places. Every caller reads what it stored after a
// barrier (__syncwarp, __syncthreads), which the volatile asm stays in
// order with.
template <int kK>
__device__ __forceinline__ void store_accumulator(float* p, const wmma::fragment<wmma::accumulator, 16, 16, kK, float>& f,
                                                  unsigned ld) {
#if defined(__CUDA_ARCH__)
    if constexpr (kK == 8) {
        const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
        asm volatile(
            "wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1,%2,%3,%4,%5,%6,%7,%8}, %9;\n" ::"r"(at),
            "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]), "f"(f.x[4]), "f"(f.x[5]), "f"(f.x[6]), "f"(f.x[7]),
            "r"(ld));
        return;
    }
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_expect_shared(p, "store_accumulator");
#endif
    wmma::store_matrix_sync(p, f, ld, wmma::mem_row_major);
}
template <int kK>
__device__ __forceinline__ void load_accumulator(wmma::fragment<wmma::accumulator, 16, 16, kK, float>& f, const float* p,
                                                 unsigned ld) {
#if defined(__CUDA_ARCH__)
    if constexpr (kK == 8) {
        const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
        asm volatile("wmma.load.c.sync.aligned.row.m16n16k8.shared.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;\n"
                     : "=f"(f.x[0]), "=f"(f.x[1]), "=f"(f.x[2]), "=f"(f.x[3]), "=f"(f.x[4]), "=f"(f.x[5]),
                       "=f"(f.x[6]), "=f"(f.x[7])
                     : "r"(at), "r"(ld));
        return;
    }
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_expect_shared(p, "load_accumulator");
#endif
    wmma::load_matrix_sync(f, p, ld, wmma::mem_row_major);
}

// acc += A · B for one k-step (16 × kK times kK × 16), split operands: the
// small cross terms first (lo_A·hi_B, hi_A·lo_B), then hi·hi. A(i, k) at
// a.hi_at(...) with layout LA. kTermsA, kTermsB: 3 for a split side, 1 for
// a side taken as exact (its lo plane not read; raw_tile_terms), whose
// cross term is left out (with both 3: "exact"; both 1: "fast"). Each
// fragment loaded once (load_operand), hi B held across the cross terms.
// kGeneric: wmma's own loads (generic: see load_operand), hi B loaded again
// after the cross term (nvcc merges the two).
template <class Op, int kTermsA, int kTermsB, class LA, class LB, bool kGeneric = false>
__device__ __forceinline__ void mma_split_step(Acc<Op>& acc, const typename Op::storage* a_hi,
                                               const typename Op::storage* a_lo, int lda,
                                               const typename Op::storage* b_hi, const typename Op::storage* b_lo,
                                               int ldb) {
    const auto load = [](auto& f, const typename Op::storage* p, int ld) {
        if constexpr (kGeneric) {
            wmma::load_matrix_sync(f, p, ld);
        } else {
            load_operand(f, p, ld);
        }
    };
    wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, typename Op::elem, LA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::elem, LB> b;
    if constexpr (kTermsA == 3) {
        load(a, a_lo, lda);
        load(b, b_hi, ldb);
        wmma::mma_sync(acc, a, b, acc);
        load(a, a_hi, lda);
        if constexpr (kTermsB == 3 && !kGeneric) {
            wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::elem, LB> b_lo_f;
            load(b_lo_f, b_lo, ldb);
            wmma::mma_sync(acc, a, b_lo_f, acc);
        } else if constexpr (kTermsB == 3) {
            load(b, b_lo, ldb);
            wmma::mma_sync(acc, a, b, acc);
            load(b, b_hi, ldb);
        }
    } else if constexpr (kTermsB == 3) {
        load(a, a_hi, lda);
        load(b, b_lo, ldb);
        wmma::mma_sync(acc, a, b, acc);
        load(b, b_hi, ldb);
    } else {
        load(a, a_hi, lda);
        load(b, b_hi, ldb);
    }
    wmma::mma_sync(acc, a, b, acc);
}
// Both sides with kTerms.
template <class Op, int kTerms, class LA, class LB>
__device__ __forceinline__ void mma_step(Acc<Op>& acc, const typename Op::storage* a_hi,
                                         const typename Op::storage* a_lo, int lda,
                                         const typename Op::storage* b_hi, const typename Op::storage* b_lo,
                                         int ldb) {
    mma_split_step<Op, kTerms, kTerms, LA, LB>(acc, a_hi, a_lo, lda, b_hi, b_lo, ldb);
}
// mma_split_step for kN products that share A: acc(n) += A · B_n, B_n at
// b_hi(n), b_lo(n), A's fragments loaded once for all of them (as nvcc
// merged the builtin loads of one A). Each accumulator takes its terms in
// mma_split_step's order, so the same sums bit for bit. kLean: each product
// by mma_split_step with wmma's generic loads (kGeneric), as before
// load_operand, for the kernels that spilled at their register caps with
// the shared loads (kLean in intra_pass says which).
template <class Op, int kTermsA, int kTermsB, class LA, class LB, int kN, bool kLean = false, class AccOf,
          class BHi, class BLo>
__device__ __forceinline__ void mma_split_steps(AccOf acc, const typename Op::storage* a_hi,
                                                const typename Op::storage* a_lo, int lda, BHi b_hi, BLo b_lo,
                                                int ldb) {
    if constexpr (kLean) {
#pragma unroll
        for (int n = 0; n < kN; ++n) {
            mma_split_step<Op, kTermsA, kTermsB, LA, LB, true>(acc(n), a_hi, a_lo, lda, b_hi(n), b_lo(n), ldb);
        }
        return;
    }
    wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, typename Op::elem, LA> ah, al;
    load_operand(ah, a_hi, lda);
    if constexpr (kTermsA == 3) load_operand(al, a_lo, lda);
#pragma unroll
    for (int n = 0; n < kN; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::elem, LB> b;
        load_operand(b, b_hi(n), ldb);
        if constexpr (kTermsA == 3) wmma::mma_sync(acc(n), al, b, acc(n));
        if constexpr (kTermsB == 3) {
            wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::elem, LB> bl;
            load_operand(bl, b_lo(n), ldb);
            wmma::mma_sync(acc(n), ah, bl, acc(n));
        }
        wmma::mma_sync(acc(n), ah, b, acc(n));
    }
}

// ---- scalar helpers (mirrors of src/cpu/chunked.rs) ---------------------------

// x − 2π·round(x / 2π), 3-part Cody–Waite: cpu::chunked::reduce_2pi.
__device__ __forceinline__ float reduce_2pi(float x) {
    constexpr float kInv2Pi = 0.15915494f;
    constexpr float kC1 = 6.28125f;
    constexpr float kC2 = 0.0019353072f;
    constexpr float kC3 = 1.0253132e-11f;
    const float j = rintf(x * kInv2Pi);
    float r = fmaf(-j, kC1, x);
    r = fmaf(-j, kC2, r);
    return fmaf(-j, kC3, r);
}

// ---- the carry over the chunks -------------------------------------------------

// Where the carry of state element e finds its chunks: slot c of a
// [B·H, num_chunks, kParts·K, V] workspace `ws` (the real part; the imaginary
// part kv further) and the chunk's decay in ws_decay [B·H, num_chunks,
// gate_dim, kParts] (channel 0 for a per-head gate), counted from slot
// `first_slot` of the workspace (carry_row, below: e.bh · num_chunks; packed
// sequences: their head's row, from the sequence's first slot). Shared by the
// forward carry (ws_state) and the adjoint carry (ws_adj).
struct CarrySlots {
    float* re;
    const float* dec;
    int64_t chunk_stride;  // f32 between a chunk's slot and the next's
    int64_t dec_stride;    // f32 between a chunk's decay and the next's
};
template <int kParts>
__device__ __forceinline__ CarrySlots carry_slots(const GateloopChunkParams& p, float* ws, const StateElement& e,
                                                  int64_t first_slot) {
    const int64_t kv = p.dims.key_dim * p.dims.value_dim;
    const int64_t gd = p.dims.gate_dim;
    const int64_t ch = gd == 1 ? 0 : e.row;
    CarrySlots s;
    s.chunk_stride = kParts * kv;
    s.re = ws + first_slot * s.chunk_stride + e.row * p.dims.value_dim + e.col;
    s.dec = p.ws_decay + (first_slot * gd + ch) * kParts;
    s.dec_stride = gd * kParts;
    return s;
}

// The chunks state element e's carry walks: from slot e.bh · num_chunks, all
// num_chunks of them; kPacked (p.cu_seqlens), e.bhi.b is the sequence, its
// ⌈len / kChunk⌉ chunks from its first slot in head h's row. The forward's
// carry (chunk_carry) and the backward's adjoint carry (grad_adjoint_carry).
struct CarryRow {
    int64_t first_slot;
    int64_t chunks;
};
template <bool kPacked>
__device__ __forceinline__ CarryRow carry_row(const GateloopChunkParams& p, const StateElement& e) {
    if (!kPacked) return {e.bh * p.num_chunks, p.num_chunks};
    const int64_t* cu = p.cu_seqlens;
    return {e.bhi.h * p.num_chunks + packed_slot_base<kChunk>(cu, e.bhi.b),
            (cu[e.bhi.b + 1] - cu[e.bhi.b] + kChunk - 1) / kChunk};
}

// The exclusive carry of one state element over a head's chunks: launch 2
// of the forward (cuda/chunk.cu, chunk_carry) and 2b of the backward
// (cuda/chunk_grad.cu, grad_adjoint_carry). Visits c = 0 … nc − 1 (or
// nc − 1 … 0 when kBackward), replaces slot c of `cs` (the real part, and
// the imaginary part kv further when kComplex), which holds the chunk's own
// term X_c, by the carried s, then s ← a_c ⊙ s + X_c with a_c the chunk's
// decay (its conjugate when kBackward: the adjoint runs the recurrence
// backwards; real gates: one f32, s.y stays 0). Returns s after the last
// chunk visited (h_final, or dh0). The walks (walk_chunks) take the same
// step, so their slots match bit for bit.
//
// Latency: the chain through s is one complex FMA a chunk, but each chunk's
// a_c and X_c come from global memory, and nvcc cannot move a chunk's loads
// above the previous chunk's stores into the same workspace (it cannot tell
// that slot c + 1 is not slot c), so written as one loop each chunk waited
// out a full round trip: about 0.3 ms over the 1024 chunks of L = 65536,
// with the few warps that B·H·K·V threads give at B1 H4 (the separate
// carry's grids) unable to hide it. So a thread keeps the next
// kCarryAhead chunks' (a_c, X_c) in registers, loaded kCarryAhead chunks
// before their turn (after the stores of the chunk kCarryAhead earlier in
// program order, to other addresses: slot c + kCarryAhead is not slot c, and
// the decays are another workspace region). The same operations in the same
// order: the values are those of the one-loop form.
//
// Visits lo .. hi − 1 only (of the nc; hi < 0: all of them) when the carry
// runs in segments (carry_into_segment below).
constexpr int kCarryAhead = 8;
template <bool kBackward, bool kComplex>
__device__ __forceinline__ float2 carry_chunks(const CarrySlots& cs, int64_t kv, int64_t nc, float2 s,
                                               int64_t lo = 0, int64_t hi = -1) {
    if (hi < 0) hi = nc;
    float2 a[kCarryAhead], x[kCarryAhead];
    // Visit i is chunk c (the reverse order when kBackward).
    auto chunk_of = [&](int64_t i) { return kBackward ? nc - 1 - i : i; };
    auto slot_of = [&](int64_t i) { return cs.re + chunk_of(i) * cs.chunk_stride; };
    // Visit i's decay and term (nothing past the last visit: no read outside
    // the workspace).
    auto fetch = [&](int64_t i, float2& ai, float2& xi) {
        if (i >= hi) return;
        const float* dec = cs.dec + chunk_of(i) * cs.dec_stride;
        const float* slot = slot_of(i);
        if constexpr (kComplex) {
            ai = make_float2(dec[0], kBackward ? -dec[1] : dec[1]);
            xi = make_float2(slot[0], slot[kv]);
        } else {
            ai = make_float2(dec[0], 0.f);
            xi = make_float2(slot[0], 0.f);
        }
    };
#pragma unroll
    for (int j = 0; j < kCarryAhead; ++j) fetch(lo + j, a[j], x[j]);
    for (int64_t i0 = lo; i0 < hi; i0 += kCarryAhead) {
#pragma unroll
        for (int j = 0; j < kCarryAhead; ++j) {
            const int64_t i = i0 + j;
            if (i < hi) {
                float* slot = slot_of(i);
                if constexpr (kComplex) {
                    slot[0] = s.x;
                    slot[kv] = s.y;
                    s = apply(a[j], x[j], s);
                } else {
                    slot[0] = s.x;
                    s.x = fmaf(a[j].x, s.x, x[j].x);
                }
                fetch(i + kCarryAhead, a[j], x[j]);
            }
        }
    }
    return s;
}

// ---- the carry in segments ---------------------------------------------------------

// Where B·H = 1 to 4 heads meet L = 65536 (1024 chunks), the carry's
// B·H·K·V threads (64 blocks at K = V = 64) each walk 1024 chunks: on an
// H200 0.41 to 0.49 ms of a 1.2 to 1.9 ms forward (2026-12-04), and as much
// again twice in the backward. With p.carry_segments = S > 1 (the host's
// plan: batched problems whose carry has few threads and many chunks) the
// visits split into S segments of ceil(nc / S): carry_segment_sums writes
// each segment's local sum (from a zero state, the carry's own step) and its
// decay product (the segment's decays multiplied in visit order), one
// thread per (element, segment); then each (element, segment) thread of the
// carry starts from the state carried over the segments before it
// (carry_into_segment: s ← P_j s + s_j, the carry's step with the segment's
// product for a decay) and walks its segment as carry_chunks walks all the
// chunks. The states entering a segment differ from the one-walk carry's
// by rounding (a product of decays, then one step, in place of one step a
// chunk): the kernels' bounds against the reference, not bit for bit; a
// single segment (S ≤ 1, every plan with enough threads or few chunks) is
// the one walk, bit for bit. Every factor is a decay, |a| ≤ 1: their
// products shrink, never divide.
struct CarrySegment {
    int64_t lo, hi;  // visits lo .. hi − 1
};
__device__ __forceinline__ CarrySegment carry_segment(int64_t nc, int64_t segments, int64_t g) {
    const int64_t len = (nc + segments - 1) / segments;
    const int64_t lo = g * len;
    return {lo, lo + len < nc ? lo + len : nc};
}
// Entry (segment g, element idx) of p.ws_carry_segments: the local sum
// (part 0), the decay product (part 1), each a (re, im) pair.
__device__ __forceinline__ float* carry_segment_entry(const GateloopChunkParams& p, int part, int64_t g,
                                                      int64_t idx) {
    const int64_t elements = p.dims.batch * p.dims.heads * p.dims.key_dim * p.dims.value_dim;
    return p.ws_carry_segments + 2 * ((part * p.carry_segments + g) * elements + idx);
}
// Segment blockIdx.y's local sum and decay product of the element the thread
// carries (visits in carry_chunks' order: reversed, decays conjugated, when
// kBackward).
template <bool kBackward, bool kComplex>
__device__ __forceinline__ void carry_segment_sums(const GateloopChunkParams& p, const CarrySlots& cs, int64_t kv,
                                                   int64_t nc) {
    const int64_t g = blockIdx.y;
    const CarrySegment sg = carry_segment(nc, p.carry_segments, g);
    float2 s = make_float2(0.f, 0.f), prod = make_float2(1.f, 0.f);
    // No stores in this loop: nvcc issues the unrolled visits' loads ahead.
#pragma unroll 4
    for (int64_t i = sg.lo; i < sg.hi; ++i) {
        const int64_t c = kBackward ? nc - 1 - i : i;
        const float* dec = cs.dec + c * cs.dec_stride;
        const float* slot = cs.re + c * cs.chunk_stride;
        if constexpr (kComplex) {
            const float2 a = make_float2(dec[0], kBackward ? -dec[1] : dec[1]);
            s = apply(a, make_float2(slot[0], slot[kv]), s);
            prod = cmul(a, prod);
        } else {
            s.x = fmaf(dec[0], s.x, slot[0]);
            prod.x = dec[0] * prod.x;
        }
    }
    const int64_t idx = state_thread();
    float* sum = carry_segment_entry(p, 0, g, idx);
    float* dp = carry_segment_entry(p, 1, g, idx);
    sum[0] = s.x;
    sum[1] = s.y;
    dp[0] = prod.x;
    dp[1] = prod.y;
}
// The state entering segment g of the thread's element: s0 carried over
// segments 0 .. g − 1 by their sums and products.
template <bool kComplex>
__device__ __forceinline__ float2 carry_into_segment(const GateloopChunkParams& p, int64_t g, float2 s0) {
    const int64_t idx = state_thread();
    float2 s = s0;
    // No stores: the unrolled segments' loads go ahead of the chain (they
    // are L2 hits: S·B·H·K·V·16 bytes, 8 MB at B1 H4 K = V = 64, S = 32).
#pragma unroll 4
    for (int64_t j = 0; j < g; ++j) {
        const float* sum = carry_segment_entry(p, 0, j, idx);
        const float* dp = carry_segment_entry(p, 1, j, idx);
        if constexpr (kComplex) {
            s = apply(make_float2(dp[0], dp[1]), make_float2(sum[0], sum[1]), s);
        } else {
            s.x = fmaf(dp[0], s.x, sum[0]);
        }
    }
    return s;
}

// What one carry thread walks (the forward's chunk_carry, the adjoint
// grad_adjoint_carry): every visit from s0, or, segmented (batched,
// p.carry_segments > 1), segment blockIdx.y's from the state carried into
// it; `last`: whether its walk ends the carry (its state is h_final, dh0).
struct CarryWalk {
    CarrySegment visits;
    float2 s_in;
    bool last;
};
template <bool kComplex, bool kPacked>
__device__ __forceinline__ CarryWalk carry_walk(const GateloopChunkParams& p, int64_t nc, float2 s0) {
    const bool segmented = !kPacked && p.carry_segments > 1;
    if (!segmented) return {{0, nc}, s0, true};
    const int64_t g = blockIdx.y;
    return {carry_segment(nc, p.carry_segments, g), carry_into_segment<kComplex>(p, g, s0), g == p.carry_segments - 1};
}

// ---- per-block context and the chunk-local gate prefix ------------------------

// Shared-memory bytes of the prefix tables: Re G as a compensated pair (running
// sum, rounding-error sum), (cos θ, sin θ when complex) as f32 and the reset
// index as i32, each [kChunk][kLd]: rows of kSlab entries, or kPrefixLd in
// the kernels with pairwise loops, or kWalkSlabReal in the real-gate walks
// (Block's kLd). src/cuda/chunk.rs: prefix_bytes.
template <bool kComplex, int kLd = kSlab>
__host__ __device__ constexpr int prefix_bytes() {
    return (kComplex ? 5 : 3) * kChunk * kLd * 4;
}

// Thread tid's place in a tile of kWidth columns staged by the block
// (stage_tile): column `col`, rows row0, row0 + kStep, … with kStep =
// kThreads / kWidth. Every chunked kernel's block has kThreads threads, so
// row0 < kStep: a thread's item u lies in row block u of any tile whose
// blocks are kStep rows (the folds of for_tile's and stage_state_rows'
// callers).
//
// kPitch: the row stride, in 4-byte words, of the shared tables whose rows
// the tile's items index (default kWidth: rows packed). Where a warp spans
// two rows (kWidth = 16), its half-warps take rows r and r + d with d the
// least distance whose two rows' 16 words fall on the other 16 banks (d ·
// kPitch ≡ 16 mod 32): d = 1 for packed rows of 16 words, 4 for the padded
// 20-word rows (kPrefixLd), where rows r and r + 1 shared four banks (a
// two-way conflict on every row-wise read and write of those tables; the
// bank model, docs/speed-log.md item 40). Pass u's rows are still row
// block u (row0 < kStep), in another order.
template <int kPitch>
__host__ __device__ constexpr int half_warp_row_distance() {
    int d = 1;
    while (d < 16 && (d * kPitch) % 32 != 16) ++d;
    return d < 16 ? d : 1;
}
template <int kWidth, int kPitch = kWidth>
struct TileSlot {
    static_assert(kThreads % kWidth == 0, "whole rows per pass of the block");
    static constexpr int kStep = kThreads / kWidth;
    // The half-warps' row distance (1 where a warp holds whole rows).
    static constexpr int kPairDistance = kWidth == 16 ? half_warp_row_distance<kPitch>() : 1;
    int row0, col;
    __device__ __forceinline__ explicit TileSlot(int tid)
        : row0(row_of(static_cast<int>(static_cast<unsigned>(tid) / kWidth))),
          col(static_cast<int>(static_cast<unsigned>(tid) % kWidth)) {}
    // Half-warp h's row: h where d = 1; where d = 4 (the only other distance
    // a pitch of the tables gives), warp w = h / 2 takes rows 8·(w / 4) +
    // w % 4 and that + 4, its halves in order: h's bits h3 h2 h1 h0 → row
    // bits h3 h0 h2 h1.
    __device__ __forceinline__ static int row_of(int h) {
        if constexpr (kPairDistance == 1) {
            return h;
        } else {
            static_assert(kPairDistance == 4 && kStep == 16, "the padded tables' rows four apart, 16 a pass");
            return (h & 8) | ((h & 1) << 2) | ((h >> 1) & 3);
        }
    }
};

// Thread tid's place in a slab's anchored and cross rows (put_query_rows,
// put_key_rows, put_cross_rows), which read the prefix tables and raw q, k rows of a
// Block<.., kLd> past the barrier that published them: the padded rows'
// order (the half-warps on rows four apart: no two-way conflict on those
// rows' reads, docs/speed-log.md item 41; complex gates since item 55,
// where their wide Exact output launches had spilled 16 bytes with it on
// sm_90 and no longer do).
template <int kLd>
using AnchoredSlot = TileSlot<kSlab, kLd>;

// Visits thread `slot`'s items of a kRows × kWidth tile in shared memory:
// f(u, row, col) for u = 0 … kRows / kStep − 1, (row, col) = (slot.row0 +
// u·kStep, slot.col), unrolled: the items i = row·kWidth + col = tid +
// u·kThreads of a flat loop, in its order, with the row's block (u) known
// at compile time — for the 16-wide slabs, row / 16 = u.
template <int kRows, int kWidth, int kPitch, class F>
__device__ __forceinline__ void for_tile(const TileSlot<kWidth, kPitch>& slot, F f) {
    constexpr int kStep = TileSlot<kWidth, kPitch>::kStep;
    static_assert(kRows % kStep == 0, "whole passes of the block per tile");
#pragma unroll
    for (int u = 0; u < kRows / kStep; ++u) f(u, slot.row0 + u * kStep, slot.col);
}

// Stages a kRows × kWidth tile: thread `slot` takes items u = 0 … kRows /
// kStep − 1, (row, col) = (slot.row0 + u·kStep, slot.col) — the items i =
// row·kWidth + col = tid + u·kThreads of a flat loop over the tile, in the
// same order — fetch(u, row, col) → value for kBatch items, then
// put(row, col, value) for each (staged_items). Callers compute the
// thread's first address once and step it by u: see staged_items for why.
template <int kRows, int kWidth, int kBatch = kLoadsInFlight, class Fetch, class Put>
__device__ __forceinline__ void stage_tile(const TileSlot<kWidth>& slot, Fetch fetch, Put put) {
    constexpr int kStep = TileSlot<kWidth>::kStep;
    static_assert(kRows % kStep == 0, "whole passes of the block per tile");
    staged_items<kRows / kStep, kBatch>(
        [&](int u) { return fetch(u, slot.row0 + u * kStep, slot.col); },
        [&](int u, decltype(fetch(0, 0, 0)) x) { put(slot.row0 + u * kStep, slot.col, x); });
}

// A thread's items of a tile, loaded and not yet put: the walks issue a
// chunk's key and value loads before its gate prefix and put them after,
// so that the loads' round trips overlap the prefix's (Block::fetch_keys,
// fetch_groups; walk_chunks).
template <typename T, int kN>
struct Held {
    T v[kN];
};
// No loads to hold (Block::stage_slab's default `between`).
struct NoLoads {
    struct None {};
    __device__ __forceinline__ None operator()() const { return {}; }
};

// kAhead (the staging functions of Block): 0, or also prefetch into L2 what
// the same call will read for the chunk kAhead chunks away (+1 the next, −1
// the previous: a reverse walk), one chunk before it is read (prefetch_l2).
// A thread's items of that chunk continue its items of this one: item u of
// the next chunk is item u + kChunk / kStep of this arithmetic progression
// (TileSlot), so the prefetch reuses the load's address. Only
// the sequential walks (walk_chunks) take it: each of their blocks stages
// chunk after chunk, its warps waiting on those loads 56% of the time
// (H200 profile of the forward walk, 2026-11-30), where the chunk-parallel
// kernels have other blocks to run. On sm_90 (and in the emulator) only
// (kPrefetchAhead): there it costs the walks no register (sm_90 ptxas: 80
// to 127 for the 16-bit kernels, as before, ±1), while sm_80's ptxas gives
// them 128-145 instead of 105-141, one resident block per SM instead of two
// (and spills when held to 128).

template <typename input_t, bool kComplex, int kLd = kSlab>
struct Block {
    using Tr = InputTraits<input_t>;
    // Row stride of the block's [kChunk][kChannels] f32 tables, the gate
    // prefix tables and the raw q and k rows (load_keys): kPrefixLd in the
    // kernels whose pairwise loops read them across rows (the output and dv
    // launches, grad_qk), where it costs no resident block; kSlab in the
    // others (the state kernels and walks read them along rows, sit at
    // their register limits, and the padding cost them spills), and
    // kWalkSlabReal in the real-gate walks (walk_slab), whose blocks take
    // two slabs' channels at once.
    static_assert(kLd == kSlab || kLd == kPrefixLd || (kLd == kWalkSlabReal && !kComplex),
                  "plain or padded rows of a slab, or the real-gate walks' plain rows of two");
    // Key channels of the block's slab (its tables' columns): kSlab, or the
    // real-gate walks' kWalkSlabReal (plain rows of that many).
    static constexpr int kChannels = kLd == kPrefixLd ? kSlab : kLd;
    static_assert(kPrefixSegs * kChannels <= kThreads, "one thread per (prefix segment, channel)");
    // Thread tid's place in the [kChunk][kChannels] tables by rows: the
    // gates', q's and k's staging and the operand rows put_inter_queries
    // and put_state_keys build from them (a thread reads back what it
    // stored itself, with no barrier between: one order). The padded rows'
    // order (TileSlot's kPitch = kLd: half-warps on rows four apart, no
    // two-way conflict; speed log item 42) for complex gates (item 55) and
    // for real gates with bf16 or f32 inputs; rows in order for real gates
    // with f16 inputs, whose dv launches (sm_80 and sm_90) spilled 4 to 24
    // bytes with it at their register caps.
    using Slot = TileSlot<kChannels, (kComplex || !std::is_same<input_t, __half>::value) ? kLd : kChannels>;
    // Loads in flight a thread when staging a [kChunk][kChannels] table (the
    // gates, q or k): kLoadsInFlight, all four items of a slab of 16 (one
    // round trip); the real walks' eight items of 32 channels likewise in
    // one batch, not two round trips on a walk's serial path.
    static constexpr int kChannelBatch = kChunk / Slot::kStep;
    static_assert(kChannels == kWalkSlabReal || kChannelBatch == kLoadsInFlight, "unchanged for slabs of 16");
    // Entry (step t, channel j) of one of those tables.
    __device__ __forceinline__ static constexpr int at(int t, int j) { return t * kLd + j; }
    const GateloopChunkParams& p;
    int tid, warp;
    int64_t bh, b, h, chunk, vt, t0, v0;
    int n;  // steps in this chunk (≤ kChunk)
    bool per_head;
    const input_t* __restrict__ q;
    const input_t* __restrict__ k;
    const input_t* __restrict__ v;
    // Prefix tables [kChunk][kLd], entry (t, j) at at(t, j) (per-head gates
    // use column 0). Re G is
    // gre + glo: after hard-decaying steps |Re G| reaches thousands, where an
    // f32 running sum's ulp (~2.4e-4) would stay in every short difference.
    float* gre;
    float* glo;
    float* gcs;
    float* gsn;
    int32_t* rst;

    __device__ __forceinline__ Block(const GateloopChunkParams& params, unsigned char* smem)
        : Block(params, smem, params.value_tiles) {}
    // A grid of `value_tiles` value tiles per chunk (1: one block per chunk,
    // as the backward's dq/dk kernel launches).
    __device__ __forceinline__ Block(const GateloopChunkParams& params, unsigned char* smem, int64_t value_tiles)
        : Block(params, smem, value_tiles, params.num_chunks, blockIdx.x) {}
    // A per-chunk grid of tiles of `tile_cols` value columns: kVTile
    // (p.value_tiles of them), or kWideCols, the wide launches' ⌈V / 128⌉
    // (intra_pass's kCols).
    __device__ __forceinline__ static Block of_tiles(const GateloopChunkParams& params, unsigned char* smem,
                                                     int tile_cols) {
        return Block(params, smem, tiles_of(params, tile_cols), params.num_chunks, blockIdx.x, tile_cols);
    }
    // Value tiles of `tile_cols` columns a (b, h) row has: p.value_tiles of
    // kVTile, or ⌈V / tile_cols⌉.
    __device__ __forceinline__ static int64_t tiles_of(const GateloopChunkParams& params, int tile_cols) {
        return tile_cols == kVTile ? params.value_tiles : (params.dims.value_dim + tile_cols - 1) / tile_cols;
    }
    // Block `index` of a grid of value tiles of `tile_cols` columns
    // (fastest), `grid_chunks` chunks, then (b, h); grid_chunks = 1 for the
    // kernels that walk the chunks (at_chunk).
    __device__ __forceinline__ Block(const GateloopChunkParams& params, unsigned char* smem, int64_t value_tiles,
                                     int64_t grid_chunks, int64_t index, int tile_cols = kVTile)
        : p(params) {
        tid = threadIdx.x;
        warp = tid >> 5;
        int64_t blk = index;
        vt = split_index(blk, value_tiles);
        chunk = split_index(blk, grid_chunks);
        bh = blk;
        const BatchHead bhi = batch_head(bh, p.dims.heads);
        b = bhi.b;
        h = bhi.h;
        v0 = vt * tile_cols;
        at_chunk(chunk);
        per_head = p.dims.gate_dim == 1;
        q = seq_row<input_t>(p.q, p.q_strides, b, h);
        k = seq_row<input_t>(p.k, p.k_strides, b, h);
        v = seq_row<input_t>(p.v, p.v_strides, b, h);
        float* f = reinterpret_cast<float*>(smem);
        gre = f;
        f += kChunk * kLd;
        glo = f;
        f += kChunk * kLd;
        if (kComplex) {
            gcs = f;
            f += kChunk * kLd;
            gsn = f;
            f += kChunk * kLd;
        } else {
            gcs = gsn = nullptr;
        }
        rst = reinterpret_cast<int32_t*>(f);
    }

    // Moves the block to chunk c of its (b, h).
    __device__ __forceinline__ void at_chunk(int64_t c) {
        chunk = c;
        t0 = c * kChunk;
        n = steps_from(t0);
    }
    // Steps of the chunk starting at step `from` (≤ 0 past the last one).
    __device__ __forceinline__ int steps_from(int64_t from) const {
        return static_cast<int>(min(static_cast<int64_t>(kChunk), p.dims.len - from));
    }

    // Whether the block of a per-chunk grid has a chunk to work on (the
    // forward's state and output kernels call it first): batched, always.
    // Packed (p.cu_seqlens, the ABI header), it first moves the block from
    // slot `chunk` of its head's row to the chunk of the sequence whose
    // slots hold it, t0 and n counted from the sequence's first step; none
    // when the slot lies past that sequence's chunks (n = 0). The rest is
    // already the packed layout's: the grid's (b, h) index runs over the H
    // heads, so b = 0 (the one batch row: the row pointers) and bh = h,
    // whose workspace row the (bh, chunk) slot indexes.
    __device__ __forceinline__ bool has_chunk() {
        const int64_t* cu = p.cu_seqlens;
        if (cu == nullptr) return true;
        const int64_t s = packed_sequence_of<kChunk>(cu, p.dims.batch, chunk);
        const int64_t end = cu[s + 1];
        t0 = cu[s] + (chunk - packed_slot_base<kChunk>(cu, s)) * kChunk;
        n = t0 < end ? static_cast<int>(min(static_cast<int64_t>(kChunk), end - t0)) : 0;
        return n > 0;
    }

    // Whether the block's chunk (after has_chunk) is the first of its
    // sequence: chunk 0, or packed the chunk starting at its sequence's first
    // step (the backward's gate gradient at a sequence's first step is 0
    // without h0).
    __device__ __forceinline__ bool first_chunk() const {
        const int64_t* cu = p.cu_seqlens;
        if (cu == nullptr) return chunk == 0;
        return t0 == cu[packed_sequence_of<kChunk>(cu, p.dims.batch, chunk)];
    }

    // Steps of the chunk kAhead chunks from this one (kAhead = ±1; ≤ 0 where
    // there is none; the walks only, which run batched).
    template <int kAhead>
    __device__ __forceinline__ int ahead_steps() const {
        return ahead_steps<kAhead>(t0);
    }
    // The same from the chunk starting at step `from`.
    template <int kAhead>
    __device__ __forceinline__ int ahead_steps(int64_t from) const {
        static_assert(kAhead == -1 || kAhead == 1, "the next or the previous chunk");
        if (kAhead < 0) return from >= kChunk ? kChunk : 0;
        return steps_from(from + kChunk);
    }

    // The kAhead prefetch of one staged item (see kAhead above): item u of
    // a thread's TileSlot<kWidth> progression first + u·step over `base`, at
    // chunk row t, its column inside the tensor when col_in. Nothing for
    // kAhead = 0 or without kPrefetchAhead.
    template <int kWidth, int kAhead, typename T>
    __device__ __forceinline__ void prefetch_ahead(const T* base, int64_t first, int64_t step, int u, int t,
                                                   bool col_in) const {
        prefetch_ahead<kWidth, kAhead>(t0, base, first, step, u, t, col_in);
    }
    // The same for items of the chunk starting at step `from`.
    template <int kWidth, int kAhead, typename T>
    __device__ __forceinline__ void prefetch_ahead(int64_t from, const T* base, int64_t first, int64_t step, int u,
                                                   int t, bool col_in) const {
        if constexpr (kAhead != 0 && kPrefetchAhead) {
            constexpr int kNext = kChunk / TileSlot<kWidth>::kStep;  // item u of the next chunk: u + kNext
            if (col_in && t < ahead_steps<kAhead>(from)) prefetch_l2(base + first + (u + kAhead * kNext) * step);
        }
    }

    // Gate columns of the slab starting at channel d0 (1 for a per-head gate).
    __device__ __forceinline__ int gate_cols(int64_t d0) const {
        return per_head ? 1 : static_cast<int>(min(static_cast<int64_t>(kChannels), p.dims.key_dim - d0));
    }
    // The prefix-table column of slab channel j.
    __device__ __forceinline__ int col(int j) const { return per_head ? 0 : j; }

    // One entry of the prefix tables (Re G, its low part, θ, the last
    // reset), held in registers by the prefix's joins.
    struct PrefixEntry {
        float re, lo, sn;
        int32_t r;
    };
    __device__ __forceinline__ PrefixEntry prefix_entry(int i) const {
        return {gre[i], glo[i], kComplex ? gsn[i] : 0.f, rst[i]};
    }
    // Joins the segment-local prefix entry e (table index i) to the final
    // prefix c (the step before e's segment), stores the result at i and
    // returns it: cpu::chunked's Scratch::join_prefix, the same operations
    // in the same order; where the segment holds a reset nothing carries
    // over it (e returned, nothing stored). The joins pass entries in
    // registers: each step's table reads were a shared round trip on the
    // serial chain, after the previous step's stores. (A select in place
    // of the branch, storing e back, spilled 16 bytes in the complex f16
    // Exact state launch on sm_90.)
    __device__ __forceinline__ PrefixEntry join_prefix(const PrefixEntry& c, const PrefixEntry& e, int i) const {
        if (e.r >= 0) return e;  // a reset inside the segment: nothing carries over it
        const float2 s = two_sum(c.re, e.re);
        PrefixEntry j;
        j.lo = (c.lo + e.lo) + s.y;
        j.re = s.x;
        j.sn = kComplex ? reduce_2pi(c.sn + e.sn) : 0.f;
        j.r = c.r;
        glo[i] = j.lo;
        gre[i] = j.re;
        if (kComplex) gsn[i] = j.sn;
        rst[i] = j.r;
        return j;
    }

    // The segmented chunk-local prefix of gate channels d0 .. d0 + cols − 1:
    // cpu::chunked::Scratch::build_prefix (the same operations in the same
    // order). Segments of kPrefixSeg steps are scanned from zero in
    // parallel, then joined: a serial chain of 8 + 8 steps (each a TwoSum and
    // a phase reduction) instead of 64, while every other thread of the block
    // waits at the barrier. Steps past the chunk's end get g = 0 (finite factors that only
    // ever meet zero q, k, v). Ends with a barrier. In two parts, stage_gates
    // then (after a barrier) scan_prefix, for stage_slab, which stores the
    // slab's keys between them.
    template <int kAhead = 0, bool kSplitJoins = true>
    __device__ void build_prefix(int64_t d0) {
        stage_gates<kAhead>(d0);
        __syncthreads();
        scan_prefix<kSplitJoins>(d0);
    }
    // build_prefix's first part: the raw gates of the slab into the tables
    // (Re into gre, Im into gsn), for scan_prefix after a barrier; nothing
    // where `live` is false (the same on every thread: stage_slab's later
    // slabs of a per-head gate, which keep the first slab's prefix; the
    // loads predicated off, not branched around, so that stage_slab's
    // loads stay one batch). In two halves, like load_keys: fetch_gates
    // issues the thread's loads (and the kAhead prefetches) into registers,
    // all in one batch, put_gates stores them.
    template <int kAhead = 0>
    __device__ __forceinline__ void stage_gates(int64_t d0, bool live = true) {
        put_gates(fetch_gates<kAhead>(d0, live), live);
    }
    // Where a thread's gate items of the chunk starting at step `from` lie
    // (its Slot progression): item u, chunk row slot.row0 +
    // u·kStep, at row + first + u·step (complex: counted in (re, im)
    // pairs), its column inside the tensor where col_in (false everywhere
    // where `live` is false).
    struct GateItems {
        Slot slot;
        bool col_in;
        int64_t step, first;
        const float* row;
    };
    __device__ __forceinline__ GateItems gate_items(int64_t from, int64_t d0, bool live) const {
        constexpr int kStep = Slot::kStep;
        const Slot slot(tid);
        const bool col_in = live && slot.col < gate_cols(d0);
        const int64_t step = opaque(kStep * p.gate_strides.time);
        const int64_t first = opaque((from + slot.row0) * p.gate_strides.time + (per_head ? 0 : d0 + slot.col));
        const float* row = kComplex ? complex_seq_row(p.log_gate, p.gate_strides, b, h)
                                    : seq_row<float>(p.log_gate, p.gate_strides, b, h);
        return {slot, col_in, step, first, row};
    }
    using HeldGates = Held<float2, kChannelBatch>;
    template <int kAhead = 0>
    __device__ __forceinline__ HeldGates fetch_gates(int64_t d0, bool live = true) const {
        constexpr int kStep = Slot::kStep;
        const GateItems g = gate_items(t0, d0, live);
        HeldGates held;
#pragma unroll
        for (int u = 0; u < kChannelBatch; ++u) {
            const int t = g.slot.row0 + u * kStep;
            if (kComplex) {
                prefetch_ahead<kChannels, kAhead>(reinterpret_cast<const float2*>(g.row), g.first, g.step, u, t,
                                                  g.col_in);
            } else {
                prefetch_ahead<kChannels, kAhead>(g.row, g.first, g.step, u, t, g.col_in);
            }
            float2 x = make_float2(0.f, 0.f);
            if (g.col_in && t < n) {
                if (kComplex) {
                    x = load_complex(g.row, g.first + u * g.step);
                } else {
                    x.x = __ldg(g.row + g.first + u * g.step);
                }
            }
            held.v[u] = x;
        }
        return held;
    }
    __device__ __forceinline__ void put_gates(const HeldGates& held, bool live = true) const {
        constexpr int kStep = Slot::kStep;
        const Slot slot(tid);
        if (!live) return;
#pragma unroll
        for (int u = 0; u < kChannelBatch; ++u) {
            const int i = at(slot.row0 + u * kStep, slot.col);
            gre[i] = held.v[u].x;
            if (kComplex) gsn[i] = held.v[u].y;
        }
    }
    // stage_gates for chunk c of the block's (b, h), real gates: each item
    // a cp.async into the tables (no register held while it lands), with
    // the kAhead prefetch of the chunk after c. The real-gate walks issue
    // the next chunk's gates while they finish this one (once its tables'
    // last readers, put_slab and the decays, are past a barrier) and wait
    // for them (cp_async_wait_all, then a barrier) before that chunk's
    // scans: the gates' round trip then no longer lies on the walk's serial
    // path, and no register holds them meanwhile.
    template <int kAhead = 0>
    __device__ __forceinline__ void issue_gates_async(int64_t d0, int64_t c) const {
        static_assert(!kComplex, "the real gates: one f32 a table entry");
        constexpr int kStep = Slot::kStep;
        const int64_t from = c * kChunk;
        const int steps = steps_from(from);
        const GateItems g = gate_items(from, d0, true);
        float* const to = gre + at(g.slot.row0, g.slot.col);
        for_const<0, kChannelBatch>([&](auto uc) {
            constexpr int u = decltype(uc)::value;
            const int t = g.slot.row0 + u * kStep;
            prefetch_ahead<kChannels, kAhead>(from, g.row, g.first, g.step, u, t, g.col_in);
            const bool live = g.col_in && t < steps;
            cp_async_f32<u * kStep * kLd>(to, live ? g.row + g.first + u * g.step : g.row, live);
        });
        cp_async_commit();
    }
    // build_prefix's second part: the scans and joins over the staged gates.
    // Ends with a barrier. kSplitJoins: phase 3 below as it is laid out for
    // slabs of 16 channels (false: one thread per (segment, channel), as
    // before; the kernels where the new layout spilled at a register cap,
    // and the walks, which ptxas gave far more registers with it).
    template <bool kSplitJoins = true>
    __device__ __forceinline__ void scan_prefix(int64_t d0) {
        const int cols = gate_cols(d0);
        // 1. One thread per (segment, channel) scans its kPrefixSeg steps from
        //    zero (the walk of cpu::chunked::Scratch::build_prefix).
        const int j = tid % kChannels;
        const int seg = tid / kChannels;
        if (seg < kPrefixSegs && j < cols) {
            float pre_re = 0.f, pre_lo = 0.f, pre_im = 0.f;
            int32_t pre_r = -1;
            for (int t = seg * kPrefixSeg; t < (seg + 1) * kPrefixSeg; ++t) {
                const int i = at(t, j);
                const float gr = gre[i];
                const bool keep = gr >= GATELOOP_RESET_LOG_GATE;
                const float2 s_re = two_sum(pre_re, gr);
                pre_re = keep ? s_re.x : 0.f;
                pre_lo = keep ? pre_lo + s_re.y : 0.f;
                if (kComplex) {
                    const float s_im = reduce_2pi(pre_im + reduce_2pi(gsn[i]));
                    pre_im = keep ? s_im : 0.f;
                    gsn[i] = pre_im;
                }
                pre_r = max(pre_r, keep ? -1 : t);
                gre[i] = pre_re;
                glo[i] = pre_lo;
                rst[i] = pre_r;
            }
        }
        __syncthreads();
        // 2. One thread per channel joins the segments' last steps in order,
        //    each step's entry read one step ahead.
        for (int c = tid; c < cols; c += kThreads) {
            PrefixEntry carry = prefix_entry(at(kPrefixSeg - 1, c));
            PrefixEntry next = prefix_entry(at(2 * kPrefixSeg - 1, c));
#pragma unroll
            for (int sg = 1; sg < kPrefixSegs; ++sg) {
                const PrefixEntry e = next;
                if (sg + 1 < kPrefixSegs) next = prefix_entry(at((sg + 2) * kPrefixSeg - 1, c));
                carry = join_prefix(carry, e, at((sg + 1) * kPrefixSeg - 1, c));
            }
        }
        __syncthreads();
        // 3. Every other step of segments ≥ 1 joins its segment's carry
        //    (read once), each step's entry read one step ahead. Each join
        //    is independent of the others, so which thread takes which
        //    step is free: with slabs of 16 channels, warp w takes segment
        //    w, its half-warps half of its steps each, on rows kApart
        //    apart at every access: 4 on the padded rows (80 words ≡ 16
        //    mod 32) and 1 on plain rows of 16 words, so the two half-warps'
        //    words lie in disjoint banks. Why: one thread per (segment,
        //    channel) put a warp's half-warps on two segments, rows 8 apart,
        //    on the same banks for both row pitches (a two-way conflict on
        //    every read and store of the phase), and took 7 steps where
        //    this takes 4 (the last, the segment's last step joined by
        //    phase 2, read but not joined). The same joins of the same
        //    entries: the same bits.
        if constexpr (kChannels == 16 && kSplitJoins) {
            static_assert(kPrefixSegs * 32 <= kThreads && kPrefixSeg == 8, "a warp a segment, four steps a half-warp");
            constexpr int kApart = kLd == kPrefixLd ? 4 : 1;
            constexpr int kStride = kApart == 4 ? 1 : 2;
            // Spelled from phase 1's (segment, channel), and the last step
            // below by a select: the spelling that compiled spill-free at
            // the sm_90 caps (others, with a fresh tid / 32 or a branch
            // around the join, spilled 4 to 28 bytes in the wide real
            // 16-bit launches).
            const int sg = seg >> 1;            // this warp's segment
            const int u0 = (seg & 1) * kApart;  // the half-warp's first step
            if (sg >= 1 && j < cols) {
                const PrefixEntry carry = prefix_entry(at(sg * kPrefixSeg - 1, j));
                const int first = sg * kPrefixSeg + u0;
                PrefixEntry next = prefix_entry(at(first, j));
#pragma unroll
                for (int v = 0; v < kPrefixSeg / 2; ++v) {
                    PrefixEntry e = next;
                    if (v + 1 < kPrefixSeg / 2) next = prefix_entry(at(first + kStride * (v + 1), j));
                    // The second half-warp's last step is the segment's
                    // last (phase 2 joined it): its reset field set to 0,
                    // as after a reset, for which join_prefix stores nothing.
                    if (v == kPrefixSeg / 2 - 1) e.r = u0 != 0 ? 0 : e.r;
                    join_prefix(carry, e, at(first + kStride * v, j));
                }
            }
        } else if (seg >= 1 && seg < kPrefixSegs && j < cols) {
            const PrefixEntry carry = prefix_entry(at(seg * kPrefixSeg - 1, j));
            const int first = seg * kPrefixSeg;
            PrefixEntry next = prefix_entry(at(first, j));
#pragma unroll
            for (int u = 0; u < kPrefixSeg - 1; ++u) {
                const PrefixEntry e = next;
                if (u + 1 < kPrefixSeg - 1) next = prefix_entry(at(first + u + 1, j));
                join_prefix(carry, e, at(first + u, j));
            }
        }
        __syncthreads();
        if (kComplex) {
            // θ ∈ [−π, π] (reduced above): the SFU's sin/cos have an absolute
            // error ≤ 2^−21.4 there, and no slow-path argument reduction.
            const auto to_sincos = [&](int i) {
                float s, c;
                __sincosf(gsn[i], &s, &c);
                gcs[i] = c;
                gsn[i] = s;
            };
            for (int e = tid; e < kChunk * kChannels; e += kThreads) {
                if constexpr (kLd == kChannels) {
                    to_sincos(e);
                } else {
                    // Padded rows: row block e / (16·kChannels) in the
                    // tables' Slot order (half-warps on rows four apart),
                    // where rows in order put them on rows side by side, a
                    // two-way conflict on each of the three accesses
                    // (speed log item 55). These are Slot(tid)'s items
                    // (row0 + 16·u) spelled from e: a Slot held across the
                    // loop, rolled or not, spilled 4 bytes in the f16
                    // complex dv launch at its sm_90 cap.
                    static_assert(Slot::kStep == 16, "16-row blocks");
                    const int h = e / kChannels;
                    to_sincos(at(Slot::row_of(h & 15) | (h & ~15), e % kChannels));
                }
            }
            __syncthreads();
        }
    }

    // |E(late, early)| of table column cl, early = −1 meaning "before the
    // chunk": 0 across a reset, else exp of a difference ≤ 0.
    // Branch-free (a select, not a branch around the exp: resets are rare,
    // so the exp is almost always taken, and the branch cost a
    // reconvergence per call in the pairwise loops); the tables hold finite
    // sums, so the exp across a reset is finite and discarded.
    __device__ __forceinline__ float modulus(int late, int early, int cl) const {
        const float e = early < 0 ? 0.f : gre[at(early, cl)];
        const float e_lo = early < 0 ? 0.f : glo[at(early, cl)];
        return modulus_of(late, early, cl, e, e_lo);
    }
    // modulus for an early step of the chunk (early ≥ 0, as in every
    // pairwise and anchored product): the same value, its table reads
    // unguarded, so nvcc issues one LDS.128 for four consecutive channels
    // where the guarded read was one predicated LDS a channel.
    __device__ __forceinline__ float modulus_within(int late, int early, int cl) const {
        return modulus_of(late, early, cl, gre[at(early, cl)], glo[at(early, cl)]);
    }
    __device__ __forceinline__ float modulus_of(int late, int early, int cl, float e, float e_lo) const {
        return modulus_between(gre[at(late, cl)], glo[at(late, cl)], rst[at(late, cl)], early, e, e_lo);
    }
    // The same from the late step's entries (Re G, its low part, its last
    // reset) and the early step's.
    __device__ __forceinline__ static float modulus_between(float late, float late_lo, int32_t late_reset, int early,
                                                            float e, float e_lo) {
        const float w = sfu_exp_nonpos(fminf(re_diff(late, late_lo, e, e_lo), 0.f));
        return late_reset > early ? 0.f : w;
    }
    __device__ __forceinline__ float cos_at(int t, int cl) const { return kComplex ? gcs[at(t, cl)] : 1.f; }
    __device__ __forceinline__ float sin_at(int t, int cl) const { return kComplex ? gsn[at(t, cl)] : 0.f; }
    // A late step's table entries, read once where several early steps
    // pair with it (add_half_pairs' tiles).
    struct LateEntry {
        float re, lo, cs, sn;
        int32_t reset;
    };
    __device__ __forceinline__ LateEntry late_entry(int late, int cl) const {
        return {gre[at(late, cl)], glo[at(late, cl)], cos_at(late, cl), sin_at(late, cl), rst[at(late, cl)]};
    }
    // modulus_within(late, early, cl) from late's entries.
    __device__ __forceinline__ float modulus_after(const LateEntry& l, int early, int cl) const {
        return modulus_between(l.re, l.lo, l.reset, early, gre[at(early, cl)], glo[at(early, cl)]);
    }
    // The entry pair of every decayed or anchored operand row: w = |E|·x at
    // step t gives (w cos θ_t, −(w sin θ_t)), which is [Re | Im] of
    // x |E| e^{−iθ_t} (a key row) and [Re | −Im] of x |E| e^{iθ_t} (a query
    // row); real gates (w, 0).
    __device__ __forceinline__ float2 phased(float w, int t, int cl) const {
        return make_float2(w * cos_at(t, cl), kComplex ? -(w * sin_at(t, cl)) : 0.f);
    }
    // phased(w, late, cl) from late's entries.
    __device__ __forceinline__ static float2 phased_after(const LateEntry& l, float w) {
        return make_float2(w * l.cs, kComplex ? -(w * l.sn) : 0.f);
    }
    // An anchored query entry, q |E(late, anchor)| e^{iθ_late} as
    // [Re | −Im], from late's entries (anchor ≥ 0 a step of the chunk).
    __device__ __forceinline__ float2 anchored_query(const LateEntry& l, float q, int anchor, int cl) const {
        return phased_after(l, modulus_after(l, anchor, cl) * q);
    }
    // The inter-chunk query entry, q |E(late, −1)| e^{iθ_late} as [Re | −Im]:
    // modulus(late, −1, cl), whose step before the chunk has Re G = 0.
    __device__ __forceinline__ static float2 inter_query(const LateEntry& l, float q) {
        return phased_after(l, modulus_between(l.re, l.lo, l.reset, -1, 0.f, 0.f) * q);
    }
    // An anchored key entry, k |E(anchor, m)| e^{−iθ_m} as [Re | Im]
    // (anchor ≥ m; raw k in kraw at slab column j, table column cl).
    __device__ __forceinline__ float2 anchored_key(const float* kraw, int anchor, int m, int j, int cl) const {
        return phased(modulus_within(anchor, m, cl) * kraw[at(m, j)], m, cl);
    }

    // Columns col0 .. col0 + kWidth − 1 of x over the chunk, each (step,
    // column, value) to put; zero past the chunk and from column `limit` on.
    template <int kWidth, int kAhead = 0, class Put>
    __device__ __forceinline__ void load_rows(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                              int64_t col0, int64_t limit, Put put) const {
        const TileSlot<kWidth> slot(tid);
        const bool col_in = col0 + slot.col < limit;
        const int64_t step = opaque(TileSlot<kWidth>::kStep * s.time);
        const int64_t first = opaque((t0 + slot.row0) * s.time + col0 + slot.col);
        stage_tile<kChunk, kWidth>(
            slot,
            [&](int u, int t, int) {
                prefetch_ahead<kWidth, kAhead>(x, first, step, u, t, col_in);
                return (col_in && t < n) ? Tr::load(x, first + u * step) : 0.f;
            },
            put);
    }

    // x (q or k) of slab d0 into xs [kChunk][kLd] f32 (entry (t, j) at
    // at(t, j)), zero past the chunk / K. (An element a load: 16-byte
    // groups, a quarter of the loads, made ptxas spill four kernels.)
    template <int kAhead = 0>
    __device__ __forceinline__ void load_keys(const input_t* __restrict__ x, const GateloopSeqStrides& s, int64_t d0,
                                              float* xs) const {
        put_keys(fetch_keys<kAhead>(x, s, d0), xs);
    }
    // load_keys in two halves: fetch_keys issues the thread's loads (and the
    // kAhead prefetches) into registers, all in one batch, put_keys stores
    // them into xs; the real-gate walks put them after the gate prefix,
    // whose round trip and serial joins the loads then overlap.
    using HeldKeys = Held<float, kChannelBatch>;
    template <int kAhead = 0>
    __device__ __forceinline__ HeldKeys fetch_keys(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                   int64_t d0) const {
        constexpr int kStep = Slot::kStep;
        static_assert(kChannelBatch * kStep == kChunk, "every item of the slab in one batch");
        const Slot slot(tid);
        const bool col_in = d0 + slot.col < p.dims.key_dim;
        const int64_t step = opaque(kStep * s.time);
        const int64_t first = opaque((t0 + slot.row0) * s.time + d0 + slot.col);
        HeldKeys held;
#pragma unroll
        for (int u = 0; u < kChannelBatch; ++u) {
            const int t = slot.row0 + u * kStep;
            prefetch_ahead<kChannels, kAhead>(x, first, step, u, t, col_in);
            held.v[u] = (col_in && t < n) ? Tr::load(x, first + u * step) : 0.f;
        }
        return held;
    }
    __device__ __forceinline__ void put_keys(const HeldKeys& held, float* xs) const {
        constexpr int kStep = Slot::kStep;
        const Slot slot(tid);
#pragma unroll
        for (int u = 0; u < kChannelBatch; ++u) xs[at(slot.row0 + u * kStep, slot.col)] = held.v[u];
    }

    // Whether stage_slab can stage x's slab rows (q or k) four channels a
    // load (key quads): K a multiple of 4 (a group lies inside the tensor or
    // wholly past it) and every group aligned to its bytes (x and the time
    // stride multiples of 8 for 16-bit inputs, 16 for f32; slabs start at
    // multiples of 16 channels). The same on every thread.
    __device__ __forceinline__ bool key_quads(const input_t* x, const GateloopSeqStrides& s) const {
        return grouped_rows<4>(x, s, 0, p.dims.key_dim);
    }
    // Whether x's columns col0 .. can be read in groups of kGroup elements:
    // every step's row there aligned to a group's bytes (x + col0 and the
    // time stride) in a tensor of `limit` columns, a multiple of kGroup (a
    // group is inside it or wholly past it). The same on every thread.
    template <int kGroup>
    __device__ __forceinline__ static bool grouped_rows(const input_t* x, const GateloopSeqStrides& s, int64_t col0,
                                                        int64_t limit) {
        constexpr uintptr_t kBytes = kGroup * sizeof(input_t);
        const uintptr_t bytes = reinterpret_cast<uintptr_t>(x + col0) | static_cast<uintptr_t>(s.time * sizeof(input_t));
        return (bytes & (kBytes - 1)) == 0 && limit % kGroup == 0;
    }
    // Thread tid's item of a slab staged in key quads: channels 4g .. 4g + 3
    // (g = tid % 4) of step `row`, one load and one 16-byte store, where
    // fetch_keys takes four loads (each with its 64-bit address) and four
    // stores. A quarter-warp's eight stores (one wavefront where their 32
    // words fall on distinct banks) take two rows, k = tid / 4 and k + 1:
    // side by side where the rows are packed (16 words: the other 16
    // banks), four apart where padded (kPrefixLd, 20 words: 80 ≡ 16 mod
    // 32, where side by side they share four banks), bits 0 and 2 of k
    // swapped: a warp still stages its own eight rows. The items differ from
    // Slot's, so only where the rows are read past a barrier (stage_slab's
    // kKeyQuads); where key_quads does not hold, the same items an element
    // a load (fetch_key_quad).
    struct KeyQuadSlot {
        static constexpr int kGroups = kChannels / 4;
        static_assert(kGroups * kChunk == kThreads, "one group of four channels a thread");
        static_assert(kLd == kSlab || kLd == kPrefixLd, "rows of 16 words, or 20 (half_warp_row_distance 4)");
        int g, row;
        __device__ __forceinline__ explicit KeyQuadSlot(int tid) : g(tid % kGroups) {
            const int k = tid / kGroups;
            row = kLd == kSlab ? k : (k & ~5) | ((k & 1) << 2) | ((k >> 2) & 1);
        }
    };
    // Thread tid's key quad (KeyQuadSlot) of x's slab d0 as loaded: one
    // load where `quads` (key_quads), else an element a load; zero past the
    // chunk and K.
    using KeyQuad = typename Tr::Quad;
    __device__ __forceinline__ KeyQuad fetch_key_quad(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                      int64_t d0, bool quads) const {
        const KeyQuadSlot slot(tid);
        const int64_t col = d0 + 4 * slot.g;
        const int64_t i = opaque((t0 + slot.row) * s.time + col);
        const int64_t count = slot.row < n ? min(p.dims.key_dim - col, int64_t{4}) : 0;
        if (quads) return count > 0 ? Tr::load_quad(x, i) : KeyQuad{};
        return Tr::load_quad_each(x, i, count);
    }
    __device__ __forceinline__ void put_key_quad(const KeyQuad& held, float* xs) const {
        const KeyQuadSlot slot(tid);
        const float4 f = Tr::widen_quad(held);
        *reinterpret_cast<float4*>(xs + at(slot.row, 4 * slot.g)) = f;
    }
    // A chunk-parallel kernel's slab d0: the gate prefix (every slab, or the
    // first of a per-head gate) and raw k into kraw, raw q into qraw too
    // where kQueries (load_keys' layout), published by the prefix's first
    // barrier: one barrier for the three tables, where the keys took one of
    // their own after the prefix's four. kHeld: the gates', q's and k's
    // loads are issued together and stored after, one round trip for the
    // three; else (kernels at their register caps, where the held loads
    // spilled) the keys are loaded and stored first, then the gates, two
    // round trips as before. Call where the previous slab's readers of
    // the tables, qraw and kraw are past a barrier. Ends with a barrier.
    //
    // `between()` runs after that barrier, before the prefix's scans, and
    // stage_slab returns what it returns: loads issued there (intra_pass:
    // the slab's state rows, fetch_state_rows) are in flight across the
    // scans' barriers and serial joins instead of a round trip after them.
    //
    // kKeyQuads: q and k staged in key quads (fetch_key_quad) where
    // key_quads allows; not in the launches where ptxas spilled with them
    // at a register cap.
    template <bool kQueries, bool kHeld, bool kSplitJoins = true, bool kKeyQuads = true, class Between = NoLoads>
    __device__ __forceinline__ auto stage_slab(int64_t d0, float* qraw, float* kraw, Between between = {}) {
        return stage_slab_rows<kQueries, kHeld, true, kSplitJoins, kKeyQuads>(k, p.k_strides, d0, qraw, kraw, between);
    }

    // A slab's gate prefix (where the slab builds one) and raw x (k, or the
    // backward's q) into xs, for the kernels whose threads read back only
    // the rows of xs they loaded (chunk_state, grad_w): stage_slab without
    // q, and with a barrier only where the slab builds a prefix (for its
    // scans; then it ends with one). Call where the previous slab's readers
    // of the tables are past a barrier.
    template <bool kHeld = true>
    __device__ __forceinline__ void stage_slab_own(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                   int64_t d0, float* xs) {
        stage_slab_rows<false, kHeld, false, true, false>(x, s, d0, nullptr, xs, NoLoads{});
    }

    // stage_slab and stage_slab_own: the prefix's gates and x (into xs; q
    // too, into qraw, where kQueries), the barrier (where kShared: other
    // threads read the rows, which may then come in key quads; else only
    // where the prefix is built), then `between` and the prefix's scans.
    template <bool kQueries, bool kHeld, bool kShared, bool kSplitJoins, bool kKeyQuads, class Between>
    __device__ __forceinline__ auto stage_slab_rows(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                    int64_t d0, float* qraw, float* xs, Between between) {
        const bool prefix = d0 == 0 || !per_head;
        static_assert(kShared || !kKeyQuads, "key quads only where the rows are read past the barrier");
        const bool quads = kKeyQuads && key_quads(x, s) && (!kQueries || key_quads(q, p.q_strides));
        const auto fetch = [&](const input_t* __restrict__ y, const GateloopSeqStrides& ys) {
            if constexpr (kKeyQuads) {
                return fetch_key_quad(y, ys, d0, quads);
            } else {
                return fetch_keys(y, ys, d0);
            }
        };
        const auto put = [&](const auto& held, float* ys) {
            if constexpr (kKeyQuads) {
                put_key_quad(held, ys);
            } else {
                put_keys(held, ys);
            }
        };
        if constexpr (kHeld) {
            // The gates' loads first: nvcc may convert a 16-bit key (and
            // wait for it) as soon as it is loaded.
            const HeldGates hg = fetch_gates(d0, prefix);
            decltype(fetch(x, s)) hq;
            if constexpr (kQueries) hq = fetch(q, p.q_strides);
            const auto hx = fetch(x, s);
            put_gates(hg, prefix);
            if constexpr (kQueries) put(hq, qraw);
            put(hx, xs);
        } else {
            if constexpr (kQueries) put(fetch(q, p.q_strides), qraw);
            put(fetch(x, s), xs);
            if (prefix) stage_gates(d0);
        }
        if (kShared || prefix) __syncthreads();
        const auto held = between();
        if (prefix) scan_prefix<kSplitJoins>(d0);
        return held;
    }

    // Value columns col0 .. col0 + kVTile − 1 of x (v or dy) over the chunk
    // into a split operand, zero past the chunk / V: a tile stored as loaded
    // (bf16 inputs, f16 Fast) 16 bytes a load where the rows allow it
    // (vector_rows), else an element a load. (Vector loads of the f16 tiles
    // that Exact splits into bf16 hi and lo made ptxas spill their walks.)
    template <class Op, int kTerms, int kAhead = 0>
    __device__ __forceinline__ void load_tile(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                              int64_t col0, const Split<Op>& xs) const {
        if constexpr (stored_as_loaded<input_t, Op, kTerms>()) {
            if (vector_rows(x, s, col0, p.dims.value_dim)) {
                load_groups<kVTile, kAhead>(x, s, col0, p.dims.value_dim,
                                            [&](int t, int c, uint4 w) { xs.put_group(t, c, w); });
                return;
            }
        }
        load_rows<kVTile, kAhead>(x, s, col0, p.dims.value_dim,
                                  [&](int m, int c, float e) { xs.template put<kTerms>(m, c, e); });
    }
    // The block's value tile (columns v0 ..).
    template <class Op, int kTerms, int kAhead = 0>
    __device__ __forceinline__ void load_tile(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                              const Split<Op>& xs) const {
        load_tile<Op, kTerms, kAhead>(x, s, v0, xs);
    }
    template <class Op, int kTerms, int kAhead = 0>
    __device__ __forceinline__ void load_values(const Split<Op>& vs) const {
        load_tile<Op, kTerms, kAhead>(v, p.v_strides, vs);
    }
    // Whether x's columns col0 .. can be staged in 16-byte groups
    // (load_groups): 16-bit inputs, groups of eight (grouped_rows).
    __device__ __forceinline__ bool vector_rows(const input_t* x, const GateloopSeqStrides& s, int64_t col0,
                                                int64_t limit) const {
        static_assert(sizeof(input_t) == 2, "16-bit inputs (callers test it at compile time)");
        return grouped_rows<8>(x, s, col0, limit);
    }
    // Columns col0 .. col0 + kWidth − 1 of x over the chunk in groups of
    // eight 16-bit elements, put(step, column, group) for each (zero past the
    // chunk and from column `limit` on): thread tid takes group tid % (kWidth
    // / 8) of rows GroupSlot::row0(tid / (kWidth / 8)) + kPass·u, a 16-byte
    // load each (the value tile: 2 a thread, where an element a load took
    // 16, each with its 64-bit address), all in flight, then the puts.
    // kAhead (the walks): the threads of a row's first and last group
    // prefetch the row of the chunk kAhead away, every line of its ≤ 128
    // bytes (2 a thread at most, where the elementwise staging took 16).
    template <int kWidth, int kAhead, class Put>
    __device__ __forceinline__ void load_groups(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                int64_t col0, int64_t limit, Put put) const {
        put_groups<kWidth>(fetch_groups<kWidth, kAhead>(x, s, col0, limit), put);
    }
    // A thread's groups (GroupSlot): 16 bytes each, kItems rows apart by kPass.
    template <int kWidth>
    struct GroupSlot {
        static_assert(kWidth % 8 == 0, "groups of eight 16-bit elements");
        static constexpr int kGroups = kWidth / 8;        // 16-byte groups of a row
        static constexpr int kPass = kThreads / kGroups;  // rows a pass of the block
        static constexpr int kItems = kChunk / kPass;     // rows a thread
        static_assert(kItems * kPass == kChunk, "whole passes of the block per chunk");
        // The first row of group index k = tid / kGroups. Four groups a row
        // (grad_qk's inter-chunk tiles: rows of 40 16-bit elements, 80
        // bytes) put a quarter-warp's 16-byte stores on two rows, which side
        // by side share 4 of the 32 banks (two wavefronts) and 4 apart (320
        // ≡ 64 mod 128 bytes) do not: bits 0 and 2 of k swapped, so a warp
        // still takes its own eight rows. Wider rows: one row a quarter-warp.
        static __device__ __forceinline__ int row0(int k) {
            return kGroups == 4 ? (k & ~5) | ((k & 1) << 2) | ((k >> 2) & 1) : k;
        }
    };
    template <int kWidth>
    using HeldGroups = Held<uint4, GroupSlot<kWidth>::kItems>;
    // load_groups in two halves (fetch_keys says why): the loads (and
    // prefetches), then put(step, column, group) for each.
    template <int kWidth, class Put>
    __device__ __forceinline__ void put_groups(const HeldGroups<kWidth>& held, Put put) const {
        using G = GroupSlot<kWidth>;
        const int g = tid % G::kGroups;
        const int r0 = G::row0(tid / G::kGroups);
#pragma unroll
        for (int u = 0; u < G::kItems; ++u) put(r0 + G::kPass * u, 8 * g, held.v[u]);
    }
    // Where a thread's groups of the chunk starting at step `from` lie: group
    // g of rows r0 + kPass·u, at first + u·step (16-byte units), inside the
    // tensor's columns where col_in; the kAhead prefetches (load_groups)
    // issued.
    struct GroupItems {
        int g, r0;
        bool col_in;
        const uint4* first;
        int64_t step;
    };
    template <int kWidth, int kAhead>
    __device__ __forceinline__ GroupItems group_items(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                      int64_t from, int64_t col0, int64_t limit) const {
        static_assert(sizeof(input_t) == 2, "groups of eight 16-bit elements");
        using G = GroupSlot<kWidth>;
        constexpr int kGroups = G::kGroups, kPass = G::kPass, kItems = G::kItems;
        GroupItems e;
        e.g = tid % kGroups;
        e.r0 = G::row0(tid / kGroups);
        e.col_in = col0 + 8 * e.g < limit;
        e.first = reinterpret_cast<const uint4*>(x + opaque((from + e.r0) * s.time + col0 + 8 * e.g));
        e.step = opaque(kPass * s.time / 8);  // uint4s from one of the thread's rows to the next
        if constexpr (kAhead != 0 && kPrefetchAhead) {
#pragma unroll
            for (int u = 0; u < kItems; ++u) {
                const bool live =
                    e.col_in && (e.g == 0 || e.g == kGroups - 1) && e.r0 + kPass * u < ahead_steps<kAhead>(from);
                prefetch_l2_if(e.first + (live ? u + kAhead * kItems : 0) * e.step, live);
            }
        }
        return e;
    }
    template <int kWidth, int kAhead>
    __device__ __forceinline__ HeldGroups<kWidth> fetch_groups(const input_t* __restrict__ x,
                                                               const GateloopSeqStrides& s, int64_t col0,
                                                               int64_t limit) const {
        using G = GroupSlot<kWidth>;
        const GroupItems e = group_items<kWidth, kAhead>(x, s, t0, col0, limit);
        HeldGroups<kWidth> held;
#pragma unroll
        for (int u = 0; u < G::kItems; ++u) {
            held.v[u] =
                (e.col_in && e.r0 + G::kPass * u < n) ? __ldg(e.first + u * e.step) : make_uint4(0u, 0u, 0u, 0u);
        }
        return held;
    }
    // load_groups of chunk c of the block's (b, h) (the walks: batched)
    // straight into the split operand `to` (ld_tile<Op, kWidth>(), stored
    // as loaded): a 16-byte cp.async a group, no register held while it
    // lands (cp_async_f32 says when it may be read). The real-gate walks
    // issue the next chunk's value tile once this one's Gram product, its
    // only reader, is past a barrier.
    template <int kWidth, int kAhead, class Op>
    __device__ __forceinline__ void issue_groups_async(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                       int64_t col0, int64_t limit, int64_t c,
                                                       const Split<Op>& to) const {
        const int64_t from = c * kChunk;
        issue_groups_async_from<kWidth, kAhead>(x, s, col0, limit, from, steps_from(from), to);
    }
    // The same for the block's own chunk (t0, n: packed blocks too, whose
    // chunk starts where its sequence's chunks do, not at chunk·kChunk).
    template <int kWidth, class Op>
    __device__ __forceinline__ void issue_own_groups_async(const input_t* __restrict__ x, const GateloopSeqStrides& s,
                                                           int64_t col0, int64_t limit, const Split<Op>& to) const {
        issue_groups_async_from<kWidth, 0>(x, s, col0, limit, t0, n, to);
    }
    // issue_groups_async of the chunk of `steps` steps starting at `from`.
    template <int kWidth, int kAhead, class Op>
    __device__ __forceinline__ void issue_groups_async_from(const input_t* __restrict__ x,
                                                            const GateloopSeqStrides& s, int64_t col0, int64_t limit,
                                                            int64_t from, int steps, const Split<Op>& to) const {
        static_assert(sizeof(typename Op::storage) == 2, "stored as loaded");
        using G = GroupSlot<kWidth>;
        constexpr int kTileLd = ld_tile<Op, kWidth>();
        const GroupItems e = group_items<kWidth, kAhead>(x, s, from, col0, limit);
        void* const base = to.hi + e.r0 * kTileLd + 8 * e.g;
        // A dead item's copy reads nothing; its address is still one inside
        // the tensor (row 0 of the block's columns), not one past its end.
        const uint4* const inside = reinterpret_cast<const uint4*>(x + col0);
        for_const<0, G::kItems>([&](auto uc) {
            constexpr int u = decltype(uc)::value;
            const bool live = e.col_in && e.r0 + G::kPass * u < steps;
            cp_async_16<2 * G::kPass * u * kTileLd>(base, live ? e.first + u * e.step : inside, live);
        });
        cp_async_commit();
    }

    // Workspace row `row` (of parts·K) of this chunk's state, at column 0.
    __device__ __forceinline__ int64_t ws_state_row(int64_t row) const {
        return ((bh * p.num_chunks + chunk) * (kComplex ? 2 : 1) * p.dims.key_dim + row) * p.dims.value_dim;
    }
};

// Thread `slot`'s elements of the rows of slab d0 in a planar [.., parts·K,
// V] chunk workspace (rows part·K + d, Block::ws_state_row; the carried
// states S_c, D(c)) at value columns col0 + slot.col: item i of part
// `part` is workspace row part·K + d0 + slot.row0 + kStep·i, at offset
// at(part, i), inside the workspace when live(i).
// kGroup = 4 (fetch_state_quads): the items are groups of four columns,
// col0 + 4·slot.col .. + 3 of a TileSlot<kCols / 4> (all four inside V or
// none: V a multiple of 4).
template <int kCols, int kChannels = kSlab, int kGroup = 1>
struct StateRows {
    static constexpr int kWidth = kCols / kGroup;  // items a row
    static constexpr int kStep = TileSlot<kWidth>::kStep;
    static constexpr int kPerPart = kChannels / kStep;  // items of a part
    static_assert(kPerPart * kStep == kChannels, "whole passes of the block per part");
    int64_t first, part_step, row_step, rows_left;
    bool col_in;
    int row0;
    template <typename input_t, bool kComplex, int kLd>
    __device__ __forceinline__ StateRows(const Block<input_t, kComplex, kLd>& blk, const TileSlot<kWidth>& slot,
                                         int64_t d0, int64_t col0) {
        const int64_t key_dim = blk.p.dims.key_dim;
        const int64_t value_dim = blk.p.dims.value_dim;
        col_in = col0 + kGroup * slot.col < value_dim;
        first = blk.ws_state_row(d0 + slot.row0) + col0 + kGroup * slot.col;
        part_step = key_dim * value_dim;
        row_step = kStep * value_dim;
        rows_left = key_dim - d0;
        row0 = slot.row0;
    }
    __device__ __forceinline__ int64_t at(int part, int i) const { return first + part * part_step + i * row_step; }
    __device__ __forceinline__ bool live(int i) const { return col_in && row0 + kStep * i < rows_left; }
};

// A thread's items kFirst .. kFirst + kCount − 1 of those rows (StateRows),
// kParts parts of kSlab rows (tile row part·kSlab + j ↔ workspace row
// part·K + d0 + j), loaded and not yet put: item u is (row, col) =
// (slot.row0 + u·kStep, slot.col) of the tile, as stage_tile orders them.
// From `state` (the workspace), zero past K or V (not read there). A
// thread's rows stay in one part for kPerPart items, so the part is known
// at compile time. intra_pass issues
// the first items inside Block::stage_slab (its `between`), in flight
// across the prefix's scans, and puts them after.
template <int kParts, int kCols>
__host__ __device__ constexpr int state_row_items() {
    return kParts * StateRows<kCols>::kPerPart;
}
template <int kParts, int kCols, int kFirst, int kCount, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ Held<float, kCount> fetch_state_rows(const Block<input_t, kComplex, kLd>& blk,
                                                                int64_t d0, int64_t col0, const float* state) {
    static_assert(kFirst >= 0 && kCount > 0 && kFirst + kCount <= state_row_items<kParts, kCols>(),
                  "items of the tile");
    const TileSlot<kCols> slot(blk.tid);
    const StateRows<kCols> rows(blk, slot, d0, col0);
    constexpr int kPerPart = StateRows<kCols>::kPerPart;
    Held<float, kCount> held;
#pragma unroll
    for (int u = kFirst; u < kFirst + kCount; ++u) {
        const int i = u % kPerPart;
        // (The offset formed before the test, as a fetch(at, live) lambda
        // did: read inside the select, ptxas spilled 12 bytes in sm_80's
        // wide complex f16 dv launch.)
        const int64_t at = rows.at(u / kPerPart, i);
        held.v[u - kFirst] = rows.live(i) ? state[at] : 0.f;
    }
    return held;
}
// put(row, col, value) for each of those items.
template <int kCols, int kFirst, int kCount, class Put>
__device__ __forceinline__ void put_state_rows(int tid, const Held<float, kCount>& held, Put put) {
    const TileSlot<kCols> slot(tid);
    constexpr int kStep = TileSlot<kCols>::kStep;
#pragma unroll
    for (int u = kFirst; u < kFirst + kCount; ++u) put(slot.row0 + u * kStep, slot.col, held.v[u - kFirst]);
}

// The same tile in groups of four columns (StateRows<kCols, kSlab, 4>)
// where every workspace row is 16-byte aligned (V a multiple of 4 and the
// workspace's base: state_quads): items 4q .. 4q + 3 (of the same count a
// thread) are the columns of its group q, from `state` (the workspace).
// One 16-byte load and one store a plane where four items took four loads,
// each with its 64-bit address and bounds test, and four stores (the wide
// real bf16 output launch's slab: ~80 of its ~1060 straight-line sm_90
// instructions were the state rows' loads). The same values put.
__device__ __forceinline__ bool state_quads(const float* state, int64_t value_dim) {
    return value_dim % 4 == 0 && (reinterpret_cast<uintptr_t>(state) & 15) == 0;
}
template <int kParts, int kCols, int kFirst, int kCount, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ Held<float, kCount> fetch_state_quads(const Block<input_t, kComplex, kLd>& blk,
                                                                 int64_t d0, int64_t col0, const float* state) {
    using Rows = StateRows<kCols, kSlab, 4>;
    static_assert(kFirst % 4 == 0 && kCount % 4 == 0 && kFirst + kCount <= state_row_items<kParts, kCols>(),
                  "whole groups of the tile");
    const TileSlot<Rows::kWidth> slot(blk.tid);
    const Rows rows(blk, slot, d0, col0);
    Held<float, kCount> held;
#pragma unroll
    for (int q = kFirst / 4; q < (kFirst + kCount) / 4; ++q) {
        const int i = q % Rows::kPerPart;
        const float4 x = rows.live(i) ? *reinterpret_cast<const float4*>(state + rows.at(q / Rows::kPerPart, i))
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
        float* const v = held.v + 4 * q - kFirst;
        v[0] = x.x;
        v[1] = x.y;
        v[2] = x.z;
        v[3] = x.w;
    }
    return held;
}
// put(row, col, float4) for each group of those items (columns col .. col + 3).
template <int kCols, int kFirst, int kCount, class Put>
__device__ __forceinline__ void put_state_quads(int tid, const Held<float, kCount>& held, Put put) {
    using Rows = StateRows<kCols, kSlab, 4>;
    const TileSlot<Rows::kWidth> slot(tid);
#pragma unroll
    for (int q = kFirst / 4; q < (kFirst + kCount) / 4; ++q) {
        const float* const v = held.v + 4 * q - kFirst;
        put(slot.row0 + q * Rows::kStep, 4 * slot.col, make_float4(v[0], v[1], v[2], v[3]));
    }
}
// Stages items kFirst … of those rows (kQuads: in groups of four from
// `state`), kLoadsInFlight loads a round trip.
template <int kParts, int kCols, int kFirst, bool kQuads, typename input_t, bool kComplex, int kLd, class Put>
__device__ __forceinline__ void stage_state_rows(const Block<input_t, kComplex, kLd>& blk, int64_t d0, int64_t col0,
                                                 Put put, const float* state) {
    constexpr int kItems = state_row_items<kParts, kCols>();
    if constexpr (kFirst < kItems) {
        constexpr int kCount = kItems - kFirst < kLoadsInFlight ? kItems - kFirst : kLoadsInFlight;
        if constexpr (kQuads) {
            put_state_quads<kCols, kFirst, kCount>(
                blk.tid, fetch_state_quads<kParts, kCols, kFirst, kCount>(blk, d0, col0, state), put);
        } else {
            put_state_rows<kCols, kFirst, kCount>(
                blk.tid, fetch_state_rows<kParts, kCols, kFirst, kCount>(blk, d0, col0, state), put);
        }
        stage_state_rows<kParts, kCols, kFirst + kCount, kQuads>(blk, d0, col0, put, state);
    }
}

// Block::stage_slab, then the slab's state rows from `state` (the
// workspace; stage_state_rows, in groups of four where `quads`, the same
// values): the loads of the thread's first kAhead items issued
// inside stage_slab (its `between`, after the tables' barrier), in flight
// across the prefix's scans, and put after; the rest after it,
// kLoadsInFlight a round trip. put(row, col, x): x a float, or a float4
// of columns col .. col + 3.
template <bool kQueries, bool kHeld, int kParts, int kCols, int kAhead, bool kSplitJoins, bool kKeyQuads,
          typename input_t, bool kComplex, int kLd, class Put>
__device__ __forceinline__ void stage_slab_and_state_rows(Block<input_t, kComplex, kLd>& blk, int64_t d0,
                                                          float* qraw, float* kraw, int64_t col0, Put put,
                                                          const float* state, bool quads) {
    if constexpr (kAhead == 0) {
        blk.template stage_slab<kQueries, kHeld, kSplitJoins, kKeyQuads>(d0, qraw, kraw);
    } else {
        const auto held = blk.template stage_slab<kQueries, kHeld, kSplitJoins, kKeyQuads>(d0, qraw, kraw, [&] {
            return quads ? fetch_state_quads<kParts, kCols, 0, kAhead>(blk, d0, col0, state)
                         : fetch_state_rows<kParts, kCols, 0, kAhead>(blk, d0, col0, state);
        });
        if (quads) {
            put_state_quads<kCols, 0, kAhead>(blk.tid, held, put);
        } else {
            put_state_rows<kCols, 0, kAhead>(blk.tid, held, put);
        }
    }
    if (quads) {
        stage_state_rows<kParts, kCols, kAhead, true>(blk, d0, col0, put, state);
    } else {
        stage_state_rows<kParts, kCols, kAhead, false>(blk, d0, col0, put, state);
    }
}

// Operand widths of one slab: [Re | Im] halves of kChannels (16), or Re
// only.
template <bool kComplex, int kChannels = kSlab>
__host__ __device__ constexpr int slab_width() {
    return kComplex ? 2 * kChannels : kChannels;
}
template <class Op, bool kComplex, int kChannels = kSlab>
__host__ __device__ constexpr int ld_slab() {
    return slab_width<kComplex, kChannels>() + Op::kPad;
}
// Key channels a block of the sequential walks (walk_chunks) takes: a slab
// (16) with complex gates, two (kWalkSlabReal, 32) with real ones, whose
// slab operand is then as wide as a complex slab's [Re | Im] (all eight
// warps in its Gram product where a slab of 16 kept four) and whose block
// stages the value tile and builds the gate prefix (its serial joins, its
// barriers) once for 32 channels: half the blocks, each about a third more
// work (src/cuda/chunk.rs: walk_slab).
template <bool kComplex>
__host__ __device__ constexpr int walk_slab() {
    return kComplex ? kSlab : kWalkSlabReal;
}
__host__ __device__ constexpr int cmax(int a, int b) {
    return a > b ? a : b;
}
// Bytes of a split (hi + lo) operand of `rows` rows of leading dimension ld.
template <class Op>
__host__ __device__ constexpr int split_bytes(int rows, int ld) {
    return 2 * rows * ld * static_cast<int>(sizeof(typename Op::storage));
}
// The bytes of a split operand of kTerms: one plane where kTerms = 1 (a bf16
// input tile: raw_tile_terms; its lo plane is neither staged nor read).
template <class Op, int kTerms>
__host__ __device__ constexpr int terms_bytes(int rows, int ld) {
    return kTerms == 1 ? split_bytes<Op>(rows, ld) / 2 : split_bytes<Op>(rows, ld);
}
constexpr int kStagingBytes = kWarps * 16 * 16 * 4;

// The dynamic shared memory of each kernel (src/cuda/chunk.rs: shared_bytes
// computes the same numbers; every array is a multiple of 128 bytes).
// The state kernel's (StateSmem) for slabs of kChannels; kTileTerms: the
// raw tile's (OpOf<input_t>::kRawTerms: one plane for bf16 inputs, exact in
// their operand at any kTerms, else two); kRawInStaging: the raw key slab
// in the staging tiles' bytes (the walks'); kSlabTerms: the slab operand's
// (the walks' kTerms: Fast's one term one plane; the state kernel and
// grad_w keep two planes at any precision, the host's bytes for them not
// depending on it).
template <class Op, bool kComplex, int kTileTerms, int kChannels = kSlab, bool kRawInStaging = false,
          int kSlabTerms = 3>
__host__ __device__ constexpr int state_smem_bytes() {
    return prefix_bytes<kComplex, kChannels>() + (kRawInStaging ? 0 : kChunk * kChannels * 4) +
           terms_bytes<Op, kTileTerms>(kChunk, ld_tile<Op>()) +
           terms_bytes<Op, kSlabTerms>(kChunk, ld_slab<Op, kComplex, kChannels>()) + kStagingBytes;
}
template <class Op, bool kComplex, int kCols = kVTile>
__host__ __device__ constexpr int output_slab_bytes() {
    return split_bytes<Op>(kChunk, ld_slab<Op, kComplex>()) +              // Q̃
           split_bytes<Op>(slab_width<kComplex>(), ld_tile<Op, kCols>()) + // S slab
           split_bytes<Op>(kPairs * kSub, ld_slab<Op, kComplex>()) +     // q̃ per pair
           split_bytes<Op>((kSubs - 1) * kSub, ld_slab<Op, kComplex>()); // k̃ per key sub-chunk
}
// The final phase's P and one kVTile of V (a wide block stages its V in
// kVTile halves, one after the other, in the same bytes); kTileTerms: V's
// (or dY's), OpOf<input_t>::kRawTerms: one plane for bf16 inputs.
template <class Op, int kTileTerms>
__host__ __device__ constexpr int output_final_bytes() {
    return split_bytes<Op>(kChunk, ld_tile<Op>()) + terms_bytes<Op, kTileTerms>(kChunk, ld_tile<Op>());  // P, V
}
template <class Op, bool kComplex, int kTileTerms, int kCols = kVTile>
__host__ __device__ constexpr int output_union_bytes() {
    return cmax(output_slab_bytes<Op, kComplex, kCols>(), output_final_bytes<Op, kTileTerms>());
}
// kCols: the block's value columns (kVTile, or kWideCols: intra_pass).
template <class Op, bool kComplex, int kTileTerms, int kCols = kVTile>
__host__ __device__ constexpr int output_smem_bytes() {
    return prefix_bytes<kComplex, kPrefixLd>() + 2 * kChunk * kPrefixLd * 4 +
           output_union_bytes<Op, kComplex, kTileTerms, kCols>() + kSubs * kSub * kSub * 4 + kStagingBytes;
}
// The backward's grad_dv (intra_pass with kAdjoint, which reads P where the
// output kernel forms it): the output layout less what only forming P
// takes — raw q, the anchored q̃ and k̃ rows, the diagonal blocks — so
// the prefix tables, raw k, a union of the slab phase's K̃ and state slab
// with the final phase's P and dY, the staging tiles.
template <class Op, bool kComplex, int kTileTerms, int kCols = kVTile>
__host__ __device__ constexpr int adjoint_union_bytes() {
    return cmax(split_bytes<Op>(kChunk, ld_slab<Op, kComplex>()) +
                    split_bytes<Op>(slab_width<kComplex>(), ld_tile<Op, kCols>()),
                output_final_bytes<Op, kTileTerms>());
}
template <class Op, bool kComplex, int kTileTerms, int kCols = kVTile>
__host__ __device__ constexpr int adjoint_smem_bytes() {
    return prefix_bytes<kComplex, kPrefixLd>() + kChunk * kPrefixLd * 4 +
           adjoint_union_bytes<Op, kComplex, kTileTerms, kCols>() + kStagingBytes;
}

// Carves split operands off a bump pointer.
template <class Op>
__device__ __forceinline__ Split<Op> carve(unsigned char*& at, int rows, int ld) {
    using S = typename Op::storage;
    Split<Op> s;
    s.hi = reinterpret_cast<S*>(at);
    s.lo = s.hi + rows * ld;
    s.ld = ld;
    at += split_bytes<Op>(rows, ld);
    return s;
}
// carve for an operand of kTerms: kTerms = 1 takes one plane (terms_bytes),
// its lo pointer the hi plane's (never dereferenced: put<1> writes hi alone,
// a product of one term reads hi alone).
template <class Op, int kTerms>
__device__ __forceinline__ Split<Op> carve_terms(unsigned char*& at, int rows, int ld) {
    if constexpr (kTerms == 1) {
        Split<Op> s;
        s.hi = s.lo = reinterpret_cast<typename Op::storage*>(at);
        s.ld = ld;
        at += terms_bytes<Op, 1>(rows, ld);
        return s;
    } else {
        return carve<Op>(at, rows, ld);
    }
}

// The shared layout of the state kernel (cuda/chunk.cu: chunk_state) and of
// the backward's grad_w, which runs the same product with other operands
// (raw q for raw k, dY for V, [Re Q̃ | −Im Q̃] for K̃): after the prefix
// tables, the raw key slab, the value-like tile (kChunk × kVTile; a bf16
// input's one plane, kTileTerms = OpOf::kRawTerms = 1), the slab
// operand (kChunk × slab width, row-major, read as the column-major A of
// the Gram product), then each warp's staging tile: state_smem_bytes.
// The walks (walk_chunks) take it for slabs of walk_slab channels, with
// kRawInStaging: the raw slab (at most kStagingBytes) in the staging
// tiles' bytes, which a walk's chunk uses only after the raw slab's last
// read (its stage, then a barrier, then the Gram product into the staging
// tiles) and before the next chunk's stage (after build_prefix's
// barriers): a real-gate walk's 8 KB, so that three blocks an SM fit an
// H200 (68 KB each).
template <class Op, bool kComplex, int kTileTerms, int kChannels = kSlab, bool kRawInStaging = false,
          int kSlabTerms = 3>
struct StateSmem {
    static_assert(!kRawInStaging || kChunk * kChannels * 4 <= kStagingBytes, "the raw slab fits the staging tiles");
    // Its bytes (the launch's check_shared, the walks' state after them).
    static constexpr int kBytes = state_smem_bytes<Op, kComplex, kTileTerms, kChannels, kRawInStaging, kSlabTerms>();
    float* raw;
    Split<Op> tile;
    Split<Op> slab;
    float* staging;
    __device__ __forceinline__ StateSmem(unsigned char* smem, int warp) {
        unsigned char* at = smem + prefix_bytes<kComplex, kChannels>();
        float* own_raw = reinterpret_cast<float*>(at);
        if (!kRawInStaging) at += kChunk * kChannels * 4;
        tile = carve_terms<Op, kTileTerms>(at, kChunk, ld_tile<Op>());
        slab = carve_terms<Op, kSlabTerms>(at, kChunk, ld_slab<Op, kComplex, kChannels>());
        raw = kRawInStaging ? reinterpret_cast<float*>(at) : own_raw;
        staging = reinterpret_cast<float*>(at) + warp * 256;
    }
};

// The state kernel's and grad_w's bytes for a block of kCols value columns
// (kVTile, or kWideCols: the wide launches, V > 64): state_smem_bytes, then
// the value tiles past the first, each laid out as StateSmem's tile
// (StateTiles). src/cuda/chunk.rs: shared_bytes (kVTile),
// state_wide_shared_bytes (kWideCols).
template <class Op, bool kComplex, int kTileTerms, int kCols = kVTile>
__host__ __device__ constexpr int state_block_bytes() {
    return state_smem_bytes<Op, kComplex, kTileTerms>() +
           (kCols / kVTile - 1) * terms_bytes<Op, kTileTerms>(kChunk, ld_tile<Op>());
}
// The value-like tiles (V; the backward's dY) of such a block: tile[h]
// holds columns v0 + kVTile·h, tile[0] StateSmem's own.
template <class Op, int kTileTerms, int kTiles>
struct StateTiles {
    Split<Op> tile[kTiles];
    template <class Smem>
    __device__ __forceinline__ StateTiles(const Smem& sm, unsigned char* smem) {
        tile[0] = sm.tile;
        unsigned char* at = smem + Smem::kBytes;
#pragma unroll
        for (int h = 1; h < kTiles; ++h) tile[h] = carve_terms<Op, kTileTerms>(at, kChunk, ld_tile<Op>());
    }
    // Every tile's columns of x (v or dy), kTerms as Block::load_tile's.
    template <int kTerms, typename input_t, bool kComplex, int kLd>
    __device__ __forceinline__ void load(const Block<input_t, kComplex, kLd>& blk, const input_t* __restrict__ x,
                                         const GateloopSeqStrides& s) const {
#pragma unroll
        for (int h = 0; h < kTiles; ++h) blk.template load_tile<Op, kTerms>(x, s, blk.v0 + kVTile * h, tile[h]);
    }
};

__device__ __forceinline__ void check_shared(int have, int need) {
    // The host computes the size from the same layout; a mismatch is a bug.
    if (have < need) __trap();
}

// Stores a warp's 16 × 16 accumulator through its staging tile and hands
// (k, row, col, value) to `f` for each of the lane's 8 elements: element k
// is (row, col) = (drain_row0(lane) + kDrainRowStep·k, drain_col(lane)), so
// a caller can compute the lane's first address once and step it by k.
constexpr int kDrainRowStep = 2;
__device__ __forceinline__ int drain_row0(int lane) { return lane >> 4; }
__device__ __forceinline__ int drain_col(int lane) { return lane & 15; }
template <class Op, class F>
__device__ __forceinline__ void drain(const Acc<Op>& acc, float* staging, int lane, F f) {
    store_accumulator(staging, acc, 16);
    __syncwarp();
    const int r0 = drain_row0(lane), c = drain_col(lane);
#pragma unroll
    for (int k = 0; k < 16 / kDrainRowStep; ++k) {
        const int r = r0 + kDrainRowStep * k;
        f(k, r, c, staging[r * 16 + c]);
    }
    __syncwarp();
}

// drain for 16-bit outputs stored 16 bytes at a time: hands (row, col, x)
// to `f` for the lane's one group of 8 consecutive elements, (row, col) =
// (lane / 2, 8·(lane % 2)), x[i] the element at col + i.
template <class Op, class F>
__device__ __forceinline__ void drain_group(const Acc<Op>& acc, float* staging, int lane, F f) {
    store_accumulator(staging, acc, 16);
    __syncwarp();
    const int r = lane >> 1, c = 8 * (lane & 1);
    const float4 a = *reinterpret_cast<const float4*>(staging + r * 16 + c);
    const float4 b = *reinterpret_cast<const float4*>(staging + r * 16 + c + 4);
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    f(r, c, x);
    __syncwarp();
}

// ---- slab operands and products shared by the forward and the backward ----------

// Inter-chunk query rows of slab d0 (raw q in qraw [kChunk][kSlab]):
// Q̃_n = q_n |E(n, −1)| e^{iθ_n} as [Re | −Im] (Re only for real gates) into
// qe: the backward's W_c = [Re Q̃ | −Im Q̃]ᵀ dY (the forward's intra_pass
// puts its rows for y += Q̃ S_c with the anchored ones: put_query_rows).
// Like put_state_keys, thread tid reads back only the qraw elements that
// Block::load_keys stored from the same thread.
template <class Op, int kTerms, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_inter_queries(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                                  const Split<Op>& qe) {
    constexpr int kCh = Block<input_t, kComplex, kLd>::kChannels;
    for_tile<kChunk, kCh>(typename Block<input_t, kComplex, kLd>::Slot(blk.tid), [&](int, int nn, int j) {
        const int cl = blk.col(j);
        const float2 x = blk.inter_query(blk.late_entry(nn, cl), qraw[blk.at(nn, j)]);
        qe.template put<kTerms>(nn, j, x.x);
        if (kComplex) qe.template put<kTerms>(nn, kCh + j, x.y);
    });
}

// State rows of slab d0 (raw k in kraw, zero past the chunk):
// K̃_m = k_m |E(last, m)| e^{i(θ_last − θ_m)} as [Re | Im] into kt. The
// forward's U_c = K̃ᵀ V; the backward's dv += [Re K̃ | Im K̃] [Re D; Im D].
// Thread tid reads the kraw entries (for_tile's (m, j), at blk.at(m, j))
// that Block::load_keys stored from the same thread, so a caller needs no
// barrier between the two (the barrier audit, tests/kernel_emu/README.md).
template <class Op, int kTerms, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_state_keys(const Block<input_t, kComplex, kLd>& blk, const float* kraw,
                                               const Split<Op>& kt) {
    const int last = blk.n - 1;
    constexpr int kCh = Block<input_t, kComplex, kLd>::kChannels;
    for_tile<kChunk, kCh>(typename Block<input_t, kComplex, kLd>::Slot(blk.tid), [&](int, int m, int j) {
        const int cl = blk.col(j);
        const float w = blk.modulus_within(last, m, cl);
        const float kk = kraw[blk.at(m, j)];
        if (kComplex) {
            const float cl_ = blk.cos_at(last, cl), sl = blk.sin_at(last, cl);
            const float kc = kk * blk.cos_at(m, cl), ks = kk * blk.sin_at(m, cl);
            kt.template put<kTerms>(m, j, w * fmaf(cl_, kc, sl * ks));
            kt.template put<kTerms>(m, kCh + j, w * fmaf(sl, kc, -(cl_ * ks)));
        } else {
            kt.template put<kTerms>(m, j, w * kk);
        }
    });
}

// out[part·K + d0 + j][v0 + c] = Σ_m X[m][part·kSlab + j] Y[m][c] for the
// slab's channels j (d0 + j < K) and the block's value tile: Xᵀ Y with X
// (kChunk × slab_width) staged row-major [m][col] and read as the
// column-major A = Xᵀ, Y (kChunk × kVTile) row-major, inner dimension
// kChunk, into a planar workspace (rows part·K + d, Block::ws_state_row).
// Warp w ↔ output tile (w / 4, w % 4): 2 × 4 tiles (complex, and the
// real-gate walks' slabs of 32: all 8 warps) or 1 × 4 (real, 16 channels). The forward's U_c = K̃ᵀ V (ws_state); the backward's
// W_c = [Re Q̃ | −Im Q̃]ᵀ dY (ws_adj). Call between barriers (X, Y staged).
// Warp w's tile (rb, cb) = (w / 4, w % 4) of Xᵀ Y (store_slab_gram's
// product) into acc; false, acc untouched, for a warp without a tile (real
// gates in slabs of 16: two 16-row blocks fewer).
// `warp`: the tile's warp index (blk.warp, or for store_slab_grams' second
// value tile the warp's index among the warps that take it).
template <class Op, int kTerms, bool kRolled = true, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ bool slab_gram(const Block<input_t, kComplex, kLd>& blk, const Split<Op>& x, const Split<Op>& y,
                                          Acc<Op>& acc, int warp) {
    constexpr int kWidth = slab_width<kComplex, Block<input_t, kComplex, kLd>::kChannels>();
    const int rb = warp / (kVTile / 16);
    const int cb = warp % (kVTile / 16);
    if (rb >= kWidth / 16) return false;
    wmma::fill_fragment(acc, 0.f);
    // A(i, k) = X[k][16·rb + i]: column-major with ld x.ld.
    constexpr int kTermsY = raw_tile_terms<input_t, kTerms>();
    const auto step = [&](int kk) {
        mma_split_step<Op, kTerms, kTermsY, wmma::col_major, wmma::row_major>(
            acc, x.hi_at(kk, 16 * rb), x.lo_at(kk, 16 * rb), x.ld, y.hi_at(kk, 16 * cb), y.lo_at(kk, 16 * cb), y.ld);
    };
    if constexpr (kTermsY < kTerms && kRolled) {
        // Not unrolled (kRolled): unrolled, ptxas held the steps' fragments
        // at once and spilled at grad_w's, the backward walk's and the real
        // forward walk's register caps (80 on sm_90 at 32 channels);
        // rolled, at the complex forward walk's (sm_80), which unrolls.
#pragma unroll 1
        for (int kk = 0; kk < kChunk; kk += Op::kK) step(kk);
    } else {
        for (int kk = 0; kk < kChunk; kk += Op::kK) step(kk);
    }
    return true;
}

// The value tile y holds columns v0 .. v0 + kVTile − 1; `warp` as slab_gram's.
template <class Op, int kTerms, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void store_slab_gram(const Block<input_t, kComplex, kLd>& blk, const Split<Op>& x,
                                                const Split<Op>& y, int64_t d0, float* staging, float* out, int64_t v0,
                                                int warp) {
    Acc<Op> acc;
    if (!slab_gram<Op, kTerms>(blk, x, y, acc, warp)) return;
    const int rb = warp / (kVTile / 16);
    const int cb = warp % (kVTile / 16);
    const int64_t key_dim = blk.p.dims.key_dim;
    const int64_t value_dim = blk.p.dims.value_dim;
    // Accumulator row r is operand column 16·rb + r: part rb, channel d0 + r.
    static_assert(kSlab == 16 && kLd != kWalkSlabReal, "one part per 16-row accumulator");
    const int lane = blk.tid & 31;
    const int64_t col = v0 + 16 * cb + drain_col(lane);
    const int64_t first = opaque(blk.ws_state_row(rb * key_dim + d0 + drain_row0(lane)) + col);
    const int64_t step = opaque(kDrainRowStep * value_dim);
    drain<Op>(acc, staging, lane, [&](int k, int r, int, float e) {
        if (d0 + r < key_dim && col < value_dim) out[first + k * step] = e;
    });
}

// store_slab_gram for a block of kTiles value tiles (tile[h]: columns
// v0 + kVTile·h; kTiles = 2 in the wide state kernel and grad_w, one block
// per 128 columns, whose prefix, raw slab and slab operand X serve both
// tiles). Where a tile's product leaves warps without a tile (real gates,
// slabs of 16: one row block, four warps) the others take the next tile at
// once; else the tiles one after the other. Each output element is the
// product of the same operands by one warp's tile, in the same order, as
// in a block of one tile: the same bits.
template <class Op, int kTerms, int kTiles, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void store_slab_grams(const Block<input_t, kComplex, kLd>& blk, const Split<Op>& x,
                                                 const Split<Op> (&tile)[kTiles], int64_t d0, float* staging,
                                                 float* out) {
    constexpr int kRowBlocks = slab_width<kComplex, Block<input_t, kComplex, kLd>::kChannels>() / 16;
    constexpr int kTileWarps = kRowBlocks * (kVTile / 16);
    if constexpr (kTiles == 1) {
        store_slab_gram<Op, kTerms>(blk, x, tile[0], d0, staging, out, blk.v0, blk.warp);
    } else if constexpr (kTiles * kTileWarps <= kWarps) {
        const int h = blk.warp / kTileWarps;
        if (h < kTiles) {
            store_slab_gram<Op, kTerms>(blk, x, tile[h], d0, staging, out, blk.v0 + kVTile * h, blk.warp % kTileWarps);
        }
    } else {
#pragma unroll 1
        for (int h = 0; h < kTiles; ++h) {
            store_slab_gram<Op, kTerms>(blk, x, tile[h], d0, staging, out, blk.v0 + kVTile * h, blk.warp);
        }
    }
}

// ---- the sequential carries: the chunks walked by one block ------------------------

// A_c = E(last, −1) of slab channel j (its gate column).
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ float2 chunk_decay(const Block<input_t, kComplex, kLd>& blk, int j, int last) {
    const int cl = blk.col(j);
    const float w = blk.modulus(last, -1, cl);
    return kComplex ? make_float2(w * blk.cos_at(last, cl), w * blk.sin_at(last, cl)) : make_float2(w, 0.f);
}

// Writes slab channel j's decay `a` to ws_decay (the caller picks one value
// tile per chunk; a per-head gate's one column is written by slab 0 only).
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void store_decay(const Block<input_t, kComplex, kLd>& blk, int64_t d0, int j, float2 a) {
    const GateloopChunkParams& p = blk.p;
    if (d0 != 0 && blk.per_head) return;
    const int64_t ch = blk.per_head ? 0 : d0 + j;
    const int64_t at_ = ((blk.bh * p.num_chunks + blk.chunk) * p.dims.gate_dim + ch) * (kComplex ? 2 : 1);
    p.ws_decay[at_] = a.x;
    if (kComplex) p.ws_decay[at_ + 1] = a.y;
}

// The dynamic shared memory of the sequential kernels: the state kernel's
// layout (StateSmem) for walk_slab channels, the raw slab in the staging
// tiles, then the slab's carried state [kWidth][kVTile] and its decays
// [walk_slab] (src/cuda/chunk.rs: sequential_shared_bytes).
// The block and shared layout of the walks; kTerms: the walk's (its slab
// operand's planes).
template <typename input_t, bool kComplex>
using WalkBlock = Block<input_t, kComplex, walk_slab<kComplex>()>;
template <class Op, typename input_t, bool kComplex, int kTerms>
using WalkSmem = StateSmem<Op, kComplex, OpOf<input_t>::kRawTerms, walk_slab<kComplex>(), true, kTerms>;
// The row pitch of a walk's X_c (its Gram product's [kWidth][kVTile] f32
// result, drained from the accumulators into the staging tiles' bytes):
// with real gates kVTile + 8 words, so that the four rows a half-warp's
// 8-byte accumulator stores touch fall on four disjoint groups of 8 banks
// (at kVTile = 64 words they shared one: four wavefronts a store, 13% of
// the real walk's; speed log item 59), in walk_x_pad_bytes past the
// staging tiles (each row's 8 pad words also hold its decay, read by the
// update beside the row). Not for complex gates, whose bf16 Exact walk
// would no longer fit four blocks an H200 SM (and whose walk no default
// plan takes).
template <bool kComplex>
__host__ __device__ constexpr int walk_x_ld() {
    return kComplex ? kVTile : kVTile + 8;
}
template <bool kComplex>
__host__ __device__ constexpr int walk_x_pad_bytes() {
    return slab_width<kComplex, walk_slab<kComplex>()>() * (walk_x_ld<kComplex>() - kVTile) * 4;
}
// kCols: the block's value columns, kVTile or (real gates) kWideCols, the
// wide walk's: its carried state as wide, and its second value tile (laid
// out as the state layout's own, which holds the first) after the decays.
template <class Op, typename input_t, bool kComplex, int kTerms, int kCols = kVTile>
__host__ __device__ constexpr int seq_smem_bytes() {
    constexpr int kCh = walk_slab<kComplex>();
    return WalkSmem<Op, input_t, kComplex, kTerms>::kBytes + walk_x_pad_bytes<kComplex>() +
           slab_width<kComplex, kCh>() * kCols * 4 + kCh * 2 * 4 +
           (kCols / kVTile - 1) * terms_bytes<Op, OpOf<input_t>::kRawTerms>(kChunk, ld_tile<Op>());
}

// The two raw inputs a walk stages each chunk: a slab of `keys` (k, or
// the backward's q) into the raw table and a value tile of `tile` (v, or
// dY) into the Gram product's Y, each a (b, h) row pointer (seq_row) with
// its strides.
template <typename input_t>
struct WalkRows {
    const input_t* keys;
    GateloopSeqStrides key_strides;
    const input_t* tile;
    GateloopSeqStrides tile_strides;
};

// What a walk's chunk loads before its gate prefix (walk_fetch) and puts
// after it (walk_put): the key slab, and the value tile where it is staged
// 16 bytes a load (`vector`; else walk_put stages it elementwise) unless
// it comes by cp.async (`kTileAsync`: Block::issue_groups_async, issued by
// the chunk before). The loads' round trips then overlap the prefix's (its
// gates' round trip, its serial joins and barriers) where they came after
// them.
template <typename input_t, bool kComplex>
struct WalkLoads {
    typename WalkBlock<input_t, kComplex>::HeldKeys keys;
    typename WalkBlock<input_t, kComplex>::template HeldGroups<kVTile> tile;
    bool vector;
};
template <int kAhead, class Op, int kTerms, bool kTileAsync = false, typename input_t, bool kComplex>
__device__ __forceinline__ WalkLoads<input_t, kComplex> walk_fetch(const WalkBlock<input_t, kComplex>& blk,
                                                                   const WalkRows<input_t>& rows, int64_t d0) {
    WalkLoads<input_t, kComplex> e;
    e.keys = blk.template fetch_keys<kAhead>(rows.keys, rows.key_strides, d0);
    e.vector = false;
    if constexpr (!kTileAsync && stored_as_loaded<input_t, Op, raw_tile_terms<input_t, kTerms>()>()) {
        const int64_t limit = blk.p.dims.value_dim;
        e.vector = blk.vector_rows(rows.tile, rows.tile_strides, blk.v0, limit);
        if (e.vector) e.tile = blk.template fetch_groups<kVTile, kAhead>(rows.tile, rows.tile_strides, blk.v0, limit);
    }
    return e;
}
// Block::load_tile's bits, from the loads walk_fetch issued where it took
// the vector path; none where the tile comes by cp.async.
template <int kAhead, class Op, int kTerms, bool kTileAsync = false, typename input_t, bool kComplex>
__device__ __forceinline__ void walk_put(const WalkBlock<input_t, kComplex>& blk, const WalkRows<input_t>& rows,
                                         const WalkLoads<input_t, kComplex>& e,
                                         const WalkSmem<Op, input_t, kComplex, kTerms>& sm) {
    constexpr int kTileTerms = raw_tile_terms<input_t, kTerms>();
    blk.put_keys(e.keys, sm.raw);
    if constexpr (!kTileAsync) {
        if constexpr (stored_as_loaded<input_t, Op, kTileTerms>()) {
            if (e.vector) {
                blk.template put_groups<kVTile>(e.tile, [&](int t, int c, uint4 w) { sm.tile.put_group(t, c, w); });
                return;
            }
        }
        blk.template load_rows<kVTile, kAhead>(
            rows.tile, rows.tile_strides, blk.v0, blk.p.dims.value_dim,
            [&](int m, int c, float x) { sm.tile.template put<kTileTerms>(m, c, x); });
    }
}

// One block per (b, h, value tile, key slab of walk_slab channels: 16
// complex, 32 real) (slab fastest) walks the chunks — forward (c = 0 …
// nc − 1) or, kBackward, in reverse — with its slab of a carried state S
// (walk_slab key rows × 64 value columns) in shared memory: per chunk it
// issues the loads of the key slab and value tile of `rows(blk)` (a
// WalkRows; walk_fetch), builds the gate prefix, puts them (walk_put: the
// raw slab in sm.raw, the tile in sm.tile as Y), then `put_slab(blk, sm)`
// forms the Gram operand X in sm.slab from sm.raw (its own raw items: no
// barrier), X_c = Xᵀ Y is formed as store_slab_gram forms it, slot c of `slots`
// (a [B·H, nc, parts·K, V] workspace) := S, then S ← a_c ⊙ S + X_c with
// a_c = A_c = E(last, −1) (conj(A_c) when kBackward; the forward walk also
// stores A_c to ws_decay, as the state kernel does): carry_chunks' step, so
// the slots and the final S are bit for bit those of the state (grad_w)
// kernel followed by the carry (adjoint carry) kernel. S starts from `init`
// (h0 or dh_final; null: 0) and ends in `fin` (h_final or dh0; null: not
// written), both [B, H, K, V] with their strides. The forward's
// chunk_state_seq (cuda/chunk.cu) and the backward's grad_w_seq
// (cuda/chunk_grad.cu). kCols = kWideCols (real gates; the wide walks, V >
// 64): a block per 128 value columns, its S that wide, each chunk's prefix,
// keys and slab operand built once for its two value tiles, whose Gram
// products and updates follow one another through the same X_c bytes (the
// second tile after the decays: seq_smem_bytes); every element's
// operations those of the walk of one tile.
template <bool kBackward, class Op, int kTerms, typename input_t, bool kComplex, int kCols = kVTile, class Rows,
          class PutSlab>
__device__ __forceinline__ void walk_chunks(const GateloopChunkParams& p, unsigned char* smem, const float* init,
                                            const GateloopStateStrides& init_strides, float* slots, float* fin,
                                            const GateloopStateStrides& fin_strides, Rows rows_of, PutSlab put_slab) {
    static_assert(kCols == kVTile || (kCols == kWideCols && !kComplex), "one value tile, or two with real gates");
    constexpr int kHalves = kCols / kVTile;  // value tiles a block
    constexpr int kAhead = kBackward ? -1 : 1;  // the chunk visited next, prefetched into L2
    // The real wide walks' gates: no L2 prefetch of the chunk after next
    // (kGatesAhead 0). A chunk's gates are issued by cp.async during the
    // chunk before, after its decays, and waited for at its own start:
    // across the Gram products and updates of both value tiles, a window
    // longer than a DRAM round trip, so the prefetch that made them L2 hits
    // saved no wait, and it took 7 to 8 instructions an item (8 items a
    // thread a chunk: ~70 of the wide real bf16 Fast walk's ~1 570 a chunk).
    // The walks of one value tile keep it: without it ptxas spilled 4 and 12
    // bytes in the bf16 ones at their caps (64 and 80 registers).
    constexpr int kGatesAhead = kHalves == 2 ? 0 : kAhead;
    constexpr int kCh = walk_slab<kComplex>();
    constexpr int kWidth = slab_width<kComplex, kCh>();
    constexpr int kTileTerms = raw_tile_terms<input_t, kTerms>();
    int64_t idx = blockIdx.x;
    const int64_t d0 = split_index(idx, (p.dims.key_dim + kCh - 1) / kCh) * kCh;
    WalkBlock<input_t, kComplex> blk(p, smem, WalkBlock<input_t, kComplex>::tiles_of(p, kCols), 1, idx, kCols);
    const WalkSmem<Op, input_t, kComplex, kTerms> sm(smem, blk.warp);
    const WalkRows<input_t> rows = rows_of(blk);
    // [kWidth][kXld]: X_c of one value tile (every warp's tile; the raw
    // slab's bytes, WalkSmem, and the pad after them: walk_x_ld)
    constexpr int kXld = walk_x_ld<kComplex>();
    float* xbuf = sm.staging - blk.warp * 256;
    static_assert(kWidth * kXld * 4 == kStagingBytes + walk_x_pad_bytes<kComplex>(), "X_c fills the staging tiles");
    float* st = reinterpret_cast<float*>(smem + sm.kBytes + walk_x_pad_bytes<kComplex>());  // [kWidth][kCols]: S
    float2* dec = reinterpret_cast<float2*>(st + kWidth * kCols);  // [kCh]: a_c
    // The value tiles (Y of the Gram product): half h of the block's columns,
    // v0 + kVTile·h; the second (kHalves = 2) after the decays.
    unsigned char* second_at = reinterpret_cast<unsigned char*>(dec + kCh);
    const Split<Op> second = carve_terms<Op, OpOf<input_t>::kRawTerms>(second_at, kChunk, ld_tile<Op>());
    const auto tile_of = [&](int h) -> const Split<Op>& { return h == 0 ? sm.tile : second; };
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;

    // Slab element i: key row d0 + i / kCols, value column v0 + i % kCols.
    auto element = [&](int i, int64_t& d, int64_t& col) {
        d = d0 + i / kCols;
        col = blk.v0 + i % kCols;
        return d < key_dim && col < value_dim;
    };
    for (int i = blk.tid; i < kCh * kCols; i += kThreads) {
        int64_t d, col;
        float2 s = make_float2(0.f, 0.f);
        if (element(i, d, col) && init != nullptr) {
            const int64_t at_ = state_index(init_strides, blk.b, blk.h, d, col);
            s = load_gate_side<kComplex>(init, at_);
        }
        st[i] = s.x;
        if (kComplex) st[kCh * kCols + i] = s.y;
    }
    // Real gates: the first chunk's gates (and its value tile where that is
    // stored as loaded in 16-byte groups: kTileAsync, by cp.async too) in
    // flight across the state's staging; every later chunk's are issued by
    // the one before (below). The loop is compiled once for each kind of
    // tile, so that the held tile's registers (walk_fetch) are not
    // allocated beside the cp.async path's (one loop testing a flag spilled
    // 12 bytes in the bf16 backward walk on sm_90).
    constexpr bool kCanTileAsync = !kComplex && stored_as_loaded<input_t, Op, raw_tile_terms<input_t, kTerms>()>();
    // Real gates: the loads in flight across the prefix, put after it
    // (the tile's and the raw slab's last readers, the previous chunk's
    // product and update, are done at its barriers). Complex gates
    // stage them after it: across it, ptxas gave the uncapped complex
    // walks 147 to 168 registers where they had 96 (sm_90 bf16 Exact:
    // one resident block where two were). There the tile's and the
    // keys' loads are issued together (walk_fetch, then walk_put: one
    // round trip where the tile's and then the keys' took two), but in
    // the f16 backward walk on sm_90 (a 4-byte spill at its 80).
    constexpr bool kTogether =
        !(kBackward && std::is_same<input_t, __half>::value) || GATELOOP_BY_ARCH(true, false);
    // Step i visits chunk chunk_at(i) (the reverse order when kBackward).
    const auto chunk_at = [&](int64_t i) { return kBackward ? p.num_chunks - 1 - i : i; };
    // Real gates: the state update in groups of four columns (16-byte slot
    // stores) where every slot row starts 16-byte aligned (the slots'
    // base, and V a multiple of 4); the same values.
    const bool quads = !kComplex && value_dim % 4 == 0 && (reinterpret_cast<uintptr_t>(slots) & 15) == 0;
    const auto walk = [&](auto tile_async) {
        constexpr bool kTileAsync = decltype(tile_async)::value;
        // Value tile h of chunk c by cp.async (kTileAsync).
        const auto issue_tile = [&](int64_t c, int h) {
            if constexpr (kTileAsync) {
                blk.template issue_groups_async<kVTile, kAhead>(rows.tile, rows.tile_strides, blk.v0 + kVTile * h,
                                                                value_dim, c, tile_of(h));
            }
        };
        if constexpr (!kComplex) {
#pragma unroll
            for (int h = 0; h < kHalves; ++h) issue_tile(chunk_at(0), h);
            blk.template issue_gates_async<kGatesAhead>(d0, chunk_at(0));
        }
#pragma unroll 1
        for (int64_t i = 0; i < p.num_chunks; ++i) {
            blk.at_chunk(chunk_at(i));
            if constexpr (!kComplex) {
                const WalkLoads<input_t, kComplex> loads = walk_fetch<kAhead, Op, kTerms, kTileAsync>(blk, rows, d0);
                // The gate prefix: the chunk's gates (and kTileAsync its
                // value tile), issued before the loop or by the previous
                // chunk (issue_gates_async, issue_tile), waited for here.
                // The barrier also orders the previous chunk's update before
                // the puts.
                cp_async_wait_all();
                __syncthreads();
                blk.template scan_prefix<false>(d0);  // ends with a barrier
                walk_put<kAhead, Op, kTerms, kTileAsync>(blk, rows, loads, sm);
                if constexpr (kHalves == 2 && !kTileAsync) {
                    // The second tile elementwise (walk_put's path for the first).
                    blk.template load_rows<kVTile, kAhead>(
                        rows.tile, rows.tile_strides, blk.v0 + kVTile, value_dim,
                        [&](int m, int c, float x) { second.template put<kTileTerms>(m, c, x); });
                }
            } else if constexpr (kTogether) {
                blk.template build_prefix<kAhead, false>(d0);
                walk_put<kAhead, Op, kTerms>(blk, rows, walk_fetch<kAhead, Op, kTerms>(blk, rows, d0), sm);
            } else {
                blk.template build_prefix<kAhead, false>(d0);
                blk.template load_tile<Op, raw_tile_terms<input_t, kTerms>(), kAhead>(rows.tile, rows.tile_strides,
                                                                                   sm.tile);
                blk.template load_keys<kAhead>(rows.keys, rows.key_strides, d0, sm.raw);
            }
            put_slab(blk, sm);
            if (blk.tid < kCh) {
                const int j = blk.tid;
                const float2 a = chunk_decay(blk, j, blk.n - 1);
                if (!kBackward && blk.vt == 0 && j < blk.gate_cols(d0)) store_decay(blk, d0, j, a);
                dec[j] = kBackward ? make_float2(a.x, -a.y) : a;
            }
            __syncthreads();
            if constexpr (!kComplex) {
                // The tables' last readers (put_slab, the decays) are done: the
                // next chunk's gates land in them across this one's Gram
                // product and update.
                if (i + 1 < p.num_chunks) blk.template issue_gates_async<kGatesAhead>(d0, chunk_at(i + 1));
            }
            // Each value tile h in turn (kHalves = 2: the wide walk, whose
            // prefix, keys and slab operand serve both): X_c = Xᵀ Y_h into
            // xbuf, then its columns of S. The same operations on each
            // element as a walk of one tile: bit for bit. Not unrolled:
            // unrolled, ptxas held both tiles' addresses (sm_80: 128
            // registers and 28 to 32 bytes spilled at two blocks an SM).
#pragma unroll 1
            for (int h = 0; h < kHalves; ++h) {
                Acc<Op> acc;
                // Rolled (where it matters: bf16 Exact) but in the complex forward walk.
                const bool owns = slab_gram<Op, kTerms, kBackward || !kComplex>(blk, sm.slab, tile_of(h), acc, blk.warp);
                // xbuf's readers, the previous tile's update, done.
                if (h > 0) __syncthreads();
                if (owns) {
                    const int rb = blk.warp / (kVTile / 16);
                    const int cb = blk.warp % (kVTile / 16);
                    store_accumulator(xbuf + 16 * rb * kXld + 16 * cb, acc, kXld);
                }
                // Real gates: row r's decay also beside X_c's row r, in its pad
                // (the raw slab's last reader, put_slab, is past a barrier),
                // where the quads' update reads it from the row it reads X_c
                // from: one address for both, where dec's own cost the 80- and
                // 64-register walks on sm_90 a register and 4 to 8 bytes of
                // spill with the padded pitch.
                if (!kComplex && h == 0 && blk.tid < kCh) xbuf[blk.tid * kXld + kVTile] = dec[blk.tid].x;
                __syncthreads();
                // The tile's only reader, the Gram product, is done: the next
                // chunk's tile lands across this one's update and the next one's
                // prefix.
                if (i + 1 < p.num_chunks) issue_tile(chunk_at(i + 1), h);
                if constexpr (!kComplex) {
                    if (quads) {
                        // Thread: columns v0 + kVTile·h + 4g .. + 3 (g = tid % 16), key
                        // rows d0 + tid / 16 + 16u: one 16-byte slot store, shared read
                        // and write a row, where the elementwise loop below took four
                        // (each store with its 64-bit address and bounds test).
                        constexpr int kQuads = kVTile / 4;  // a row's groups of four columns
                        constexpr int kRowStep = kThreads / kQuads;
                        static_assert(kCh % kRowStep == 0, "whole passes of the block");
                        const int g = blk.tid % kQuads;
                        const int r0 = blk.tid / kQuads;
                        const int64_t col = blk.v0 + kVTile * h + 4 * g;
                        const bool col_in = col < value_dim;  // all four: value_dim % 4 == 0
                        float* const first = slots + opaque(blk.ws_state_row(d0 + r0) + col);
                        const int64_t row_step = opaque(kRowStep * value_dim);
                        // Rolled in the wide walks (unrolled with the padded
                        // pitch, the wide 16-bit Fast ones spilled 8 bytes at
                        // their 80 registers on sm_90; the narrow bf16 Exact
                        // one, rolled, 4 at its 80).
#pragma unroll(kHalves == 2 ? 1 : kCh / kRowStep)
                        for (int u = 0; u < kCh / kRowStep; ++u) {
                            const int r = r0 + kRowStep * u;
                            float4* const sp = reinterpret_cast<float4*>(st + r * kCols + kVTile * h + 4 * g);
                            const float4 sv = *sp;
                            if (col_in && d0 + r < key_dim) *reinterpret_cast<float4*>(first + u * row_step) = sv;
                            const float a = xbuf[r * kXld + kVTile];
                            const float4 x = *reinterpret_cast<const float4*>(xbuf + r * kXld + 4 * g);
                            *sp = make_float4(fmaf(a, sv.x, x.x), fmaf(a, sv.y, x.y), fmaf(a, sv.z, x.z),
                                              fmaf(a, sv.w, x.w));
                        }
                        continue;
                    }
                }
                // Thread slot: column v0 + kVTile·h + col, key rows d0 + row0 + kStep·u.
                const TileSlot<kVTile> slot(blk.tid);
                const StateRows<kVTile, kCh> rows(blk, slot, d0, blk.v0 + kVTile * h);
                for_tile<kCh, kVTile>(slot, [&](int u, int r, int c) {
                    const int e = r * kXld + c;          // in xbuf
                    const int se = r * kCols + kVTile * h + c;  // in st
                    const float2 s = make_float2(st[se], kComplex ? st[kCh * kCols + se] : 0.f);
                    if (rows.live(u)) {
                        slots[rows.at(0, u)] = s.x;
                        if (kComplex) slots[rows.at(1, u)] = s.y;
                    }
                    const float2 a = dec[r];
                    if (kComplex) {
                        const float2 x = apply(a, make_float2(xbuf[e], xbuf[kCh * kXld + e]), s);
                        st[se] = x.x;
                        st[kCh * kCols + se] = x.y;
                    } else {
                        st[se] = fmaf(a.x, s.x, xbuf[e]);
                    }
                });
            }
            // (The next chunk's prefix ends with a barrier before xbuf, dec
            // or st are touched again: build_prefix's own, or for real gates
            // the one after cp_async_wait_all.)
        }
    };
    if constexpr (kCanTileAsync) {
        if (blk.vector_rows(rows.tile, rows.tile_strides, blk.v0, value_dim)) {
            walk(std::true_type{});
        } else {
            walk(std::false_type{});
        }
    } else {
        walk(std::false_type{});
    }
    __syncthreads();
    if (fin == nullptr) return;
    for (int i = blk.tid; i < kCh * kCols; i += kThreads) {
        int64_t d, col;
        if (!element(i, d, col)) continue;
        const float2 s = make_float2(st[i], kComplex ? st[kCh * kCols + i] : 0.f);
        store_gate_side<kComplex>(fin, state_index(fin_strides, blk.b, blk.h, d, col), s);
    }
}

// ---- the intra-chunk pass: the forward's y, the backward's dv ---------------------

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

// The diagonal 16 × 16 score blocks are formed in halves of kPiece = 8
// steps: the causal pairs inside each half pairwise (each factor one exp of
// a direct difference), and the 8 × 8 block between them (query steps 8 ..
// 15 of the sub-chunk against key steps 0 .. 7) as anchored products at the
// first half's last step r: q_n |E(n, r)| e^{iθ_n} · k_m |E(r, m)| e^{−iθ_m},
// both factors ≤ 1, 0 across a reset, as the off-diagonal sub-chunk blocks
// are formed (put_query_rows, put_key_rows). Why: pairwise, a sub-chunk's 136 pairs
// take an exp and seven table reads per pair and channel (the diagonal
// pairs were about 45% of the output launch's instructions per slab); the
// halves take 2 × 36 pairs, and the block between them 16 rows of factors
// (an exp each) and 64 products of 16 (32 complex) FMAs. Per slab the 288
// pairs are 160 tiles of one query row and two key rows (one per thread,
// the query side's reads shared: add_half_pairs) and the 256 cross
// products one per thread, where the 544 pairs were three for a warp and
// two for the others.
constexpr int kPiece = kSub / 2;
constexpr int kPieces = kChunk / kPiece;
constexpr int kCrossRows = kSubs * kPiece;              // 32 anchored query rows, 32 key rows
static_assert(kSubs * kPiece * kPiece == kThreads, "one cross product per thread");
// The anchor of sub-chunk `sub`'s cross rows: its first half's last step.
__host__ __device__ constexpr int cross_anchor(int sub) {
    return kSub * sub + kPiece - 1;
}

constexpr int kPiecePairs = kPiece * (kPiece + 1) / 2;  // 36
// The causal pairs (row r, column c ≤ r) of a kWidth × kWidth block (the
// kPiece's 36), numbered without a square root: rows f and kWidth − 1 − f
// hold kWidth + 1 pairs together, so pair t is in fold f = t / (kWidth + 1),
// at (f, e) for e = t % (kWidth + 1) ≤ f, else at (kWidth − 1 − f, e − f − 1)
// (an odd width's middle row alone); rows counted from kRow0. (The shift
// inside each arm: added to the select's result, nvcc kept the add, 8
// more instructions in the real output launches.)
template <int kWidth = kPiece, int kRow0 = 0>
__device__ __forceinline__ int2 piece_pair(int t) {
    const int f = t / (kWidth + 1);
    const int e = t - f * (kWidth + 1);
    return e <= f ? make_int2(kRow0 + f, e) : make_int2(kRow0 + kWidth - 1 - f, e - f - 1);
}
// The strictly causal pairs (c < r) of a piece alone, 28: those of the
// 7 × 7 block below its first row.
constexpr int kPieceStrictPairs = kPiece * (kPiece - 1) / 2;  // 28
__device__ __forceinline__ int2 piece_strict_pair(int t) {
    return piece_pair<kPiece - 1, 1>(t);
}

// The same pairs in tiles of two key columns of one query row (the last
// tile of an even row has one): row r holds ⌈(r + 1) / 2⌉ tiles, rows 2s
// and 2s + 1 hold s + 1 each, so tile u < 20 is in row pair s with
// s(s + 1) ≤ u < (s + 1)(s + 2), at (row, first key column).
constexpr int kPieceTiles = (kPiece / 2) * (kPiece / 2 + 1);  // 20
static_assert(kPieces * kPieceTiles <= kThreads, "one tile per thread");
__device__ __forceinline__ int2 piece_tile(int u) {
    static_assert(kPiece == 8, "four row pairs");
    const int s = (u >= 2) + (u >= 6) + (u >= 12);
    const int v = u - s * (s + 1);
    const int odd = v > s;
    return make_int2(2 * s + odd, 2 * (v - odd * (s + 1)));
}

// The cross rows' scratch (f32, kCrossRows query rows then kCrossRows key
// rows, each [Re | −Im] or [Re | Im] of the slab's channels, Re only for
// real gates): rows of kPrefixLd (real: 80 bytes, so the eight key rows a
// quarter-warp reads at one column fall in eight 16-byte bank groups) or,
// complex, of 2·kSlab with the 16-byte group XOR-swizzled by the row (8
// groups a row: the same, in 8 KB). cross_scratch_bytes: what the caller
// lends (intra_pass: the warps' staging tiles, idle in the slab loop).
template <bool kComplex>
__host__ __device__ constexpr int cross_ld() {
    return kComplex ? 2 * kSlab : kPrefixLd;
}
template <bool kComplex>
__host__ __device__ constexpr int cross_scratch_bytes() {
    return 2 * kCrossRows * cross_ld<kComplex>() * 4;
}
static_assert(cross_scratch_bytes<true>() <= kStagingBytes && cross_scratch_bytes<false>() <= kStagingBytes,
              "the cross rows fit the staging tiles");
// Entry (row, 16-byte group g) of the cross scratch.
template <bool kComplex>
__device__ __forceinline__ int cross_at(int row, int g) {
    return row * cross_ld<kComplex>() + 4 * (kComplex ? (g ^ (row & 7)) : g);
}

// The cross rows of slab d0 into `scratch` (cross_scratch_bytes; raw q, k
// in qraw, kraw [kChunk][kSlab], the prefix tables of the slab): query row
// i < 32 is step n = 16·(i / 8) + 8 + i % 8 as [Re q̃ | −Im q̃],
// q̃ = q_n |E(n, a)| e^{iθ_n}; key row i (from kCrossRows on) is step
// m = 16·(i / 8) + i % 8 as [Re k̃ | Im k̃], k̃ = k_m |E(a, m)| e^{−iθ_m}; the
// anchor a = 16·(i / 8) + 7 is the first half's last step (both factors
// ≤ 1, 0 across a reset; the entry of row i, channel j at
// cross_at(i, j / 4) + j % 4, its Im part at cross_at(i, (16 + j) / 4) + j % 4).
// The forward's diagonal blocks (add_diagonal_cross) and the backward's
// dq, dk (grad_qk) take their 8 × 8 blocks between the halves from them.
template <bool kComplex>
__device__ __forceinline__ void put_cross_entry(float* scratch, int i, int j, float2 x) {
    scratch[cross_at<kComplex>(i, j >> 2) + (j & 3)] = x.x;
    if (kComplex) scratch[cross_at<kComplex>(i, (kSlab + j) >> 2) + (j & 3)] = x.y;
}

// A slab's operand rows from its raw queries (raw q in qraw [kChunk][kSlab],
// the prefix tables of the slab), each query step's q and table entries
// read once for all of its rows (where each kind of row read them again:
// speed log item 58). Thread AnchoredSlot's items (n, j) over the chunk's
// 64 steps, n's sub-chunk i the item's u (compile time), put
//   per key sub-chunk s < i, anchor r = its last step, row
//     pair_of(i, s)·16 + n − 16 i of qa, q̃_n = q_n |E(n, r)| e^{iθ_n} as
//     [Re | −Im]: the six off-diagonal score blocks' query rows;
//   kInter: row n of qe, Q̃_n = q_n |E(n, −1)| e^{iθ_n} as [Re | −Im] (Re
//     only for real gates): the forward's y += Q̃ S_c (intra_pass);
//   kCross: where n is in its sub-chunk's second half, its cross query row
//     (above) into `cross`.
// Every entry the same operations as one row at a time. Call past the
// barrier that publishes qraw and the tables (a thread reads other
// threads' raw q). qe: null without kInter, cross without kCross.
template <class Op, int kTerms, bool kInter, bool kCross, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_query_rows(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                               const Split<Op>& qa, const Split<Op>* qe, float* cross) {
    using B = Block<input_t, kComplex, kLd>;
    static_assert(TileSlot<kSlab>::kStep == kSub, "one sub-chunk row block per item");
    for_tile<kChunk, kSlab>(AnchoredSlot<kLd>(blk.tid), [&](int si, int nn, int j) {
        const int h = nn - kSub * si;  // the step in its sub-chunk
        // A warp's rows are all in one half of their sub-chunks (AnchoredSlot).
        const bool cross_row = kCross && h >= kPiece;
        if (!kInter && !cross_row && si == 0) return;
        const int cl = blk.col(j);
        const float q = qraw[blk.at(nn, j)];
        const auto late = blk.late_entry(nn, cl);
        if constexpr (kInter) {
            const float2 x = B::inter_query(late, q);
            qe->template put<kTerms>(nn, j, x.x);
            if (kComplex) qe->template put<kTerms>(nn, kSlab + j, x.y);
        }
#pragma unroll
        for (int s = 0; s < si; ++s) {
            const int row = kSub * pair_of(si, s) + h;
            const float2 x = blk.anchored_query(late, q, kSub * s + kSub - 1, cl);
            qa.template put<kTerms>(row, j, x.x);
            if (kComplex) qa.template put<kTerms>(row, kSlab + j, x.y);
        }
        if (cross_row) {
            const float2 x = blk.anchored_query(late, q, cross_anchor(si), cl);
            put_cross_entry<kComplex>(cross, kPiece * si + h - kPiece, j, x);
        }
    });
}

// The cross key rows (above) into `cross`, from the raw keys (raw k in
// kraw [kChunk][kSlab]).
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_cross_keys(const Block<input_t, kComplex, kLd>& blk, const float* kraw,
                                               float* cross) {
    static_assert(kCrossRows == 2 * kSub, "two row blocks of 16");
    for_tile<kCrossRows, kSlab>(AnchoredSlot<kLd>(blk.tid), [&](int, int i, int j) {
        const int sub = i / kPiece;
        const float2 x = blk.anchored_key(kraw, cross_anchor(sub), kSub * sub + i % kPiece, j, blk.col(j));
        put_cross_entry<kComplex>(cross + kCrossRows * cross_ld<kComplex>(), i, j, x);
    });
}

// The same as put_query_rows from the raw keys: rows m < 48 of ka,
// k̃_m = k_m |E(r, m)| e^{−iθ_m} as [Re | Im], anchor r = the last step of
// m's sub-chunk (the six off-diagonal score blocks' key rows), and, kCross,
// the cross key rows (put_cross_keys).
template <class Op, int kTerms, bool kCross, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_key_rows(const Block<input_t, kComplex, kLd>& blk, const float* kraw,
                                             const Split<Op>& ka, float* cross) {
    // A 16-wide slab's row block is its item index (for_tile): row / 16 = u
    // is the key sub-chunk, known at compile time.
    static_assert(TileSlot<kSlab>::kStep == kSub, "one sub-chunk row block per item");
    for_tile<(kSubs - 1) * kSub, kSlab>(AnchoredSlot<kLd>(blk.tid), [&](int sub, int m, int j) {
        const float2 x = blk.anchored_key(kraw, sub * kSub + kSub - 1, m, j, blk.col(j));
        ka.template put<kTerms>(m, j, x.x);
        if (kComplex) ka.template put<kTerms>(m, kSlab + j, x.y);
    });
    if constexpr (kCross) put_cross_keys(blk, kraw, cross);
}

// The cross rows alone (the backward's grad_qk, whose scratch is free only
// after its off-diagonal products; the register-fragment output pass): the
// query rows two items a thread (put_query_rows' kCross would give half
// the threads four).
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void put_cross_rows(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                               const float* kraw, float* scratch) {
    for_tile<kCrossRows, kSlab>(AnchoredSlot<kLd>(blk.tid), [&](int, int i, int j) {
        const int sub = i / kPiece;
        const int step = kSub * sub + kPiece + i % kPiece;
        const int cl = blk.col(j);
        const float2 x = blk.anchored_query(blk.late_entry(step, cl), qraw[blk.at(step, j)], cross_anchor(sub), cl);
        put_cross_entry<kComplex>(scratch, i, j, x);
    });
    put_cross_keys(blk, kraw, scratch);
}

// f(j) for the slab's channels j < cols in order: a whole slab (every slab
// where K is a multiple of 16) in passes of four channels without a
// remainder (unroll 4; a full unroll spilled in six kernels), the same
// operations in the same order.
template <class F>
__device__ __forceinline__ void for_slab_channels(int cols, F f) {
    if (cols == kSlab) {
#pragma unroll 4
        for (int j = 0; j < kSlab; ++j) f(j);
    } else {
        for (int j = 0; j < cols; ++j) f(j);
    }
}

// Re E(n, m) of table column cl for a pair inside a half: the modulus,
// times Re e^{i(θ_n − θ_m)} = cos θ_n cos θ_m + sin θ_n sin θ_m for complex
// gates; real gates skip the latter (nvcc does not fold the fmaf of the
// tables' constant 1 and 0, and multiplied every factor by the 1 it returns).
// From the query step's entries (late_entry); pair_factor reads them.
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ float pair_factor_after(const Block<input_t, kComplex, kLd>& blk,
                                                   const typename Block<input_t, kComplex, kLd>::LateEntry& l, int m,
                                                   int cl) {
    const float w = blk.modulus_after(l, m, cl);
    if constexpr (!kComplex) return w;
    return w * fmaf(l.cs, blk.cos_at(m, cl), l.sn * blk.sin_at(m, cl));
}
template <typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ float pair_factor(const Block<input_t, kComplex, kLd>& blk, int nn, int m, int cl) {
    return pair_factor_after(blk, blk.late_entry(nn, cl), m, cl);
}

// The pairs of slab d0's halves into pdiag (add_diagonal_pairs' first
// part), each pair's sum over the channels in channel order. kKeys = 2:
// thread i < 160 takes tile i % 20 of piece i / 20 (piece_tile): query row
// nn against key rows m0 and m0 + 1 (m0 twice, the second discarded, where
// m0 is the row's last key), two chains in one pass over the channels,
// nn's raw q and table entries read once for both: about 0.8× the table
// and operand reads of one pair a thread, and no second round. kKeys = 1
// (the launches that spilled with two at their register caps): complex
// gates pair i % 36 of piece i / 36 (piece_pair) for i < 288, a second
// round for one warp; real gates a channel each the 224 pairs of distinct
// steps one a thread and the 64 of a step with itself, whose factor is 1,
// as sums of products on the last warp.
// Either way every pair the same value, its channels in the same order.
template <int kKeys, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void add_half_pairs(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                               const float* kraw, int64_t d0, float* pdiag) {
    static_assert(kKeys == 1 || kKeys == 2, "one or two key rows a thread");
    if constexpr (kKeys == 2) {
        const int i = blk.tid;
        if (i >= kPieces * kPieceTiles) return;
        const int pc = i / kPieceTiles;
        const int2 rt = piece_tile(i - pc * kPieceTiles);
        const bool two = rt.y < rt.x;
        const int nn = pc * kPiece + rt.x;
        const int m0 = pc * kPiece + rt.y;
        const int m1 = two ? m0 + 1 : m0;
        const int sb = pc / 2;
        const int r16 = nn - sb * kSub, c16 = m0 - sb * kSub;
        const int cols = blk.gate_cols(d0);
        float acc0 = 0.f, acc1 = 0.f;
        if (blk.per_head) {
            float dot0 = 0.f, dot1 = 0.f;
            for (int j = 0; j < kSlab; ++j) {
                const float q = qraw[blk.at(nn, j)];
                dot0 = fmaf(q, kraw[blk.at(m0, j)], dot0);
                dot1 = fmaf(q, kraw[blk.at(m1, j)], dot1);
            }
            const auto late = blk.late_entry(nn, 0);
            acc0 = pair_factor_after(blk, late, m0, 0) * dot0;
            acc1 = pair_factor_after(blk, late, m1, 0) * dot1;
        } else {
            // nn's entries read once for both keys (nvcc would merge the
            // repeated reads; said here, they are one read for every
            // compiler, the bank model's included).
            auto channel = [&](int j) {
                const float q = qraw[blk.at(nn, j)];
                const auto late = blk.late_entry(nn, j);
                const float qk0 = q * kraw[blk.at(m0, j)];
                const float qk1 = q * kraw[blk.at(m1, j)];
                acc0 = fmaf(pair_factor_after(blk, late, m0, j), qk0, acc0);
                acc1 = fmaf(pair_factor_after(blk, late, m1, j), qk1, acc1);
            };
            for_slab_channels(cols, channel);
        }
        float* row = pdiag + (sb * kSub + r16) * kSub + c16;
        row[0] += acc0;
        if (two) row[1] += acc1;
    } else {
        // Pair (nn, m) of piece pc, its factors from the tables. (cols read
        // once for real gates, a pair for complex: either other way ptxas
        // spilled 16 to 48 bytes, in the wide real 16-bit output launches
        // or the complex Fast frag ones, on sm_90.)
        const int real_cols = blk.gate_cols(d0);
        const auto add_pair = [&](int pc, int nn, int m) {
            const int sb = pc / 2;
            const int r16 = nn - sb * kSub, c16 = m - sb * kSub;
            const int cols = kComplex ? blk.gate_cols(d0) : real_cols;
            float acc = 0.f;
            if (blk.per_head) {
                float dot = 0.f;
                for (int j = 0; j < kSlab; ++j) dot = fmaf(qraw[blk.at(nn, j)], kraw[blk.at(m, j)], dot);
                acc = pair_factor(blk, nn, m, 0) * dot;
            } else {
                auto channel = [&](int j) {
                    const float qk = qraw[blk.at(nn, j)] * kraw[blk.at(m, j)];
                    acc = fmaf(pair_factor(blk, nn, m, j), qk, acc);
                };
                for_slab_channels(cols, channel);
            }
            pdiag[(sb * kSub + r16) * kSub + c16] += acc;
        };
        // Real gates a channel each (not per head, whose pairs take one
        // factor each): a step's pair with itself has the factor 1 exactly
        // (re_diff of an entry with itself is 0, or NaN, which fminf takes
        // to 0; ex2 of 0 is 1; no reset lies after the step), so fmaf(1, qk,
        // acc) is acc + qk, rounded once: those 64 pairs are sums of
        // products alone, no table reads, no exp (__fmul_rn: q k rounded
        // before the sum, as before, not contracted into it), two a thread
        // on the last warp, the 224 others one a thread on the rest, where
        // the 288 took two rounds for one warp. The same bits.
        if (kComplex || blk.per_head) {
            for (int i = blk.tid; i < kPieces * kPiecePairs; i += kThreads) {
                const int pc = i / kPiecePairs;
                const int2 rc = piece_pair(i - pc * kPiecePairs);
                add_pair(pc, pc * kPiece + rc.x, pc * kPiece + rc.y);
            }
        } else {
            constexpr int kStrict = kPieces * kPieceStrictPairs;
            constexpr int kSelfThreads = kThreads - kStrict;
            static_assert(kStrict < kThreads && kChunk % kSelfThreads == 0, "whole rounds of the pairs with themselves");
            for (int i = blk.tid; i < kStrict; i += kThreads) {
                const int pc = i / kPieceStrictPairs;
                const int2 rc = piece_strict_pair(i - pc * kPieceStrictPairs);
                add_pair(pc, pc * kPiece + rc.x, pc * kPiece + rc.y);
            }
            for (int nn = blk.tid - kStrict; nn >= 0 && nn < kChunk; nn += kSelfThreads) {
                float acc = 0.f;
#pragma unroll 1
                for (int j = 0; j < real_cols; ++j) acc = acc + __fmul_rn(qraw[blk.at(nn, j)], kraw[blk.at(nn, j)]);
                pdiag[nn * kSub + nn % kSub] += acc;
            }
        }
    }
}
// The diagonal 16 × 16 score blocks of slab d0, first part (raw q, k in
// qraw, kraw [kChunk][kSlab]; the prefix tables of the slab):
// pdiag[(16·sb + r)·16 + c] += Σ_d q_nd k_md Re E(n, m)_d for n = 16·sb + r,
// m = 16·sb + c ≤ n inside one half (r, c < 8 or r, c ≥ 8), pairwise
// (add_half_pairs, kKeys key rows a thread), in channel order; and the
// cross rows into `scratch` (put_cross_rows) for add_diagonal_cross: the
// forward's register-fragment output pass (cuda/chunk_frag.cuh; intra_pass
// puts the cross rows with its anchored ones, put_query_rows and
// put_key_rows, and then adds the pairs). Call between
// barriers (qraw, kraw, the tables staged; pdiag's diagonal-half elements
// and the scratch not read by others), and add_diagonal_cross after the
// next barrier.
// add_half_pairs: the pairs alone (the backward's grad_qk puts the cross
// rows itself, for its own products, and then adds these).
template <int kKeys, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void add_diagonal_pairs(const Block<input_t, kComplex, kLd>& blk, const float* qraw,
                                                   const float* kraw, int64_t d0, float* pdiag, float* scratch) {
    put_cross_rows(blk, qraw, kraw, scratch);
    add_half_pairs<kKeys>(blk, qraw, kraw, d0, pdiag);
}

// The diagonal blocks' second part: thread tid's element (query step
// 16·sb + 8 + r, key step 16·sb + c), sb = tid / 64, r = tid / 8 % 8,
// c = tid % 8, of the 8 × 8 block between the halves: pdiag += Σ over the
// slab's [Re | Im] columns of the cross rows' products (put_cross_rows, or
// put_query_rows' and put_key_rows' kCross, staged them), in column order.
// Call after the barrier that follows them, and before the barrier that
// ends the slab (the next slab's cross rows overwrite the scratch).
template <bool kComplex, bool kRolled = false>
__device__ __forceinline__ void add_diagonal_cross(int tid, const float* scratch, float* pdiag) {
    const int sb = tid / (kPiece * kPiece);
    const int r = tid / kPiece % kPiece;
    const int c = tid % kPiece;
    const int qi = sb * kPiece + r, ki = sb * kPiece + c;
    const float* krows = scratch + kCrossRows * cross_ld<kComplex>();
    float acc = 0.f;
    const auto group = [&](int g) {
        const float4 x = *reinterpret_cast<const float4*>(scratch + cross_at<kComplex>(qi, g));
        const float4 y = *reinterpret_cast<const float4*>(krows + cross_at<kComplex>(ki, g));
        acc = fmaf(x.x, y.x, acc);
        acc = fmaf(x.y, y.y, acc);
        acc = fmaf(x.z, y.z, acc);
        acc = fmaf(x.w, y.w, acc);
    };
    // kRolled: one group a pass, the same operations in the same order
    // (the backward's complex grad_qk, at its 128 registers, spilled with
    // the groups' loads all in flight, and with two a pass).
    if constexpr (kRolled) {
#pragma unroll 1
        for (int g = 0; g < slab_width<kComplex>() / 4; ++g) group(g);
    } else {
#pragma unroll
        for (int g = 0; g < slab_width<kComplex>() / 4; ++g) group(g);
    }
    pdiag[(sb * kSub + kPiece + r) * kSub + c] += acc;
}

// Off-diagonal score block `pair` (query sub-chunk i, key sub-chunk j) +=
// q̃ (pair rows of qa) · k̃ᵀ (sub-chunk j's rows of ka) over one slab
// (put_query_rows' and put_key_rows' operands): the forward's P (intra_pass), and the
// backward's grad_qk, which forms the same P for grad_dv.
template <class Op, int kTerms, bool kComplex, bool kRolled = false>
__device__ __forceinline__ void add_score_block(Acc<Op>& sacc, const Split<Op>& qa, const Split<Op>& ka, int pair) {
    const int sj = pair_key(pair);
    const auto step = [&](int kk) {
        mma_step<Op, kTerms, wmma::row_major, wmma::col_major>(sacc, qa.hi_at(kSub * pair, kk), qa.lo_at(kSub * pair, kk),
                                                               qa.ld, ka.hi_at(kSub * sj, kk), ka.lo_at(kSub * sj, kk),
                                                               ka.ld);
    };
    // kRolled: one inner step at a time (the backward's complex grad_qk, at
    // its 128 registers); the same operations in the same order.
    if constexpr (kRolled) {
#pragma unroll 1
        for (int kk = 0; kk < slab_width<kComplex>(); kk += Op::kK) step(kk);
    } else {
        for (int kk = 0; kk < slab_width<kComplex>(); kk += Op::kK) step(kk);
    }
}

// One block (b, h, chunk, value tile of kCols columns) of the pass that
// forms (kAdjoint: reads, below) the chunk's causal scores P (summed over
// every key slab) and, kAdjoint = false, the forward's output (launch 3 of
// cuda/chunk.cu)
//   y  = Re(Q̃ S_c) + P V,        Q̃_n = q_n E(n, −1),  S_c from `state` = ws_state;
// kAdjoint = true, the backward's value gradient (launch 3b of cuda/chunk_grad.cu)
//   dv = Re(K̃ D(c)) + Pᵀ dY,     K̃_m = k_m E(last, m), D(c) from `state` = ws_adj.
// `tile` (v or dy) is the value-side operand of the last product, `out` (y or
// dv) the result, each a (b, h) sequence row with its strides. Per key slab:
// X (64 × 2·16: [Re Q̃ | −Im Q̃] or [Re K̃ | Im K̃]) · state slab (2·16 × kCols)
// into the out accumulators; the six off-diagonal 16 × 16 score blocks
// (query sub-chunk i > key sub-chunk j, anchor r = last step of j) as
// q̃ (16 × 2·16) · k̃ᵀ (2·16 × 16) into score accumulators; the four diagonal
// blocks pairwise in f32 (each factor one exp of a direct difference). After
// the last slab P (64 × 64, causal) · V, or Pᵀ · dY, on tensor cores, V in
// halves of kVTile columns through the same bytes. Warps: warp w owns, in
// each half h of kVTile columns, out tiles (row block w / 2, column blocks
// 4h + 2·(w % 2) + {0, 1}) (accumulators 2h, 2h + 1) and, w < 6, score
// block w. kCols = kWideCols: the scores (every slab's q, k rows, anchored
// rows, diagonal pairs: most of the pass's work) are formed once for 128
// columns, where two kVTile blocks each formed them. Every element's
// operations and their order are the same for either kCols: bit for bit.
// kAdjoint: P is not formed but read from `scores`, the chunk's
// [kChunk][kChunk] f32 (on and below the diagonal) as the backward's
// grad_qk wrote them (grad_qk_scores: the same operands and operations as
// here, so the same bits); a slab then takes only K̃ and its product with D
// (no q, no anchored or cross rows, no pairs, no score products), and
// its layout has none of their bytes.
// Shared memory: output_smem_bytes<Op, kComplex, kCols>, kAdjoint
// adjoint_smem_bytes.
template <class Op, int kTerms, bool kAdjoint, int kCols = kVTile, typename input_t, bool kComplex, int kLd>
__device__ __forceinline__ void intra_pass(Block<input_t, kComplex, kLd>& blk, unsigned char* smem, const float* state,
                                           const input_t* __restrict__ tile, const GateloopSeqStrides& tile_strides,
                                           input_t* __restrict__ out, const GateloopSeqStrides& out_strides,
                                           const float* __restrict__ scores = nullptr) {
    static_assert(kCols == kVTile || kCols == kWideCols, "one or two halves");
    constexpr bool saved = kAdjoint;  // P from `scores`
    constexpr int kHalves = kCols / kVTile;
    constexpr int kOut = 2 * kHalves;  // accumulators a warp
    using Tr = InputTraits<input_t>;
    unsigned char* at = smem + prefix_bytes<kComplex, kLd>();
    // Raw q (not when P is read), raw k.
    float* qraw = saved ? nullptr : reinterpret_cast<float*>(at);
    if (!saved) at += kChunk * kLd * 4;
    float* kraw = reinterpret_cast<float*>(at);
    at += kChunk * kLd * 4;
    unsigned char* union_at = at;
    // Slab phase (q̃ and k̃ only to form P: kAdjoint leaves them unused,
    // outside its bytes).
    const Split<Op> qe = carve<Op>(at, kChunk, ld_slab<Op, kComplex>());
    const Split<Op> st = carve<Op>(at, slab_width<kComplex>(), ld_tile<Op, kCols>());
    const Split<Op> qa = carve<Op>(at, kPairs * kSub, ld_slab<Op, kComplex>());
    // k̃ [m][col] row-major, read as the column-major B = k̃ᵀ.
    const Split<Op> ka = carve<Op>(at, (kSubs - 1) * kSub, ld_slab<Op, kComplex>());
    // Final phase (same bytes); V (dY) one plane for bf16 inputs, whose one
    // term is exact (raw_tile_terms).
    constexpr int kRawTerms = OpOf<input_t>::kRawTerms;
    unsigned char* fin = union_at;
    const Split<Op> ps = carve<Op>(fin, kChunk, ld_tile<Op>());
    const Split<Op> vs = carve_terms<Op, kRawTerms>(fin, kChunk, ld_tile<Op>());
    at = union_at + (saved ? adjoint_union_bytes<Op, kComplex, kRawTerms, kCols>()
                           : output_union_bytes<Op, kComplex, kRawTerms, kCols>());
    float* pdiag = saved ? nullptr : reinterpret_cast<float*>(at);  // [kSubs][16][16]
    if (!saved) at += kSubs * kSub * kSub * 4;
    // The warps' staging tiles: the diagonal blocks' cross rows in the slab
    // loop (put_query_rows, put_key_rows), the score blocks and the drain after it.
    float* cross = reinterpret_cast<float*>(at);
    float* staging = cross + blk.warp * 256;

    const GateloopChunkParams& p = blk.p;
    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int tid = blk.tid;
    const int lane = tid & 31;
    constexpr int kWidth = slab_width<kComplex>();
    // Warp → out tiles (row block yr; in half h, column blocks 4h + yc + {0, 1})
    // and score block.
    const int yr = blk.warp >> 1;
    const int yc = (blk.warp & 1) * 2;
    const int pair = blk.warp;  // < kPairs: owns that score block
    // Accumulator a's column block: half a / 2, column block yc + a % 2.
    const auto ycol = [&](int a) { return (kVTile / 16) * (a >> 1) + yc + (a & 1); };

    // The products' A loaded once for the accumulators that share it, by
    // load_operand, but in the launches that spilled so at their register
    // caps (mma_split_steps' kLean, wmma's generic loads as before: the
    // wide 16-bit real Exact output launches, 8 and 48 bytes at 80 on sm_90,
    // and the wide f16 dv launches, 8 to 32 bytes at 80 and 128).
    constexpr bool kLean = kCols == kWideCols && kTerms == 3 && sizeof(input_t) == 2 &&
                           (kAdjoint ? std::is_same<input_t, __half>::value : !kComplex);
    // The diagonal pairs two key rows a thread (add_half_pairs), but one
    // where two spilled at the register cap: the wide 16-bit launches (real
    // gates on sm_90, 180 to 332 bytes at 80; complex on sm_80, 28 at 128)
    // and the narrow real f16 Exact one on sm_90 (4 to 12 at 80).
    constexpr bool kWideTight = kCols == kWideCols && sizeof(input_t) == 2 &&
                                (kComplex ? GATELOOP_BY_ARCH(true, false) : GATELOOP_BY_ARCH(false, true));
    constexpr bool kF16Tight =
        !kComplex && std::is_same<input_t, __half>::value && kTerms == 3 && GATELOOP_BY_ARCH(false, true);
    constexpr int kPairKeys = kWideTight || kF16Tight ? 1 : 2;
    Acc<Op> yacc[kOut];
#pragma unroll
    for (int a = 0; a < kOut; ++a) wmma::fill_fragment(yacc[a], 0.f);
    Acc<Op> sacc;
    wmma::fill_fragment(sacc, 0.f);
    for (int i = tid; i < kSubs * kSub * kSub && !saved; i += kThreads) pdiag[i] = 0.f;
    // The state rows in groups of four (fetch_state_quads) but for complex
    // gates on sm_80 (the narrow Exact output launches and the wide f16 dv
    // launch spilled 20 to 24 bytes at 128 registers).
    constexpr bool kQuads = !(kComplex && GATELOOP_BY_ARCH(true, false));
    const bool quads = kQuads && state_quads(state, value_dim);

    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        // The gate prefix, raw k and (to form P) raw q, published by one
        // barrier, their loads in one round trip; not where holding them
        // spilled 4 to 20 bytes at the register cap on sm_90 (the wide
        // complex output launches at 128, the narrow real dv launch at 80).
        constexpr bool kTight = saved ? !kComplex && kCols == kVTile : kComplex && kCols == kWideCols;
        constexpr bool kHeld = !kTight || GATELOOP_BY_ARCH(true, false);
        // The state entering the chunk (S_c; D(c) when kAdjoint), rows [Re | Im]
        // of the slab's channels (read after the slab's next barrier): the
        // loads of the thread's first kStateAhead items issued after the
        // tables' barrier, in flight across the prefix's scans (their
        // barriers and serial joins) where they were a round trip after
        // them, the rest after (kLoadsInFlight a trip, as before). Every
        // item (4 to 16) in the 16-bit launches; four in the f32 ones
        // (holding all eight spilled 4 bytes in the wide real Exact output
        // on sm_90); none where holding them spilled at a register cap
        // (the wide complex output launches on sm_90, 12 to 24 bytes at
        // 128; the wide f16 dv launches, 8 to 20 bytes at 80 and 128).
        constexpr int kParts = kComplex ? 2 : 1;
        constexpr int kItems = state_row_items<kParts, kCols>();
        constexpr bool kStateTight = kCols == kWideCols && (saved ? std::is_same<input_t, __half>::value
                                                                  : kComplex && GATELOOP_BY_ARCH(false, true));
        constexpr int kStateAhead = kStateTight ? 0 : sizeof(input_t) == 2 ? kItems : kLoadsInFlight;
        // The prefix's last joins a warp a segment (scan_prefix), but not
        // where that spilled at the register cap on sm_90: the wide real
        // f16 Fast output launch (28 bytes at 80) and the wide real bf16
        // dv launch (16 bytes at 64).
        constexpr bool kSplitJoins =
            !(kCols == kWideCols && !kComplex && GATELOOP_BY_ARCH(false, true) &&
              (kAdjoint ? std::is_same<input_t, __nv_bfloat16>::value : std::is_same<input_t, __half>::value && kTerms == 1));
        // Key quads (Block::key_quads) but where ptxas spilled with them
        // at a register cap: the wide real 16-bit output launches on sm_90
        // (32 to 48 bytes at 80) and the Exact ones on sm_80 (12 bytes);
        // the wide f16 dv launches on sm_80 (20 bytes) and the wide real
        // bf16 one on sm_90 (68 bytes).
        constexpr bool kF16 = std::is_same<input_t, __half>::value;
        constexpr bool kKeyQuads = !(kCols == kWideCols && sizeof(input_t) == 2 &&
                                     (kAdjoint ? GATELOOP_BY_ARCH(kF16, !kComplex && !kF16)
                                               : !kComplex && GATELOOP_BY_ARCH(kTerms > 1, true)));
        stage_slab_and_state_rows<!saved, kHeld, kParts, kCols, kStateAhead, kSplitJoins, kKeyQuads>(
            blk, d0, qraw, kraw, blk.v0, [&](int r, int c, auto x) { st.template put<kTerms>(r, c, x); }, state,
            quads);
        // Inter-chunk rows: [Re Q̃ | −Im Q̃] (y), [Re K̃ | Im K̃] (dv).
        // With the anchored and cross rows, each query step's entries read once.
        if constexpr (kAdjoint) {
            put_state_keys<Op, kTerms>(blk, kraw, qe);
        } else {
            put_query_rows<Op, kTerms, true, true>(blk, qraw, qa, &qe, cross);
            put_key_rows<Op, kTerms, true>(blk, kraw, ka, cross);
            add_half_pairs<kPairKeys>(blk, qraw, kraw, d0, pdiag);
        }
        __syncthreads();
        if (!saved) add_diagonal_cross<kComplex>(tid, cross, pdiag);
        // out += X S (inner: this slab's kWidth), rows 16·yr, the warp's column blocks.
        // Not unrolled (1 to 4 steps): unrolled, the wide launch's four
        // accumulators took the complex dv kernel past 128 registers (16
        // bytes spilled, sm_90); rolled, every kernel of this pass is at or
        // below its registers before the wide launch (f32 complex output
        // 234 → 194), the same operations in the same order.
#pragma unroll 1
        for (int kk = 0; kk < kWidth; kk += Op::kK) {
            // The warp's kOut accumulators share A (its rows of X).
            mma_split_steps<Op, kTerms, kTerms, wmma::row_major, wmma::row_major, kOut, kLean>(
                [&](int a) -> Acc<Op>& { return yacc[a]; }, qe.hi_at(16 * yr, kk), qe.lo_at(16 * yr, kk), qe.ld,
                [&](int a) { return st.hi_at(kk, 16 * ycol(a)); }, [&](int a) { return st.lo_at(kk, 16 * ycol(a)); },
                st.ld);
        }
        // score block (si, sj) += q̃ (pair rows) · k̃ᵀ (key sub-chunk sj).
        if (pair < kPairs && !saved) add_score_block<Op, kTerms, kComplex>(sacc, qa, ka, pair);
        __syncthreads();
    }

    // The value-side tile (v or dY) of the last product, a half of kVTile
    // columns at a time: stored as loaded (bf16, f16 Fast) where its rows
    // allow, each half's loads issued ahead (Block::fetch_groups) and put
    // when vs is free: the first half's round trip across P's forming, the
    // second's across the first half's products, where each was a round
    // trip between two barriers.
    constexpr int kTileTerms = raw_tile_terms<input_t, kTerms>();
    constexpr bool kTileAhead = stored_as_loaded<input_t, Op, kTileTerms>();
    bool tile_ahead = false;
    typename Block<input_t, kComplex, kLd>::template HeldGroups<kVTile> held_tile;
    if constexpr (kTileAhead) {
        tile_ahead = blk.vector_rows(tile, tile_strides, blk.v0, value_dim);
        if (tile_ahead) held_tile = blk.template fetch_groups<kVTile, 0>(tile, tile_strides, blk.v0, value_dim);
    }
    // P (64 × 64, causal) into its split operand: the score blocks pass
    // through the warps' staging tiles, the diagonal from pdiag, zeros above.
    if (pair < kPairs && !saved) store_accumulator(staging, sacc, 16);
    __syncthreads();
    float* staging0 = cross;
    // Items u of row block bi = u / (kSub / kStep) (a thread's rows stay
    // inside one 16-row block for kSub / kStep items).
    constexpr int kStep = TileSlot<kChunk>::kStep;
    static_assert(kSub % kStep == 0, "whole row blocks per item run");
    for_tile<kChunk, kChunk>(TileSlot<kChunk>(tid), [&](int u, int nn, int m) {
        const int bi = u / (kSub / kStep), bj = m / kSub;
        const int rr = nn - bi * kSub, cc = m - bj * kSub;
        float x = 0.f;
        if (saved) {
            x = bj < bi || (bj == bi && cc <= rr) ? scores[nn * kChunk + m] : 0.f;
        } else if (bj == bi) {
            x = cc <= rr ? pdiag[(bi * kSub + rr) * kSub + cc] : 0.f;
        } else if (bj < bi) {
            x = staging0[pair_of(bi, bj) * 256 + rr * 16 + cc];
        }
        ps.template put<kTerms>(nn, m, x);
    });
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
        // Half h of the tile into vs; half h − 1's products, its readers, done.
        if (h > 0) __syncthreads();
        bool put = false;
        if constexpr (kTileAhead) {
            if (tile_ahead) {
                blk.template put_groups<kVTile>(held_tile, [&](int t, int c, auto w) { vs.put_group(t, c, w); });
                if (h + 1 < kHalves) {
                    held_tile = blk.template fetch_groups<kVTile, 0>(tile, tile_strides, blk.v0 + (h + 1) * kVTile,
                                                                     value_dim);
                }
                put = true;
            }
        }
        if (!put) {
            // held_tile unused on this path (tile_ahead false): said, so that
            // ptxas need not keep it across the loads.
            if constexpr (kTileAhead) held_tile = {};
            blk.template load_tile<Op, kTileTerms>(tile, tile_strides, blk.v0 + h * kVTile, vs);
        }
        __syncthreads();
        if constexpr (kAdjoint) {
            // dv += Pᵀ dY: A(m, n) = P[n][m] read column-major, the inner loop
            // over n from the diagonal block on (P is causal: n ≥ m).
            for (int kk = kSub * yr; kk < kChunk; kk += Op::kK) {
                mma_split_steps<Op, kTerms, kTileTerms, wmma::col_major, wmma::row_major, 2, kLean>(
                    [&](int t) -> Acc<Op>& { return yacc[2 * h + t]; }, ps.hi_at(kk, 16 * yr), ps.lo_at(kk, 16 * yr),
                    ps.ld, [&](int t) { return vs.hi_at(kk, 16 * (yc + t)); },
                    [&](int t) { return vs.lo_at(kk, 16 * (yc + t)); }, vs.ld);
            }
        } else {
            // y += P V, the inner loop stopping at the diagonal block.
            for (int kk = 0; kk < kSub * (yr + 1); kk += Op::kK) {
                mma_split_steps<Op, kTerms, kTileTerms, wmma::row_major, wmma::row_major, 2, kLean>(
                    [&](int t) -> Acc<Op>& { return yacc[2 * h + t]; }, ps.hi_at(16 * yr, kk), ps.lo_at(16 * yr, kk),
                    ps.ld, [&](int t) { return vs.hi_at(kk, 16 * (yc + t)); },
                    [&](int t) { return vs.lo_at(kk, 16 * (yc + t)); }, vs.ld);
            }
        }
    }
    // No barrier before draining into the staging tiles: their cross-warp
    // reads (the score blocks, into ps) ended at the barrier after the
    // first load_tile, and the products read ps and vs, which do not
    // overlap them.
    //
    // 16-bit outputs whose rows start 16-byte aligned: a lane's 8 elements
    // of a tile in one 16-byte store, where the elementwise drain took 8
    // (each with its 64-bit address); the same values. Not in the wide
    // complex launches on sm_80, which sit at 128 registers there and
    // spilled 8 bytes with it.
    constexpr bool kGroupDrain =
        sizeof(input_t) == 2 && !(kComplex && kCols == kWideCols && GATELOOP_BY_ARCH(true, false));
    if constexpr (kGroupDrain) {
        if (blk.vector_rows(out, out_strides, blk.v0, value_dim)) {
#pragma unroll
            for (int a = 0; a < kOut; ++a) {
                drain_group<Op>(yacc[a], staging, lane, [&](int r, int c, const float (&x)[8]) {
                    const int64_t col = blk.v0 + 16 * ycol(a) + c;
                    if (16 * yr + r >= blk.n || col >= value_dim) return;
                    // (mma::pack2 rounds as Tr::store does.)
                    const uint4 w = make_uint4(mma::pack2<input_t>(x[0], x[1]), mma::pack2<input_t>(x[2], x[3]),
                                               mma::pack2<input_t>(x[4], x[5]), mma::pack2<input_t>(x[6], x[7]));
                    *reinterpret_cast<uint4*>(out + (blk.t0 + 16 * yr + r) * out_strides.time + col) = w;
                });
            }
            return;
        }
    }
#pragma unroll
    for (int a = 0; a < kOut; ++a) {
        const int64_t col = blk.v0 + 16 * ycol(a) + drain_col(lane);
        const int64_t first = opaque((blk.t0 + 16 * yr + drain_row0(lane)) * out_strides.time + col);
        const int64_t step = opaque(kDrainRowStep * out_strides.time);
        drain<Op>(yacc[a], staging, lane, [&](int k, int r, int, float x) {
            if (16 * yr + r < blk.n && col < value_dim) Tr::store(out, first + k * step, x);
        });
    }
}

}  // namespace chunk
}  // namespace gateloop

#endif  // GATELOOP_CHUNK_COMMON_CUH
