// What the emulator drivers (driver.cpp, chunk_driver.cpp,
// attention_driver.cpp, recurrent_driver.cpp) share: raw little-endian f32
// files, as tests/emu_support writes and reads them, the contiguous
// [B, L, H, D] strides of the launchers, and the dynamic shared memory's
// poisoning.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gateloop_abi.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif

// Prepares a block's dynamic shared memory (the driver's buffer of `cap`
// bytes): its first `bytes` (the launch's dynamic size) filled with 0xff
// (NaN as f32), so a word read before it is written poisons the result;
// under AddressSanitizer the rest poisoned, so a kernel that uses more than
// the host gave it aborts, as it would fault (or corrupt) on a GPU. Call from
// one thread before the block's first barrier.
static void emu_fill_shared(void* buf, size_t cap, size_t bytes) {
    if (bytes > cap) std::abort();
    unsigned char* b = static_cast<unsigned char*>(buf);
    ASAN_UNPOISON_MEMORY_REGION(b, cap);
    std::memset(b, 0xff, bytes);
    ASAN_POISON_MEMORY_REGION(b + bytes, cap - bytes);
}

static std::vector<float> read_f32(const std::string& path, size_t n) {
    std::vector<float> x(n);
    std::ifstream f(path, std::ios::binary);
    if (!f.read(reinterpret_cast<char*>(x.data()), static_cast<std::streamsize>(n * 4))) {
        std::fprintf(stderr, "cannot read %zu f32 from %s\n", n, path.c_str());
        std::exit(2);
    }
    return x;
}
static void write_f32(const std::string& path, const std::vector<float>& x) {
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * 4));
}
static GateloopSeqStrides seq(int64_t L, int64_t H, int64_t D) { return GateloopSeqStrides{L * H * D, H * D, D}; }
