// nvcuda::wmma for the CPU kernel emulator (tests/kernel_emu), enough for
// cuda/chunk.cu: every lane of a warp holds the WHOLE tile in its fragment
// (the kernels touch fragments only through these calls), loads read the
// tile from memory, mma_sync computes the full product in f32 with one fmaf
// per k in k order (products of TF32/f16/bf16 operands are exact in f32;
// the tensor core's truncating accumulation is modelled only in the fake
// driver's build, EMU_GPU_ARITH below), each lane stores its share of the tile
// (every lane holds the same tile, so the union is the whole tile).
#pragma once
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cuda_bf16.h"
#include "cuda_fp16.h"

#ifdef EMU_BANKS
// The bank model's view of these tiles (bank_model.cpp, build.sh banks): what
// the GPU's instructions read and write, in place of the emulation's
// whole-tile reads, which are muted.
void emu_banks_mute(int delta);
void emu_banks_tile_ldsm(const void* p, size_t stride);
void emu_banks_ldmatrix_row(const void* row, int count);
void emu_banks_tile_words(const void* p, unsigned ld, bool row_major, const int (*rc)[2], int n, unsigned width,
                          bool write);
// Inlined into the kernel, so that each call site is its own (addr2line -i).
#define EMU_BANKS_INLINE __attribute__((always_inline))
#else
#define EMU_BANKS_INLINE
#endif

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// f32 → TF32 (10 explicit mantissa bits) as the hardware's cvt.rna.tf32.f32
// (CUDA's __float_to_tf32): round to nearest, ties AWAY from zero; NaN/inf
// unchanged. The result is an f32 with the low 13 bits clear.
inline float __float_to_tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) {
        u += 0x1000u;  // half an ulp of TF32 in magnitude (sign-magnitude: away from zero)
        u &= 0xffffe000u;
    }
    float r;
    std::memcpy(&r, &u, 4);
    return r;
}

template <class T>
inline float emu_widen(const T& x) {
    return static_cast<float>(x);
}
template <>
inline float emu_widen<__half>(const __half& x) {
    return __half2float(x);
}
template <>
inline float emu_widen<__nv_bfloat16>(const __nv_bfloat16& x) {
    return __bfloat162float(x);
}

template <class Use, int M, int N, int K>
struct emu_shape;
template <int M, int N, int K>
struct emu_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct emu_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct emu_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = emu_shape<Use, M, N, K>::rows;
    static constexpr int cols = emu_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    float x[rows * cols];  // (r, c) at x[r * cols + c], widened to f32
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
    for (float& e : f.x) e = v;
}

// The CUDA C++ Programming Guide's contract of load_matrix_sync and
// store_matrix_sync, which the hardware does not forgive (a misaligned tile
// faults or reads the wrong elements): the pointer 256-bit (32-byte)
// aligned, ldm a multiple of 16 bytes. The emulator's shared buffer and the
// GPU's dynamic shared memory are both aligned to 128 bytes, so an offset
// that passes here passes there. A violation aborts with the call's numbers.
inline void emu_check_tile(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
    const auto addr = reinterpret_cast<std::uintptr_t>(p);
    if (addr % 32 != 0 || (ldm * elem_bytes) % 16 != 0) {
        std::fprintf(stderr, "wmma::%s: pointer %% 32 = %u, ldm = %u (%zu-byte elements: ldm·size %% 16 = %zu)\n", what,
                     static_cast<unsigned>(addr % 32), ldm, elem_bytes, (ldm * elem_bytes) % 16);
        std::abort();
    }
}

unsigned emu_lane();

