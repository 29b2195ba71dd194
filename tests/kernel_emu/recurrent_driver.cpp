// Runs the recurrent kernel's launch (as src/cuda/recurrent.rs `launch`
// does: same GateloopRecurrentParams, grid, 32 × key_groups block, dynamic
// shared bytes) on the CPU emulation of cuda/recurrent.cu, or the three
// launches of its backward (src/cuda/recurrent_grad.rs `backward_into`) on
// that of cuda/recurrent_grad.cu.
//
//   recurrent_emu DIR           (forward_into: h0 optional, h_final written)
//   recurrent_emu --decode DIR  (decode_into: the state updated in place)
//   recurrent_emu --grad DIR    (backward_into; see run_grad)
//
// DIR/dims.txt: B L H K V gate_dim has_h0 dtype rows_per_thread key_groups chunk_len shared_bytes staging
// (the plan of src/cuda/recurrent.rs `plan_with`, checked here against the
// ABI's formulas; dtype: GATELOOP_DTYPE_* of q, k, v, y; staging 0: the
// batched kernel gateloop_recurrent_*, 1: gateloop_recurrent_ahead_*). DIR/{q,k,v,log_gate}.bin,
// with h0 h0.bin, and for --decode state.bin: raw little-endian f32
// (complex as pairs), contiguous [B, L, H, D] / [B, H, K, V]; for f16 / bf16
// q, k, v must already be representable (converted exactly, else the driver
// exits). Writes
// DIR/y.out (widened to f32) and DIR/h_final.out (forward) or DIR/state.out
// (decode). y, h_final and the dynamic shared memory start as NaN, so an
// element no thread writes (or a shared word read before it is written)
// shows; in place, the state buffer holds the initial state.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "emu.h"
#include "gateloop_abi.h"
#include "driver_io.h"

void emu_launch(unsigned grid, EmuDim3 block, const std::function<void()>& kernel);

// The dynamic shared memory of cuda/recurrent.cu's block-scope
// `extern __shared__ float4 smem[]` (namespace gateloop). One block runs at a
// time; it is poisoned before each block. 48 KiB (src/cuda/recurrent.rs
// SHARED_BUDGET) plus the backward sweeps' sequence above their staging
// (src/cuda/recurrent_grad.rs SWEEP_SHARED_LIMIT), the most the launchers
// ever ask for.
namespace gateloop {
constexpr size_t kEmuSharedCapacity = 48 * 1024 + GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES;
alignas(128) float4 smem[kEmuSharedCapacity / sizeof(float4)];
}  // namespace gateloop

using Entry = void (*)(const GateloopRecurrentParams);
// entries_{,ahead_}DTYPE[log2 R].
#define ENTRIES(NAME, DTYPE)                                                          \
    extern "C" {                                                                      \
    void gateloop_recurrent_##NAME##DTYPE##_r1(const GateloopRecurrentParams p);      \
    void gateloop_recurrent_##NAME##DTYPE##_r2(const GateloopRecurrentParams p);      \
    void gateloop_recurrent_##NAME##DTYPE##_r4(const GateloopRecurrentParams p);      \
    void gateloop_recurrent_##NAME##DTYPE##_r8(const GateloopRecurrentParams p);      \
    void gateloop_recurrent_##NAME##DTYPE##_r16(const GateloopRecurrentParams p);     \
    }                                                                                 \
    static const Entry entries_##NAME##DTYPE[5] = {                                   \
        gateloop_recurrent_##NAME##DTYPE##_r1, gateloop_recurrent_##NAME##DTYPE##_r2, \
        gateloop_recurrent_##NAME##DTYPE##_r4, gateloop_recurrent_##NAME##DTYPE##_r8, \
        gateloop_recurrent_##NAME##DTYPE##_r16};
ENTRIES(, f32)
ENTRIES(, f16)
ENTRIES(, bf16)
ENTRIES(ahead_, f32)
ENTRIES(ahead_, f16)
ENTRIES(ahead_, bf16)

