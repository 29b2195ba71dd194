// The chunked BACKWARD of GateLoop (complex gates): the GPU twin of
// src/cpu/chunked_grad.rs. READ that module's doc for the derivation (the
// pre-phase accumulators acc_q, acc_k, acc_d, the gate gradient from w', u and
// the through term); this file maps its three CPU launches onto thread blocks,
// with the same chunks (64), anchors (last step of each 16-step key
// sub-chunk), segmented chunk-local gate prefix (Block::build_prefix, shared
// with the forward through chunk_common.cuh) and the same formulas.
//
// Launches (one stream; the launcher is src/cuda/chunk_grad.rs):
//   1a. the forward's gateloop_chunk_state (tensor cores): U_c, A_c.
//   1b. grad_w, one block per (b, h, chunk, value tile of 64):
//       W_c = [Re Q̃ | −Im Q̃]ᵀ dY (planar 2K × 64), Q̃_n = q_n E(n, −1), per
//       key slab a (2·16 × 64)·(64 × 64) tensor-core product: the state
//       kernel's K̃ᵀ V with Q̃ for K̃ and dY for V (store_slab_gram).
//   2a. the forward's gateloop_chunk_carry: U_c → S_in(c) (h_final to a sink).
//   2b. grad_adjoint_carry, one thread per (b, h, key row, value column):
//       D(last) = dh_final, D(c − 1) = conj(A_c) D(c) + W_c, W_c ← D(c); dh0.
//   3a. grad_qk, one block per (b, h, chunk), looping over key slabs of 16:
//       s = dY Vᵀ (64 × 64, once), then per slab the inter-chunk products
//       S_in dy_n, D v_n, the pre-phase accumulators of the CPU mirror, dq,
//       dk and the gate gradient (per-head gates: the slabs' w', u and
//       through terms summed in shared memory in slab order, then one scan:
//       deterministic, no atomics).
//   3b. grad_dv, one block per (b, h, chunk, value tile of 64):
//       dv = Pᵀ dY + [Re K̃ | Im K̃] [Re D; Im D], the scores P (causal,
//       summed over every key slab) recomputed exactly as the forward's
//       output kernel forms them: it IS that kernel's pass (intra_pass in
//       chunk_common.cuh) with kAdjoint, K̃ for Q̃, D for S, Pᵀ dY for P V.
// Tensor cores: 1b and 3b multiply on tensor cores like the forward (f32
// inputs TF32 m16n16k8, f16 and bf16 inputs bf16 m16n16k16; OpOf picks the
// operand type and says why bf16 for f16), always with three split products (kGradTerms: hi·hi +
// hi·lo + lo·hi, the forward's "exact", ~21 bits for TF32): W_c's and dv's
// products, the anchored off-diagonal score blocks (inner dimension 2·16 per
// slab) and Pᵀ dY; only P's four diagonal 16 × 16 blocks are pairwise f32.
// 3a forms s = dY Vᵀ on tensor cores too (two raw inputs: three split
// products for f32 and f16, one for bf16, exact in its own type), and per
// slab the inter-chunk products S_in dy_n, D v_n (three split products);
// its intra-chunk pairs (the pre-phase accumulators acc_q, acc_k and the
// gate terms, each pair with its own anchored modulus, applied last for the
// gate), dq, dk and the gate scans still use f32 CUDA-core FMAs. 2b is
// elementwise.
// Every modulus exponentiated is exp of a difference ≤ 0 inside one segment;
// off-diagonal sub-chunk pairs use the factorisation
// |E(n, m)| = |E(n, r)| |E(r, m)| at the anchor r (both factors ≤ 1, 0 across
// a reset on either side), diagonal sub-chunk pairs one exp each.
// The gate's terms (w', u) are formed apart from acc_q, acc_k with the modulus
// multiplied LAST (the CPU module doc's "Gate terms: the modulus last"): here
// every pair is pairwise, so an anchored pair applies both of its factors
// |E(r, m)|, |E(n, r)| after s_nm q_n k_m (pair_modulus_factors).
//
// Thread ↔ data maps (256 threads, 8 warps):
//   grad_w:  warp w ↔ the 16 × 16 tile (w / 4, w % 4) of the slab's
//            2·16 × 64 rows of W_c (one accumulator, drained through the
//            warp's staging tile); operands staged by all threads.
//   grad_qk: s = dY Vᵀ: warp w ↔ its tiles (w / 2, 2·(w % 2) + t), t < 2;
//            per slab, X = dY S_inᵀ and Y = V Dᵀ: warp w ↔ tile (w / 2, w % 2)
//            of each; the rest: key channel d = tid % 16 of the slab, steps
//            n = tid / 16 + 16i (i < 4) for dq, dk.
//   grad_dv: warp w ↔ dv tiles (steps 16·(w / 2), columns 16·(2·(w % 2) + t),
//            t < 2) and, w < 6, off-diagonal score block w; the diagonal
//            score blocks thread-strided (the forward output kernel's map).
// Shared memory is dynamic; its size is computed by the host with the same
// layout (src/cuda/chunk_grad.rs: shared_bytes) and checked here (trap).