#ifdef EMU_BANKS
// mma.sync's fragment coordinates of lane l (g = l / 4, t = l % 4): a TF32
// operand's four registers (A 16×8: (g, t), (g+8, t), (g, t+4), (g+8, t+4);
// B 8×16 as (k, n): (t, g), (t+4, g), (t, g+8), (t+4, g+8)) and an f32
// accumulator's four pairs (16×16: (g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8)).
EMU_BANKS_INLINE inline void emu_banks_fragment(bool b_operand, bool accumulator, int (&rc)[4][2]) {
    const int l = static_cast<int>(emu_lane()), g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
        if (accumulator) {
            rc[i][0] = g + 8 * (i % 2), rc[i][1] = 2 * t + 8 * (i / 2);
        } else if (b_operand) {
            rc[i][0] = t + 4 * (i % 2), rc[i][1] = g + 8 * (i / 2);
        } else {
            rc[i][0] = g + 8 * (i % 2), rc[i][1] = t + 4 * (i / 2);
        }
    }
}
// An f32 accumulator tile's accesses: four 8-byte ones a lane row-major,
// eight 4-byte ones column-major.
EMU_BANKS_INLINE inline void emu_banks_accumulator(const float* p, unsigned ldm, bool row_major, bool write) {
    int rc[4][2];
    emu_banks_fragment(false, true, rc);
    if (row_major) {
        emu_banks_tile_words(p, ldm, true, rc, 4, 8, write);
    } else {
        int both[8][2];
        for (int i = 0; i < 8; ++i) both[i][0] = rc[i / 2][0], both[i][1] = rc[i / 2][1] + i % 2;
        emu_banks_tile_words(p, ldm, false, both, 8, 4, write);
    }
}
#endif

// Element (r, c) of a row_major tile is p[r·ldm + c], of a col_major one p[c·ldm + r].
template <class Use, int M, int N, int K, class T, class L, class S>
EMU_BANKS_INLINE inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const S* p, unsigned ldm) {
    using F = fragment<Use, M, N, K, T, L>;
    emu_check_tile(p, ldm, sizeof(S), "load_matrix_sync");
#ifdef EMU_BANKS
    // 16-bit operands: one ldmatrix .x4 (16 lines of 32 bytes, ldm apart);
    // TF32: four 4-byte loads a lane.
    if constexpr (sizeof(S) == 2) {
        emu_banks_tile_ldsm(p, static_cast<size_t>(ldm) * 2);
    } else {
        int rc[4][2];
        emu_banks_fragment(std::is_same_v<Use, matrix_b>, false, rc);
        emu_banks_tile_words(p, ldm, !std::is_same_v<L, col_major>, rc, 4, 4, false);
    }
    emu_banks_mute(1);
#endif
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = emu_widen<S>(std::is_same_v<L, col_major> ? p[c * ldm + r] : p[r * ldm + c]);
    // A TF32 operand must hold TF32 values (__float_to_tf32): what the
    // tensor core does with the low 13 bits of an f32 is not the emulator's
    // full-precision product. A set low bit means a value the kernel did not
    // round, or a word it never wrote (the poison is all ones).
    // (An OR over the tile first: a loop the compiler vectorizes, run by
    // every lane of every load; the report's search only on a failure.)
    if constexpr (std::is_same_v<T, precision::tf32>) {
        uint32_t low = 0;
        for (float x : f.x) low |= std::bit_cast<uint32_t>(x) & 0x1fffu;
        if (low != 0) {
            for (float x : f.x) {
                const uint32_t u = std::bit_cast<uint32_t>(x);
                if ((u & 0x1fffu) != 0) {
                    std::fprintf(stderr, "wmma::load_matrix_sync: a TF32 operand holds 0x%08x, not a TF32 value\n", u);
                    std::abort();
                }
            }
        }
    }
#ifdef EMU_BANKS
    emu_banks_mute(-1);
#endif
}

void emu_syncwarp();

// An accumulator tile loaded back (CUDA's overload with a layout): every
// lane reads the whole tile, after the warp has arrived.
template <int M, int N, int K, class T>
EMU_BANKS_INLINE inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned ldm, layout_t layout) {
    emu_check_tile(p, ldm, sizeof(float), "load_matrix_sync");
#ifdef EMU_BANKS
    emu_banks_accumulator(p, ldm, layout == mem_row_major, false);
    emu_banks_mute(1);
#endif
    emu_syncwarp();
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
#ifdef EMU_BANKS
    emu_banks_mute(-1);
#endif
}

