// The fake driver's tensor-core model (include/mma.h, EMU_GPU_ARITH): its
// AVX2 path against its scalar path, on random tiles of both shapes the
// kernels use (TF32 16×16×8 in groups of 4, f16/bf16 16×16×16 in groups of
// 8) with every kind of value the kernels can feed it: zeros of both signs,
// exponents far apart (terms that truncate away), sums below FLT_MIN and
// past FLT_MAX, groups of zeros only, infinities and NaN (the poison).
// Equal means bit for bit, except that any NaN equals any NaN (no compiler
// keeps NaN signs through reordered additions). Exit 0 when equal (or when
// the build has no AVX2 path to compare, said so), 1 with the first
// difference otherwise.
//
//     build.sh tensor-core OUT && OUT [tiles]
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "emu.h"  // what the kernels see first (build.sh force-includes it there)
#include "mma.h"

namespace {
std::mt19937_64 rng(20261201);

float draw(int mode) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    const int r = static_cast<int>(rng() % 100);
    if (mode == 3) return std::ldexp(u(rng), -60 - static_cast<int>(rng() % 16));  // products below FLT_MIN
    if (mode == 4) return std::ldexp(u(rng), 60 + static_cast<int>(rng() % 8));    // products past FLT_MAX
    if (mode == 5) return r < 50 ? ((rng() & 1) ? 0.f : -0.f) : u(rng);          // all-zero groups
    if (mode == 1) {
        if (r < 3) return 0.f;
        if (r < 5) return -0.f;
        if (r < 7) return std::ldexp(u(rng), -127);  // subnormal: flushed by the model
        if (r < 8) return (rng() & 1) ? INFINITY : -INFINITY;
        if (r < 9) return NAN;
        if (r < 20) return std::ldexp(u(rng), static_cast<int>(rng() % 200) - 100);
        if (r < 25) return std::ldexp(u(rng), static_cast<int>(rng() % 250) - 125);
    }
    return u(rng) * std::ldexp(1.f, static_cast<int>(rng() % 20) - 10);
}

bool same(float x, float y) {
    return (std::isnan(x) && std::isnan(y)) || std::bit_cast<uint32_t>(x) == std::bit_cast<uint32_t>(y);
}

#ifdef __AVX2__
template <int M, int N, int K, int G>
bool compare(int tiles) {
    float a[M * K], b[K * N], c[M * N], d_vec[M * N], d_scalar[M * N];
    for (int t = 0; t < tiles; ++t) {
        // Plain values, special values, zero accumulators, sums below
        // FLT_MIN (flushed), above FLT_MAX (cut to it), all-zero groups.
        const int mode = t % 6;
        // Operands as mma_sync hands them over: subnormals already flushed.
        for (float& x : a) x = std::fabs(x = draw(mode)) < FLT_MIN ? 0.f : x;
        for (float& x : b) x = std::fabs(x = draw(mode)) < FLT_MIN ? 0.f : x;
        for (float& x : c) x = mode == 2 ? 0.f : mode == 3 ? (rng() & 1) * std::ldexp(1.f, -130) : draw(mode);
        nvcuda::wmma::emu_tensor_core_tile_avx2<M, N, K, G>(d_vec, a, b, c);
        nvcuda::wmma::emu_tensor_core_tile_scalar<M, N, K, G>(d_scalar, a, b, c);
        for (int i = 0; i < M * N; ++i) {
            if (!same(d_vec[i], d_scalar[i])) {
                std::printf("tensor-core model %dx%dx%d: tile %d element %d: AVX2 %a, scalar %a\n", M, N, K, t, i,
                            static_cast<double>(d_vec[i]), static_cast<double>(d_scalar[i]));
                return false;
            }
        }
    }
    return true;
}
#endif
}  // namespace

int main(int argc, char** argv) {
#ifdef __AVX2__
    const int tiles = argc > 1 ? std::atoi(argv[1]) : 10000;
    if (!compare<16, 16, 8, 4>(tiles) || !compare<16, 16, 16, 8>(tiles)) return 1;
    std::printf("tensor-core model: AVX2 path equals the scalar path on %d tiles of each shape\n", tiles);
#else
    (void)argc;
    (void)argv;
    std::printf("tensor-core model: this build has no AVX2 path (the scalar path is the only one)\n");
#endif
    return 0;
}
