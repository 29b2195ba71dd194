// A CPU emulation of the CUDA features the scan kernels use, force-included
// before cuda/*.cu by tests/kernel_emu/build.sh: every thread of a block is
// an OS thread, __syncthreads is a std::barrier, warp shuffles exchange
// through a per-block array between two barriers (the kernels shuffle in
// block-uniform control flow only), __shared__ variables are statics (one
// block runs at a time). Arithmetic is the host's: fmaf is exact as on the
// GPU; exp2f/sincosf come from glibc, as in the Rust mirror.
#pragma once
#include <cmath>
#include <cstdint>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

struct EmuDim3 {
    unsigned x, y, z;
};
extern thread_local EmuDim3 threadIdx;
extern thread_local EmuDim3 blockIdx;
extern EmuDim3 blockDim;

void __syncthreads();
float emu_shuffle(float v, int src_lane_delta, bool up);
inline float __shfl_up_sync(unsigned, float v, int offset) { return emu_shuffle(v, offset, true); }
inline float __shfl_down_sync(unsigned, float v, int offset) { return emu_shuffle(v, offset, false); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