template <int M, int N, int K, class T>
EMU_BANKS_INLINE inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    emu_check_tile(p, ldm, sizeof(float), "store_matrix_sync");
    // CUDA's contract: the call waits until every lane of the warp has
    // arrived, then stores. Nothing orders the stores before a later read
    // by another lane: a kernel that reads the tile back across lanes must
    // __syncwarp() first (the race build reports it when it does not).
    // Which lane stores which element is the hardware's business (the
    // fragment layout is opaque); the emulator gives element (r, c) to lane
    // 4·(r mod 8) + (c mod 8)/2, the accumulator layout of mma.sync's 16×8
    // tiles, so that the natural lane-strided read-back (lane l reads
    // elements l, l + 32, …) crosses lanes here as it does on the GPU.
    static_assert(M % 8 == 0 && N % 8 == 0, "accumulator tiles of 8×8 blocks");
#ifdef EMU_BANKS
    emu_banks_accumulator(p, ldm, layout == mem_row_major, true);
    emu_banks_mute(1);
#endif
    emu_syncwarp();
    const int lane = static_cast<int>(emu_lane());
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            if (4 * (r % 8) + (c % 8) / 2 == lane) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
#ifdef EMU_BANKS
    emu_banks_mute(-1);
#endif
}

#ifdef EMU_GPU_ARITH
// 2^e for a normal double's exponent range, and the exponent of a normal
// double (the terms here are products of f32 values: |x| ≥ 2^-298).
inline double emu_pow2(int e) { return std::bit_cast<double>(static_cast<uint64_t>(e + 1023) << 52); }
inline int emu_exponent(double x) { return static_cast<int>(std::bit_cast<uint64_t>(x) >> 52 & 0x7ff) - 1023; }

// The fake CUDA driver's tensor core (tests/kernel_emu/gpu_arith.h): the
// accumulation as measured on V100 and A100 (Fasi, Higham, Mikaitis and
// Pranesh, "Numerical behavior of NVIDIA tensor cores", 2021), at its
// pessimistic end. A group of products (4 for TF32, 8 for f16 / bf16) and
// the accumulator: the products exact, every term cut TOWARD ZERO to a
// multiple of the f32 ulp of the largest term (aligned with no guard bits),
// the sum exact, then cut toward zero to f32. Truncation is biased: its
// errors add up instead of cancelling, as they do on the card. Subnormal
// results are flushed to zero, as are subnormal operands (mma_sync): whether
// the tensor cores keep them is not documented, and flushing is the worse
// case.
inline float emu_tensor_core_group(float c, const double* products, int n) {
    double amax = std::fabs(static_cast<double>(c)), plain = c;
    for (int i = 0; i < n; ++i) {
        const double m = std::fabs(products[i]);
        if (m > amax) amax = m;
        plain += products[i];
    }
    if (!std::isfinite(plain) || amax == 0.0) return static_cast<float>(plain);  // inf, NaN, or all zeros
    const int e = emu_exponent(amax);  // amax in [2^e, 2^(e+1))
    const double ulp = emu_pow2(e - 23), inv = emu_pow2(23 - e);
    double s = std::trunc(static_cast<double>(c) * inv) * ulp;
    for (int i = 0; i < n; ++i) s += std::trunc(products[i] * inv) * ulp;  // multiples of ulp: exact
    float f = static_cast<float>(s);
    if (std::fabs(static_cast<double>(f)) > std::fabs(s)) f = std::nextafterf(f, 0.f);
    if (std::fabs(f) < FLT_MIN) f = std::copysign(0.f, f);
    return f;
}

