// Runs the device-side gate check (cuda/check.cu: one launch, as
// src/cuda/check.rs `log_gate` does) on the CPU emulation of the kernel.
//
//   check_emu DIR
//
// DIR/dims.txt: n grid (complex elements; blocks of GATELOOP_CHECK_THREADS,
// the grid given so a test can take the grid-stride rounds the launcher's
// grid would not). DIR/log_gate.bin: n complex f32, interleaved. The result
// words start as the launcher sets them (n, 0, 0). Writes DIR/result.txt:
// "first re_bits im_bits blocks_done" — result[0], the f32 pair of
// result[1] as bit patterns, result[2].
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "emu.h"
#include "gateloop_abi.h"
#include "driver_io.h"

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel);
extern "C" void gateloop_check_log_gate(const GateloopCheckParams p);

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: check_emu DIR\n");
        return 2;
    }
    const std::string dir = argv[1];
    std::ifstream dims(dir + "/dims.txt");
    int64_t n = 0, grid = 0;
    if (!(dims >> n >> grid) || n < 1 || grid < 1 || grid > GATELOOP_CHECK_MAX_BLOCKS) {
        std::fprintf(stderr, "check_emu: bad dims.txt\n");
        return 2;
    }
    const std::vector<float> gate = read_f32(dir + "/log_gate.bin", 2 * static_cast<size_t>(n));
    std::vector<int64_t> result = {n, 0, 0};
    static_assert(GATELOOP_CHECK_RESULT_WORDS == 3, "the result words written below");
    const GateloopCheckParams p{gate.data(), result.data(), n};
    emu_launch(static_cast<unsigned>(grid), GATELOOP_CHECK_THREADS, [&] { gateloop_check_log_gate(p); });
    uint32_t re_bits, im_bits;
    std::memcpy(&re_bits, reinterpret_cast<const unsigned char*>(&result[1]), 4);
    std::memcpy(&im_bits, reinterpret_cast<const unsigned char*>(&result[1]) + 4, 4);
    std::FILE* f = std::fopen((dir + "/result.txt").c_str(), "w");
    if (f == nullptr) return 1;
    std::fprintf(f, "%" PRId64 " %" PRIu32 " %" PRIu32 " %" PRId64 "\n", result[0], re_bits, im_bits, result[2]);
    return std::fclose(f) == 0 ? 0 : 1;
}
