// Runs the fused-scan forward's launch sequence (as src/cuda/scan.rs
// `forward_into` does) or the backward's (as src/cuda/scan_grad.rs
// `backward_into` does) on the CPU emulation of the kernels.
//
//   scan_grad_emu --forward DIR   (reduce, carry, forward)
//   scan_grad_emu DIR             (the backward's five launches)
//
// Forward: DIR/dims.txt: B L H K V gate_dim has_h0 dtype warps value_tile
// (dtype: GATELOOP_DTYPE_* of q, k, v, y)
// Backward: DIR/dims.txt: B L H K V gate_dim has_h0 has_dh_final warps fwd_value_tile value_tile
// (f32 only)
// DIR/{q,k,v,log_gate}.bin, for the backward dy.bin, and when present
// {h0,dh_final}.bin: raw little-endian f32 (complex as pairs), contiguous
// [B, L, H, D] / [B, H, K, V]; for an f16 / bf16 forward q, k, v must already
// be representable (converted exactly, else the driver exits). The forward
// writes DIR/{y,h_final}.out (y widened to f32); the backward
// DIR/{dq,dk,dv,dlog_gate}.out and, with h0, DIR/dh0.out. Outputs and
// workspace start as NaN, so an element no kernel writes shows.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "emu.h"
#include "gateloop_abi.h"
#include "driver_io.h"

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel);

