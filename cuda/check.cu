// The opt-in device-side value check of a log_gate buffer (see
// GateloopCheckParams in gateloop_abi.h and src/cuda/check.rs).
//
//   gateloop_check_log_gate: the FIRST index i < n whose complex f32 log gate
//   is outside the domain — Re > 0, NaN in Re or Im, or Im = ±inf
//   (Re = −inf, a reset, is allowed) — and its value.
//
// Mapping. A grid-stride loop over the n complex elements: thread j of the
// grid reads j, j + G, j + 2G, … (G = grid threads; coalesced, one float2
// per thread per step) and stops at its first offending element, which is
// its smallest one. A warp shuffle and a shared-memory pass give the block's
// minimum; thread 0 of the block folds it into result[0] with a 64-bit
// integer atomicMin (when it is < n), then takes a ticket (atomicAdd on
// result[2]) behind a __threadfence. The block with the last ticket reads the
// final minimum (an atomic read: every block's atomicMin precedes its
// ticket) and, when there is one, copies that element into result[1].
//
// Determinism: the minimum of a set does not depend on the order in which
// it is folded, integer atomics are exact, and the value reported is the
// input's own bits; so the result is the same for any grid size and any
// schedule (and equal to the host's Problem::check_gate, which scans in
// index order and stops at the first offending element).

#include "common.cuh"

namespace gateloop {

constexpr int kCheckThreads = GATELOOP_CHECK_THREADS;
static_assert(kCheckThreads % 32 == 0 && kCheckThreads <= 1024, "whole warps, one block");

// Whether a log gate is outside the domain: the device mirror of
// gateloop::problem::log_gate_violation (which also names the reason).
__device__ __forceinline__ bool log_gate_bad(float2 g) {
    return isnan(g.x) || isnan(g.y) || g.x > 0.f || isinf(g.y);
}

__device__ __forceinline__ long long warp_min(long long x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_down_sync(0xffffffffu, x, offset));
    return x;
}

}  // namespace gateloop

extern "C" __global__ void __launch_bounds__(GATELOOP_CHECK_THREADS)
    gateloop_check_log_gate(const GateloopCheckParams p) {
    using namespace gateloop;
    const long long n = p.n;

    // This thread's first (= smallest) offending index, n when none.
    long long first = n;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (log_gate_bad(load_complex(p.log_gate, i))) {
            first = i;
            break;
        }
    }

    // The block's minimum.
    __shared__ long long warp_first[kCheckThreads / 32];
    first = warp_min(first);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_first[warp] = first;
    __syncthreads();
    if (threadIdx.x != 0) return;

    long long block_first = n;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) block_first = min(block_first, warp_first[w]);

    long long* result_first = reinterpret_cast<long long*>(p.result);
    unsigned long long* blocks_done = reinterpret_cast<unsigned long long*>(p.result + 2);
    if (block_first < n) atomicMin(result_first, block_first);
    __threadfence();
    const unsigned long long ticket = atomicAdd(blocks_done, 1ull);
    if (ticket == static_cast<unsigned long long>(gridDim.x) - 1) {
        // Every block's atomicMin happened before its ticket: read the final
        // minimum atomically (adding 0 changes nothing).
        const long long f = static_cast<long long>(atomicAdd(reinterpret_cast<unsigned long long*>(result_first), 0ull));
        if (f < n) {
            *reinterpret_cast<float2*>(p.result + 1) = load_complex(p.log_gate, f);
        }
    }
}
