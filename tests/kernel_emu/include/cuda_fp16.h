// __half for the CPU kernel emulator (tests/kernel_emu): IEEE binary16 via
// GCC's _Float16 (conversions round to nearest even, as __float2half_rn).
#pragma once
#include <cstring>
struct __half {
    _Float16 x;
};
inline float __half2float(__half h) { return static_cast<float>(h.x); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline __half __ushort_as_half(unsigned short bits) {
    __half h;
    std::memcpy(&h.x, &bits, 2);
    return h;
}