template <class T>
static int run(const std::string& dir, bool decode, const Entry* batched, const Entry* ahead) {
    std::ifstream df(dir + "/dims.txt");
    int64_t B, L, H, K, V, G, has_h0, dtype, rows, groups, chunk, shared, staging;
    if (!(df >> B >> L >> H >> K >> V >> G >> has_h0 >> dtype >> rows >> groups >> chunk >> shared >> staging) ||
        (decode && has_h0) || (staging != 0 && staging != 1)) {
        std::fprintf(stderr, "bad dims.txt (decode takes its initial state from state.bin, not h0)\n");
        return 2;
    }
    // src/cuda/recurrent.rs `plan`'s invariants (the ABI's contract).
    const int64_t padded = rows * groups, tile = GATELOOP_RECURRENT_VALUE_TILE;
    const int64_t per_step = 16 * padded + 4 * tile * (1 + groups);
    int ri = 0;
    while (ri < 5 && (int64_t{1} << ri) != rows) ++ri;
    if (ri == 5 || groups < 1 || groups > GATELOOP_RECURRENT_MAX_KEY_GROUPS || padded < K || chunk < 1 ||
        shared != chunk * per_step + GATELOOP_RECURRENT_SEQUENCE_BYTES ||
        static_cast<size_t>(shared) > gateloop::kEmuSharedCapacity) {
        std::fprintf(stderr, "plan outside the ABI's contract\n");
        return 2;
    }
    // The ahead kernel's bound (past it the kernel traps: the launcher must
    // not get there).
    const int64_t items = rows < 16 ? GATELOOP_RECURRENT_AHEAD_ITEMS : GATELOOP_RECURRENT_AHEAD_ITEMS_R16;
    if (staging == 1 && (chunk * rows > tile * items || chunk > groups * items)) {
        std::fprintf(stderr, "ahead plan outside the ABI's contract\n");
        return 2;
    }
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_elems<T>(dir + "/q.bin", qk), k = read_elems<T>(dir + "/k.bin", qk), v = read_elems<T>(dir + "/v.bin", vn);
    auto gate = read_f32(dir + "/log_gate.bin", 2 * gn);
    std::vector<float> h0;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", 2 * sn);
    std::vector<T> y = nan_elems<T>(vn);
    std::vector<float> hf = decode ? read_f32(dir + "/state.bin", 2 * sn) : std::vector<float>(2 * sn, std::nanf(""));

    // GateloopRecurrentParams::for_dims, then the plan and Buffers::bind.
    GateloopRecurrentParams p{};
    bind_common(p, B, L, H, K, V, G, static_cast<uint32_t>(dtype), q.data(), k.data(), v.data(), gate.data(),
                has_h0 ? h0.data() : nullptr, y.data(), hf.data());
    if (decode) p.flags |= GATELOOP_FLAG_STATE_IN_PLACE;
    p.key_groups = static_cast<int32_t>(groups);
    p.padded_key_dim = static_cast<int32_t>(padded);
    p.chunk_len = static_cast<int32_t>(chunk);
    p.value_tiles = static_cast<int32_t>((V + tile - 1) / tile);

    const Entry f = (staging == 1 ? ahead : batched)[ri];
    const unsigned grid = static_cast<unsigned>(B * H * p.value_tiles);
    emu_launch(grid, EmuDim3{static_cast<unsigned>(tile), static_cast<unsigned>(groups), 1}, [&] {
        if (emu_thread_rank() == 0) emu_fill_shared(gateloop::smem, gateloop::kEmuSharedCapacity, static_cast<size_t>(shared));
        __syncthreads();
        f(p);
    });

    write_widened(dir + "/y.out", y);
    write_f32(dir + (decode ? "/state.out" : "/h_final.out"), hf);
    return 0;
}

using GradEntry = void (*)(const GateloopRecurrentGradParams);
// grad_{fwd,bwd}_DTYPE[log2 R] (R ≤ 8) and grad_gate_DTYPE.
#define GRAD_ENTRIES(DTYPE)                                                                        \
    extern "C" {                                                                                   \
    void gateloop_recurrent_grad_fwd_##DTYPE##_r1(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_fwd_##DTYPE##_r2(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_fwd_##DTYPE##_r4(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_fwd_##DTYPE##_r8(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_bwd_##DTYPE##_r1(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_bwd_##DTYPE##_r2(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_bwd_##DTYPE##_r4(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_bwd_##DTYPE##_r8(const GateloopRecurrentGradParams p);            \
    void gateloop_recurrent_grad_gate_##DTYPE(const GateloopRecurrentGradParams p);                \
    }                                                                                              \
    static const GradEntry grad_fwd_##DTYPE[4] = {                                                 \
        gateloop_recurrent_grad_fwd_##DTYPE##_r1, gateloop_recurrent_grad_fwd_##DTYPE##_r2,        \
        gateloop_recurrent_grad_fwd_##DTYPE##_r4, gateloop_recurrent_grad_fwd_##DTYPE##_r8};       \
    static const GradEntry grad_bwd_##DTYPE[4] = {                                                 \
        gateloop_recurrent_grad_bwd_##DTYPE##_r1, gateloop_recurrent_grad_bwd_##DTYPE##_r2,        \
        gateloop_recurrent_grad_bwd_##DTYPE##_r4, gateloop_recurrent_grad_bwd_##DTYPE##_r8};
