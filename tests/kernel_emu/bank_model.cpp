// The shared-memory bank model of the fake CUDA driver's `banks` build
// (build.sh banks): how many shared-memory wavefronts each load and store
// of a kernel would take on a GPU, counted from the accesses the kernels
// make when the emulator runs them. A development tool, for speed work
// without a GPU (scripts/smem-profile.sh reads its report); the build and
// the tests never use it.
//
// How: the kernel files of that build are compiled with g++'s
// ThreadSanitizer instrumentation but without its runtime, so every load
// and store of kernel code calls one of the __tsan_* hooks below with its
// address and width, from its own instruction (the hook's return address
// names the site). Accesses inside the block's shared memory (the buffers
// the driver names: emu_banks_shared) are logged per thread, with the
// number of barriers that thread has passed (its epoch). After the block,
// the k-th access of a site in an epoch of every lane of a warp is taken as
// one warp instruction (the kernels' control flow is warp-uniform where
// they touch shared memory; a lane that skips an access is an inactive
// lane of it), and its wavefronts are counted by the usual model of 32
// banks of 4 bytes: per phase, the most distinct 4-byte words any one bank
// must serve (lanes reading one word share it); a phase is the whole warp
// for accesses of up to 4 bytes, a half-warp for 8, a quarter-warp for 16.
// Ideal: one wavefront per phase with an active lane (Nsight Compute's
// "ideal" likewise counts a conflict-free access).
//
// The tensor-core operand and accumulator tiles (include/mma.h's wmma and
// ldmatrix, whose emulation reads whole tiles in every lane) are logged as
// the GPU's instructions read them instead (emu_banks_tile_*): an ldmatrix
// .x4 (16-bit wmma operands: one 16-byte row segment a lane, eight lanes a
// phase), TF32 operands as four 4-byte loads a lane and f32 accumulators
// as four 8-byte accesses a lane in mma.sync's fragment layouts.
//
// g++ is not nvcc: the model sees the loads g++ kept (build.sh turns off
// the scalar replacement of aggregates and the vectorizer so that a float4
// stays one 16-byte access and loops stay scalar), so it ranks layouts and
// finds the conflicted sites; its totals are estimates (checked against a
// profile: scripts/smem-profile.sh).
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "emu.h"

