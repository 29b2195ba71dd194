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
unsigned emu_grid_row = 0, emu_grid_rows = 1;

// The two barriers, by execution model (below): every thread of the block,
// and every thread of warp `warp`.
static void block_barrier();
static void warp_barrier(unsigned warp);


void __syncwarp(unsigned) { warp_barrier(emu_thread_rank() / 32); }
namespace nvcuda::wmma {
void emu_syncwarp() { __syncwarp(); }
unsigned emu_lane() { return emu_thread_rank() & 31; }
}  // namespace nvcuda::wmma

void __syncthreads() { block_barrier(); }

static int g_predicates[1024];

int __syncthreads_or(int predicate) {
    g_predicates[threadIdx.x] = predicate != 0;
    block_barrier();
    const int any = std::any_of(g_predicates, g_predicates + blockDim.x, [](int x) { return x != 0; });
    block_barrier();  // every thread has read before the next call writes
    return any;
}

// A shuffle: each thread writes its value to its slot of an exchange array,
// one block barrier, then reads its source lane's slot. Two arrays per type,
// taken in turn (the thread's shuffle count since its block began, mod 2,
// the same on every thread: the kernels shuffle in block-uniform control
// flow), so one barrier suffices: the next write to an array is two
// shuffles later, behind the barrier of the shuffle in between, which every
// reader of this one passes only after reading. (Two barriers per shuffle,
// one array, cost twice the fiber switches: the scan tests spent most of
// their time there.)
static unsigned char g_shuffle_parity[1024];  // per thread; emu_launch clears it before each block
static void reset_shuffles() { std::fill(std::begin(g_shuffle_parity), std::end(g_shuffle_parity), 0); }
template <class T>
static T shuffle_through(T (&xchg)[2][1024], T v, int offset, bool up) {
    const unsigned tid = emu_thread_rank();
    const int lane = static_cast<int>(tid & 31);
    T* buf = xchg[g_shuffle_parity[tid]];
    g_shuffle_parity[tid] ^= 1;
    buf[tid] = v;
    block_barrier();
    T r = v;
    if (up && lane >= offset) r = buf[tid - offset];
    if (!up && lane + offset < 32) r = buf[tid + offset];
    return r;
}
static float g_xchg[2][1024];
float emu_shuffle(float v, int offset, bool up) { return shuffle_through(g_xchg, v, offset, up); }
// __shfl_xor_sync: the same exchange, from lane (lane ^ mask) of the warp.
float emu_shuffle_xor(float v, int lane_mask) {
    const unsigned tid = emu_thread_rank();
    float* buf = g_xchg[g_shuffle_parity[tid]];
    g_shuffle_parity[tid] ^= 1;
    buf[tid] = v;
    block_barrier();
    return buf[tid ^ static_cast<unsigned>(lane_mask & 31)];
}
static long long g_xchg64[2][1024];
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

// Thread `rank` of a block of `dim` (x fastest: the inverse of emu.h's
// emu_thread_rank).
static EmuDim3 thread_index(unsigned rank, EmuDim3 dim) {
    return EmuDim3{rank % dim.x, rank / dim.x % dim.y, rank / (dim.x * dim.y)};
}

#ifndef EMU_FIBERS
// ---- every thread of a block an OS thread ----------------------------------
// (the emulator binaries of the tests: ThreadSanitizer sees the barriers'
// happens-before edges between real threads, and AddressSanitizer knows
// thread stacks)

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

static std::barrier<>* g_barrier = nullptr;
static std::vector<std::barrier<>*> g_warp_barriers;
static void block_barrier() { g_barrier->arrive_and_wait(); }
static void warp_barrier(unsigned warp) { g_warp_barriers[warp]->arrive_and_wait(); }

// The threads that run blocks: created once and reused by every block of
// every launch (creating a block's threads anew cost more than most blocks
// run). Worker t runs thread t of each block that has more than t threads.
// Never destroyed: the workers wait on it until the process exits.
struct WorkerPool {
    std::mutex m;
    std::condition_variable start;  // a new block is ready (generation moved)
    std::condition_variable done;   // the block's last thread finished
    unsigned long long generation = 0;
    unsigned threads = 0;  // of the current block
    unsigned finished = 0;
    unsigned block = 0;    // its index in the grid
    const std::function<void()>* kernel = nullptr;
    std::vector<std::thread> workers;
};
static WorkerPool& pool = *new WorkerPool;

static void worker(unsigned t) {
    unsigned long long seen = 0;
    std::unique_lock<std::mutex> lock(pool.m);
    for (;;) {
        pool.start.wait(lock, [&] { return pool.generation != seen; });
        seen = pool.generation;
        if (t >= pool.threads) continue;
        const std::function<void()>& kernel = *pool.kernel;
        threadIdx = thread_index(t, blockDim);
        blockIdx = EmuDim3{pool.block, emu_grid_row, 0};
        lock.unlock();
        kernel();
        lock.lock();
        if (++pool.finished == pool.threads) pool.done.notify_one();
    }
}