#ifdef __AVX2__
// d = a · b + c over a whole M×N tile, groups of G products: what
// emu_tensor_core_group computes element by element, four elements per AVX2
// vector (build.sh passes -mavx2 where the CPU has it). The same operations
// on the same values: exact products, exact sums of multiples of one ulp,
// truncation toward zero by rounding the scaled values, the cut to f32 as a
// truncation of the scaled sum to 24 bits, the same comparisons as
// selections. So the same floats, bit for bit (NaN signs aside, which no
// compiler keeps: tests/kernel_emu/tensor_core_check.cpp compares the two).
// About 4× faster than the scalar loop, which a miss of the memo below runs
// once per distinct warp-wide product: the fake driver's chunked tests spent
// most of their time there.
template <int M, int N, int K, int G>
inline void emu_tensor_core_tile_avx2(float* d, const float* a, const float* b, const float* c) {
    static_assert(N % 4 == 0);
    constexpr int V = N / 4;  // vectors per row, processed side by side (independent chains)
    const __m256d sign = _mm256_set1_pd(-0.0);
    const __m256i exp_mask = _mm256_set1_epi64x(0x7ff0000000000000ll);
    const __m256i ulp_shift = _mm256_set1_epi64x(23ll << 52);
    const __m256i inv_base = _mm256_set1_epi64x((2046ll + 23) << 52);
    const __m256d flt_min = _mm256_set1_pd(FLT_MIN), flt_max = _mm256_set1_pd(FLT_MAX), dbl_max = _mm256_set1_pd(DBL_MAX);
    const __m256d zero = _mm256_setzero_pd();
    auto absv = [&](__m256d x) { return _mm256_andnot_pd(sign, x); };
    auto trunc = [](__m256d x) { return _mm256_round_pd(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); };
    // 2^(e-23) and 2^(23-e) for x in [2^e, 2^(e+1)), from the exponent field
    auto scales = [&](__m256d x, __m256d* ulp, __m256d* inv) {
        const __m256i eb = _mm256_and_si256(_mm256_castpd_si256(x), exp_mask);
        *ulp = _mm256_castsi256_pd(_mm256_sub_epi64(eb, ulp_shift));
        *inv = _mm256_castsi256_pd(_mm256_sub_epi64(inv_base, eb));
    };
    __m256d bd[K][V];  // b widened once, not once per row
    for (int k = 0; k < K; ++k)
        for (int v = 0; v < V; ++v) bd[k][v] = _mm256_cvtps_pd(_mm_loadu_ps(b + k * N + 4 * v));
    for (int i = 0; i < M; ++i) {
        __m256d s[V];
        for (int v = 0; v < V; ++v) s[v] = _mm256_cvtps_pd(_mm_loadu_ps(c + i * N + 4 * v));
        for (int k0 = 0; k0 < K; k0 += G) {
            __m256d p[G][V], amax[V], plain[V], ulp[V], inv[V], t[V];
            for (int v = 0; v < V; ++v) { amax[v] = absv(s[v]); plain[v] = s[v]; }
            for (int k = 0; k < G; ++k) {
                const __m256d av = _mm256_set1_pd(a[i * K + k0 + k]);
                for (int v = 0; v < V; ++v) {
                    p[k][v] = _mm256_mul_pd(av, bd[k0 + k][v]);
                    amax[v] = _mm256_max_pd(absv(p[k][v]), amax[v]);  // m > amax ? m : amax, NaN included
                    plain[v] = _mm256_add_pd(plain[v], p[k][v]);
                }
            }
            for (int v = 0; v < V; ++v) {
                scales(amax[v], &ulp[v], &inv[v]);
                t[v] = _mm256_mul_pd(trunc(_mm256_mul_pd(s[v], inv[v])), ulp[v]);
            }
            for (int k = 0; k < G; ++k)
                for (int v = 0; v < V; ++v) t[v] = _mm256_add_pd(t[v], _mm256_mul_pd(trunc(_mm256_mul_pd(p[k][v], inv[v])), ulp[v]));
            // t cut toward zero to 24 significant bits (an f32): subnormals
            // flushed (t = 0 lands there too: its scales are finite nonsense,
            // so f is a zero), overflow cut to ±FLT_MAX; then the special
            // case, a non-finite sum or every term zero: the plain sum
            // rounded to f32.
            for (int v = 0; v < V; ++v) {
                __m256d q, qinv;
                scales(t[v], &q, &qinv);
                __m256d f = _mm256_mul_pd(trunc(_mm256_mul_pd(t[v], qinv)), q);
                const __m256d t_sign = _mm256_and_pd(t[v], sign);
                f = _mm256_blendv_pd(f, t_sign, _mm256_cmp_pd(absv(f), flt_min, _CMP_LT_OQ));
                f = _mm256_blendv_pd(f, _mm256_or_pd(flt_max, t_sign), _mm256_cmp_pd(absv(f), flt_max, _CMP_GT_OQ));
                const __m256d special = _mm256_or_pd(_mm256_cmp_pd(absv(plain[v]), dbl_max, _CMP_NLE_UQ), _mm256_cmp_pd(amax[v], zero, _CMP_EQ_OQ));
                s[v] = _mm256_blendv_pd(f, _mm256_cvtps_pd(_mm256_cvtpd_ps(plain[v])), special);
            }
        }
        for (int v = 0; v < V; ++v) _mm_storeu_ps(d + i * N + 4 * v, _mm256_cvtpd_ps(s[v]));
    }
}
#endif