#include "chunk_common.cuh"

namespace gateloop {
namespace chunk {

constexpr int kAnchors = kSubs - 1; // key sub-chunks with an off-diagonal anchor
// Split products of the backward's tensor-core operands: always three terms
// ("exact"; the f32 backward's GPU tests demand rel L2 ≤ 1e-4).
constexpr int kGradTerms = 3;

// grad_qk's shared memory (grad_w and grad_dv take the forward state and
// output kernels' layouts). After the prefix tables: q, k raw and s (f32,
// live throughout); then a union of the s phase (dY, V tiles as split
// operands) and the slab phase (the anchor tables, then the inter-chunk
// staging: dY, V, S_in, D over kInterCols value columns as split operands,
// reused for the products X, Y in f32); then w', u, the per-head sums and
// the through terms (f32, live across the slab loop). Every region but the
// last two a multiple of 128 bytes. src/cuda/chunk_grad.rs: shared_bytes.
constexpr int kInterCols = kVTile / 2;  // value columns per step of the inter-chunk products
template <class Op>
__host__ __device__ constexpr int ld_inter() {
    return kInterCols + Op::kPad;
}
template <class Op>
__host__ __device__ constexpr int qk_inter_bytes() {
    return cmax(2 * split_bytes<Op>(kChunk, ld_inter<Op>()) + 2 * split_bytes<Op>(2 * kSlab, ld_inter<Op>()),
                2 * kChunk * 2 * kSlab * 4);
}
constexpr int kAnchorBytes = 4 * (kChunk * kAnchors * kSlab + kChunk * kSlab);  // |E(n, r_j)|, |E(r_m, m)|
template <class Op>
__host__ __device__ constexpr int qk_union_bytes() {
    return cmax(2 * split_bytes<Op>(kChunk, ld_tile<Op>()), kAnchorBytes + qk_inter_bytes<Op>());
}
template <class Op>
__host__ __device__ constexpr int qk_smem_bytes() {
    return prefix_bytes<true>() + 4 * (2 * kChunk * kSlab + kChunk * kChunk) + qk_union_bytes<Op>() +
           4 * (2 * 2 * kChunk * kSlab + 2 * 2 * kChunk + 2 * kSlab + 2);
}

// The anchor tables of one slab (after build_prefix, raw q, k loaded):
// wa[(n·kAnchors + j)·kSlab + d] = |E(n, r_j)| for key sub-chunk j < sub(n)
// (else 0), wk[m·kSlab + d] = |E(r_m, m)| for m in sub-chunks 0 .. kSubs − 2,
// r_j = 16 j + 15: the forward's anchored factors (cpu::chunked intra_scores).
template <class B>
__device__ __forceinline__ void anchor_tables(const B& blk, float* wa, float* wk) {
    for (int i = blk.tid; i < kChunk * kAnchors * kSlab; i += kThreads) {
        const int d = i % kSlab;
        const int j = (i / kSlab) % kAnchors;
        const int n = i / (kSlab * kAnchors);
        wa[i] = j < n / kSub ? blk.modulus(n, kSub * j + kSub - 1, blk.col(d)) : 0.f;
    }
    for (int i = blk.tid; i < kChunk * kSlab; i += kThreads) {
        const int d = i % kSlab;
        const int m = i / kSlab;
        const int j = m / kSub;
        wk[i] = j < kAnchors ? blk.modulus(kSub * j + kSub - 1, m, blk.col(d)) : 0.f;
    }
}

// |E(n, m)| for m < n of channel d (table column cl) as two factors (late,
// early) whose product it is: (one exp, 1) inside a sub-chunk, the anchored
// (|E(n, r)|, |E(r, m)|) across sub-chunks. A gate term applies them LAST,
// one by one, to its product of normal-sized factors (s_nm q_n k_m): a
// modulus in f32's subnormal range (or an anchored product of two small
// factors) would otherwise be rounded to a few bits before q and k scale it
// up (cpu::chunked_grad's module doc, "Gate terms: the modulus last").
template <class B>
__device__ __forceinline__ float2 pair_modulus_factors(const B& blk, const float* wa, const float* wk, int n, int m,
                                                       int d, int cl) {
    const int j = m / kSub;
    if (j == n / kSub) return make_float2(blk.modulus(n, m, cl), 1.f);
    return make_float2(wa[(n * kAnchors + j) * kSlab + d], wk[m * kSlab + d]);
}

// ---- 1b. W_c = Σ_n conj(Q̃_n) dy_nᵀ ----------------------------------------------------

template <typename input_t>
__device__ __forceinline__ void grad_w(const GateloopChunkGradParams& g) {
    using Op = typename OpOf<input_t>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    // The forward state kernel's layout: raw q for raw k, dY for V, Q̃ for K̃.
    check_shared(g.w_shared_bytes, state_smem_bytes<Op, true>());
    const GateloopChunkParams& p = g.fwd;
    Block<input_t, true> blk(p, smem);
    // Raw q, the dY tile, [Re Q̃ | −Im Q̃] [n][col] (read as the column-major A = Q̃ᴴ).
    const StateSmem<Op, true> sm(smem, blk.warp);
    float* qraw = sm.raw;
    const Split<Op>& dys = sm.tile;
    const Split<Op>& qe = sm.slab;
    float* staging = sm.staging;

    blk.template load_tile<Op, kGradTerms>(seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h), g.dy_strides, dys);
    for (int64_t d0 = 0; d0 < p.dims.key_dim; d0 += kSlab) {
        if (d0 == 0 || !blk.per_head) blk.build_prefix(d0);  // ends with a barrier
        blk.load_keys(blk.q, p.q_strides, d0, qraw);
        __syncthreads();
        put_inter_queries<Op, kGradTerms>(blk, qraw, qe);
        __syncthreads();
        store_slab_gram<Op, kGradTerms>(blk, qe, dys, d0, staging, g.ws_adj);
        __syncthreads();  // qe, qraw and the prefix tables are rewritten by the next slab
    }
}

// ---- 2b. the adjoint carry ------------------------------------------------------------

__device__ __forceinline__ void grad_adjoint_carry(const GateloopChunkGradParams& g) {
    const GateloopChunkParams& p = g.fwd;
    const int64_t kv = p.dims.key_dim * p.dims.value_dim;
    StateElement e;
    if (!state_element(p.dims, e)) return;
    const CarrySlots cs = carry_slots<2>(p, g.ws_adj, e);
    const float2 d_last = (g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH_FINAL) != 0
                              ? load_complex(g.dh_final, state_index(g.dh_final_strides, e.bhi.b, e.bhi.h, e.row, e.col))
                              : make_float2(0.f, 0.f);
    // D(c − 1) = conj(A_c) D(c) + W_c, each slot W_c replaced by D(c).
    const float2 s = carry_chunks<true>(cs.re, cs.re + kv, cs.chunk_stride, cs.dec, cs.dec_stride, p.num_chunks, d_last);
    if ((g.grad_flags & GATELOOP_GRAD_FLAG_HAS_DH0) != 0) {
        reinterpret_cast<float2*>(g.dh0)[state_index(g.dh0_strides, e.bhi.b, e.bhi.h, e.row, e.col)] = s;
    }
}

// ---- 3a. dq, dk and the gate gradient -------------------------------------------------

// The gate gradient of one gate column over the chunk's first n steps
// (cpu::chunked_grad launch3_chunk's last part): u (in place) becomes its
// exclusive prefix sum from `start` = A ⊙ Σ_j S_in conj(D); then, backwards,
// g_t = conj(Σ_{r ≥ t} w'_r + u_t), the running sum restarted at each reset
// step (whose gradient is 0). `stride` separates consecutive steps in w, u.
template <class B, class Write>
__device__ __forceinline__ void gate_scan(const B& blk, float2* w, float2* u, int stride, float2 start, int cl,
                                          bool zero_first, Write write) {
    float2 run = start;
    for (int n = 0; n < blk.n; ++n) {
        const float2 x = u[n * stride];
        u[n * stride] = run;
        run = make_float2(run.x + x.x, run.y + x.y);
    }
    run = make_float2(0.f, 0.f);
    for (int n = blk.n - 1; n >= 0; --n) {
        float2 out;
        if (blk.rst[n * kSlab + cl] == n) {
            run = make_float2(0.f, 0.f);
            out = run;
        } else {
            run = make_float2(run.x + w[n * stride].x, run.y + w[n * stride].y);
            out = make_float2(run.x + u[n * stride].x, -(run.y + u[n * stride].y));
        }
        // The very first step without h0 multiplies a zero state: exactly 0.
        if (n == 0 && zero_first) out = make_float2(0.f, 0.f);
        write(n, out);
    }
}

template <typename input_t>
__device__ __forceinline__ void grad_qk(const GateloopChunkGradParams& g) {
    using Tr = InputTraits<input_t>;
    using Op = typename OpOf<input_t>::type;
    constexpr int kRawTerms = OpOf<input_t>::kRawTerms;  // dY, V are raw inputs
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(g.qk_shared_bytes, qk_smem_bytes<Op>());
    const GateloopChunkParams& p = g.fwd;
    Block<input_t, true> blk(p, smem, 1);
    float* f = reinterpret_cast<float*>(smem + prefix_bytes<true>());
    float* qraw = f;
    f += kChunk * kSlab;
    float* kraw = f;
    f += kChunk * kSlab;
    float* ds = f;  // [kChunk][kChunk]: s_nm = dy_n · v_m
    f += kChunk * kChunk;
    unsigned char* union_at = reinterpret_cast<unsigned char*>(f);  // the s phase | the slab phase
    float* wa = f;
    f += kChunk * kAnchors * kSlab;
    float* wk = f;
    f += kChunk * kSlab;
    unsigned char* inter = reinterpret_cast<unsigned char*>(f);  // qk_inter_bytes
    f = reinterpret_cast<float*>(union_at + qk_union_bytes<Op>());
    float2* wpr = reinterpret_cast<float2*>(f);  // [kChunk][kSlab]: w'_n of channel d
    f += 2 * kChunk * kSlab;
    float2* upr = reinterpret_cast<float2*>(f);  // [kChunk][kSlab]: u_n of channel d
    f += 2 * kChunk * kSlab;
    float2* head_w = reinterpret_cast<float2*>(f);  // [kChunk]: per-head sums over the channels
    f += 2 * kChunk;
    float2* head_u = reinterpret_cast<float2*>(f);  // [kChunk]
    f += 2 * kChunk;
    float2* through = reinterpret_cast<float2*>(f);  // [kSlab]: Σ_j S_in conj(D) per channel
    f += 2 * kSlab;
    float2* head_through = reinterpret_cast<float2*>(f);  // [1]

    const int64_t key_dim = p.dims.key_dim;
    const int64_t value_dim = p.dims.value_dim;
    const int tid = blk.tid;
    const bool zero_first = blk.chunk == 0 && (p.flags & GATELOOP_FLAG_HAS_H0) == 0;
    const input_t* __restrict__ dy = seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h);

