// The emulator's runtime: block launches, the barrier, shuffles.
#include <barrier>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

#include "emu.h"

thread_local EmuDim3 threadIdx;
thread_local EmuDim3 blockIdx;
EmuDim3 blockDim;
EmuDim3 gridDim;

static std::barrier<>* g_barrier = nullptr;
static float g_xchg[1024];
static std::vector<std::barrier<>*> g_warp_barriers;

void __syncwarp(unsigned) { g_warp_barriers[emu_thread_rank() / 32]->arrive_and_wait(); }
namespace nvcuda::wmma {
void emu_syncwarp() { __syncwarp(); }
unsigned emu_lane() { return emu_thread_rank() & 31; }
}  // namespace nvcuda::wmma

void __syncthreads() { g_barrier->arrive_and_wait(); }

static int g_predicates[1024];

int __syncthreads_or(int predicate) {
    g_predicates[threadIdx.x] = predicate != 0;
    g_barrier->arrive_and_wait();
    const int any = std::any_of(g_predicates, g_predicates + blockDim.x, [](int x) { return x != 0; });
    g_barrier->arrive_and_wait();  // every thread has read before the next call writes
    return any;
}

// A shuffle through `xchg` (one slot per thread) between two block barriers.
template <class T>
static T shuffle_through(T* xchg, T v, int offset, bool up) {
    const unsigned tid = emu_thread_rank();
    const int lane = static_cast<int>(tid & 31);
    xchg[tid] = v;
    g_barrier->arrive_and_wait();
    T r = v;
    if (up && lane >= offset) r = xchg[tid - offset];
    if (!up && lane + offset < 32) r = xchg[tid + offset];
    g_barrier->arrive_and_wait();
    return r;
}
float emu_shuffle(float v, int offset, bool up) { return shuffle_through(g_xchg, v, offset, up); }
static long long g_xchg64[1024];
long long emu_shuffle(long long v, int offset, bool up) { return shuffle_through(g_xchg64, v, offset, up); }

// The kernels' static __shared__ variables (emu.h puts them in this
// section; the linker defines its bounds, weakly: a build whose kernels
// have none has no section). Filled with 0xff before each block through a
// volatile pointer, uninstrumented: the section holds AddressSanitizer's
// redzones between the variables, whose bytes nothing reads.
extern "C" unsigned char __start_emu_static_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_static_shared[] __attribute__((weak));
__attribute__((no_sanitize_address)) static void poison_static_shared() {
    volatile unsigned char* p = __start_emu_static_shared;
    for (; p != nullptr && p < __stop_emu_static_shared; ++p) *p = 0xff;
}

// How long one block may take before emu_launch calls it hung:
// EMU_BLOCK_TIMEOUT_S, default 300 s: more than any whole emulated test
// file takes (under 4 minutes), so only a block that cannot finish hits it.
static std::chrono::seconds block_timeout() {
    static const long long s = [] {
        const char* e = std::getenv("EMU_BLOCK_TIMEOUT_S");
        const long long v = e != nullptr ? std::atoll(e) : 0;
        return v > 0 ? v : 300;
    }();
    return std::chrono::seconds(s);
}

// Runs `kernel` over grid × (block.x · block.y · block.z) threads, one
// block at a time: in order, or with EMU_REVERSE_BLOCKS (the race-checking
// build) last block first, so that a block depending on a lower-numbered
// block of the same launch — which a GPU may run later, or at the same time
// — reads poison instead of that block's results.
void emu_launch(unsigned grid, EmuDim3 block_dim, const std::function<void()>& kernel) {
    blockDim = block_dim;
    gridDim = EmuDim3{grid, 1, 1};
    const unsigned block = block_dim.x * block_dim.y * block_dim.z;
    for (unsigned i = 0; i < grid; ++i) {
#ifdef EMU_REVERSE_BLOCKS
        const unsigned b = grid - 1 - i;
#else
        const unsigned b = i;
#endif
        poison_static_shared();
        std::barrier<> bar(block);
        g_barrier = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        g_warp_barriers.clear();
        for (unsigned w = 0; w * 32 < block; ++w) {
            warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
            g_warp_barriers.push_back(warps.back().get());
        }
        std::mutex finished_mutex;
        std::condition_variable finished_cv;
        unsigned finished = 0;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t, b] {
                threadIdx = EmuDim3{t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
                blockIdx = EmuDim3{b, 0, 0};
                kernel();
                std::lock_guard<std::mutex> lock(finished_mutex);
                if (++finished == block) finished_cv.notify_one();
            });
        }
        // A barrier or shuffle that some thread of the block never reaches
        // (one in divergent code, or after a non-uniform early return)
        // waits forever here, as it may hang a GPU: fail with what to look
        // for instead of hanging the test run.
        {
            std::unique_lock<std::mutex> lock(finished_mutex);
            if (!finished_cv.wait_for(lock, block_timeout(), [&] { return finished == block; })) {
                std::fprintf(stderr,
                             "emulator: block %u of %u: %u of %u threads finished after %lld s; the rest wait at a "
                             "__syncthreads, __syncwarp or shuffle that not every thread of the block (or warp) "
                             "reaches (EMU_BLOCK_TIMEOUT_S sets the limit)\n",
                             b, grid, finished, block, static_cast<long long>(block_timeout().count()));
                std::_Exit(67);
            }
        }
        for (auto& th : threads) th.join();
    }
}

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    emu_launch(grid, EmuDim3{block, 1, 1}, kernel);
}