// One output element of the model: c + Σ_k a_at(k) · b_at(k) over K terms
// in groups of G (emu_tensor_core_group), subnormal operands flushed. The
// element loop of the WMMA tiles and of the mma.sync emulation below.
template <int K, int G, class A, class B>
inline float emu_tensor_core_dot(float c, A a_at, B b_at) {
    static_assert(K % G == 0, "whole groups");
    for (int k0 = 0; k0 < K; k0 += G) {
        double products[G];  // 11 × 11 (or 8 × 8) significant bits: exact in double
        for (int k = 0; k < G; ++k) {
            const float x = a_at(k0 + k), y = b_at(k0 + k);
            products[k] = static_cast<double>(std::fabs(x) < FLT_MIN ? 0.f : x) *
                          static_cast<double>(std::fabs(y) < FLT_MIN ? 0.f : y);
        }
        c = emu_tensor_core_group(c, products, G);
    }
    return c;
}

// The tile one element at a time: the reference for the AVX2 path, and the
// path without AVX2 (its operands arrive flushed; flushing again is a no-op).
template <int M, int N, int K, int G>
inline void emu_tensor_core_tile_scalar(float* d, const float* a, const float* b, const float* c) {
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j)
            d[i * N + j] = emu_tensor_core_dot<K, G>(
                c[i * N + j], [&](int k) { return a[i * K + k]; }, [&](int k) { return b[k * N + j]; });
}

template <int M, int N, int K, int G>
inline void emu_tensor_core_tile(float* d, const float* a, const float* b, const float* c) {
#ifdef __AVX2__
    emu_tensor_core_tile_avx2<M, N, K, G>(d, a, b, c);
#else
    emu_tensor_core_tile_scalar<M, N, K, G>(d, a, b, c);
#endif
}

// The products of the last distinct operands one OS thread multiplied (the
// fake driver runs a block's threads as fibers of one OS thread), in slots
// picked by a hash of a sample of the operands and matched in full.
template <int NA, int NB, int NC>
struct EmuMmaMemo {
    struct Entry {
        bool used = false;
        float a[NA], b[NB], c[NC], d[NC];
    };
    static constexpr size_t kSlots = 1024;
    std::vector<Entry> slots = std::vector<Entry>(kSlots);
    Entry& slot(const float* a, const float* b, const float* c) {
        // A sum of the sampled words times odd constants: independent
        // multiplies instead of one serial chain (a hit costs this and the
        // memcmp of `holds`, 31 times per warp-wide product).
        uint64_t h = 0;
        uint64_t w = 0x9e3779b97f4a7c15ull;
        auto mix = [&h, &w](const float* x, int n) {
            for (int i = 0; i < n; i += 7, w += 0x6a09e667f3bcc90aull) h += (std::bit_cast<uint32_t>(x[i]) + 1ull) * (w | 1);
        };
        mix(a, NA);
        mix(b, NB);
        mix(c, NC);
        h ^= h >> 31;
        h *= 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
        return slots[static_cast<size_t>(h) % kSlots];
    }
    // Whether `e` holds the product of exactly these operands (memcmp, not
    // ==: a NaN operand, the poison, must match itself).
    static bool holds(const Entry& e, const float* a, const float* b, const float* c) {
        return e.used && std::memcmp(e.a, a, sizeof e.a) == 0 && std::memcmp(e.b, b, sizeof e.b) == 0 &&
               std::memcmp(e.c, c, sizeof e.c) == 0;
    }
};
#endif

