// Warp-wide tensor-core products on register fragments (PTX mma.sync) and
// fragment loads from shared memory (ldmatrix): the primitives of kernels
// that keep their operands in registers instead of staging every WMMA tile
// through shared memory (the chunked output kernel spends its time there:
// docs/speed-log.md). Unlike WMMA, whose fragment layout is opaque, these
// layouts are the PTX ISA's ("Matrix fragments for mma.m16n8k16 /
// mma.m16n8k8"), so a kernel can build fragments from values it already
// holds, and the layout functions below are the one place that spells them.
// cuda/selftest.cu checks them against the card (gateloop::cuda::selftest);
// the kernel emulator implements the same instructions from the ISA's
// tables (tests/kernel_emu/include/mma.h) and runs that check too.
//
// Lane l of a warp: group g = l / 4 (0..7), thread-in-group t = l % 4.
//
// m16n8k16, 16-bit operands (bf16 or f16), f32 accumulate, D = A·B + C:
//   A 16×16 (row-major): 4 registers of 2 elements (low half first):
//     a0 = (g, 2t | 2t+1)   a1 = (g+8, 2t | 2t+1)
//     a2 = (g, 2t+8 | 2t+9) a3 = (g+8, 2t+8 | 2t+9)
//   B 16×8 (k × n): 2 registers: b0 = (k = 2t | 2t+1, n = g), b1 = (k = 2t+8 | 2t+9, n = g)
//   C, D 16×8 f32: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// m16n8k8, TF32 operands (f32 registers holding TF32 values, to_tf32):
//   A 16×8: a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)
//   B 8×8:  b0 = (k = t, n = g), b1 = (k = t+4, n = g)
//   C, D as above.
// ldmatrix .x4 (.x2): lane 8j + r gives the address of row r of 8×8 matrix j
// (rows of 8 16-bit elements, 16 bytes, 16-byte aligned, in shared memory);
// register j of lane l receives row l/4, columns 2(l%4) | 2(l%4)+1 of matrix
// j, or with .trans, column l/4, rows 2(l%4) | 2(l%4)+1. So .x4 over the
// four 8×8 quarters of a row-major 16×16 tile (top-left, bottom-left,
// top-right, bottom-right) yields A's a0..a3, and .x2.trans over the two
// 8×8 halves of a row-major 16×8 (k × n) tile yields B's b0, b1.

#ifndef GATELOOP_MMA_CUH
#define GATELOOP_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "common.cuh"

namespace gateloop {
namespace mma {

// ---- fragment layouts (the ISA's tables above) ------------------------------

__device__ __forceinline__ int group(int lane) { return lane >> 2; }
__device__ __forceinline__ int thread_in_group(int lane) { return lane & 3; }

// Element e (0..7: register e/2, half e%2) of a 16×16 A fragment.
__device__ __forceinline__ int a16_row(int lane, int e) { return group(lane) + 8 * ((e >> 1) & 1); }
__device__ __forceinline__ int a16_col(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1) + 8 * (e >> 2); }
// Element e (0..3: register e/2, half e%2) of a 16×8 B fragment.
__device__ __forceinline__ int b16_k(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1) + 8 * (e >> 1); }
__device__ __forceinline__ int b16_n(int lane) { return group(lane); }
// Register r (0..3) of a 16×8 TF32 A fragment; register r (0..1) of an 8×8 B one.
__device__ __forceinline__ int a8_row(int lane, int r) { return group(lane) + 8 * (r & 1); }
__device__ __forceinline__ int a8_col(int lane, int r) { return thread_in_group(lane) + 4 * (r >> 1); }
__device__ __forceinline__ int b8_k(int lane, int r) { return thread_in_group(lane) + 4 * r; }
__device__ __forceinline__ int b8_n(int lane) { return group(lane); }
// Element e (0..3) of a 16×8 f32 accumulator.
__device__ __forceinline__ int acc_row(int lane, int e) { return group(lane) + 8 * (e >> 1); }
__device__ __forceinline__ int acc_col(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1); }

// ---- operand packing --------------------------------------------------------

// Two 16-bit values in one register, `lo` in the low half (the lower column
// or k index: the first in memory), each rounded to nearest even
// (InputTraits::store).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    static_assert(sizeof(T) == 2, "16-bit operands");
    T pair[2];
    InputTraits<T>::store(pair, 0, lo);
    InputTraits<T>::store(pair, 1, hi);
    uint32_t u;
    memcpy(&u, pair, 4);
    return u;
}

// An f32 as a TF32 operand register: rounded to TF32 (nearest, ties away,
// the hardware's cvt.rna), low 13 bits clear.
__device__ __forceinline__ uint32_t tf32_bits(float x) {
    const float r = nvcuda::wmma::__float_to_tf32(x);
    uint32_t u;
    memcpy(&u, &r, 4);
    return u;
}

// ---- the instructions ------------------------------------------------------

// Which 16-bit type an m16n8k16 product reads.
template <typename T>
struct Mma16;
template <>
struct Mma16<__nv_bfloat16> {
    static constexpr int kKind = 0;
};
template <>
struct Mma16<__half> {
    static constexpr int kKind = 1;
};

}  // namespace mma
}  // namespace gateloop

// (Under the kernel emulator, <mma.h> is the emulator's, which defines
// emu_mma_m16n8k16, emu_mma_m16n8k8_tf32 and emu_ldmatrix.)

namespace gateloop {
namespace mma {

// d += A·B on one warp (every lane calls it, converged), 16-bit operands.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
    if constexpr (Mma16<T>::kKind == 0) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_mma_m16n8k16(Mma16<T>::kKind, d, a, b);
#endif
}

// d += A·B on one warp, TF32 operands (tf32_bits).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_mma_m16n8k8_tf32(d, a, b);
#endif
}

// ldmatrix .x4 / .x2, optionally .trans: `row` is this lane's row address in
// shared memory (lanes 0..8·N−1 matter; the others' are ignored but must be
// valid shared addresses: pass any row of the tile).
template <int N, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
    static_assert(N == 2 || N == 4, "ldmatrix .x2 or .x4");
#if defined(__CUDA_ARCH__)
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (N == 4 && !kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    } else if constexpr (N == 4) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    } else if constexpr (!kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    }
#elif defined(GATELOOP_KERNEL_EMULATOR)
    emu_ldmatrix(N, kTrans, r, row);
#endif
}

}  // namespace mma
}  // namespace gateloop

#endif  // GATELOOP_MMA_CUH
