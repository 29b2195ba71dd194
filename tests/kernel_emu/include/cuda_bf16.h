// Stub for the CPU kernel emulator (tests/kernel_emu): f32 kernels only.
#pragma once
struct __nv_bfloat16 { unsigned short bits; };
inline float __bfloat162float(__nv_bfloat16) { return 0.f; }
inline __nv_bfloat16 __float2bfloat16_rn(float) { return __nv_bfloat16{0}; }