    // s = dY Vᵀ on tensor cores, over every value tile in order: warp w owns
    // the 16 × 16 tiles (w / 2, 2·(w % 2) + t) of s, t < 2. dY and V are
    // staged as split operands in the union (the slab phase's buffers are
    // idle until the first slab's tables; build_prefix's barriers keep them
    // until every warp is done) and the accumulators stored straight into ds.
    {
        unsigned char* at = union_at;
        const Split<Op> dys = carve<Op>(at, kChunk, ld_tile<Op>());
        // V [m][c] row-major, read as the column-major B = Vᵀ.
        const Split<Op> vs = carve<Op>(at, kChunk, ld_tile<Op>());
        const int sr = blk.warp >> 1;
        const int sc = (blk.warp & 1) * 2;
        Acc<Op> sacc[2];
        wmma::fill_fragment(sacc[0], 0.f);
        wmma::fill_fragment(sacc[1], 0.f);
        for (int64_t v0 = 0; v0 < value_dim; v0 += kVTile) {
            blk.template load_tile<Op, kRawTerms>(dy, g.dy_strides, v0, dys);
            blk.template load_tile<Op, kRawTerms>(blk.v, p.v_strides, v0, vs);
            __syncthreads();
            for (int kk = 0; kk < kVTile; kk += Op::kK) {
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    mma_step<Op, kRawTerms, wmma::row_major, wmma::col_major>(
                        sacc[t], dys.hi_at(16 * sr, kk), dys.lo_at(16 * sr, kk), dys.ld, vs.hi_at(16 * (sc + t), kk),
                        vs.lo_at(16 * (sc + t), kk), vs.ld);
                }
            }
            __syncthreads();  // the next tile overwrites dY, V
        }
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            wmma::store_matrix_sync(ds + 16 * sr * kChunk + 16 * (sc + t), sacc[t], kChunk, wmma::mem_row_major);
        }
    }
    for (int i = tid; i < kChunk; i += kThreads) {
        head_w[i] = make_float2(0.f, 0.f);
        head_u[i] = make_float2(0.f, 0.f);
    }
    if (tid == 0) head_through[0] = make_float2(0.f, 0.f);
    // (ds and the head sums are read after the first slab's barriers.)

    const int d = tid % kSlab;
    const int nb = tid / kSlab;  // rows nb + 16 i
    input_t* __restrict__ dq_out = seq_row_mut<input_t>(g.dq, g.dq_strides, blk.b, blk.h);
    input_t* __restrict__ dk_out = seq_row_mut<input_t>(g.dk, g.dk_strides, blk.b, blk.h);
    float* dgate = g.dlog_gate + 2 * (blk.b * g.dgate_strides.batch + blk.h * g.dgate_strides.head);
    const float* dec = p.ws_decay + (blk.bh * p.num_chunks + blk.chunk) * p.dims.gate_dim * 2;

    for (int64_t d0 = 0; d0 < key_dim; d0 += kSlab) {
        if (d0 == 0 || !blk.per_head) blk.build_prefix(d0);  // ends with a barrier
        blk.load_keys(blk.q, p.q_strides, d0, qraw);
        blk.load_keys(blk.k, p.k_strides, d0, kraw);
        anchor_tables(blk, wa, wk);
        __syncthreads();
        const int cl = blk.col(d);
        // Intra-chunk pairs m < n (the self pair apart): the pre-phase rows
        // acc_q[n] = Σ_m s_nm |E(n, m)| k_m e^{−iθ_m}, acc_k[n] = Σ_{m > n} s_mn |E(m, n)| q_m e^{iθ_m},
        // and their part of w'_n = q_n dq̂_n − k_n dk̂_n, pair by pair with the
        // modulus applied last: gw = e^{iθ_n} Σ_m (s_nm q_n k_m)|E(n, m)| e^{−iθ_m}
        //                          − e^{−iθ_n} Σ_{m > n} (s_mn q_m k_n)|E(m, n)| e^{iθ_m}.
        float2 aq[4], ak[4], ad[4], gw[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = nb + 16 * i;
            const float qn = qraw[n * kSlab + d], kn = kraw[n * kSlab + d];
            float qr = 0.f, qi = 0.f, kr = 0.f, ki = 0.f, gqr = 0.f, gqi = 0.f, gkr = 0.f, gki = 0.f;
#pragma unroll 2
            for (int m = 0; m < n; ++m) {
                const float km = kraw[m * kSlab + d], snm = ds[n * kChunk + m];
                const float2 e = pair_modulus_factors(blk, wa, wk, n, m, d, cl);
                const float x = snm * (e.x * e.y) * km;
                const float xg = ((snm * qn * km) * e.y) * e.x;
                const float cm = blk.cos_at(m, cl), sm = blk.sin_at(m, cl);
                qr = fmaf(x, cm, qr);
                qi = fmaf(-x, sm, qi);
                gqr = fmaf(xg, cm, gqr);
                gqi = fmaf(-xg, sm, gqi);
            }
#pragma unroll 2
            for (int m = n + 1; m < blk.n; ++m) {
                const float qm = qraw[m * kSlab + d], smn = ds[m * kChunk + n];
                const float2 e = pair_modulus_factors(blk, wa, wk, m, n, d, cl);
                const float x = smn * (e.x * e.y) * qm;
                const float xg = ((smn * qm * kn) * e.y) * e.x;
                const float cm = blk.cos_at(m, cl), sm = blk.sin_at(m, cl);
                kr = fmaf(x, cm, kr);
                ki = fmaf(x, sm, ki);
                gkr = fmaf(xg, cm, gkr);
                gki = fmaf(xg, sm, gki);
            }
            aq[i] = make_float2(qr, qi);
            ak[i] = make_float2(kr, ki);
            const float cn = blk.cos_at(n, cl), sn = blk.sin_at(n, cl);
            // e^{iθ_n} gq − e^{−iθ_n} gk
            gw[i] = make_float2(fmaf(cn, gqr, -(sn * gqi)) - fmaf(cn, gkr, sn * gki),
                                fmaf(sn, gqr, cn * gqi) - fmaf(cn, gki, -(sn * gkr)));
        }
        // Through the state on tensor cores: X = dY S_inᵀ (row n: x_n = S_in dy_n)
        // and Y = V Dᵀ (y_n = D v_n), 64 × [Re | Im] of the slab's channels,
        // inner dimension every value column in steps of kInterCols; warp w
        // owns tile (w / 2, w % 2) of each. Σ_j S_in conj(D) per channel in
        // f32 by the threads of nb = 0, straight from the workspace.
        float2 xs[4], ys[4];
        {
            unsigned char* at = inter;
            const Split<Op> dyh = carve<Op>(at, kChunk, ld_inter<Op>());
            const Split<Op> vh = carve<Op>(at, kChunk, ld_inter<Op>());
            // S_in, D rows [j][c] row-major, read as the column-major B = S_inᵀ, Dᵀ.
            const Split<Op> sh = carve<Op>(at, 2 * kSlab, ld_inter<Op>());
            const Split<Op> dh = carve<Op>(at, 2 * kSlab, ld_inter<Op>());
            const int xr = blk.warp >> 1;
            const int xc = blk.warp & 1;
            Acc<Op> xacc, yacc;
            wmma::fill_fragment(xacc, 0.f);
            wmma::fill_fragment(yacc, 0.f);
            float2 thr = make_float2(0.f, 0.f);
            for (int64_t v0 = 0; v0 < value_dim; v0 += kInterCols) {
                __syncthreads();  // the previous step's operands are consumed
                for (int i = tid; i < kChunk * kInterCols; i += kThreads) {
                    const int n = i / kInterCols;
                    const int c = i - n * kInterCols;
                    const bool in = n < blk.n && v0 + c < value_dim;
                    dyh.template put<kGradTerms>(n, c, in ? Tr::load(dy, (blk.t0 + n) * g.dy_strides.time + v0 + c) : 0.f);
                    vh.template put<kGradTerms>(n, c, in ? Tr::load(blk.v, (blk.t0 + n) * p.v_strides.time + v0 + c) : 0.f);
                }
                for (int i = tid; i < 2 * kSlab * kInterCols; i += kThreads) {
                    const int r = i / kInterCols;
                    const int c = i - r * kInterCols;
                    const int part = r / kSlab;
                    const int64_t dd = d0 + (r - part * kSlab);
                    const bool in = dd < key_dim && v0 + c < value_dim;
                    const int64_t at_ = blk.ws_state_row(part * key_dim + dd) + v0 + c;
                    sh.template put<kGradTerms>(r, c, in ? p.ws_state[at_] : 0.f);
                    dh.template put<kGradTerms>(r, c, in ? g.ws_adj[at_] : 0.f);
                }
                if (nb == 0 && d0 + d < key_dim) {
                    const int64_t re = blk.ws_state_row(d0 + d) + v0;
                    const int64_t im = blk.ws_state_row(key_dim + d0 + d) + v0;
                    const int cols = static_cast<int>(min(static_cast<int64_t>(kInterCols), value_dim - v0));
                    for (int c = 0; c < cols; ++c) {
                        const float sr = p.ws_state[re + c], si = p.ws_state[im + c];
                        const float dr = g.ws_adj[re + c], di = g.ws_adj[im + c];
                        thr = make_float2(fmaf(sr, dr, fmaf(si, di, thr.x)), fmaf(si, dr, fmaf(-sr, di, thr.y)));
                    }
                }
                __syncthreads();
                for (int kk = 0; kk < kInterCols; kk += Op::kK) {
                    mma_step<Op, kGradTerms, wmma::row_major, wmma::col_major>(
                        xacc, dyh.hi_at(16 * xr, kk), dyh.lo_at(16 * xr, kk), dyh.ld, sh.hi_at(16 * xc, kk),
                        sh.lo_at(16 * xc, kk), sh.ld);
                    mma_step<Op, kGradTerms, wmma::row_major, wmma::col_major>(
                        yacc, vh.hi_at(16 * xr, kk), vh.lo_at(16 * xr, kk), vh.ld, dh.hi_at(16 * xc, kk),
                        dh.lo_at(16 * xc, kk), dh.ld);
                }
            }
            if (nb == 0) through[d] = thr;
            __syncthreads();  // every warp is done with the operands: X, Y take their bytes
            float* xy = reinterpret_cast<float*>(inter);  // X then Y, [kChunk][2·kSlab] each
            wmma::store_matrix_sync(xy + 16 * xr * 2 * kSlab + 16 * xc, xacc, 2 * kSlab, wmma::mem_row_major);
            wmma::store_matrix_sync(xy + kChunk * 2 * kSlab + 16 * xr * 2 * kSlab + 16 * xc, yacc, 2 * kSlab,
                                    wmma::mem_row_major);
            __syncthreads();
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int n = nb + 16 * i;
                xs[i] = make_float2(xy[n * 2 * kSlab + d], xy[n * 2 * kSlab + kSlab + d]);
                ys[i] = make_float2(xy[(kChunk + n) * 2 * kSlab + d], xy[(kChunk + n) * 2 * kSlab + kSlab + d]);
            }
        }
        const int last = blk.n - 1;
        const float cl_last = blk.cos_at(last, cl), sl_last = blk.sin_at(last, cl);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int n = nb + 16 * i;
            // acc_q += |E(n, −1)| (S_in dy_n); acc_d = |E(last, n)| e^{iθ_last} conj(D v_n).
            const float wi = blk.modulus(n, -1, cl);
            aq[i] = make_float2(fmaf(wi, xs[i].x, aq[i].x), fmaf(wi, xs[i].y, aq[i].y));
            const float wl = n < blk.n ? blk.modulus(last, n, cl) : 0.f;
            const float2 yd = make_float2(fmaf(cl_last, ys[i].x, sl_last * ys[i].y),
                                          fmaf(sl_last, ys[i].x, -(cl_last * ys[i].y)));
            ad[i] = make_float2(wl * yd.x, wl * yd.y);
            // dq̂ = e^{iθ} acc_q, dk̂ = e^{−iθ} acc_k, dk̂ᴰ = e^{−iθ} acc_d.
            const float cn = blk.cos_at(n, cl), sn = blk.sin_at(n, cl);
            const float2 dqh = make_float2(fmaf(cn, aq[i].x, -(sn * aq[i].y)), fmaf(sn, aq[i].x, cn * aq[i].y));
            const float2 dkh = make_float2(fmaf(cn, ak[i].x, sn * ak[i].y), fmaf(cn, ak[i].y, -(sn * ak[i].x)));
            const float2 dkd = make_float2(fmaf(cn, ad[i].x, sn * ad[i].y), fmaf(cn, ad[i].y, -(sn * ad[i].x)));
            const float qn = qraw[n * kSlab + d], kn = kraw[n * kSlab + d];
            // w'_n = q dq̂ − k dk̂ (self pair left out: it cancels exactly), u_n = k dk̂ᴰ,
            // each term's modulus applied last: w'_n = gw + |E(n, −1)|·(q_n e^{iθ_n} S_in dy_n),
            // u_n = |E(last, n)|·(k_n e^{−iθ_n} e^{iθ_last} conj(D v_n)).
            const float2 xq = make_float2(qn * fmaf(cn, xs[i].x, -(sn * xs[i].y)), qn * fmaf(sn, xs[i].x, cn * xs[i].y));
            const float2 xk = make_float2(kn * fmaf(cn, yd.x, sn * yd.y), kn * fmaf(cn, yd.y, -(sn * yd.x)));
            wpr[n * kSlab + d] = make_float2(fmaf(wi, xq.x, gw[i].x), fmaf(wi, xq.y, gw[i].y));
            upr[n * kSlab + d] = make_float2(wl * xk.x, wl * xk.y);
            const float s_nn = ds[n * kChunk + n];
            const int64_t ch = d0 + d;
            if (n < blk.n && ch < key_dim) {
                Tr::store(dq_out, (blk.t0 + n) * g.dq_strides.time + ch, fmaf(kn, s_nn, dqh.x));
                Tr::store(dk_out, (blk.t0 + n) * g.dk_strides.time + ch, fmaf(qn, s_nn, dkh.x + dkd.x));
            }
        }
        __syncthreads();
        if (!blk.per_head) {
            // One thread per channel: its own scan.
            if (tid < kSlab && d0 + tid < key_dim) {
                const int j = tid;
                const float2 a = make_float2(dec[(d0 + j) * 2], dec[(d0 + j) * 2 + 1]);
                gate_scan(blk, wpr + j, upr + j, kSlab, cmul(a, through[j]), j, zero_first, [&](int n, float2 x) {
                    reinterpret_cast<float2*>(dgate)[(blk.t0 + n) * g.dgate_strides.time + d0 + j] = x;
                });
            }
        } else {
            // Per-head gate: the channels' terms summed in a fixed order
            // (slab by slab, channel by channel).
            if (tid < kChunk) {
                float2 sw = head_w[tid], su = head_u[tid];
                for (int j = 0; j < kSlab; ++j) {
                    sw = make_float2(sw.x + wpr[tid * kSlab + j].x, sw.y + wpr[tid * kSlab + j].y);
                    su = make_float2(su.x + upr[tid * kSlab + j].x, su.y + upr[tid * kSlab + j].y);
                }
                head_w[tid] = sw;
                head_u[tid] = su;
            } else if (tid == kChunk) {
                float2 t = head_through[0];
                for (int j = 0; j < kSlab; ++j) t = make_float2(t.x + through[j].x, t.y + through[j].y);
                head_through[0] = t;
            }
        }
        __syncthreads();  // wpr, upr, through, the tables are rewritten by the next slab
    }
    if (blk.per_head && tid == 0) {
        const float2 a = make_float2(dec[0], dec[1]);
        gate_scan(blk, head_w, head_u, 1, cmul(a, head_through[0]), 0, zero_first, [&](int n, float2 x) {
            reinterpret_cast<float2*>(dgate)[(blk.t0 + n) * g.dgate_strides.time] = x;
        });
    }
}