// d = a · b + c (d may alias c): one fmaf per k in k order, or under
// EMU_GPU_ARITH the tensor core's truncating groups.
template <int M, int N, int K, class TA, class LA, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
#ifdef EMU_GPU_ARITH
    constexpr int kGroup = std::is_same_v<TA, precision::tf32> ? 4 : 8;
    static_assert(K % kGroup == 0, "whole groups");
    // Every lane of the warp holds the whole tile and calls with the same
    // operands, one lane after the other: the 31 repeats come from a memo.
    thread_local EmuMmaMemo<M * K, K * N, M * N> memo;
    auto& e = memo.slot(a.x, b.x, c.x);
    if (!memo.holds(e, a.x, b.x, c.x)) {
        e.used = true;
        std::memcpy(e.a, a.x, sizeof e.a);
        std::memcpy(e.b, b.x, sizeof e.b);
        std::memcpy(e.c, c.x, sizeof e.c);
        float af[M * K], bf[K * N];  // the operands, subnormals flushed
        for (int i = 0; i < M * K; ++i) af[i] = std::fabs(a.x[i]) < FLT_MIN ? 0.f : a.x[i];
        for (int i = 0; i < K * N; ++i) bf[i] = std::fabs(b.x[i]) < FLT_MIN ? 0.f : b.x[i];
        emu_tensor_core_tile<M, N, K, kGroup>(e.d, af, bf, c.x);
    }
    std::memcpy(d.x, e.d, sizeof d.x);
#else
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s = fmaf(a.x[i * K + k], b.x[k * N + j], s);
            d.x[i * N + j] = s;
        }
#endif
}

}  // namespace wmma
}  // namespace nvcuda

