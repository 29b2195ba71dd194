// Self-tests of the hardware contracts the kernels build on
// (gateloop::cuda::selftest). gateloop_selftest_mma: the register-fragment
// layouts of cuda/mma.cuh, D = A·B + C five ways per trial (see the ABI
// header): fragments built element by element from the layout functions,
// and loaded by ldmatrix from shared tiles in both orientations. The host
// compares each D with the exact product (the inputs are small integers,
// so every accumulation order and rounding gives it exactly): a layout
// function, a register order or an ldmatrix addressing that differs from
// the card's shows as wrong elements.

#include "common.cuh"
#include "mma.cuh"

namespace gateloop {
namespace selftest {

constexpr int kProducts = GATELOOP_SELFTEST_MMA_PRODUCTS;

// The accumulator fragment of C (16×8 row-major).
__device__ __forceinline__ void load_acc(float (&acc)[4], const float* c, int lane) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = c[mma::acc_row(lane, e) * 8 + mma::acc_col(lane, e)];
}

__device__ __forceinline__ void store_acc(float* d, const float (&acc)[4], int lane) {
#pragma unroll
    for (int e = 0; e < 4; ++e) d[mma::acc_row(lane, e) * 8 + mma::acc_col(lane, e)] = acc[e];
}

// D = A·B + C, 16-bit operands, fragments from the layout functions.
template <typename T>
__device__ void product16_direct(float* d, const float* a, const float* b, const float* c, int lane) {
    uint32_t fa[4], fb[2];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int e = 2 * r;
        fa[r] = mma::pack2<T>(a[mma::a16_row(lane, e) * 16 + mma::a16_col(lane, e)],
                              a[mma::a16_row(lane, e + 1) * 16 + mma::a16_col(lane, e + 1)]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int e = 2 * r;
        fb[r] = mma::pack2<T>(b[mma::b16_k(lane, e) * 8 + mma::b16_n(lane)],
                              b[mma::b16_k(lane, e + 1) * 8 + mma::b16_n(lane)]);
    }
    float acc[4];
    load_acc(acc, c, lane);
    mma::mma_16816<T>(acc, fa, fb);
    store_acc(d, acc, lane);
}

// D = A[:, 0:8]·B[0:8, :] + C in TF32.
__device__ void product_tf32_direct(float* d, const float* a, const float* b, const float* c, int lane) {
    uint32_t fa[4], fb[2];
#pragma unroll
    for (int r = 0; r < 4; ++r) fa[r] = mma::tf32_bits(a[mma::a8_row(lane, r) * 16 + mma::a8_col(lane, r)]);
#pragma unroll
    for (int r = 0; r < 2; ++r) fb[r] = mma::tf32_bits(b[mma::b8_k(lane, r) * 8 + mma::b8_n(lane)]);
    float acc[4];
    load_acc(acc, c, lane);
    mma::mma_1688_tf32(acc, fa, fb);
    store_acc(d, acc, lane);
}

// D = A·B + C, 16-bit operands through shared memory and ldmatrix. With
// kTransposed the tiles are staged A column-major and B n-major and read
// with the other ldmatrix variants (.x4.trans, .x2), which must give the
// same fragments.
template <typename T, bool kTransposed>
__device__ void product16_ldmatrix(float* d, const float* a, const float* b, const float* c, int lane, T* sa, T* sb) {
    // Staging: 8 elements of A and 4 of B per lane, rows of 16 bytes.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int idx = lane * 8 + i, row = idx / 16, col = idx % 16;
        InputTraits<T>::store(sa, kTransposed ? col * 16 + row : idx, a[idx]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = lane * 4 + i, k = idx / 8, n = idx % 8;
        InputTraits<T>::store(sb, kTransposed ? n * 16 + k : idx, b[idx]);
    }
    __syncwarp();
    uint32_t fa[4], fb[2];
    const int m = lane / 8, r = lane % 8;
    if constexpr (!kTransposed) {
        // A's quarters in register order: (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
        mma::ldmatrix<4, false>(fa, sa + (8 * (m % 2) + r) * 16 + 8 * (m / 2));
        // B's halves k 0-7 and 8-15 (lanes 16-31 repeat 0-15's rows).
        mma::ldmatrix<2, true>(fb, sb + (8 * (m % 2) + r) * 8);
    } else {
        // Column-major A: row c of the staged tile is column c of A; quarter
        // j of A is the staged quarter with rows and columns swapped.
        mma::ldmatrix<4, true>(fa, sa + (8 * (m / 2) + r) * 16 + 8 * (m % 2));
        // n-major B: staged row n holds B(0..15, n); half j is columns 8j..8j+7.
        mma::ldmatrix<2, false>(fb, sb + r * 16 + 8 * (m % 2));
    }
    float acc[4];
    load_acc(acc, c, lane);
    mma::mma_16816<T>(acc, fa, fb);
    store_acc(d, acc, lane);
    __syncwarp();  // the tiles are reused by the next product
}

}  // namespace selftest
}  // namespace gateloop

extern "C" __global__ void __launch_bounds__(GATELOOP_SELFTEST_MMA_THREADS)
    gateloop_selftest_mma(const GateloopSelftestMmaParams p) {
    using namespace gateloop::selftest;
    const int lane = static_cast<int>(threadIdx.x);
    const int64_t trial = blockIdx.x;
    const float* a = p.a + trial * 256;
    const float* b = p.b + trial * 128;
    const float* c = p.c + trial * 128;
    float* d = p.d + trial * kProducts * 128;
    __shared__ __align__(16) __nv_bfloat16 sa_bf16[256];
    __shared__ __align__(16) __nv_bfloat16 sb_bf16[128];
    __shared__ __align__(16) __half sa_f16[256];
    __shared__ __align__(16) __half sb_f16[128];
    product16_direct<__nv_bfloat16>(d + 0 * 128, a, b, c, lane);
    product16_direct<__half>(d + 1 * 128, a, b, c, lane);
    product_tf32_direct(d + 2 * 128, a, b, c, lane);
    product16_ldmatrix<__nv_bfloat16, false>(d + 3 * 128, a, b, c, lane, sa_bf16, sb_bf16);
    product16_ldmatrix<__half, true>(d + 4 * 128, a, b, c, lane, sa_f16, sb_f16);
}