// Runs `kernel` over grid × (block.x · block.y · block.z) threads, one
// block at a time: in order, or with EMU_REVERSE_BLOCKS (the race-checking
// build) last block first, so that a block depending on a lower-numbered
// block of the same launch — which a GPU may run later, or at the same time
// — reads poison instead of that block's results. One launch at a time.
void emu_launch(unsigned grid, EmuDim3 block_dim, const std::function<void()>& kernel) {
    blockDim = block_dim;
    gridDim = EmuDim3{grid, emu_grid_rows, 1};
    const unsigned block = block_dim.x * block_dim.y * block_dim.z;
    {
        std::lock_guard<std::mutex> lock(pool.m);
        while (pool.workers.size() < block) {
            pool.workers.emplace_back(worker, static_cast<unsigned>(pool.workers.size()));
            pool.workers.back().detach();
        }
    }
    for (unsigned i = 0; i < grid; ++i) {
#ifdef EMU_REVERSE_BLOCKS
        const unsigned b = grid - 1 - i;
#else
        const unsigned b = i;
#endif
        poison_static_shared();
        reset_shuffles();
        std::barrier<> bar(block);
        g_barrier = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        g_warp_barriers.clear();
        for (unsigned w = 0; w * 32 < block; ++w) {
            warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
            g_warp_barriers.push_back(warps.back().get());
        }
        std::unique_lock<std::mutex> lock(pool.m);
        pool.threads = block;
        pool.finished = 0;
        pool.block = b;
        pool.kernel = &kernel;
        ++pool.generation;
        pool.start.notify_all();
        // A barrier or shuffle that some thread of the block never reaches
        // (one in divergent code, or after a non-uniform early return)
        // waits forever here, as it may hang a GPU: fail with what to look
        // for instead of hanging the test run.
        if (!pool.done.wait_for(lock, block_timeout(), [&] { return pool.finished == block; })) {
            std::fprintf(stderr,
                         "emulator: block %u of %u: %u of %u threads finished after %lld s; the rest wait at a "
                         "__syncthreads, __syncwarp or shuffle that not every thread of the block (or warp) "
                         "reaches (EMU_BLOCK_TIMEOUT_S sets the limit)\n",
                         b, grid, pool.finished, block, static_cast<long long>(block_timeout().count()));
            std::_Exit(67);
        }
    }
}

#else
// ---- every thread of a block a fiber ---------------------------------------
// (the fake CUDA driver, cuda_driver.cpp: many times faster, since a barrier
// is a few context switches in one OS thread instead of a futex wake-up of
// every thread). The block's threads run on the calling thread, each on its
// own stack, one at a time: each runs until it reaches a barrier (or ends),
// then the next ready one. A barrier releases its waiters when the last of
// its threads arrives. The same orders of events are possible as with OS
// threads; only ThreadSanitizer needs those (the race build uses them).
// A block in which no thread can run and not all have ended waits at a
// barrier that some thread never reaches: reported at once, exit 67.
#include <sys/mman.h>
#include <ucontext.h>

// Switching fibers: on x86-64 a few instructions (the callee-saved
// registers and the stack pointer), since glibc's swapcontext also saves
// the signal mask with a system call, ~20 times the cost; elsewhere
// swapcontext. A fiber's context is its saved stack pointer (x86-64) or a
// ucontext_t.
#if defined(__x86_64__)
extern "C" void emu_fiber_switch(void** save_sp, void* resume_sp);
asm(R"(
    .text
    .globl emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch
)");
struct FiberContext {
    void* sp = nullptr;
};
static void fiber_switch(FiberContext* save, FiberContext* resume) { emu_fiber_switch(&save->sp, resume->sp); }
// A context that starts `entry` (which must never return) on the stack
// [stack, stack + bytes): what emu_fiber_switch pops (six registers, then
// the return address `entry`), above it a null return address for `entry`,
// so that entry starts with the stack aligned as after a call.
static void fiber_start(FiberContext* c, void* stack, size_t bytes, void (*entry)(), FiberContext*) {
    void** top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(entry);
    for (int i = 3; i <= 8; ++i) top[-i] = nullptr;
    c->sp = top - 8;
}
#else
struct FiberContext {
    ucontext_t uc;
};
static void fiber_switch(FiberContext* save, FiberContext* resume) { swapcontext(&save->uc, &resume->uc); }
static void fiber_start(FiberContext* c, void* stack, size_t bytes, void (*entry)(), FiberContext* link) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = bytes;
    c->uc.uc_link = &link->uc;
    makecontext(&c->uc, entry, 0);
}
#endif