GRAD_ENTRIES(f32)
GRAD_ENTRIES(f16)
GRAD_ENTRIES(bf16)

// The backward: DIR/dims.txt: B L H K V gate_dim has_h0 dtype rows_per_thread
// key_groups chunk_len shared_bytes segments has_dh_final (the plan of
// src/cuda/recurrent_grad.rs `plan`, checked here against the ABI's
// formulas); inputs as the forward's plus dy.bin and, with has_dh_final,
// dh_final.bin. Writes dq.out, dk.out, dv.out (widened), dlog_gate.out and,
// with h0, dh0.out. Every gradient, the workspace and the dynamic shared
// memory start as NaN.
template <class T>
static int run_grad(const std::string& dir, const GradEntry* fwd, const GradEntry* bwd, GradEntry gate) {
    std::ifstream df(dir + "/dims.txt");
    int64_t B, L, H, K, V, G, has_h0, dtype, rows, groups, chunk, shared, segments, has_dhf;
    if (!(df >> B >> L >> H >> K >> V >> G >> has_h0 >> dtype >> rows >> groups >> chunk >> shared >> segments >>
          has_dhf)) {
        std::fprintf(stderr, "bad dims.txt\n");
        return 2;
    }
    const int64_t padded = rows * groups, tile = GATELOOP_RECURRENT_VALUE_TILE, seg = GATELOOP_RECURRENT_GRAD_SEGMENT;
    const int64_t per_step = 16 * padded + 4 * tile * (2 + groups);
    int ri = 0;
    while (ri < 4 && (int64_t{1} << ri) != rows) ++ri;
    if (ri == 4 || groups < 1 || groups > GATELOOP_RECURRENT_MAX_KEY_GROUPS || (rows < 8 && groups != 1) ||
        padded < K || K > GATELOOP_RECURRENT_GRAD_GATE_BLOCK || chunk < 1 || seg % chunk != 0 ||
        shared != chunk * per_step + GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES ||
        static_cast<size_t>(shared) > gateloop::kEmuSharedCapacity ||
        segments != (L + seg - 1) / seg) {
        std::fprintf(stderr, "plan outside the ABI's contract\n");
        return 2;
    }
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_elems<T>(dir + "/q.bin", qk), k = read_elems<T>(dir + "/k.bin", qk), v = read_elems<T>(dir + "/v.bin", vn);
    auto dy = read_elems<T>(dir + "/dy.bin", vn);
    auto gate_in = read_f32(dir + "/log_gate.bin", 2 * gn);
    std::vector<float> h0, dhf;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", 2 * sn);
    if (has_dhf) dhf = read_f32(dir + "/dh_final.bin", 2 * sn);
    std::vector<T> dq = nan_elems<T>(qk), dk = nan_elems<T>(qk), dv = nan_elems<T>(vn);
    std::vector<float> dg(2 * gn, std::nanf("")), dh0(has_h0 ? 2 * sn : 0, std::nanf(""));
    const int64_t tiles = (V + tile - 1) / tile;
    const size_t ck = 2 * B * H * segments * K * V, part = tiles * B * H * L * K;
    std::vector<float> ws(2 * ck + 2 * part, std::nanf(""));

    // GateloopRecurrentParams::for_dims and GradBuffers::bind into `fwd`
    // (y and h_final null), then the gradient fields as backward_into sets them.
    GateloopRecurrentGradParams p{};
    bind_common(p.fwd, B, L, H, K, V, G, static_cast<uint32_t>(dtype), q.data(), k.data(), v.data(), gate_in.data(),
                has_h0 ? h0.data() : nullptr, nullptr, nullptr);
    p.fwd.key_groups = static_cast<int32_t>(groups);
    p.fwd.padded_key_dim = static_cast<int32_t>(padded);
    p.fwd.chunk_len = static_cast<int32_t>(chunk);
    p.fwd.value_tiles = static_cast<int32_t>(tiles);
    p.dy = dy.data();
    p.dh_final = has_dhf ? dhf.data() : nullptr;
    p.dq = dq.data();
    p.dk = dk.data();
    p.dv = dv.data();
    p.dlog_gate = dg.data();
    p.dh0 = has_h0 ? dh0.data() : nullptr;
    p.checkpoints = ws.data();
    p.adjoints = ws.data() + ck;
    p.partial_dq = ws.data() + 2 * ck;
    p.partial_dk = ws.data() + 2 * ck + part;
    p.dy_strides = p.dv_strides = seq(L, H, V);
    p.dq_strides = p.dk_strides = seq(L, H, K);
    p.dgate_strides = seq(L, H, G);
    p.dh_final_strides = p.dh0_strides = GateloopStateStrides{H * K * V, K * V, V};
    p.segments = segments;

    const unsigned grid = static_cast<unsigned>(B * H * tiles);
    for (const GradEntry f : {fwd[ri], bwd[ri]}) {
        emu_launch(grid, EmuDim3{static_cast<unsigned>(tile), static_cast<unsigned>(groups), 1}, [&] {
            if (emu_thread_rank() == 0) emu_fill_shared(gateloop::smem, gateloop::kEmuSharedCapacity, static_cast<size_t>(shared));
            __syncthreads();
            f(p);
        });
    }
    emu_launch(static_cast<unsigned>(B * H * segments), EmuDim3{GATELOOP_RECURRENT_GRAD_GATE_BLOCK, 1, 1}, [&] {
        if (emu_thread_rank() == 0) {
            emu_fill_shared(gateloop::smem, gateloop::kEmuSharedCapacity, GATELOOP_RECURRENT_GRAD_GATE_SHARED_BYTES);
        }
        __syncthreads();
        gate(p);
    });

    write_widened(dir + "/dq.out", dq);
    write_widened(dir + "/dk.out", dk);
    write_widened(dir + "/dv.out", dv);
    write_f32(dir + "/dlog_gate.out", dg);
    if (has_h0) write_f32(dir + "/dh0.out", dh0);
    return 0;
}