// ---- 3b. dv -----------------------------------------------------------------------

// The forward output kernel's pass with kAdjoint (chunk_common.cuh:
// intra_pass): the scores P recomputed exactly as the forward forms them
// (anchored off-diagonal blocks as tensor-core products, diagonal blocks
// pairwise), dv = [Re K̃ | Im K̃] [Re D; Im D] per slab and Pᵀ dY after the
// last, on tensor cores. The output kernel's shared layout.
template <typename input_t>
__device__ __forceinline__ void grad_dv(const GateloopChunkGradParams& g) {
    using Op = typename OpOf<input_t>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    check_shared(g.dv_shared_bytes, output_smem_bytes<Op, true>());
    Block<input_t, true> blk(g.fwd, smem);
    intra_pass<Op, kGradTerms, true>(blk, smem, g.ws_adj, seq_row<input_t>(g.dy, g.dy_strides, blk.b, blk.h),
                                     g.dy_strides, seq_row_mut<input_t>(g.dv, g.dv_strides, blk.b, blk.h),
                                     g.dv_strides);
}

}  // namespace chunk
}  // namespace gateloop

// ---- entry points -----------------------------------------------------------------
//
// gateloop_chunk_grad_{w,qk,dv}_{dtype}: dtype of q, k, v, dy, dq, dk, dv.

#define GATELOOP_CHUNK_GRAD_ENTRIES(DTYPE, TYPE)                                                            \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, 1)                               \
        gateloop_chunk_grad_w_##DTYPE(const GateloopChunkGradParams g) {                                    \
        gateloop::chunk::grad_w<TYPE>(g);                                                                   \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, 1)                               \
        gateloop_chunk_grad_qk_##DTYPE(const GateloopChunkGradParams g) {                                   \
        gateloop::chunk::grad_qk<TYPE>(g);                                                                  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(gateloop::chunk::kThreads, 1)                               \
        gateloop_chunk_grad_dv_##DTYPE(const GateloopChunkGradParams g) {                                   \
        gateloop::chunk::grad_dv<TYPE>(g);                                                                  \
    }

GATELOOP_CHUNK_GRAD_ENTRIES(f32, float)
GATELOOP_CHUNK_GRAD_ENTRIES(f16, __half)
GATELOOP_CHUNK_GRAD_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(GATELOOP_CHUNK_CARRY_THREADS)
    gateloop_chunk_grad_adjoint_carry(const GateloopChunkGradParams g) {
    gateloop::chunk::grad_adjoint_carry(g);
}