namespace {

struct Event {
    uintptr_t pc;
    uintptr_t addr;
    uint32_t epoch;
    uint8_t size;
    bool write;
};

struct Range {
    uintptr_t first, end;
};

constexpr unsigned kMaxThreads = 1024;
Range g_ranges[4];
int g_range_count = 0;
bool g_on = false;                        // logging this block
std::vector<Event> g_log[kMaxThreads];    // per thread rank, in program order
uint32_t g_epoch[kMaxThreads];            // barriers passed
uint32_t g_mute[kMaxThreads];             // inside a modelled tile access

// Per site: (warp instructions, wavefronts, ideal wavefronts, active lanes).
struct SiteCount {
    uint64_t count = 0, wavefronts = 0, ideal = 0, lanes = 0;
    unsigned size = 0;
    bool write = false;
};
struct KernelCount {
    uint64_t blocks_sampled = 0, blocks_launched = 0;
    std::map<uintptr_t, SiteCount> sites;
};
std::map<std::string, KernelCount> g_kernels;
KernelCount* g_current = nullptr;
unsigned g_sampled_this_launch = 0;
unsigned g_sample_blocks = 4;

bool in_shared(uintptr_t a) {
    for (int i = 0; i < g_range_count; ++i) {
        if (a >= g_ranges[i].first && a < g_ranges[i].end) return true;
    }
    return false;
}

inline void record(const void* p, unsigned size, bool write, void* pc) {
    if (!g_on) return;
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (!in_shared(a)) return;
    const unsigned rank = emu_thread_rank();
    if (g_mute[rank] != 0) return;
    g_log[rank].push_back(Event{reinterpret_cast<uintptr_t>(pc), a, g_epoch[rank], static_cast<uint8_t>(size), write});
}

// Wavefronts of one warp access: lanes' (lane, address, bytes).
struct Lane {
    unsigned lane;
    uintptr_t addr;
    unsigned size;
};
std::pair<unsigned, unsigned> wavefronts(const std::vector<Lane>& lanes) {
    unsigned size = 0;
    for (const Lane& l : lanes) size = std::max(size, l.size);
    const unsigned per_phase = size <= 4 ? 32 : size <= 8 ? 16 : 8;
    unsigned total = 0, ideal = 0;
    for (unsigned phase = 0; phase < 32 / per_phase; ++phase) {
        std::vector<uintptr_t> words[32];
        bool active = false;
        for (const Lane& l : lanes) {
            if (l.lane / per_phase != phase) continue;
            active = true;
            for (uintptr_t w = l.addr / 4; w <= (l.addr + l.size - 1) / 4; ++w) {
                auto& bank = words[w % 32];
                if (std::find(bank.begin(), bank.end(), w) == bank.end()) bank.push_back(w);
            }
        }
        if (!active) continue;
        ++ideal;
        size_t most = 0;
        for (const auto& bank : words) most = std::max(most, bank.size());
        total += static_cast<unsigned>(most);
    }
    return {total, ideal};
}

// nvcc's load/store vectorizer, approximately: where a thread reads (or
// writes) consecutive elements of 2 or 4 bytes from one site, one after
// another in an epoch (an unrolled loop over channels, which g++ keeps as
// one instruction run again), nvcc issues one access of up to 16 bytes
// where the first address is aligned to it (the pairwise loops' LDS.128 a
// four channels). Runs are split into aligned power-of-two pieces.
void push_run(std::vector<Event>& out, Event run, unsigned elem) {
    while (run.size > 0) {
        unsigned piece = 16;
        while (piece > elem && (piece > run.size || run.addr % piece != 0)) piece /= 2;
        Event e = run;
        e.size = static_cast<uint8_t>(piece);
        out.push_back(e);
        run.addr += piece;
        run.size = static_cast<uint8_t>(run.size - piece);
    }
}
std::vector<Event> vectorize(const std::vector<Event>& log) {
    std::vector<Event> out;
    out.reserve(log.size());
    // Open runs by (site, epoch): the run so far and its element size.
    std::map<std::pair<uintptr_t, uint32_t>, std::pair<Event, unsigned>> open;
    auto close_all = [&] {
        for (auto& [key, run] : open) push_run(out, run.first, run.second);
        open.clear();
    };
    uint32_t epoch = log.empty() ? 0 : log.front().epoch;
    for (const Event& e : log) {
        if (e.epoch != epoch) {
            close_all();
            epoch = e.epoch;
        }
        if (e.size != 2 && e.size != 4) {
            out.push_back(e);
            continue;
        }
        auto it = open.find({e.pc, e.epoch});
        if (it != open.end()) {
            auto& [run, elem] = it->second;
            unsigned grown = 1;  // the new size rounded up to a power of two
            while (grown < run.size + e.size) grown *= 2;
            if (elem == e.size && run.write == e.write && run.addr + run.size == e.addr && grown <= 16 &&
                run.addr % grown == 0) {
                run.size = static_cast<uint8_t>(run.size + e.size);
                continue;
            }
            push_run(out, run, elem);
            open.erase(it);
        }
        open.emplace(std::make_pair(e.pc, e.epoch), std::make_pair(e, static_cast<unsigned>(e.size)));
    }
    close_all();
    return out;
}
bool g_vectorize = true;

// This library as dladdr names it: its path and load address.
const Dl_info& this_library() {
    static const Dl_info info = [] {
        Dl_info i{};
        dladdr(reinterpret_cast<void*>(&this_library), &i);
        return i;
    }();
    return info;
}
// A site's name in the report: its offset in this library. The return
// address is the instruction after the call: one byte back lands in the
// call, which addr2line places.
uintptr_t site_offset(uintptr_t pc) { return pc - reinterpret_cast<uintptr_t>(this_library().dli_fbase) - 1; }

// GATELOOP_BANKS_TRACE=0xSITE (a site as the report names it): its first
// GATELOOP_BANKS_TRACE_COUNT (default 8) conflicted warp instructions of
// each launch to stderr, each lane's word offset from the lowest word the
// instruction touches, to see which lanes meet in a bank.
uintptr_t g_trace_site = 0;
unsigned g_trace_left = 0;
void trace(uintptr_t pc, unsigned warp, uint32_t epoch, uint32_t k, const std::vector<Lane>& lanes, unsigned w) {
    if (g_trace_left == 0 || w <= 1 || site_offset(pc) != g_trace_site) return;
    --g_trace_left;
    uintptr_t lo = UINTPTR_MAX;
    for (const Lane& l : lanes) lo = std::min(lo, l.addr);
    std::fprintf(stderr, "trace warp %u epoch %u k %u: %u wavefronts:", warp, epoch, k, w);
    for (const Lane& l : lanes) std::fprintf(stderr, " %u:%llu", l.lane, static_cast<unsigned long long>((l.addr - lo) / 4));
    std::fprintf(stderr, "\n");
}

void process_block(unsigned threads) {
    struct Rec {
        unsigned warp;
        uintptr_t pc;
        uint32_t epoch, k;
        unsigned lane;
        uintptr_t addr;
        unsigned size;
        bool write;
    };
    std::vector<Rec> recs;
    for (unsigned t = 0; t < threads; ++t) {
        std::map<std::pair<uintptr_t, uint32_t>, uint32_t> seen;
        for (const Event& e : g_vectorize ? vectorize(g_log[t]) : g_log[t]) {
            const uint32_t k = seen[{e.pc, e.epoch}]++;
            recs.push_back(Rec{t / 32, e.pc, e.epoch, k, t % 32, e.addr, e.size, e.write});
        }
        g_log[t].clear();
    }
    std::sort(recs.begin(), recs.end(), [](const Rec& a, const Rec& b) {
        return std::tie(a.warp, a.pc, a.epoch, a.k, a.lane) < std::tie(b.warp, b.pc, b.epoch, b.k, b.lane);
    });
    std::vector<Lane> lanes;
    for (size_t i = 0; i < recs.size();) {
        size_t j = i;
        lanes.clear();
        while (j < recs.size() && recs[j].warp == recs[i].warp && recs[j].pc == recs[i].pc &&
               recs[j].epoch == recs[i].epoch && recs[j].k == recs[i].k) {
            lanes.push_back(Lane{recs[j].lane, recs[j].addr, recs[j].size});
            ++j;
        }
        const auto [w, ideal] = wavefronts(lanes);
        trace(recs[i].pc, recs[i].warp, recs[i].epoch, recs[i].k, lanes, w);
        SiteCount& s = g_current->sites[recs[i].pc];
        s.count += 1;
        s.wavefronts += w;
        s.ideal += ideal;
        s.lanes += lanes.size();
        s.size = std::max(s.size, recs[i].size);
        s.write = recs[i].write;
        i = j;
    }
}

void write_report() {
    const char* path = std::getenv("GATELOOP_BANKS_OUT");
    FILE* out = path != nullptr ? std::fopen(path, "w") : stderr;
    if (out == nullptr) return;
    const Dl_info& info = this_library();
    std::fprintf(out, "# gateloop shared-memory bank model (tests/kernel_emu/bank_model.cpp)\n");
    std::fprintf(out, "library %s\n", info.dli_fname != nullptr ? info.dli_fname : "?");
    for (const auto& [name, k] : g_kernels) {
        std::fprintf(out, "kernel %s blocks_sampled %llu blocks_launched %llu\n", name.c_str(),
                     static_cast<unsigned long long>(k.blocks_sampled),
                     static_cast<unsigned long long>(k.blocks_launched));
        for (const auto& [pc, s] : k.sites) {
            std::fprintf(out, "site %s 0x%llx %s%u %llu %llu %llu %llu\n", name.c_str(),
                         static_cast<unsigned long long>(site_offset(pc)), s.write ? "W" : "R", s.size,
                         static_cast<unsigned long long>(s.count), static_cast<unsigned long long>(s.wavefronts),
                         static_cast<unsigned long long>(s.ideal), static_cast<unsigned long long>(s.lanes));
        }
    }
    if (out != stderr) std::fclose(out);
}

struct AtExit {
    ~AtExit() { write_report(); }
} g_at_exit;

// The model on accesses whose wavefronts are known (run at the first
// launch; a failure aborts with the case): one word a lane, consecutive (1)
// or two words apart (2: two lanes a bank), one word for all (a broadcast:
// 1); 16 bytes a lane, consecutive (4 quarter-warps, 1 each), or eight rows
// 64 bytes apart a quarter-warp (2 of 8 bank groups: 4 each, 16) or 80
// bytes apart (the padded tables: 1 each, 4); 8 bytes a lane 256 bytes apart
// (each half-warp's 16 lanes on one bank pair: 16 each, 32); 16 bytes a
// lane with one quarter-warp's on one bank group and the others' on one
// word (8 + 3). And the
// vectorizer: four consecutive words of one site, 16-byte aligned, one
// 16-byte access; three, from an 8-byte boundary, an 8- and a 4-byte one.
void self_test() {
    struct Case {
        const char* what;
        unsigned size, stride, expect;
    };
    const Case cases[] = {
        {"4-byte consecutive", 4, 4, 1},     {"4-byte two words apart", 4, 8, 2}, {"4-byte broadcast", 4, 0, 1},
        {"16-byte consecutive", 16, 16, 4},  {"16-byte rows 64 B apart", 16, 64, 16},
        {"16-byte rows 80 B apart", 16, 80, 4}, {"8-byte 256 B apart", 8, 256, 32},
    };
    auto expect = [](const char* what, const std::vector<Lane>& lanes, unsigned want) {
        const unsigned got = wavefronts(lanes).first;
        if (got != want) {
            std::fprintf(stderr, "bank model self-test: %s: %u wavefronts, expected %u\n", what, got, want);
            std::abort();
        }
    };
    for (const Case& c : cases) {
        std::vector<Lane> lanes;
        for (unsigned l = 0; l < 32; ++l) lanes.push_back(Lane{l, 4096 + uintptr_t{l} * c.stride, c.size});
        expect(c.what, lanes, c.expect);
    }
    // The phases are quarter-warps for 16 bytes, not half-warps: lanes 0-7
    // on one bank group (rows 128 bytes apart: 8 each), the rest on one
    // 16-byte word of another (a broadcast, 1 a quarter-warp): 8 + 3,
    // where half-warps would give 8 + 1.
    std::vector<Lane> lanes;
    for (unsigned l = 0; l < 32; ++l) lanes.push_back(Lane{l, l < 8 ? 4096 + uintptr_t{l} * 128 : 8192 + 16, 16});
    expect("16-byte, one quarter-warp on one bank group", lanes, 11);
    auto run = [](uintptr_t first, int n) {
        std::vector<Event> log;
        for (int i = 0; i < n; ++i) log.push_back(Event{1, first + 4 * uintptr_t(i), 0, 4, false});
        std::vector<unsigned> sizes;
        for (const Event& e : vectorize(log)) sizes.push_back(e.size);
        return sizes;
    };
    if (run(4096, 4) != std::vector<unsigned>{16} || run(4104, 3) != std::vector<unsigned>{8, 4}) {
        std::fprintf(stderr, "bank model self-test: the vectorizer's runs\n");
        std::abort();
    }
}

}  // namespace

