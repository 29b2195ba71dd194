// Runs the attention forward's launch sequence (as src/cuda/attention.rs
// `forward_into` does: prep, y, state) on the CPU emulation of the kernels.
//
//   attention_emu DIR
//
// DIR/dims.txt: B L H K V gate_dim has_h0 dtype (GATELOOP_DTYPE_* of q, k,
// v, y). DIR/{q,k,v,log_gate}.bin and, with h0, h0.bin: raw little-endian
// f32 (complex as pairs), contiguous [B, L, H, D] / [B, H, K, V]; for f16 /
// bf16 q, k, v must already be representable (converted exactly, else the
// driver exits). Writes DIR/y.out (widened to f32) and DIR/h_final.out.
// Outputs and workspace start as NaN, so an element no kernel writes shows.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "emu.h"
#include "gateloop_abi.h"
#include "driver_io.h"

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel);

// The three entry points of one element type: prep, y, state.
using Entry = void (*)(const GateloopAttentionParams);
struct AttentionEntries {
    Entry prep, y, state;
};
#define ATTENTION_ENTRIES(DTYPE)                                               \
    extern "C" {                                                               \
    void gateloop_attention_prep_##DTYPE(const GateloopAttentionParams p);     \
    void gateloop_attention_##DTYPE(const GateloopAttentionParams p);          \
    void gateloop_attention_state_##DTYPE(const GateloopAttentionParams p);    \
    }                                                                          \
    static const AttentionEntries attention_##DTYPE = {                        \
        gateloop_attention_prep_##DTYPE, gateloop_attention_##DTYPE, gateloop_attention_state_##DTYPE};
ATTENTION_ENTRIES(f32)
ATTENTION_ENTRIES(f16)
ATTENTION_ENTRIES(bf16)

static int64_t div_ceil(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The three launches with q, k, v, y of element type T (`dtype`).
template <class T>
static int run(const std::string& dir, int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t G, int64_t has_h0,
               uint32_t dtype, const AttentionEntries& e) {
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_elems<T>(dir + "/q.bin", qk), k = read_elems<T>(dir + "/k.bin", qk), v = read_elems<T>(dir + "/v.bin", vn);
    auto gate = read_f32(dir + "/log_gate.bin", 2 * gn);
    std::vector<float> h0;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", 2 * sn);
    const float nan = std::nanf("");
    std::vector<T> y = nan_elems<T>(vn);
    std::vector<float> h_final(2 * sn, nan);
    // The launcher's workspace: prefix (2n), suffix (2n), reset (n), prefix_lo (n).
    const size_t n = gn;
    std::vector<float> ws(6 * n, nan);

    GateloopAttentionParams p{};
    bind_common(p, B, L, H, K, V, G, dtype, q.data(), k.data(), v.data(), gate.data(), has_h0 ? h0.data() : nullptr,
                y.data(), h_final.data());
    p.ws_prefix = ws.data();
    p.ws_suffix = ws.data() + 2 * n;
    p.ws_reset = reinterpret_cast<int32_t*>(ws.data() + 4 * n);
    p.ws_prefix_lo = ws.data() + 5 * n;
    p.num_tiles = div_ceil(L, GATELOOP_ATTENTION_TILE);
    p.value_tiles = div_ceil(V, GATELOOP_ATTENTION_VALUE_TILE);
    p.state_key_tiles = div_ceil(K, GATELOOP_ATTENTION_STATE_KEY_TILE);
    p.state_value_tiles = div_ceil(V, GATELOOP_ATTENTION_STATE_VALUE_TILE);

    const unsigned prep_grid = static_cast<unsigned>(div_ceil(B * H * p.num_tiles * G, GATELOOP_ATTENTION_PREP_THREADS));
    emu_launch(prep_grid, GATELOOP_ATTENTION_PREP_THREADS, [&] { e.prep(p); });
    emu_launch(static_cast<unsigned>(B * H * p.num_tiles * p.value_tiles), GATELOOP_ATTENTION_THREADS, [&] { e.y(p); });
    emu_launch(static_cast<unsigned>(B * H * p.state_key_tiles * p.state_value_tiles), GATELOOP_ATTENTION_THREADS,
               [&] { e.state(p); });

    write_widened(dir + "/y.out", y);
    write_f32(dir + "/h_final.out", h_final);
    return 0;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    std::ifstream df(dir + "/dims.txt");
    int64_t B, L, H, K, V, G, has_h0, dtype;
    if (!(df >> B >> L >> H >> K >> V >> G >> has_h0 >> dtype)) {
        std::fprintf(stderr, "bad dims.txt\n");
        return 2;
    }
    const uint32_t t = static_cast<uint32_t>(dtype);
    switch (dtype) {
        case GATELOOP_DTYPE_F32: return run<float>(dir, B, L, H, K, V, G, has_h0, t, attention_f32);
        case GATELOOP_DTYPE_F16: return run<__half>(dir, B, L, H, K, V, G, has_h0, t, attention_f16);
        case GATELOOP_DTYPE_BF16: return run<__nv_bfloat16>(dir, B, L, H, K, V, G, has_h0, t, attention_bf16);
        default: std::fprintf(stderr, "bad dtype %lld\n", static_cast<long long>(dtype)); return 2;
    }
}