// The forward's entry points of one element type, by value tile T = 1, 2, 4.
using ScanEntry = void (*)(const GateloopScanParams);
struct ScanEntries {
    ScanEntry reduce[3];
    ScanEntry forward[3];
    ScanEntry of(const ScanEntry (&e)[3], int64_t tile) const { return e[tile == 1 ? 0 : tile == 2 ? 1 : 2]; }
};
#define SCAN_ENTRIES(DTYPE)                                                                                  \
    extern "C" {                                                                                             \
    void gateloop_scan_reduce_##DTYPE##_v1(const GateloopScanParams p);                                      \
    void gateloop_scan_reduce_##DTYPE##_v2(const GateloopScanParams p);                                      \
    void gateloop_scan_reduce_##DTYPE##_v4(const GateloopScanParams p);                                      \
    void gateloop_scan_forward_##DTYPE##_v1(const GateloopScanParams p);                                     \
    void gateloop_scan_forward_##DTYPE##_v2(const GateloopScanParams p);                                     \
    void gateloop_scan_forward_##DTYPE##_v4(const GateloopScanParams p);                                     \
    }                                                                                                        \
    static const ScanEntries scan_##DTYPE = {                                                                \
        {gateloop_scan_reduce_##DTYPE##_v1, gateloop_scan_reduce_##DTYPE##_v2, gateloop_scan_reduce_##DTYPE##_v4}, \
        {gateloop_scan_forward_##DTYPE##_v1, gateloop_scan_forward_##DTYPE##_v2,                             \
         gateloop_scan_forward_##DTYPE##_v4}};
SCAN_ENTRIES(f32)
SCAN_ENTRIES(f16)
SCAN_ENTRIES(bf16)

extern "C" {
void gateloop_scan_carry(const GateloopScanParams p);
void gateloop_scan_grad_reduce_f32_v1(const GateloopScanGradParams p);
void gateloop_scan_grad_reduce_f32_v2(const GateloopScanGradParams p);
void gateloop_scan_grad_f32_v1(const GateloopScanGradParams p);
void gateloop_scan_grad_f32_v2(const GateloopScanGradParams p);
void gateloop_scan_grad_carry(const GateloopScanGradParams p);
}


// The forward's params for contiguous inputs (src/cuda/scan.rs
// `forward_into`: GateloopScanParams::for_dims, then the plan's geometry);
// chunk_gate / chunk_state, y and h_final are the caller's.
static GateloopScanParams forward_params(int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t G, uint32_t dtype,
                                         const void* q, const void* k, const void* v, const float* gate, const float* h0,
                                         int64_t warps, int64_t tile) {
    GateloopScanParams f{};
    // y, h_final: set by the caller (the forward's outputs, or null in the backward's recompute).
    bind_common(f, B, L, H, K, V, G, dtype, q, k, v, gate, h0, nullptr, nullptr);
    f.warps = static_cast<int32_t>(warps);
    f.value_tile = static_cast<int32_t>(tile);
    f.chunk_len = GATELOOP_SCAN_STEPS_PER_THREAD * 32 * warps;
    f.num_chunks = (L + f.chunk_len - 1) / f.chunk_len;
    f.value_tiles = (V + tile - 1) / tile;
    return f;
}

// The forward's reduce and carry launches (only when there is more than one
// chunk), as src/cuda/scan.rs `forward_into` enqueues them; `e`: the entry
// points of f.dtype.
static void reduce_and_carry(const GateloopScanParams& f, const ScanEntries& e) {
    if (f.num_chunks <= 1) return;
    const GateloopDims& d = f.dims;
    const unsigned block = static_cast<unsigned>(32 * f.warps);
    const unsigned rgrid = static_cast<unsigned>(d.batch * d.heads * f.value_tiles * (f.num_chunks - 1));
    const unsigned carry_grid =
        static_cast<unsigned>((d.batch * d.heads * d.key_dim * d.value_dim + GATELOOP_SCAN_CARRY_BLOCK - 1) / GATELOOP_SCAN_CARRY_BLOCK);
    const ScanEntry fr = e.of(e.reduce, f.value_tile);
    emu_launch(rgrid, block, [&] { fr(f); });
    emu_launch(carry_grid, GATELOOP_SCAN_CARRY_BLOCK, [&] { gateloop_scan_carry(f); });
}

// The forward's launches (reduce, carry, forward; one chunk: forward only)
// with q, k, v, y of element type T: DIR/dims.txt without its dtype read.
template <class T>
static int run_forward(const std::string& dir, int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t G, int64_t has_h0,
                       uint32_t dtype, int64_t warps, int64_t tile, const ScanEntries& e) {
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_elems<T>(dir + "/q.bin", qk), k = read_elems<T>(dir + "/k.bin", qk), v = read_elems<T>(dir + "/v.bin", vn);
    auto gate = read_f32(dir + "/log_gate.bin", 2 * gn);
    std::vector<float> h0;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", 2 * sn);
    GateloopScanParams f = forward_params(B, L, H, K, V, G, dtype, q.data(), k.data(), v.data(), gate.data(),
                                          has_h0 ? h0.data() : nullptr, warps, tile);
    const int64_t nc = f.num_chunks;
    // src/cuda/scan.rs LaunchPlan::workspace_len: chunk_gate (2·B·H·nc·K)
    // then chunk_state (2·B·H·nc·K·V).
    const float nan = std::nanf("");
    std::vector<float> ws(nc > 1 ? 2 * B * H * nc * K * (V + 1) : 0, nan), hf(2 * sn, nan);
    std::vector<T> y = nan_elems<T>(vn);
    if (nc > 1) {
        f.chunk_gate = ws.data();
        f.chunk_state = ws.data() + 2 * B * H * nc * K;
    }
    f.y = y.data();
    f.h_final = hf.data();
    reduce_and_carry(f, e);
    const ScanEntry ff = e.of(e.forward, tile);
    emu_launch(static_cast<unsigned>(B * H * f.value_tiles * nc), static_cast<unsigned>(32 * warps), [&] { ff(f); });
    write_widened(dir + "/y.out", y);
    write_f32(dir + "/h_final.out", hf);
    return 0;
}

int main(int argc, char** argv) {
    const bool forward = argc == 3 && std::string(argv[1]) == "--forward";
    if (argc != 2 && !forward) {
        std::fprintf(stderr, "usage: %s [--forward] DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[argc - 1];
    std::ifstream df(dir + "/dims.txt");
    int64_t B, L, H, K, V, G, has_h0, has_dhf = 0, dtype = GATELOOP_DTYPE_F32, warps, fwd_tile, tile = 0;
    const bool ok = forward ? static_cast<bool>(df >> B >> L >> H >> K >> V >> G >> has_h0 >> dtype >> warps >> fwd_tile)
                            : static_cast<bool>(df >> B >> L >> H >> K >> V >> G >> has_h0 >> has_dhf >> warps >> fwd_tile >> tile);
    if (!ok) {
        std::fprintf(stderr, "bad dims.txt\n");
        return 2;
    }
    if (forward) {
        const uint32_t t = static_cast<uint32_t>(dtype);
        switch (dtype) {
            case GATELOOP_DTYPE_F32: return run_forward<float>(dir, B, L, H, K, V, G, has_h0, t, warps, fwd_tile, scan_f32);
            case GATELOOP_DTYPE_F16: return run_forward<__half>(dir, B, L, H, K, V, G, has_h0, t, warps, fwd_tile, scan_f16);
            case GATELOOP_DTYPE_BF16:
                return run_forward<__nv_bfloat16>(dir, B, L, H, K, V, G, has_h0, t, warps, fwd_tile, scan_bf16);
            default: std::fprintf(stderr, "bad dtype %lld\n", static_cast<long long>(dtype)); return 2;
        }
    }
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_f32(dir + "/q.bin", qk), k = read_f32(dir + "/k.bin", qk), v = read_f32(dir + "/v.bin", vn);
    auto gate = read_f32(dir + "/log_gate.bin", 2 * gn);
    std::vector<float> h0;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", 2 * sn);
    const float nan = std::nanf("");
    GateloopScanParams f = forward_params(B, L, H, K, V, G, GATELOOP_DTYPE_F32, q.data(), k.data(), v.data(), gate.data(),
                                          has_h0 ? h0.data() : nullptr, warps, fwd_tile);
    const int64_t nc = f.num_chunks;
    // src/cuda/scan_grad.rs: the forward's workspace (chunk_gate, 2·B·H·nc·K,
    // then chunk_state, 2·B·H·nc·K·V), then rev_gate and rev_state of the
    // same sizes.
    const int64_t half = nc > 1 ? 2 * B * H * nc * K * (V + 1) : 0;
    const int64_t state_off = 2 * B * H * nc * K;

    auto dy = read_f32(dir + "/dy.bin", vn);
    std::vector<float> dhf;
    if (has_dhf) dhf = read_f32(dir + "/dh_final.bin", 2 * sn);
    std::vector<float> dq(qk, nan), dk(qk, nan), dv(vn, nan), dg(2 * gn, nan), dh0(has_h0 ? 2 * sn : 0, nan);
    const int64_t tiles = (V + tile - 1) / tile;
    std::vector<float> ws(2 * half + 2, nan);
    GateloopScanGradParams g{};
    if (nc > 1) {
        f.chunk_gate = ws.data();
        f.chunk_state = ws.data() + state_off;
        g.rev_gate = ws.data() + half;
        g.rev_state = ws.data() + half + state_off;
    }
    g.fwd = f;
    g.dy = dy.data();
    g.dh_final = has_dhf ? dhf.data() : nullptr;
    g.dq = dq.data();
    g.dk = dk.data();
    g.dv = dv.data();
    g.dlog_gate = dg.data();
    g.dh0 = has_h0 ? dh0.data() : nullptr;
    g.dy_strides = g.dv_strides = seq(L, H, V);
    g.dq_strides = g.dk_strides = seq(L, H, K);
    g.dgate_strides = seq(L, H, G);
    g.dh_final_strides = g.dh0_strides = GateloopStateStrides{H * K * V, K * V, V};
    g.value_tile = static_cast<int32_t>(tile);
    g.value_tiles = tiles;

    const unsigned block = static_cast<unsigned>(32 * warps);
    const unsigned carry_grid = static_cast<unsigned>((B * H * K * V + GATELOOP_SCAN_CARRY_BLOCK - 1) / GATELOOP_SCAN_CARRY_BLOCK);
    if (nc > 1) {
        reduce_and_carry(g.fwd, scan_f32);
        auto gr = tile == 1 ? gateloop_scan_grad_reduce_f32_v1 : gateloop_scan_grad_reduce_f32_v2;
        emu_launch(static_cast<unsigned>(B * H * tiles * (nc - 1)), block, [&] { gr(g); });
        emu_launch(carry_grid, GATELOOP_SCAN_CARRY_BLOCK, [&] { gateloop_scan_grad_carry(g); });
    }
    auto gk = tile == 1 ? gateloop_scan_grad_f32_v1 : gateloop_scan_grad_f32_v2;
    emu_launch(static_cast<unsigned>(B * H * nc), block, [&] { gk(g); });

    write_f32(dir + "/dq.out", dq);
    write_f32(dir + "/dk.out", dk);
    write_f32(dir + "/dv.out", dv);
    write_f32(dir + "/dlog_gate.out", dg);
    if (has_h0) write_f32(dir + "/dh0.out", dh0);
    return 0;
}