// ---- called by the fake driver and the runtime (EMU_BANKS) ----------------

void emu_banks_launch(const char* kernel, const void* const* buffers, const size_t* bytes, int count,
                      unsigned blocks) {
    static const bool tested = (self_test(), true);
    (void)tested;
    if (const char* s = std::getenv("GATELOOP_BANKS_BLOCKS")) g_sample_blocks = static_cast<unsigned>(std::atoi(s));
    if (const char* s = std::getenv("GATELOOP_BANKS_VECTORIZE")) g_vectorize = std::strcmp(s, "0") != 0;
    if (const char* s = std::getenv("GATELOOP_BANKS_TRACE")) {
        g_trace_site = static_cast<uintptr_t>(std::strtoull(s, nullptr, 16));
        const char* c = std::getenv("GATELOOP_BANKS_TRACE_COUNT");
        g_trace_left = c != nullptr ? static_cast<unsigned>(std::atoi(c)) : 8;
    }
    g_range_count = std::min(count, 4);
    for (int i = 0; i < g_range_count; ++i) {
        const auto first = reinterpret_cast<uintptr_t>(buffers[i]);
        g_ranges[i] = Range{first, first + bytes[i]};
    }
    g_current = &g_kernels[kernel];
    g_current->blocks_launched += blocks;
    g_sampled_this_launch = 0;
}