// ---- mma.sync and ldmatrix on register fragments (cuda/mma.cuh) -------------
//
// Unlike WMMA's, these fragments are the PTX ISA's documented layouts, and
// each lane holds only its own registers, as on the card. An instruction is
// warp-wide: each lane deposits its registers (or its row address) in its
// warp's exchange slots, a warp barrier, then each lane computes its own
// outputs from every lane's deposits, a warp barrier (no lane overwrites its
// slots before all have read). Written from the ISA's tables, independently
// of cuda/mma.cuh's layout functions; gateloop::cuda::selftest compares both
// with a card. Arithmetic as the WMMA emulation's: fmaf in k order, or under
// EMU_GPU_ARITH the truncating groups (8 products for 16-bit operands, 4 for
// TF32) with subnormal operands flushed.
namespace emu_mma {
inline uint32_t g_regs[32][32][6];        // [warp][lane]: a0..a3, b0, b1
inline const void* g_rows[32][32];         // [warp][lane]: ldmatrix row addresses
inline unsigned warp_of() { return emu_thread_rank() / 32; }

// A 16-bit operand (kind 0: bf16, 1: f16) as f32.
inline float widen16(int kind, uint32_t bits16) {
    if (kind == 0) return std::bit_cast<float>(bits16 << 16);
    return static_cast<float>(std::bit_cast<_Float16>(static_cast<uint16_t>(bits16)));
}
// A TF32 operand register: an f32 whose low 13 bits are clear (the kernels
// round with tf32_bits); anything else is a value the kernel did not round.
inline float tf32_value(uint32_t u) {
    if ((u & 0x1fffu) != 0) {
        std::fprintf(stderr, "mma.sync .tf32: an operand register holds 0x%08x, not a TF32 value\n", u);
        std::abort();
    }
    return std::bit_cast<float>(u);
}

// d[e] += Σ_k A(row_e, k) · B(k, col_e) for this lane's four accumulator
// elements (row g + 8·(e/2), column 2t + e%2), K terms in groups of G.
template <int K, int G, class A, class B>
inline void accumulate(float* d, unsigned lane, A a_at, B b_at) {
    const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float s = d[e];
#ifdef EMU_GPU_ARITH
        s = nvcuda::wmma::emu_tensor_core_dot<K, G>(
            s, [&](int k) { return a_at(row, k); }, [&](int k) { return b_at(k, col); });
#else
        (void)G;
        for (int k = 0; k < K; ++k) s = fmaf(a_at(row, k), b_at(k, col), s);
#endif
        d[e] = s;
    }
}
}  // namespace emu_mma

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A·B.
inline void emu_mma_m16n8k16(int kind, float* d, const uint32_t* a, const uint32_t* b) {
    using namespace emu_mma;
    const unsigned warp = warp_of(), lane = emu_thread_rank() % 32;
    for (int i = 0; i < 4; ++i) g_regs[warp][lane][i] = a[i];
    for (int i = 0; i < 2; ++i) g_regs[warp][lane][4 + i] = b[i];
    nvcuda::wmma::emu_syncwarp();
    // A(r, c), 16×16: lane 4·(r mod 8) + (c mod 8)/2, register r/8 + 2·(c/8), half c mod 2.
    auto a_at = [&](int r, int c) {
        const uint32_t w = g_regs[warp][4 * (r % 8) + (c % 8) / 2][r / 8 + 2 * (c / 8)];
        return widen16(kind, (c % 2) ? w >> 16 : w & 0xffffu);
    };
    // B(k, n), 16×8: lane 4·n + (k mod 8)/2, register k/8, half k mod 2.
    auto b_at = [&](int k, int n) {
        const uint32_t w = g_regs[warp][4 * n + (k % 8) / 2][4 + k / 8];
        return widen16(kind, (k % 2) ? w >> 16 : w & 0xffffu);
    };
    float out[4] = {d[0], d[1], d[2], d[3]};
    accumulate<16, 8>(out, lane, a_at, b_at);
    nvcuda::wmma::emu_syncwarp();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d += A·B.
inline void emu_mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) {
    using namespace emu_mma;
    const unsigned warp = warp_of(), lane = emu_thread_rank() % 32;
    for (int i = 0; i < 4; ++i) g_regs[warp][lane][i] = a[i];
    for (int i = 0; i < 2; ++i) g_regs[warp][lane][4 + i] = b[i];
    nvcuda::wmma::emu_syncwarp();
    // A(r, c), 16×8: lane 4·(r mod 8) + c mod 4, register r/8 + 2·(c/4).
    auto a_at = [&](int r, int c) { return tf32_value(g_regs[warp][4 * (r % 8) + c % 4][r / 8 + 2 * (c / 4)]); };
    // B(k, n), 8×8: lane 4·n + k mod 4, register k/4.
    auto b_at = [&](int k, int n) { return tf32_value(g_regs[warp][4 * n + k % 4][4 + k / 4]); };
    float out[4] = {d[0], d[1], d[2], d[3]};
    accumulate<8, 4>(out, lane, a_at, b_at);
    nvcuda::wmma::emu_syncwarp();
    for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x{2,4}[.trans].shared.b16: lane 8j + r gives
// row r of matrix j (16 bytes, 16-byte aligned); register j of lane l gets
// row l/4, columns 2(l%4), 2(l%4)+1 of matrix j, or with .trans column l/4,
// rows 2(l%4), 2(l%4)+1.
EMU_BANKS_INLINE inline void emu_ldmatrix(int count, bool trans, uint32_t* r, const void* row) {
    using namespace emu_mma;
    const unsigned warp = warp_of(), lane = emu_thread_rank() % 32;
    if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0 && lane < static_cast<unsigned>(8 * count)) {
        std::fprintf(stderr, "ldmatrix: lane %u's row address is not 16-byte aligned\n", lane);
        std::abort();
    }
    g_rows[warp][lane] = row;
#ifdef EMU_BANKS
    emu_banks_ldmatrix_row(row, count);
    emu_banks_mute(1);
#endif
    nvcuda::wmma::emu_syncwarp();
    auto element = [&](int matrix, int r8, int c8) {
        uint16_t x;
        std::memcpy(&x, static_cast<const char*>(g_rows[warp][8 * matrix + r8]) + 2 * c8, 2);
        return static_cast<uint32_t>(x);
    };
    const int l = static_cast<int>(lane);
    for (int j = 0; j < count; ++j) {
        if (!trans) {
            r[j] = element(j, l / 4, 2 * (l % 4)) | element(j, l / 4, 2 * (l % 4) + 1) << 16;
        } else {
            r[j] = element(j, 2 * (l % 4), l / 4) | element(j, 2 * (l % 4) + 1, l / 4) << 16;
        }
    }
    nvcuda::wmma::emu_syncwarp();
#ifdef EMU_BANKS
    emu_banks_mute(-1);
#endif
}