int main(int argc, char** argv) {
    const bool decode = argc == 3 && std::string(argv[1]) == "--decode";
    const bool grad = argc == 3 && std::string(argv[1]) == "--grad";
    if (argc != 2 && !decode && !grad) {
        std::fprintf(stderr, "usage: %s [--decode | --grad] DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[argc - 1];
    std::ifstream df(dir + "/dims.txt");
    int64_t skip, dtype;
    for (int i = 0; i < 7; ++i) df >> skip;
    if (!(df >> dtype)) {
        std::fprintf(stderr, "bad dims.txt\n");
        return 2;
    }
    if (grad) {
        switch (dtype) {
            case GATELOOP_DTYPE_F32: return run_grad<float>(dir, grad_fwd_f32, grad_bwd_f32, gateloop_recurrent_grad_gate_f32);
            case GATELOOP_DTYPE_F16: return run_grad<__half>(dir, grad_fwd_f16, grad_bwd_f16, gateloop_recurrent_grad_gate_f16);
            case GATELOOP_DTYPE_BF16:
                return run_grad<__nv_bfloat16>(dir, grad_fwd_bf16, grad_bwd_bf16, gateloop_recurrent_grad_gate_bf16);
            default: std::fprintf(stderr, "bad dtype %lld\n", static_cast<long long>(dtype)); return 2;
        }
    }
    switch (dtype) {
        case GATELOOP_DTYPE_F32: return run<float>(dir, decode, entries_f32, entries_ahead_f32);
        case GATELOOP_DTYPE_F16: return run<__half>(dir, decode, entries_f16, entries_ahead_f16);
        case GATELOOP_DTYPE_BF16: return run<__nv_bfloat16>(dir, decode, entries_bf16, entries_ahead_bf16);
        default: std::fprintf(stderr, "bad dtype %lld\n", static_cast<long long>(dtype)); return 2;
    }
}