void emu_banks_block_begin() {
    g_on = g_current != nullptr && g_sampled_this_launch < g_sample_blocks;
    std::fill(std::begin(g_epoch), std::end(g_epoch), 0u);
    std::fill(std::begin(g_mute), std::end(g_mute), 0u);
}

void emu_banks_block_end(unsigned threads) {
    if (!g_on) return;
    g_on = false;
    ++g_sampled_this_launch;
    ++g_current->blocks_sampled;
    process_block(threads);
}

void emu_banks_barrier() { ++g_epoch[emu_thread_rank()]; }

// ---- the tensor-core tiles, as the GPU reads and writes them ---------------
// (Each logged at its caller's site: include/mma.h's inline functions are
// inlined into the kernel.)

void emu_banks_mute(int delta) { g_mute[emu_thread_rank()] += static_cast<uint32_t>(delta); }

// ldmatrix .x4 of a 16 × 16 tile of 16-bit elements whose 16 lines (rows of
// a row-major tile, columns of a column-major one) start `stride` bytes
// apart: lane l reads line l % 8 + 8·(l / 8 % 2), half l / 16.
void emu_banks_tile_ldsm(const void* p, size_t stride) {
    void* pc = __builtin_return_address(0);
    const unsigned l = emu_thread_rank() % 32;
    const auto* at = static_cast<const char*>(p) + (l % 8 + 8 * (l / 8 % 2)) * stride + 16 * (l / 16);
    record(at, 16, false, pc);
}

