// Runs the chunked forward's three launches (as src/cuda/chunk.rs `launch`
// does: same params, workspace layout, grids, 256 threads, dynamic shared
// bytes) or the chunked backward's six (as src/cuda/chunk_grad.rs
// `backward_into` does) on the CPU emulation of cuda/chunk.cu and
// cuda/chunk_grad.cu, in the element type dims.txt names.
//
//   chunk_emu DIR              (forward: state, carry, output)
//   chunk_emu --sequential DIR (forward: state_seq, output)
//   chunk_emu --fragments [--sequential] DIR
//                              (forward, f16 / bf16: the output launch on
//                              register fragments, output_frag)
//   chunk_emu --backward [--sequential] DIR
//                              (backward, complex gates: state, grad_w, carry,
//                              adjoint carry, grad_qk, grad_dv; state_seq and
//                              grad_w_seq for the first four)
//
// DIR/dims.txt: B L H K V gate_dim has_h0 complex exact dtype (dtype:
// GATELOOP_DTYPE_* of q, k, v, y, dy, dq, dk, dv: the `_f32` / `_f16` /
// `_bf16` entry points).
// DIR/shared.txt (optional): the host launchers' dynamic shared bytes for
// that dtype (src/cuda/chunk.rs and chunk_grad.rs `shared_bytes`,
// chunk.rs `sequential_shared_bytes`, `fragment_output_shared_bytes` (0 for
// f32)): state output w qk dv state_seq output_frag. When present the launches take those (a kernel given less traps,
// one using more than it is given trips AddressSanitizer) and the driver
// fails unless they equal its own layout sums below, so the host's numbers
// are checked against the kernels, not only the driver's.
// DIR/{q,k,v,log_gate}.bin and, with h0, h0.bin: raw little-endian f32,
// contiguous [B, L, H, D] / [B, H, K, V]; log_gate and h0 complex (re, im
// pairs) when `complex`, real otherwise; for f16 / bf16, q, k, v and dy must
// already be representable in the type (converted exactly, else the driver
// exits; driver_io.h `read_elems`), and y, dq, dk, dv are written widened to
// f32. Forward: writes DIR/{y,h_final}.out
// (h_final complex or real like h0). Backward: also reads DIR/dy.bin and,
// when present, DIR/dh_final.bin (complex); writes DIR/{dq,dk,dv,dlog_gate}.out
// and, with h0, DIR/dh0.out. Outputs, workspace and shared memory start as
// NaN, so an element no kernel writes (or a shared word read before it is
// written) shows.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <functional>
#include <string>
#include <vector>
#include <type_traits>

#include "emu.h"
#include "gateloop_abi.h"
#include "driver_io.h"

void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel);

// The dynamic shared memory of cuda/chunk.cu's `extern __shared__ smem[]`
// (declared at block scope in namespace gateloop::chunk). One block runs at a
// time, so one buffer serves every block; it is poisoned before each block.
namespace gateloop::chunk {
constexpr size_t kEmuSharedCapacity = 256 * 1024;
alignas(128) unsigned char smem[kEmuSharedCapacity];
}  // namespace gateloop::chunk

void emu_expect_shared(const void* p, const char* what) {
    emu_expect_in(p, gateloop::chunk::smem, sizeof(gateloop::chunk::smem), what);
}

extern "C" {
void gateloop_chunk_carry_c(const GateloopChunkParams p);
void gateloop_chunk_carry_r(const GateloopChunkParams p);
void gateloop_chunk_grad_adjoint_carry_c(const GateloopChunkGradParams g);
void gateloop_chunk_grad_adjoint_carry_r(const GateloopChunkGradParams g);
}

