// File I/O and stride helpers shared by the emulator drivers (driver.cpp,
// chunk_driver.cpp): raw little-endian f32 files, as tests/common writes and
// reads them, and the contiguous [B, L, H, D] strides of the launchers.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "gateloop_abi.h"

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