// One lane's address of a row given to ldmatrix (lanes below 8·count).
void emu_banks_ldmatrix_row(const void* row, int count) {
    void* pc = __builtin_return_address(0);
    if (emu_thread_rank() % 32 < static_cast<unsigned>(8 * count)) record(row, 16, false, pc);
}

// 4-byte elements at (row, col) of a tile whose element (r, c) is at
// p + (row_major ? r·ld + c : c·ld + r) · 4: one access a pair.
void emu_banks_tile_words(const void* p, unsigned ld, bool row_major, const int (*rc)[2], int n, unsigned width,
                          bool write) {
    void* pc = __builtin_return_address(0);
    for (int i = 0; i < n; ++i) {
        const int r = rc[i][0], c = rc[i][1];
        const size_t at = row_major ? static_cast<size_t>(r) * ld + c : static_cast<size_t>(c) * ld + r;
        record(static_cast<const char*>(p) + 4 * at, width, write, pc);
    }
}

// ---- g++'s ThreadSanitizer hooks (no runtime: these are all of it) ---------

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define EMU_BANKS_HOOKS(N)                                                                              \
    void __tsan_read##N(void* p) { record(p, N, false, __builtin_return_address(0)); }                  \
    void __tsan_write##N(void* p) { record(p, N, true, __builtin_return_address(0)); }                  \
    void __tsan_unaligned_read##N(void* p) { record(p, N, false, __builtin_return_address(0)); }        \
    void __tsan_unaligned_write##N(void* p) { record(p, N, true, __builtin_return_address(0)); }
EMU_BANKS_HOOKS(1)
EMU_BANKS_HOOKS(2)
EMU_BANKS_HOOKS(4)
EMU_BANKS_HOOKS(8)
EMU_BANKS_HOOKS(16)
#undef EMU_BANKS_HOOKS
void __tsan_read_range(void* p, unsigned long n) { record(p, static_cast<unsigned>(std::min(n, 16ul)), false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { record(p, static_cast<unsigned>(std::min(n, 16ul)), true, __builtin_return_address(0)); }
// cuda/check.cu's atomics (emu.h's atomicMin, atomicAdd, __threadfence),
// as the uninstrumented build does them (seq_cst).
long long __tsan_atomic64_load(const volatile long long* p, int) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
long long __tsan_atomic64_fetch_add(volatile long long* p, long long v, int) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
int __tsan_atomic64_compare_exchange_weak(volatile long long* p, long long* expected, long long v, int, int) {
    return __atomic_compare_exchange_n(p, expected, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}
}
