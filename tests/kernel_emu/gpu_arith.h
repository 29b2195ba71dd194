// The GPU's arithmetic at its documented worst, for the fake CUDA driver
// (build.sh libcuda; emu.h includes this under EMU_GPU_ARITH). The other
// emulator builds compute as the Rust mirrors do (glibc, no contraction) so
// that the two can be compared bit for bit; the fake driver stands in for a
// GPU instead, and its tests compare with the f64 reference under bounds
// that must hold on the real card. So here every library function errs by
// as much as the CUDA C++ Programming Guide's accuracy tables allow, the
// SFU's __sincosf by its absolute bound, nvcc's default fmad contraction is
// g++'s -ffp-contract=fast (build.sh), and the tensor cores accumulate with
// truncation and flush subnormals (include/mma.h). A bound that survives this survives a GPU
// whose errors are at most these; one that fails here would likely have
// failed the first GPU run.
//
// Every perturbation is a pure function of the argument (a hash picks its
// direction), so a kernel stays deterministic run to run, as on a GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace emu_gpu {

inline uint32_t hash(float x, uint32_t salt) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u ^= salt;
    u *= 0x9e3779b1u;
    u ^= u >> 15;
    u *= 0x85ebca6bu;
    u ^= u >> 13;
    return u;
}

// y (glibc's value of f(x), within about half an ulp) moved one f32 ulp up
// or down: ≈ 1.5 ulp in all, against CUDA's 2 for expf, exp2f, sincosf
// and cosf. Exact cases stay exact (x = 0, zero, inf, NaN results: exp(−inf)
// = 0 is how a reset works), and the move never leaves [lo, hi], the range
// every implementation keeps (e^x ≤ 1 for x ≤ 0, |sin| ≤ 1).
inline float ulp_off(float y, float x, uint32_t salt, float lo, float hi) {
    if (x == 0.f || y == 0.f || !std::isfinite(y)) return y;
    const float moved = std::nextafterf(y, (hash(x, salt) & 1) ? INFINITY : -INFINITY);
    return std::fmin(std::fmax(moved, lo), hi);
}

inline float expf_(float x) { return ulp_off(::expf(x), x, 0x1u, 0.f, x <= 0.f ? 1.f : INFINITY); }
inline float exp2f_(float x) { return ulp_off(::exp2f(x), x, 0x2u, 0.f, x <= 0.f ? 1.f : INFINITY); }
inline float cosf_(float x) { return ulp_off(::cosf(x), x, 0x3u, -1.f, 1.f); }
inline void sincosf_(float x, float* s, float* c) {
    ::sincosf(x, s, c);
    *s = ulp_off(*s, x, 0x4u, -1.f, 1.f);
    *c = ulp_off(*c, x, 0x5u, -1.f, 1.f);
}

// The SFU's sine and cosine (MUFU): absolute error ≤ 2^-21.41 for x in
// [−π, π], unbounded past it (the Guide). Outside [−π, π] (with room for
// the reduction's last rounding) is a kernel bug the GPU would not report:
// here it aborts. Inside, each value is off by between half and all of
// the bound, in a hashed direction.
inline void sfu_sincosf(float x, float* s, float* c) {
    if (!(std::fabs(x) <= 3.1416f)) {
        std::fprintf(stderr, "__sincosf(%.9g): argument outside [-pi, pi], where the SFU's error is unbounded\n",
                     static_cast<double>(x));
        std::abort();
    }
    constexpr float kBound = 3.5894e-7f;  // 2^-21.41
    ::sincosf(x, s, c);
    const uint32_t h = hash(x, 0x6u);
    const float es = kBound * (0.5f + 0.5f * static_cast<float>(h >> 8 & 0xff) / 255.f);
    const float ec = kBound * (0.5f + 0.5f * static_cast<float>(h >> 16 & 0xff) / 255.f);
    *s = std::fmin(std::fmax(*s + ((h & 1) ? es : -es), -1.f), 1.f);
    *c = std::fmin(std::fmax(*c + ((h & 2) ? ec : -ec), -1.f), 1.f);
}

}  // namespace emu_gpu

// Function-like, so that `using std::expf;` in a later <math.h> is untouched.
#define expf(x) emu_gpu::expf_(x)
#define exp2f(x) emu_gpu::exp2f_(x)
#define cosf(x) emu_gpu::cosf_(x)
#define sincosf(x, s, c) emu_gpu::sincosf_(x, s, c)
inline void __sincosf(float x, float* s, float* c) { emu_gpu::sfu_sincosf(x, s, c); }
// The other inexact functions are not modelled: a kernel that calls one
// fails to build here (an undeclared name that says so) until it is.
#define sinf(x) EMU_GPU_ARITH_does_not_model_sinf(x)
#define tanf(x) EMU_GPU_ARITH_does_not_model_tanf(x)
#define logf(x) EMU_GPU_ARITH_does_not_model_logf(x)
#define log2f(x) EMU_GPU_ARITH_does_not_model_log2f(x)
#define log1pf(x) EMU_GPU_ARITH_does_not_model_log1pf(x)
#define expm1f(x) EMU_GPU_ARITH_does_not_model_expm1f(x)
#define powf(x, y) EMU_GPU_ARITH_does_not_model_powf(x, y)
#define atan2f(x, y) EMU_GPU_ARITH_does_not_model_atan2f(x, y)
#define tanhf(x) EMU_GPU_ARITH_does_not_model_tanhf(x)
#define rsqrtf(x) EMU_GPU_ARITH_does_not_model_rsqrtf(x)
#define __expf(x) EMU_GPU_ARITH_does_not_model___expf(x)
#define __logf(x) EMU_GPU_ARITH_does_not_model___logf(x)
#define __sinf(x) EMU_GPU_ARITH_does_not_model___sinf(x)
#define __cosf(x) EMU_GPU_ARITH_does_not_model___cosf(x)
#define __fdividef(x, y) EMU_GPU_ARITH_does_not_model___fdividef(x, y)
