// A CPU emulation of the CUDA features the scan kernels use, force-included
// before cuda/*.cu by tests/kernel_emu/build.sh: every thread of a block is
// an OS thread, __syncthreads is a std::barrier, warp shuffles exchange
// through per-block arrays, one block barrier each (two arrays taken in
// turn: runtime.cpp; the kernels shuffle in block-uniform control flow
// only), __shared__ variables are statics (one
// block runs at a time). Arithmetic is the host's: fmaf is exact as on the
// GPU; exp2f/sincosf come from glibc, as in the Rust mirror.
#pragma once
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

// Kernel code that has an emulator path (cuda/mma.cuh's instructions)
// takes it under this macro.
#define GATELOOP_KERNEL_EMULATOR 1
#define __device__
#define __global__
#define __host__
#ifdef EMU_BANKS
// The bank model's build (bank_model.cpp): inlined as nvcc inlines them, so
// that each access site is its own instruction (addr2line -i names it).
#define __forceinline__ inline __attribute__((always_inline))
#else
#define __forceinline__ inline
#endif
#ifdef EMU_LIST_ENTRIES
// build.sh's listing of the entry points (preprocessing only): each
// kernel's launch bounds stay visible before its name, so the fake CUDA
// driver (cuda_driver.cpp) knows the most threads a block of it may have.
#define __launch_bounds__(...) EMU_LAUNCH_BOUNDS(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
// Static __shared__ arrays are statics (one block runs at a time), all in
// one linker section, which emu_launch (runtime.cpp) fills with 0xff bytes
// (NaN as f32, −1 as an integer) before every block: the GPU promises
// nothing about shared memory a block has not written, so a word read
// before it is written must not see zeros or the previous block's values.
// Kernels with dynamic shared memory (cuda/chunk.cu: `extern __shared__
// ... smem[]`) are built with EMU_DYNAMIC_SHARED: __shared__ is then empty
// and the block-scope extern declaration names a namespace-scope buffer the
// driver defines (and poisons before every block).
#ifdef EMU_DYNAMIC_SHARED
#define __shared__
#else
#define __shared__ static __attribute__((section("emu_static_shared")))
#endif
#define __align__(n) __attribute__((aligned(n)))

// CUDA's vector types carry their size as alignment (vector_types.h), and
// the GPU's vector loads and stores fault on an address that is not a
// multiple of it; so do these, for UndefinedBehaviorSanitizer's alignment
// check (build.sh) to see a float2 read from an odd float offset of a
// shared carving or a workspace, which x86 would forgive.
struct __align__(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct __align__(8) int2 {
    int x, y;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }
struct __align__(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct __align__(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct __align__(8) uint2 {
    unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
// A product rounded to f32 that no contraction fuses into a following sum
// (nvcc's mul.rn): through a volatile, also in the fake driver's build,
// whose -ffp-contract=fast would otherwise fuse it.
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}

struct EmuDim3 {
    unsigned x, y, z;
};
extern thread_local EmuDim3 threadIdx;
extern thread_local EmuDim3 blockIdx;
extern EmuDim3 blockDim;
extern EmuDim3 gridDim;
// The row of a 2-D grid an emu_launch runs (blockIdx.y), of emu_grid_rows
// (gridDim.y): the fake driver runs a grid (gx, gy) as gy launches of gx
// blocks, rows in order (cuLaunchKernel).
extern unsigned emu_grid_row, emu_grid_rows;
// The calling thread's index within its block, x fastest (CUDA's linear
// thread id: warps are its consecutive runs of 32).
inline unsigned emu_thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

#ifdef EMU_BANKS
// The bank model (bank_model.cpp): a launch's shared buffers, each block's
// start and end, and every barrier a thread passes (runtime.cpp).
void emu_banks_launch(const char* kernel, const void* const* buffers, const size_t* bytes, int count,
                      unsigned blocks);
void emu_banks_block_begin();
void emu_banks_block_end(unsigned threads);
void emu_banks_barrier();
#endif

void __syncthreads();
// __syncthreads, and whether `predicate` is non-zero on any thread of the block.
int __syncthreads_or(int predicate);
// A barrier of the calling thread's warp (all 32 lanes must call it, as the
// kernels do: warp-uniform control flow).
void __syncwarp(unsigned mask = 0xffffffffu);
[[noreturn]] inline void __trap() { std::abort(); }
// Aborts, naming `what`, unless p lies in the block's dynamic shared memory
// (the driver's buffer). The chunked kernels' .shared loads and stores
// (load_operand, store_accumulator in cuda/chunk_common.cuh) call it where
// the GPU would take p as a shared address: a pointer elsewhere would read
// or write a wrong place there, and here reads it as given. Defined by the
// drivers of kernels with dynamic shared memory (chunk_driver.cpp,
// cuda_driver.cpp), each through emu_expect_in with its buffer.
void emu_expect_shared(const void* p, const char* what);
inline void emu_expect_in(const void* p, const void* buf, size_t bytes, const char* what) {
    const auto* at = static_cast<const unsigned char*>(p);
    const auto* first = static_cast<const unsigned char*>(buf);
    if (at < first || at >= first + bytes) {
        std::fprintf(stderr, "%s: %p is not in the block's shared memory\n", what, p);
        std::abort();
    }
}
#ifdef EMU_GPU_ARITH
#include "gpu_arith.h"
#else
// The SFU's __sincosf is approximate (abs. error ≤ 2^-21.4 on [-π, π]); the
// emulator uses glibc's correctly rounded-ish sincosf, as the Rust mirror.
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
#endif
template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}
float emu_shuffle(float v, int src_lane_delta, bool up);
long long emu_shuffle(long long v, int src_lane_delta, bool up);
inline float __shfl_up_sync(unsigned, float v, int offset) { return emu_shuffle(v, offset, true); }
inline float __shfl_down_sync(unsigned, float v, int offset) { return emu_shuffle(v, offset, false); }
inline long long __shfl_down_sync(unsigned, long long v, int offset) { return emu_shuffle(v, offset, false); }
float emu_shuffle_xor(float v, int lane_mask);
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu_shuffle_xor(v, lane_mask); }
// CUDA's global isnan / isinf (cuda/check.cu).
using std::isinf;
using std::isnan;
// Device atomics as std::atomic_ref (seq_cst, which ThreadSanitizer sees):
// cuda/check.cu's cross-block ticket. __threadfence orders a block's writes
// before its later ones as seen by OTHER blocks; here blocks run one after
// another (joined threads), so it has nothing to order and is only a
// compiler barrier (ThreadSanitizer does not model thread fences).
inline long long atomicMin(long long* p, long long v) {
    std::atomic_ref<long long> a(*p);
    long long old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