// The entry points of one element type: state and output kernels indexed
// [complex][exact], and the backward's grad_w, grad_qk, grad_dv, grad_w_seq
// indexed [complex].
using Entry = void (*)(const GateloopChunkParams);
using GradEntry = void (*)(const GateloopChunkGradParams);
struct ChunkEntries {
    Entry state[2][2], state_seq[2][2], output[2][2];
    GradEntry w[2], qk[2], dv[2], w_seq[2], dh0[2];
};
#define CHUNK_ENTRIES(DTYPE)                                                                                      \
    extern "C" {                                                                                                  \
    void gateloop_chunk_state_##DTYPE##_c_exact(const GateloopChunkParams p);                                     \
    void gateloop_chunk_state_##DTYPE##_c_fast(const GateloopChunkParams p);                                      \
    void gateloop_chunk_state_##DTYPE##_r_exact(const GateloopChunkParams p);                                     \
    void gateloop_chunk_state_##DTYPE##_r_fast(const GateloopChunkParams p);                                      \
    void gateloop_chunk_state_seq_##DTYPE##_c_exact(const GateloopChunkParams p);                                 \
    void gateloop_chunk_state_seq_##DTYPE##_c_fast(const GateloopChunkParams p);                                  \
    void gateloop_chunk_state_seq_##DTYPE##_r_exact(const GateloopChunkParams p);                                 \
    void gateloop_chunk_state_seq_##DTYPE##_r_fast(const GateloopChunkParams p);                                  \
    void gateloop_chunk_output_##DTYPE##_c_exact(const GateloopChunkParams p);                                    \
    void gateloop_chunk_output_##DTYPE##_c_fast(const GateloopChunkParams p);                                     \
    void gateloop_chunk_output_##DTYPE##_r_exact(const GateloopChunkParams p);                                    \
    void gateloop_chunk_output_##DTYPE##_r_fast(const GateloopChunkParams p);                                     \
    void gateloop_chunk_grad_w_##DTYPE##_c(const GateloopChunkGradParams g);                                      \
    void gateloop_chunk_grad_qk_##DTYPE##_c(const GateloopChunkGradParams g);                                     \
    void gateloop_chunk_grad_dv_##DTYPE##_c(const GateloopChunkGradParams g);                                     \
    void gateloop_chunk_grad_w_seq_##DTYPE##_c(const GateloopChunkGradParams g);                                  \
    void gateloop_chunk_grad_w_##DTYPE##_r(const GateloopChunkGradParams g);                                      \
    void gateloop_chunk_grad_qk_##DTYPE##_r(const GateloopChunkGradParams g);                                     \
    void gateloop_chunk_grad_dv_##DTYPE##_r(const GateloopChunkGradParams g);                                     \
    void gateloop_chunk_grad_w_seq_##DTYPE##_r(const GateloopChunkGradParams g);                                  \
    void gateloop_chunk_grad_dh0_##DTYPE##_c(const GateloopChunkGradParams g);                                    \
    void gateloop_chunk_grad_dh0_##DTYPE##_r(const GateloopChunkGradParams g);                                    \
    }                                                                                                             \
    static const ChunkEntries chunk_##DTYPE = {                                                                   \
        {{gateloop_chunk_state_##DTYPE##_r_fast, gateloop_chunk_state_##DTYPE##_r_exact},                          \
         {gateloop_chunk_state_##DTYPE##_c_fast, gateloop_chunk_state_##DTYPE##_c_exact}},                         \
        {{gateloop_chunk_state_seq_##DTYPE##_r_fast, gateloop_chunk_state_seq_##DTYPE##_r_exact},                  \
         {gateloop_chunk_state_seq_##DTYPE##_c_fast, gateloop_chunk_state_seq_##DTYPE##_c_exact}},                 \
        {{gateloop_chunk_output_##DTYPE##_r_fast, gateloop_chunk_output_##DTYPE##_r_exact},                        \
         {gateloop_chunk_output_##DTYPE##_c_fast, gateloop_chunk_output_##DTYPE##_c_exact}},                       \
        {gateloop_chunk_grad_w_##DTYPE##_r, gateloop_chunk_grad_w_##DTYPE##_c},                                     \
        {gateloop_chunk_grad_qk_##DTYPE##_r, gateloop_chunk_grad_qk_##DTYPE##_c},                                   \
        {gateloop_chunk_grad_dv_##DTYPE##_r, gateloop_chunk_grad_dv_##DTYPE##_c},                                   \
        {gateloop_chunk_grad_w_seq_##DTYPE##_r, gateloop_chunk_grad_w_seq_##DTYPE##_c},                             \
        {gateloop_chunk_grad_dh0_##DTYPE##_r, gateloop_chunk_grad_dh0_##DTYPE##_c}};
CHUNK_ENTRIES(f32)
CHUNK_ENTRIES(f16)
CHUNK_ENTRIES(bf16)

// The register-fragment output kernels (16-bit inputs), [complex][exact].
using FragTable = Entry[2][2];
#define FRAG_ENTRIES(DTYPE)                                                                                       \
    extern "C" {                                                                                                  \
    void gateloop_chunk_output_frag_##DTYPE##_c_exact(const GateloopChunkParams p);                               \
    void gateloop_chunk_output_frag_##DTYPE##_c_fast(const GateloopChunkParams p);                                \
    void gateloop_chunk_output_frag_##DTYPE##_r_exact(const GateloopChunkParams p);                               \
    void gateloop_chunk_output_frag_##DTYPE##_r_fast(const GateloopChunkParams p);                                \
    }                                                                                                             \
    static const FragTable frag_##DTYPE = {                                                                       \
        {gateloop_chunk_output_frag_##DTYPE##_r_fast, gateloop_chunk_output_frag_##DTYPE##_r_exact},               \
        {gateloop_chunk_output_frag_##DTYPE##_c_fast, gateloop_chunk_output_frag_##DTYPE##_c_exact}};
FRAG_ENTRIES(f16)
FRAG_ENTRIES(bf16)
// --fragments: the output launch takes these (null for f32: an error).
static const FragTable* g_fragments = nullptr;
static bool g_want_fragments = false;

// The staging tiles (every layout below ends with them): a 16×16 f32 tile
// a warp, chunk_common.cuh `kStagingBytes`.
static constexpr int staging = (GATELOOP_CHUNK_THREADS / 32) * 16 * 16 * 4;

// src/cuda/chunk.rs `shared_bytes` for operands of `s` bytes (4: TF32 for
// f32 inputs, row padding 4; 2: f16 / bf16, row padding 8): (state kernel,
// output kernel; the output's prefix tables and raw q, k in rows of
// GATELOOP_CHUNK_PREFIX_LD entries, the state's of KEY_SLAB);
// `walk_slab`: the walks' key channels a block (16 complex, 32 real).
// `sequential_shared_bytes`: the state kernel's layout for slabs of that many
// channels, the raw slab in the staging tiles, (real gates) X_c's row pad,
// then the slab's carried state and decays.
static int walk_slab(bool complex) { return complex ? GATELOOP_CHUNK_KEY_SLAB : GATELOOP_CHUNK_WALK_SLAB_REAL; }
// The planes of a raw input tile (v, dY) staged as an operand: one for bf16
// inputs, exact in their operand (chunk_common.cuh: OpOf::kRawTerms,
// carve_terms), else hi and lo.
template <class T>
static int raw_planes() {
    return std::is_same<T, __nv_bfloat16>::value ? 1 : 2;
}
// chunk.rs `raw_tile_bytes` (`raw_tile_bytes_cols`): a raw value tile (V or
// dY) of `cols` columns of `s`-byte operands in `planes` planes, rows padded
// as ld_tile.
static int raw_tile_bytes(int s, int planes, int cols = GATELOOP_CHUNK_VALUE_TILE) {
    return planes * GATELOOP_CHUNK_LEN * (cols + (s == 4 ? 4 : 8)) * s;
}
// chunk.rs `state_layout_bytes`: the state kernel's layout for slabs of `ch`
// channels, its value tile in `planes` planes and its slab operand in
// `slab_planes` (1: a walk under Fast), the raw slab in the staging tiles'
// bytes with raw_in_staging.
static int32_t state_layout_bytes(int s, int planes, int slab_planes, bool complex, int ch, bool raw_in_staging) {
    const int pad = s == 4 ? 4 : 8, C = GATELOOP_CHUNK_LEN;
    return (complex ? 5 : 3) * C * ch * 4 + (raw_in_staging ? 0 : C * ch * 4) +
           raw_tile_bytes(s, planes) + slab_planes * C * (ch * (complex ? 2 : 1) + pad) * s +
           staging;
}
static int32_t seq_shared_bytes(int s, int planes, int slab_planes, bool complex) {
    const int ch = walk_slab(complex);
    // (Real gates: X_c's row pad, chunk_common.cuh walk_x_pad_bytes.)
    return state_layout_bytes(s, planes, slab_planes, complex, ch, true) + (complex ? 0 : ch * 8 * 4) +
           ch * (complex ? 2 : 1) * GATELOOP_CHUNK_VALUE_TILE * 4 + ch * 8;
}
static void fwd_shared_bytes(int s, int planes, bool complex, int32_t& state, int32_t& output) {
    const int pad = s == 4 ? 4 : 8, C = GATELOOP_CHUNK_LEN, slab = GATELOOP_CHUNK_KEY_SLAB, sub = GATELOOP_CHUNK_SUB_LEN;
    const int width = slab * (complex ? 2 : 1), ld_slab = width + pad, ld_tile = GATELOOP_CHUNK_VALUE_TILE + pad;
    auto split = [&](int rows, int ld) { return 2 * rows * ld * s; };
    const int padded = (complex ? 5 : 3) * C * GATELOOP_CHUNK_PREFIX_LD * 4, padded_raw = C * GATELOOP_CHUNK_PREFIX_LD * 4;
    const int subs = C / sub, pairs = subs * (subs - 1) / 2;
    state = state_layout_bytes(s, planes, 2, complex, slab, false);
    const int slab_phase = split(C, ld_slab) + split(width, ld_tile) + split(pairs * sub, ld_slab) + split((subs - 1) * sub, ld_slab);
    const int final_phase = split(C, ld_tile) + raw_tile_bytes(s, planes);  // P, V
    output = padded + 2 * padded_raw + (slab_phase > final_phase ? slab_phase : final_phase) + subs * sub * sub * 4 + staging;
}

// src/cuda/chunk.rs `fragment_output_shared_bytes` (16-bit operands):
// cuda/chunk_frag.cuh `frag_output_smem_bytes`.
static int32_t frag_shared_bytes(bool complex) {
    const int C = GATELOOP_CHUNK_LEN, slab = GATELOOP_CHUNK_KEY_SLAB, sub = GATELOOP_CHUNK_SUB_LEN;
    const int ld_tile = GATELOOP_CHUNK_VALUE_TILE + 8;
    auto split = [&](int rows) { return 2 * rows * ld_tile * 2; };
    const int prefix = (complex ? 5 : 3) * C * slab * 4, raw = C * slab * 4;
    return prefix + 2 * raw + split(slab * (complex ? 2 : 1)) + split(C) + (C / sub) * sub * sub * 4 +
           (C - sub) * (C - sub + 4) * 4;
}

// src/cuda/chunk_grad.rs `shared_bytes` for operands of `size` bytes:
// (grad_w, grad_qk, grad_dv); grad_w takes the forward state kernel's
// layout (of the gate kind), grad_dv the output kernel's less raw q, the
// anchored rows and the diagonal blocks (adjoint_smem_bytes); grad_qk's
// slab operands are `width` wide, its f32 products' rows width + 8
// (ld_product), its s phase's and inter-chunk phase's dY and V one plane
// each for bf16 inputs (`planes` 1: carve_terms), as grad_w's dY.
static void grad_shared_bytes(int size, int planes, bool complex, int32_t& w, int32_t& qk, int32_t& dv) {
    const int c = GATELOOP_CHUNK_LEN, s = GATELOOP_CHUNK_KEY_SLAB, t = GATELOOP_CHUNK_VALUE_TILE;
    // grad_qk's prefix tables and raw q, k in padded rows, as the output's.
    const int pad = size == 4 ? 4 : 8, sub = GATELOOP_CHUNK_SUB_LEN, ld = GATELOOP_CHUNK_PREFIX_LD;
    const int prefix = (complex ? 5 : 3) * c * ld * 4;
    const int pairs = (c / sub) * (c / sub - 1) / 2, key_subs = c / sub - 1, width = (complex ? 2 : 1) * s;
    fwd_shared_bytes(size, planes, complex, w, dv);
    auto split = [&](int rows, int ld) { return 2 * rows * ld * size; };
    const int dy_tile = raw_tile_bytes(size, planes);
    dv = prefix + c * ld * 4 + std::max(split(c, width + pad) + split(width, t + pad), split(c, t + pad) + dy_tile) +
         staging;
    const int product_ld = width + 8, cross_ld = complex ? 2 * s : ld;
    // The inter-chunk steps: 64 value columns for real bf16 (planes 1), else
    // 32; dY and V in `planes` planes, S_in and D split (chunk_grad.cu:
    // inter_cols, qk_inter_bytes).
    const int inter_cols = !complex && planes == 1 ? t : t / 2;
    const int inter = std::max(2 * raw_tile_bytes(size, planes, inter_cols) + 2 * split(width, inter_cols + pad),
                               2 * c * product_ld * 4);
    const int offdiag = split(pairs * sub, sub + pad) + split(pairs * sub, width + pad) + split(key_subs * sub, width + pad);
    const int products = 4 * (pairs + key_subs) * sub * product_ld + 2 * (c / 2) * cross_ld * 4;
    const int uni = std::max({inter, offdiag, products});
    // The tail: P's blocks for grad_dv (kQkScoresBytes), w', u rows padded
    // and the head sums (real gates: a float an entry, GateRows), the
    // through terms.
    const int tail = 4 * (pairs + c / sub) * sub * sub + 4 * ((complex ? 2 : 1) * 2 * (c * (s + 1) + c) + 2 * s + 2);
    // The s phase's dY, V tiles overlay the union and the tail.
    qk = prefix + 4 * (2 * c * ld + c * c) + std::max(2 * dy_tile, uni + tail);
}

// A block with `bytes` of dynamic shared memory, NaN-poisoned first.
template <class P>
static std::function<void()> with_shared(void (*f)(const P), const P& p, int32_t bytes) {
    return [f, &p, bytes] {
        if (threadIdx.x == 0) {
            emu_fill_shared(gateloop::chunk::smem, gateloop::chunk::kEmuSharedCapacity, static_cast<size_t>(bytes));
        }
        __syncthreads();
        f(p);
    };
}

// The launches with q, k, v, y (and dy, dq, dk, dv) of element type T
// (`dtype`), operands of sizeof(T) bytes (TF32 for f32).
template <class T>
static int run(const std::string& dir, bool backward, bool sequential, int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t G,
               int64_t has_h0, int64_t complex, int64_t exact, uint32_t dtype, const ChunkEntries& e) {
    const int64_t parts = complex ? 2 : 1;
    const size_t qk = B * L * H * K, vn = B * L * H * V, gn = B * L * H * G, sn = B * H * K * V;
    auto q = read_elems<T>(dir + "/q.bin", qk), k = read_elems<T>(dir + "/k.bin", qk), v = read_elems<T>(dir + "/v.bin", vn);
    auto gate = read_f32(dir + "/log_gate.bin", parts * gn);
    std::vector<float> h0;
    if (has_h0) h0 = read_f32(dir + "/h0.bin", parts * sn);
    const float nan = std::nanf("");
    std::vector<T> y = nan_elems<T>(vn);
    std::vector<float> hf(parts * sn, nan);

    // src/cuda/chunk.rs `plan` and `launch`.
    const int64_t nc = (L + GATELOOP_CHUNK_LEN - 1) / GATELOOP_CHUNK_LEN;
    const int64_t tiles = (V + GATELOOP_CHUNK_VALUE_TILE - 1) / GATELOOP_CHUNK_VALUE_TILE;
    const unsigned grid = static_cast<unsigned>(B * H * nc * tiles);
    const unsigned carry_grid = static_cast<unsigned>((sn + GATELOOP_CHUNK_CARRY_THREADS - 1) / GATELOOP_CHUNK_CARRY_THREADS);
    const int64_t decay_len = B * H * nc * G * parts;
    const int64_t workspace_len = nc * parts * sn + decay_len;
    std::vector<float> ws(workspace_len, nan);

    GateloopChunkParams p{};
    bind_common(p, B, L, H, K, V, G, dtype, q.data(), k.data(), v.data(), gate.data(), has_h0 ? h0.data() : nullptr,
                y.data(), hf.data());
    p.ws_decay = ws.data();
    p.ws_state = ws.data() + decay_len;
    p.num_chunks = nc;
    p.value_tiles = tiles;
    fwd_shared_bytes(sizeof(T), raw_planes<T>(), complex, p.state_shared_bytes, p.shared_bytes);
    // state, output, grad_w, grad_qk, grad_dv, state_seq (at the case's
    // precision), output_frag, grad_w_seq.
    int32_t host[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::ifstream sf(dir + "/shared.txt");
    const bool has_host = static_cast<bool>(sf);
    if (has_host && !(sf >> host[0] >> host[1] >> host[2] >> host[3] >> host[4] >> host[5] >> host[6] >> host[7])) {
        std::fprintf(stderr, "bad shared.txt\n");
        return 2;
    }
    // The host's size for one launch (when given), which must equal the driver's.
    auto from_host = [&](int32_t& bytes, int i, const char* what) {
        if (!has_host) return true;
        if (host[i] != bytes) {
            std::fprintf(stderr, "%s: the host launcher gives %d shared bytes, the kernel layout sums to %d\n", what,
                         host[i], bytes);
            return false;
        }
        bytes = host[i];
        return true;
    };
    if (!from_host(p.state_shared_bytes, 0, "state") || !from_host(p.shared_bytes, 1, "output")) return 2;

    const Entry state = e.state[complex != 0][exact != 0];
    Entry output = e.output[complex != 0][exact != 0];
    if (g_want_fragments) {
        // src/cuda/chunk.rs `launch` with ChunkOutput::Fragments.
        if (g_fragments == nullptr || backward) {
            std::fprintf(stderr, "--fragments: forward with f16 or bf16 inputs only\n");
            return 2;
        }
        output = (*g_fragments)[complex != 0][exact != 0];
        p.shared_bytes = frag_shared_bytes(complex != 0);
        if (!from_host(p.shared_bytes, 6, "output_frag")) return 2;
    }
    const Entry state_seq = e.state_seq[complex != 0][exact != 0];
    const unsigned seq_grid =
        static_cast<unsigned>(B * H * tiles * ((K + walk_slab(complex != 0) - 1) / walk_slab(complex != 0)));
    const Entry carry = complex ? gateloop_chunk_carry_c : gateloop_chunk_carry_r;
    if (backward) {
        // src/cuda/chunk_grad.rs `plan`: ws_adj after the forward's
        // workspace, then the h_final sink, then the scores P.
        const int64_t adj_offset = workspace_len, sink_offset = adj_offset + nc * parts * sn;
        const int64_t scores_offset = sink_offset + parts * sn;
        const int64_t c = GATELOOP_CHUNK_LEN;
        ws.assign(scores_offset + B * H * nc * c * c, nan);
        auto dy = read_elems<T>(dir + "/dy.bin", vn);
        std::vector<float> dhf;
        const bool has_dhf = static_cast<bool>(std::ifstream(dir + "/dh_final.bin"));
        if (has_dhf) dhf = read_f32(dir + "/dh_final.bin", parts * sn);
        std::vector<T> dq = nan_elems<T>(qk), dk = nan_elems<T>(qk), dv = nan_elems<T>(vn);
        std::vector<float> dg(parts * gn, nan), dh0(has_h0 ? parts * sn : 0, nan);
        GateloopChunkGradParams g{};
        g.fwd = p;
        g.fwd.ws_decay = ws.data();
        g.fwd.ws_state = ws.data() + decay_len;
        g.fwd.h_final = ws.data() + sink_offset;
        g.ws_adj = ws.data() + adj_offset;
        g.ws_scores = ws.data() + scores_offset;
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
        g.grad_flags = (has_dhf ? GATELOOP_GRAD_FLAG_HAS_DH_FINAL : 0) | (has_h0 ? GATELOOP_GRAD_FLAG_HAS_DH0 : 0);
        grad_shared_bytes(sizeof(T), raw_planes<T>(), complex != 0, g.w_shared_bytes,
                          g.qk_shared_bytes, g.dv_shared_bytes);
        if (!from_host(g.w_shared_bytes, 2, "grad_w") || !from_host(g.qk_shared_bytes, 3, "grad_qk") ||
            !from_host(g.dv_shared_bytes, 4, "grad_dv"))
            return 2;
        const unsigned qk_grid = static_cast<unsigned>(B * H * nc);
        if (sequential) {
            // state_seq and grad_w_seq (src/cuda/chunk_grad.rs with the
            // forward plan's sequential carry), each its own shared size.
            // (Fast: the forward walk's slab operand one plane; grad_w_seq's
            // three terms two.)
            g.fwd.state_shared_bytes =
                seq_shared_bytes(static_cast<int>(sizeof(T)), raw_planes<T>(), exact ? 2 : 1, complex != 0);
            g.w_shared_bytes = seq_shared_bytes(static_cast<int>(sizeof(T)), raw_planes<T>(), 2, complex != 0);
            if (!from_host(g.fwd.state_shared_bytes, 5, "state_seq") || !from_host(g.w_shared_bytes, 7, "grad_w_seq"))
                return 2;
            emu_launch(seq_grid, GATELOOP_CHUNK_THREADS, with_shared(state_seq, g.fwd, g.fwd.state_shared_bytes));
            emu_launch(seq_grid, GATELOOP_CHUNK_THREADS, with_shared(e.w_seq[complex != 0], g, g.w_shared_bytes));
        } else {
            const GradEntry adjoint_carry = complex ? gateloop_chunk_grad_adjoint_carry_c : gateloop_chunk_grad_adjoint_carry_r;
            emu_launch(grid, GATELOOP_CHUNK_THREADS, with_shared(state, g.fwd, g.fwd.state_shared_bytes));
            emu_launch(grid, GATELOOP_CHUNK_THREADS, with_shared(e.w[complex != 0], g, g.w_shared_bytes));
            emu_launch(carry_grid, GATELOOP_CHUNK_CARRY_THREADS, [&] { carry(g.fwd); });
            emu_launch(carry_grid, GATELOOP_CHUNK_CARRY_THREADS, [&] { adjoint_carry(g); });
        }
        // dh0 again from D(0) on CUDA cores (src/cuda/chunk_grad.rs, after either carry).
        if (has_h0) emu_launch(carry_grid, GATELOOP_CHUNK_CARRY_THREADS, [&] { e.dh0[complex != 0](g); });
        emu_launch(qk_grid, GATELOOP_CHUNK_THREADS, with_shared(e.qk[complex != 0], g, g.qk_shared_bytes));
        emu_launch(grid, GATELOOP_CHUNK_THREADS, with_shared(e.dv[complex != 0], g, g.dv_shared_bytes));
        write_widened(dir + "/dq.out", dq);
        write_widened(dir + "/dk.out", dk);
        write_widened(dir + "/dv.out", dv);
        write_f32(dir + "/dlog_gate.out", dg);
        if (has_h0) write_f32(dir + "/dh0.out", dh0);
        return 0;
    }
    if (sequential) {
        // src/cuda/chunk.rs `launch` with ChunkCarry::Sequential: one block
        // per (b, h, value tile, key slab), its own shared size.
        p.state_shared_bytes =
            seq_shared_bytes(static_cast<int>(sizeof(T)), raw_planes<T>(), exact ? 2 : 1, complex != 0);
        if (!from_host(p.state_shared_bytes, 5, "state_seq")) return 2;
        emu_launch(seq_grid, GATELOOP_CHUNK_THREADS, with_shared(state_seq, p, p.state_shared_bytes));
    } else {
        emu_launch(grid, GATELOOP_CHUNK_THREADS, with_shared(state, p, p.state_shared_bytes));
        emu_launch(carry_grid, GATELOOP_CHUNK_CARRY_THREADS, [&] { carry(p); });
    }
    emu_launch(grid, GATELOOP_CHUNK_THREADS, with_shared(output, p, p.shared_bytes));

    write_widened(dir + "/y.out", y);
    write_f32(dir + "/h_final.out", hf);
    return 0;
}

int main(int argc, char** argv) {
    bool backward = false, sequential = false, bad = argc < 2;
    for (int i = 1; i + 1 < argc; ++i) {
        const std::string a = argv[i];
        backward |= a == "--backward";
        sequential |= a == "--sequential";
        g_want_fragments |= a == "--fragments";
        bad |= a != "--backward" && a != "--sequential" && a != "--fragments";
    }
    if (bad) {
        std::fprintf(stderr, "usage: %s [--backward | --fragments] [--sequential] DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[argc - 1];
    std::ifstream df(dir + "/dims.txt");
    int64_t B, L, H, K, V, G, has_h0, complex, exact, dtype;
    if (!(df >> B >> L >> H >> K >> V >> G >> has_h0 >> complex >> exact >> dtype)) {
        std::fprintf(stderr, "bad dims.txt\n");
        return 2;
    }
    const uint32_t t = static_cast<uint32_t>(dtype);
    switch (dtype) {
        case GATELOOP_DTYPE_F32: return run<float>(dir, backward, sequential, B, L, H, K, V, G, has_h0, complex, exact, t, chunk_f32);
        case GATELOOP_DTYPE_F16:
            g_fragments = &frag_f16;
            return run<__half>(dir, backward, sequential, B, L, H, K, V, G, has_h0, complex, exact, t, chunk_f16);
        case GATELOOP_DTYPE_BF16:
            g_fragments = &frag_bf16;
            return run<__nv_bfloat16>(dir, backward, sequential, B, L, H, K, V, G, has_h0, complex, exact, t, chunk_bf16);
        default: std::fprintf(stderr, "bad dtype %lld\n", static_cast<long long>(dtype)); return 2;
    }
}