namespace {
// Per thread of a block; a kernel's locals (emulated registers, WMMA
// fragments holding whole tiles) live here. Reserved, committed as touched.
constexpr size_t kFiberStack = size_t(2) << 20;

struct Fiber {
    enum State { Ready, AtBlockBarrier, AtWarpBarrier, Done };
    FiberContext context;
    void* stack = nullptr;  // kFiberStack bytes above a guard page
    EmuDim3 thread{};
    State state = Done;
};

struct FiberBlock {
    FiberContext scheduler;
    std::vector<Fiber> fibers;  // stacks kept from block to block
    unsigned threads = 0;
    unsigned at_block_barrier = 0;
    std::vector<unsigned> at_warp_barrier;
    unsigned done = 0;
    Fiber* current = nullptr;
    const std::function<void()>* kernel = nullptr;
};
FiberBlock& g_block = *new FiberBlock;

void run_fiber() {
    (*g_block.kernel)();
    g_block.current->state = Fiber::Done;
    ++g_block.done;
    // Never resumed: the next block starts its fibers afresh.
    fiber_switch(&g_block.current->context, &g_block.scheduler);
    std::abort();
}

void release(Fiber::State waiting, unsigned first, unsigned end) {
    for (unsigned t = first; t < end; ++t) {
        if (g_block.fibers[t].state == waiting) g_block.fibers[t].state = Fiber::Ready;
    }
}
}  // namespace

static void block_barrier() {
#ifdef EMU_BANKS
    emu_banks_barrier();
#endif
    Fiber* f = g_block.current;
    if (++g_block.at_block_barrier == g_block.threads) {
        g_block.at_block_barrier = 0;
        release(Fiber::AtBlockBarrier, 0, g_block.threads);
        return;  // the last to arrive goes on
    }
    f->state = Fiber::AtBlockBarrier;
    fiber_switch(&f->context, &g_block.scheduler);
}

static void warp_barrier(unsigned warp) {
#ifdef EMU_BANKS
    emu_banks_barrier();
#endif
    Fiber* f = g_block.current;
    const unsigned first = 32 * warp;
    const unsigned lanes = std::min(32u, g_block.threads - first);
    if (++g_block.at_warp_barrier[warp] == lanes) {
        g_block.at_warp_barrier[warp] = 0;
        release(Fiber::AtWarpBarrier, first, first + lanes);
        return;
    }
    f->state = Fiber::AtWarpBarrier;
    fiber_switch(&f->context, &g_block.scheduler);
}

// Runs `kernel` over grid × (block.x · block.y · block.z) threads, one
// block at a time, in order. One launch at a time.
void emu_launch(unsigned grid, EmuDim3 block_dim, const std::function<void()>& kernel) {
    blockDim = block_dim;
    gridDim = EmuDim3{grid, emu_grid_rows, 1};
    const unsigned block = block_dim.x * block_dim.y * block_dim.z;
    const size_t page = 4096;
    while (g_block.fibers.size() < block) {
        g_block.fibers.emplace_back();
        void* m = mmap(nullptr, kFiberStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "emulator: cannot map a fiber stack\n");
            std::_Exit(70);
        }
        mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
        g_block.fibers.back().stack = static_cast<char*>(m) + page;
    }
    g_block.threads = block;
    g_block.kernel = &kernel;
    g_block.at_warp_barrier.assign((block + 31) / 32, 0);
    for (unsigned b = 0; b < grid; ++b) {
        poison_static_shared();
        reset_shuffles();
        g_block.done = 0;
        g_block.at_block_barrier = 0;
        std::fill(g_block.at_warp_barrier.begin(), g_block.at_warp_barrier.end(), 0u);
        for (unsigned t = 0; t < block; ++t) {
            Fiber& f = g_block.fibers[t];
            fiber_start(&f.context, f.stack, kFiberStack, run_fiber, &g_block.scheduler);
            f.thread = thread_index(t, block_dim);
            f.state = Fiber::Ready;
        }
        blockIdx = EmuDim3{b, emu_grid_row, 0};
#ifdef EMU_BANKS
        emu_banks_block_begin();
#endif
        while (g_block.done < block) {
            bool ran = false;
            for (unsigned t = 0; t < block; ++t) {
                Fiber& f = g_block.fibers[t];
                if (f.state != Fiber::Ready) continue;
                ran = true;
                g_block.current = &f;
                threadIdx = f.thread;
                fiber_switch(&g_block.scheduler, &f.context);
            }
            if (!ran) {
                unsigned at_block = 0, at_warp = 0;
                for (unsigned t = 0; t < block; ++t) {
                    at_block += g_block.fibers[t].state == Fiber::AtBlockBarrier;
                    at_warp += g_block.fibers[t].state == Fiber::AtWarpBarrier;
                }
                std::fprintf(stderr,
                             "emulator: block %u of %u cannot finish: %u of %u threads ended, %u wait at "
                             "__syncthreads (or a shuffle), %u at __syncwarp, which not every thread of the block "
                             "(or warp) reaches\n",
                             b, grid, g_block.done, block, at_block, at_warp);
                std::_Exit(67);
            }
        }
#ifdef EMU_BANKS
        emu_banks_block_end(block);
#endif
    }
}

#endif  // EMU_FIBERS

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    emu_launch(grid, EmuDim3{block, 1, 1}, kernel);
}
