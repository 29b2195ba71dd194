/*
 * gateloop_abi.h — THE kernel ABI of gateloop.
 *
 * Every kernel takes one parameter struct from this header, by value. The Rust
 * mirror, src/cuda/abi.rs, is generated from this file by bindgen and
 * committed; build.rs refuses to build when the sha256 of this header differs
 * from the one recorded in abi.rs. After editing this file run
 *
 *     scripts/regen-abi.sh
 *
 * Rules for every struct here (so that host and device agree byte for byte):
 *   - plain C, fixed-width integer types, no bit-fields, no enums in structs
 *     (enums become #define'd uint32_t constants);
 *   - sizes and indices are int64_t (B·L·H·K can exceed 2^31);
 *   - device pointers are plain pointers (8 bytes);
 *   - explicit padding fields, so the struct has no implicit holes and its
 *     size is a multiple of 8; GATELOOP_ABI_ASSERT pins the size.
 *
 * Conventions shared by all kernels:
 *   - a sequence tensor is [B, L, H, D] with D contiguous; its strides are
 *     given per (batch, time, head) in elements of the tensor's element type,
 *     counting a complex number as ONE element (an interleaved (re, im) pair);
 *   - a state tensor is [B, H, K, V] complex with V contiguous; strides per
 *     (batch, head, key) in complex elements;
 *   - the recurrent state (h0, h_final) and log_gate are always complex f32;
 *     the other tensors (q, k, v, y) have the kernel's input type
 *     (GATELOOP_DTYPE_*); arithmetic and accumulation are f32.
 *
 * Adding a kernel (scan, attention, chunked, ...): add a
 * Gateloop<Kernel>Params struct below that embeds GateloopDims and the stride
 * structs, add its GATELOOP_ABI_ASSERT, regenerate. Never reorder or resize an
 * existing struct without bumping GATELOOP_ABI_VERSION.
 */
#ifndef GATELOOP_ABI_H
#define GATELOOP_ABI_H

#include <stdint.h>

#ifdef __cplusplus
#define GATELOOP_ABI_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define GATELOOP_ABI_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* Bumped on every incompatible change of a struct below. */
#define GATELOOP_ABI_VERSION 2u

/* Element types of the non-state tensors (Gateloop<Kernel>Params.dtype). */
#define GATELOOP_DTYPE_F32 0u
#define GATELOOP_DTYPE_F16 1u
#define GATELOOP_DTYPE_BF16 2u

/* Bits of Gateloop<Kernel>Params.flags. */
/* h0 is present (otherwise h0 must be NULL and the initial state is 0). */
#define GATELOOP_FLAG_HAS_H0 1u
/* log_gate has one entry per head (gate_dim == 1), broadcast over K. */
#define GATELOOP_FLAG_PER_HEAD_GATE 2u
/* Decode: the state is updated in place. The initial state is read from
 * h_final, which is then overwritten with the final state; h0 must be NULL
 * and HAS_H0 clear. Each state element is read and later written by the same
 * thread, so no other thread can observe a half-updated state. */
#define GATELOOP_FLAG_STATE_IN_PLACE 4u

/* Below this Re(log_gate) a step is a reset in f32 kernels and their CPU
 * mirrors: exp(-104) = 6.8e-46 is below half the smallest f32 subnormal
 * (2^-150 = 7.0e-46), so the gate a = exp(log_gate) is exactly 0 there and
 * treating the step as a reset (Re = -inf) changes nothing in exact f32
 * arithmetic, while summing such a value into a running log-gate sum would
 * cost that sum its precision (ulp(3541) = 2.4e-4). */
#define GATELOOP_RESET_LOG_GATE -104.0f

/* Columns of the state (values of V) one recurrent thread block covers. */
#define GATELOOP_RECURRENT_VALUE_TILE 32
/* Most warps (key groups) in one recurrent thread block. */
#define GATELOOP_RECURRENT_MAX_KEY_GROUPS 16
/* Dynamic shared memory of a recurrent block beyond its chunk's staging:
 * the block's sequence, its first step and length (two int64). */
#define GATELOOP_RECURRENT_SEQUENCE_BYTES 16
/* Largest number of state rows one recurrent thread keeps in registers. */
#define GATELOOP_RECURRENT_MAX_ROWS 16
/* The recurrent kernel's ahead staging (gateloop_recurrent_ahead_*): a
 * thread holds the next time chunk's staging items in registers, at most this
 * many (R < 16; R = 16: the _R16 one). */
#define GATELOOP_RECURRENT_AHEAD_ITEMS 4
#define GATELOOP_RECURRENT_AHEAD_ITEMS_R16 2

/* The sizes of one problem. */
typedef struct GateloopDims {
    int64_t batch;     /* B */
    int64_t len;       /* L, time steps */
    int64_t heads;     /* H */
    int64_t key_dim;   /* K */
    int64_t value_dim; /* V */
    int64_t gate_dim;  /* K for a per-channel gate, 1 for a per-head gate */
} GateloopDims;
GATELOOP_ABI_ASSERT(sizeof(GateloopDims) == 48, "GateloopDims layout");

/* Strides of a [B, L, H, D] tensor (D contiguous), in elements. */
typedef struct GateloopSeqStrides {
    int64_t batch;
    int64_t time;
    int64_t head;
} GateloopSeqStrides;
GATELOOP_ABI_ASSERT(sizeof(GateloopSeqStrides) == 24, "GateloopSeqStrides layout");

/* Strides of a [B, H, K, V] complex state (V contiguous), in complex elements. */
typedef struct GateloopStateStrides {
    int64_t batch;
    int64_t head;
    int64_t key;
} GateloopStateStrides;
GATELOOP_ABI_ASSERT(sizeof(GateloopStateStrides) == 24, "GateloopStateStrides layout");

/*
 * The recurrent kernel (cuda/recurrent.cu).
 *
 * Launch geometry (chosen by the host, validated there, trusted here):
 *   grid.x  = B · H · ceil(V / GATELOOP_RECURRENT_VALUE_TILE), flattened;
 *   block   = (GATELOOP_RECURRENT_VALUE_TILE, key_groups, 1);
 *   dynamic shared memory = chunk_len · (16 · padded_key_dim
 *                           + 4 · VALUE_TILE · (1 + key_groups))
 *                           + GATELOOP_RECURRENT_SEQUENCE_BYTES bytes;
 *   the entry point gateloop_recurrent_{dtype}_r{R} (batched staging) or
 *   gateloop_recurrent_ahead_{dtype}_r{R} (ahead staging), dtype in {f32,
 *   f16, bf16} (of q, k, v, y), R in {1, 2, 4, 8, 16}
 *   (R ≤ GATELOOP_RECURRENT_MAX_ROWS), with R · key_groups == padded_key_dim
 *   ≥ key_dim; thread (lane, g) keeps state rows g · R + i, i < R,
 *   of column 32 · tile + lane;
 *   for gateloop_recurrent_ahead_{dtype}_r{R}, with A the ahead items
 *   (GATELOOP_RECURRENT_AHEAD_ITEMS, _R16 for R = 16), also
 *   chunk_len · R ≤ 32 · A and chunk_len ≤ key_groups · A (else the kernel
 *   traps).
 * gateloop_recurrent_real_{dtype}_r{R} and gateloop_recurrent_real_ahead_
 * {dtype}_r{R} take the same parameters and geometry with real gates:
 * log_gate, h0 and h_final real f32 (their strides count f32 elements).
 *
 * Packed variable-length sequences (cu_seqlens non-NULL; NULL otherwise; the
 * backward's embedded `fwd` takes it too, below): dims.batch = N sequences, packed
 * along time into batch row 0 of q, k, v, log_gate and y ([1, dims.len, H,
 * D]); sequence b is the steps from offset b to offset b + 1 of
 * cu_seqlens in that row (the host checked that the N + 1 offsets rise
 * strictly from 0 to dims.len), starts from state b of h0 (or 0) and ends in
 * state b of h_final ([N, H, K, V]).
 */
typedef struct GateloopRecurrentParams {
    /* Inputs (device pointers). */
    const void *q;        /* [B, L, H, K] dtype */
    const void *k;        /* [B, L, H, K] dtype */
    const void *v;        /* [B, L, H, V] dtype */
    const float *log_gate; /* [B, L, H, gate_dim] complex f32 (every dtype) */
    const float *h0;      /* [B, H, K, V] complex f32, NULL unless HAS_H0 */
    /* Outputs (device pointers). */
    void *y;              /* [B, L, H, V] dtype */
    float *h_final;       /* [B, H, K, V] complex f32 (and the initial state if STATE_IN_PLACE) */
    const int64_t *cu_seqlens; /* [B + 1] step offsets of packed sequences, or NULL (above) */

    GateloopDims dims;
    GateloopSeqStrides q_strides;
    GateloopSeqStrides k_strides;
    GateloopSeqStrides v_strides;
    GateloopSeqStrides gate_strides;
    GateloopSeqStrides y_strides;
    GateloopStateStrides h0_strides;
    GateloopStateStrides h_final_strides;

    uint32_t flags;          /* GATELOOP_FLAG_* */
    uint32_t dtype;          /* GATELOOP_DTYPE_* of q, k, v, y */
    int32_t key_groups;      /* warps per block, 1..=MAX_KEY_GROUPS */
    int32_t padded_key_dim;  /* key_groups · R ≥ key_dim */
    int32_t chunk_len;       /* time steps staged in shared memory at once, ≥ 1 */
    int32_t value_tiles;     /* ceil(V / VALUE_TILE) */
} GateloopRecurrentParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopRecurrentParams) == 64 + 48 + 5 * 24 + 2 * 24 + 24,
                    "GateloopRecurrentParams layout");

/*
 * The fused associative scan (cuda/scan.cu): the paper's parallel mode.
 *
 * Time is cut into chunks of chunk_len = STEPS_PER_THREAD · 32 · warps steps;
 * thread (warp w, lane l) of a block owns the STEPS_PER_THREAD consecutive
 * steps starting at chunk_start + (32 · w + l) · STEPS_PER_THREAD and value
 * columns value_tile · tile + j, j < value_tile, and loops over all K rows.
 * Three entry points run in order on one stream (the first two only when
 * num_chunks > 1):
 *   gateloop_scan_reduce_{dtype}_v{T}: grid.x = B·H · value_tiles · (num_chunks − 1),
 *     block = 32 · warps; writes each chunk's aggregate (A, B): A into
 *     chunk_gate[bh][c][k], B into chunk_state[bh][c + 1][k][v];
 *   gateloop_scan_carry: grid.x = ceil(B·H·K·V / SCAN_CARRY_BLOCK), block =
 *     SCAN_CARRY_BLOCK; turns chunk_state[bh][c] into the state entering
 *     chunk c (slot 0 = h0 or 0), sequentially over c;
 *   gateloop_scan_forward_{dtype}_v{T}: grid.x = B·H · value_tiles · num_chunks,
 *     block = 32 · warps; re-scans each chunk from its entering state
 *     (chunk_state[bh][c], or h0 when num_chunks == 1), writes y and h_final.
 * Block index order (fastest first): chunk, value tile, (b, h).
 * Workspaces (complex f32, contiguous, NULL when num_chunks == 1):
 *   chunk_gate  [B·H, num_chunks, K], chunk_state [B·H, num_chunks, K, V].
 * No dynamic shared memory.
 */
/* Time steps one scan thread owns (registers). */
#define GATELOOP_SCAN_STEPS_PER_THREAD 8
/* Most warps in one scan block (the block scan covers 32 · warps threads). */
#define GATELOOP_SCAN_MAX_WARPS 8
/* Largest number of value columns one scan thread owns (_v1, _v2, _v4). */
#define GATELOOP_SCAN_MAX_VALUE_TILE 4
/* Threads per block of gateloop_scan_carry. */
#define GATELOOP_SCAN_CARRY_BLOCK 256

typedef struct GateloopScanParams {
    /* Inputs (device pointers). */
    const void *q;        /* [B, L, H, K] dtype */
    const void *k;        /* [B, L, H, K] dtype */
    const void *v;        /* [B, L, H, V] dtype */
    const float *log_gate; /* [B, L, H, gate_dim] complex f32 (every dtype) */
    const float *h0;      /* [B, H, K, V] complex f32, NULL unless HAS_H0 */
    /* Outputs (device pointers). */
    void *y;              /* [B, L, H, V] dtype */
    float *h_final;       /* [B, H, K, V] complex f32 */
    /* Workspaces (device pointers, NULL when num_chunks == 1). */
    float *chunk_gate;    /* [B·H, num_chunks, K] complex f32 */
    float *chunk_state;   /* [B·H, num_chunks, K, V] complex f32 */

    GateloopDims dims;
    GateloopSeqStrides q_strides;
    GateloopSeqStrides k_strides;
    GateloopSeqStrides v_strides;
    GateloopSeqStrides gate_strides;
    GateloopSeqStrides y_strides;
    GateloopStateStrides h0_strides;
    GateloopStateStrides h_final_strides;

    uint32_t flags;       /* GATELOOP_FLAG_* */
    uint32_t dtype;       /* GATELOOP_DTYPE_* of q, k, v, y */
    int32_t warps;        /* warps per block, 1..=SCAN_MAX_WARPS */
    int32_t value_tile;   /* value columns per thread: the T of the entry point */
    int64_t chunk_len;    /* STEPS_PER_THREAD · 32 · warps */
    int64_t num_chunks;   /* ceil(L / chunk_len) */
    int64_t value_tiles;  /* ceil(V / value_tile) */
} GateloopScanParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopScanParams) == 72 + 48 + 5 * 24 + 2 * 24 + 16 + 24,
                    "GateloopScanParams layout");

/*
 * Masked surrogate attention, O(L²) (cuda/attention.cu): three kernels that
 * share this struct.
 *
 *   1. gateloop_attention_prep_{dtype}: one thread per (b, h, time tile,
 *      gate channel); grid.x = ceil(B·H·num_tiles·gate_dim / PREP_THREADS),
 *      block = PREP_THREADS. Writes the tile-local log-gate sums to the
 *      workspace (ws_*), all [B, H, L, gate_dim], contiguous:
 *        ws_prefix[t] = S_t, Σ of log_gate since max(tile start, last reset)
 *                       up to t inclusive (0 at a reset), phase in (−π, π];
 *        ws_prefix_lo[t] = the compensation of Re S_t (f32): the running
 *                       sum of the TwoSum rounding errors of the additions
 *                       that formed Re ws_prefix[t] (0 at a reset), so that
 *                       Re S_t = Re ws_prefix[t] + ws_prefix_lo[t] up to the
 *                       low sum's own rounding (|lo| ≤ 32 ulps of Re S_t).
 *                       After hard-decaying steps |Re S| reaches thousands,
 *                       where an f32 ulp is ~2e-4: the diagonal tile's short
 *                       differences S_n − S_m need the low part;
 *        ws_suffix[t] = Σ of log_gate over (t, tile end], Re = −inf when a
 *                       reset lies in it, phase in (−π, π];
 *        ws_reset[t]  = tile-local index of the last reset ≤ t, or −1.
 *   2. gateloop_attention_{dtype}: y. grid.x = B·H·num_tiles·value_tiles,
 *      block = ATTENTION_THREADS, static shared memory only; one block per
 *      (b, h, query tile, tile of VALUE_TILE columns of v/y).
 *   3. gateloop_attention_state_{dtype}: h_final. grid.x =
 *      B·H·state_key_tiles·state_value_tiles, block = ATTENTION_THREADS; one
 *      block per (b, h, STATE_KEY_TILE rows, STATE_VALUE_TILE columns).
 * Launched in that order on one stream (2 and 3 read the workspace of 1).
 * key_dim ≤ MAX_KEY_DIM.
 */
#define GATELOOP_ATTENTION_TILE 64
#define GATELOOP_ATTENTION_VALUE_TILE 64
#define GATELOOP_ATTENTION_KEY_SLAB 16
#define GATELOOP_ATTENTION_MAX_KEY_DIM 256
#define GATELOOP_ATTENTION_THREADS 256
#define GATELOOP_ATTENTION_PREP_THREADS 128
#define GATELOOP_ATTENTION_STATE_KEY_TILE 64
#define GATELOOP_ATTENTION_STATE_VALUE_TILE 32

typedef struct GateloopAttentionParams {
    /* Inputs (device pointers). */
    const void *q;        /* [B, L, H, K] dtype */
    const void *k;        /* [B, L, H, K] dtype */
    const void *v;        /* [B, L, H, V] dtype */
    const float *log_gate; /* [B, L, H, gate_dim] complex f32 (every dtype) */
    const float *h0;      /* [B, H, K, V] complex f32, NULL unless HAS_H0 */
    /* Outputs (device pointers). */
    void *y;              /* [B, L, H, V] dtype */
    float *h_final;       /* [B, H, K, V] complex f32 */
    /* Workspace (device pointers), each [B, H, L, gate_dim], contiguous. */
    float *ws_prefix;     /* complex f32 */
    float *ws_prefix_lo;  /* f32: compensation of Re ws_prefix */
    float *ws_suffix;     /* complex f32 */
    int32_t *ws_reset;    /* int32 */

    GateloopDims dims;
    GateloopSeqStrides q_strides;
    GateloopSeqStrides k_strides;
    GateloopSeqStrides v_strides;
    GateloopSeqStrides gate_strides;
    GateloopSeqStrides y_strides;
    GateloopStateStrides h0_strides;
    GateloopStateStrides h_final_strides;

    uint32_t flags;            /* GATELOOP_FLAG_* */
    uint32_t dtype;            /* GATELOOP_DTYPE_* of q, k, v, y */
    int64_t num_tiles;         /* ceil(L / TILE) */
    int64_t value_tiles;       /* ceil(V / VALUE_TILE) */
    int64_t state_key_tiles;   /* ceil(K / STATE_KEY_TILE) */
    int64_t state_value_tiles; /* ceil(V / STATE_VALUE_TILE) */
} GateloopAttentionParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopAttentionParams) == 88 + 48 + 5 * 24 + 2 * 24 + 8 + 4 * 8,
                    "GateloopAttentionParams layout");

/*
 * The opt-in device-side value check of a log_gate buffer (cuda/check.cu):
 * gateloop_check_log_gate scans n complex f32 and finds the FIRST (lowest)
 * index whose value is outside the gate's domain: Re > 0, NaN in Re or Im,
 * or Im = ±inf (Re = −inf, a reset, is allowed).
 *
 * Launch geometry: grid.x ≤ CHECK_MAX_BLOCKS blocks of CHECK_THREADS
 * threads, a grid-stride loop over the n elements (any grid size gives the
 * same result).
 * The result buffer is GATELOOP_CHECK_RESULT_WORDS int64_t, initialized by
 * the host to:
 *   result[0] = n   out: the first offending index, n when there is none
 *                   (an atomicMin of every block's first offending index);
 *   result[1] = 0   out: when result[0] < n, the offending value as
 *                   (re, im) f32 in the 8 bytes of this word (written by the
 *                   block that finishes last: it reads result[0] after every
 *                   block's atomicMin, behind a __threadfence);
 *   result[2] = 0   the count of finished blocks (an atomicAdd ticket).
 * The result is deterministic: integer atomics only, and the reported value
 * is read from the input.
 */
#define GATELOOP_CHECK_THREADS 256
#define GATELOOP_CHECK_MAX_BLOCKS 1024
#define GATELOOP_CHECK_RESULT_WORDS 3

typedef struct GateloopCheckParams {
    const float *log_gate; /* n complex f32 (interleaved, 8-byte aligned) */
    int64_t *result;       /* [GATELOOP_CHECK_RESULT_WORDS] int64_t, see above */
    int64_t n;             /* complex elements of log_gate */
} GateloopCheckParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopCheckParams) == 24, "GateloopCheckParams layout");

/*
 * The self-test of the tensor-core fragment layouts (cuda/selftest.cu,
 * cuda/mma.cuh; gateloop::cuda::selftest): one warp per trial (grid.x =
 * trials, SELFTEST_MMA_THREADS threads), each computing D = A·B + C in
 * SELFTEST_MMA_PRODUCTS ways from fragments built by the layout functions or
 * loaded by ldmatrix:
 *   0: bf16 m16n8k16, fragments from the layout functions;
 *   1: f16 m16n8k16, likewise;
 *   2: TF32 m16n8k8 on A's first 8 columns and B's first 8 rows;
 *   3: bf16 m16n8k16, A by ldmatrix.x4 from a row-major 16×16 tile, B by
 *      ldmatrix.x2.trans from a row-major 16×8 (k × n) tile;
 *   4: f16 m16n8k16, A by ldmatrix.x4.trans from a column-major tile, B by
 *      ldmatrix.x2 from an n-major (8 × 16) tile.
 * Every tensor is row-major f32 per trial: a [trials, 16, 16], b [trials,
 * 16, 8], c [trials, 16, 8] (values exact in bf16, f16 and TF32), d
 * [trials, SELFTEST_MMA_PRODUCTS, 16, 8] (out, every element written).
 */
#define GATELOOP_SELFTEST_MMA_THREADS 32
#define GATELOOP_SELFTEST_MMA_PRODUCTS 5

typedef struct GateloopSelftestMmaParams {
    const float *a;
    const float *b;
    const float *c;
    float *d;
} GateloopSelftestMmaParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopSelftestMmaParams) == 32, "GateloopSelftestMmaParams layout");

/*
 * The chunked mode on tensor cores (cuda/chunk.cu; CPU mirror
 * src/cpu/chunked.rs): chunks of CHUNK_LEN steps, anchored sub-chunks of
 * CHUNK_SUB_LEN, key channels in slabs of CHUNK_KEY_SLAB, value tiles of
 * CHUNK_VALUE_TILE columns. Three kernels on one stream:
 *   1. gateloop_chunk_state_{dtype}_{g}_{prec}: grid.x = B·H·num_chunks·value_tiles
 *      (block index: value tile fastest, then chunk, then (b, h)), block =
 *      CHUNK_THREADS, dynamic shared memory state_shared_bytes. Writes U_c
 *      into ws_state and A_c into ws_decay.
 *   2. gateloop_chunk_carry_{g}: grid.x = ceil(B·H·K·V / CHUNK_CARRY_THREADS),
 *      block = CHUNK_CARRY_THREADS; S ← A S + U over the chunks, ws_state[c]
 *      becomes the state entering chunk c; writes h_final. With
 *      carry_segments S > 1 (below), grid.y = S, after
 *      gateloop_chunk_carry_segments_{g} (grid (grid.x, S − 1)).
 *   3. gateloop_chunk_output_{dtype}_{g}_{prec}: grid as 1, dynamic shared
 *      memory shared_bytes; writes y.
 * Or 1 and 2 in one kernel, gateloop_chunk_state_seq_{dtype}_{g}_{prec}:
 *   grid.x = B·H·value_tiles·ceil(K / slab) (slab = CHUNK_KEY_SLAB with
 *   complex gates, CHUNK_WALK_SLAB_REAL with real ones; key slab fastest, then
 *   value tile, then (b, h)), dynamic shared memory state_shared_bytes (its
 *   own layout's size); each block walks the chunks in order and writes what
 *   1 and 2 write (ws_state[c] = the state entering chunk c, ws_decay,
 *   h_final), bit for bit.
 * {g}: c = complex gates (log_gate, h0, h_final complex f32, parts = 2), r =
 * real gates (log_gate [B, L, H, gate_dim], h0 and h_final [B, H, K, V] REAL
 * f32, parts = 1; the strides then count f32 elements). {prec}: exact (3
 * split tensor-core products per operand pair) or fast (1).
 * Workspaces (f32, contiguous):
 *   ws_decay [B·H, num_chunks, gate_dim, parts], ws_state [B·H, num_chunks, parts·K, V].
 * key_dim ≤ CHUNK_MAX_KEY_DIM.
 *
 * Packed variable-length sequences (cu_seqlens non-NULL; the backward's
 * embedded `fwd` takes it too, below): dims.batch = N sequences packed
 * along time into batch row 0 of q, k, v, log_gate and y ([1, dims.len, H,
 * D]; sequence b is steps cu_seqlens[b] .. cu_seqlens[b + 1], the host
 * checked that the offsets rise strictly from 0 to dims.len), starting from
 * state b of h0 (or 0) and ending in state b of h_final ([N, H, K, V]). Its
 * chunks start at its first step; chunk c of sequence b is slot
 * ⌊cu_seqlens[b] / CHUNK_LEN⌋ + b + c of head h's row of the workspaces
 * (packed_slot_base in cuda/common.cuh: no two sequences share a slot), so
 * num_chunks = ⌊dims.len / CHUNK_LEN⌋ + N slots and the workspaces are
 * [H, num_chunks, ...]. The state and output grids run (h, slot, value
 * tile): a slot past its sequence's last chunk is an empty block, which
 * returns; the carry, gateloop_chunk_carry_packed_{g} (same grid), runs
 * (b, h, key row, value column) as batched, b the sequence.
 * gateloop_chunk_state_seq takes batched problems only.
 */
#define GATELOOP_CHUNK_LEN 64
#define GATELOOP_CHUNK_SUB_LEN 16
/* Steps per segment of the chunk-local gate prefix (each segment scanned
 * from zero, then joined to the carry of the segments before it: the
 * kernels' build_prefix and cpu::chunked's, in the same order). */
#define GATELOOP_CHUNK_PREFIX_SEG 8
#define GATELOOP_CHUNK_KEY_SLAB 16
/* Key channels per block of the real-gate walks (gateloop_chunk_state_seq_*_r_*,
 * gateloop_chunk_grad_w_seq_*_r): two KEY_SLABs, whose slab operand is as
 * wide as a complex slab's [Re | Im]. The complex-gate walks take KEY_SLAB. */
#define GATELOOP_CHUNK_WALK_SLAB_REAL 32
/* Row stride, in 4-byte entries, of the gate prefix tables in the chunked
 * kernels' shared memory: KEY_SLAB channels and 4 of padding, so that the
 * pairwise loops' 16-byte reads of eight consecutive rows fall on eight
 * bank groups (cuda/chunk_common.cuh, kPrefixLd). */
#define GATELOOP_CHUNK_PREFIX_LD 20
#define GATELOOP_CHUNK_VALUE_TILE 64
/* Value columns per block of the wide output launches
 * (gateloop_chunk_output_wide_*): two VALUE_TILEs, whose blocks would
 * each form the same chunk scores, in one block that forms them once. */
#define GATELOOP_CHUNK_WIDE_TILE 128
#define GATELOOP_CHUNK_THREADS 256
#define GATELOOP_CHUNK_CARRY_THREADS 256
#define GATELOOP_CHUNK_MAX_KEY_DIM 256

typedef struct GateloopChunkParams {
    /* Inputs (device pointers). */
    const void *q;        /* [B, L, H, K] dtype */
    const void *k;        /* [B, L, H, K] dtype */
    const void *v;        /* [B, L, H, V] dtype */
    const float *log_gate; /* [B, L, H, gate_dim] complex f32 (c) or f32 (r) */
    const float *h0;      /* [B, H, K, V] complex f32 (c) or f32 (r), NULL unless HAS_H0 */
    /* Outputs (device pointers). */
    void *y;              /* [B, L, H, V] dtype */
    float *h_final;       /* [B, H, K, V] complex f32 (c) or f32 (r) */
    /* Workspaces (device pointers). */
    float *ws_decay;      /* [B·H, num_chunks, gate_dim, parts] f32 */
    float *ws_state;      /* [B·H, num_chunks, parts·K, V] f32 */
    const int64_t *cu_seqlens; /* [B + 1] step offsets of packed sequences, or NULL (above) */

    GateloopDims dims;
    GateloopSeqStrides q_strides;
    GateloopSeqStrides k_strides;
    GateloopSeqStrides v_strides;
    GateloopSeqStrides gate_strides;
    GateloopSeqStrides y_strides;
    GateloopStateStrides h0_strides;
    GateloopStateStrides h_final_strides;

    uint32_t flags;             /* GATELOOP_FLAG_* */
    uint32_t dtype;             /* GATELOOP_DTYPE_* of q, k, v, y */
    int64_t num_chunks;         /* ceil(L / CHUNK_LEN) */
    int64_t value_tiles;        /* ceil(V / CHUNK_VALUE_TILE) */
    int32_t shared_bytes;       /* dynamic shared memory of the output kernel */
    int32_t state_shared_bytes; /* dynamic shared memory of the state kernel (or of state_seq) */
    /* The separate carry in segments of chunks (batched problems only; 0 or
     * 1: one segment, the carry as described above). With S > 1 segments of
     * ceil(num_chunks / S) chunks: gateloop_chunk_carry_segments_{g}
     * (grid (carry blocks, S − 1)) writes each segment's local sum (from a
     * zero state) and its decay product into ws_carry_segments, then the
     * carry (grid (carry blocks, S)) starts segment s from the state carried
     * over segments 0 .. s − 1 through those; the backward's adjoint carry
     * likewise (gateloop_chunk_grad_adjoint_carry_segments_{g}, its chunks
     * in reverse). */
    int64_t carry_segments;
    float *ws_carry_segments;   /* [2 (sum, decay product), S, B·H·K·V, 2] f32, NULL unless S > 1 */
} GateloopChunkParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopChunkParams) == 80 + 48 + 5 * 24 + 2 * 24 + 8 + 2 * 8 + 8 + 16,
                    "GateloopChunkParams layout");

/*
 * The chunked BACKWARD (cuda/chunk_grad.cu; CPU mirror src/cpu/chunked_grad.rs),
 * complex (g = c) or real (g = r: gated linear attention) gates. Gradients of
 * L = Σ dy ⊙ y + Σ Re(conj(dh_final) ⊙ h_final).
 * Six kernels (seven with dh0) on one stream, every one taking GateloopChunkGradParams or the
 * embedded forward struct `fwd`:
 *   1a. gateloop_chunk_state_{dtype}_{g}_{prec} (the forward's, on fwd): U_c, A_c.
 *   1b. gateloop_chunk_grad_w_{dtype}_{g}: grid.x = B·H·num_chunks·value_tiles,
 *       block CHUNK_THREADS, dynamic shared memory w_shared_bytes:
 *       W_c = Σ_n conj(Q̃_n) dy_nᵀ (planar parts·K × V) into ws_adj.
 *   2a. gateloop_chunk_carry_{g} (the forward's, on fwd): S_in(c) over U_c;
 *       h_final into the workspace sink fwd.h_final.
 *   2b. gateloop_chunk_grad_adjoint_carry_{g}: grid.x = ceil(B·H·K·V /
 *       CHUNK_CARRY_THREADS): D(c) over W_c (reverse, conj(A)). With
 *       fwd.carry_segments S > 1, grid.y = S, after
 *       gateloop_chunk_grad_adjoint_carry_segments_{g} (grid (grid.x, S − 1));
 *       2a likewise after gateloop_chunk_carry_segments_{g}.
 *   2c. gateloop_chunk_grad_dh0_{dtype}_{g} (only with HAS_DH0): the same
 *       grid and block: dh0 = conj(A_0) D(0) + W_0 from slot 0 of ws_adj and
 *       chunk 0's inputs, on CUDA cores.
 *   3a. gateloop_chunk_grad_qk_{dtype}_{g}: grid.x = B·H·num_chunks, dynamic
 *       shared memory qk_shared_bytes: dq, dk, dlog_gate, and each chunk's
 *       scores P into ws_scores.
 *   3b. gateloop_chunk_grad_dv_{dtype}_{g}: grid.x = B·H·num_chunks·value_tiles,
 *       dynamic shared memory dv_shared_bytes: dv (P read from ws_scores).
 *   (With the forward plan's sequential carry, 1a + 2a are
 *   gateloop_chunk_state_seq_{dtype}_{g}_{prec} and 1b + 2b
 *   gateloop_chunk_grad_w_seq_{dtype}_{g}, one block per (b, h, value tile,
 *   key slab of the forward walk's width), shared memory state_shared_bytes /
 *   w_shared_bytes.)
 * dq, dk, dv have the input dtype; dlog_gate, dh_final, dh0 are complex f32
 * (g = c) or f32 (g = r), like log_gate and h0.
 * ws_adj [B·H, num_chunks, parts·K, V] f32 (W_c, then the adjoint D(c) arriving
 * at the last step of chunk c from after it); parts = 2 (c) or 1 (r).
 * Packed sequences (fwd.cu_seqlens non-NULL): the forward's packed layout
 * (above: fwd.dims.batch = N, the inputs, dy and the gradients dq, dk, dv,
 * dlog_gate in batch row 0, h0, dh_final, dh0 and the sink [N, H, K, V], the
 * workspaces and ws_adj [H, num_chunks slots, ...]); grad_w, grad_qk and
 * grad_dv run (h, slot[, value tile]), an empty slot's block returning; 2a
 * and 2b are gateloop_chunk_carry_packed_{g} and
 * gateloop_chunk_grad_adjoint_carry_packed_{g} (each sequence's own slots;
 * the same grids), 2c reads each sequence's first chunk and slot. The
 * walking kernels (state_seq, grad_w_seq) take batched problems only.
 */
/* dh_final is present (otherwise NULL: the adjoint after the last step is 0). */
#define GATELOOP_GRAD_FLAG_HAS_DH_FINAL 1u
/* dh0 is written, by gateloop_chunk_grad_dh0 (otherwise NULL). */
#define GATELOOP_GRAD_FLAG_HAS_DH0 2u

typedef struct GateloopChunkGradParams {
    GateloopChunkParams fwd;  /* inputs, fwd.ws_state = S_in(c), fwd.ws_decay = A_c */
    const void *dy;           /* [B, L, H, V] dtype */
    const float *dh_final;    /* [B, H, K, V] complex f32 (c) or f32 (r), NULL unless HAS_DH_FINAL */
    void *dq;                 /* [B, L, H, K] dtype */
    void *dk;                 /* [B, L, H, K] dtype */
    void *dv;                 /* [B, L, H, V] dtype */
    float *dlog_gate;         /* [B, L, H, gate_dim] complex f32 (c) or f32 (r) */
    float *dh0;               /* [B, H, K, V] complex f32 (c) or f32 (r), NULL unless HAS_DH0 */
    float *ws_adj;            /* [B·H, num_chunks, parts·K, V] f32 */
    GateloopSeqStrides dy_strides;
    GateloopSeqStrides dq_strides;
    GateloopSeqStrides dk_strides;
    GateloopSeqStrides dv_strides;
    GateloopSeqStrides dgate_strides;
    GateloopStateStrides dh_final_strides;
    GateloopStateStrides dh0_strides;
    uint32_t grad_flags;       /* GATELOOP_GRAD_FLAG_* */
    int32_t w_shared_bytes;    /* dynamic shared memory of grad_w */
    int32_t qk_shared_bytes;   /* dynamic shared memory of grad_qk */
    int32_t dv_shared_bytes;   /* dynamic shared memory of grad_dv */
    /* [B·H, num_chunks, CHUNK_LEN, CHUNK_LEN] f32 (packed: [H, num_chunks
     * slots, ...]): each chunk's causal scores P (the forward output
     * kernel's), written by grad_qk on and below the diagonal and read by
     * grad_dv, which does not form them again. Required (the kernels trap
     * on NULL). */
    float *ws_scores;
} GateloopChunkGradParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopChunkGradParams) == 328 + 16 + 8 * 8 + 5 * 24 + 2 * 24 + 16 + 8,
                    "GateloopChunkGradParams layout");

/*
 * The fused scan's backward (cuda/scan_grad.cu): the adjoint recurrence
 *   δ_t = conj(a_{t+1}) ⊙ δ_{t+1} + q_tᵀ dy_t   (δ_L = dh_final, a_L = 1)
 * as the scan's machinery run backwards in time, with the forward states
 * recomputed from chunk-boundary checkpoints. Same chunks as the forward
 * (`fwd.warps`, `fwd.chunk_len`, `fwd.num_chunks`). Five launches on one
 * stream (the first four only when num_chunks > 1):
 *   gateloop_scan_reduce_{dtype}_v{fwd.value_tile}, gateloop_scan_carry: the
 *     forward's own kernels with `fwd` (y, h_final NULL): the state entering
 *     every chunk in fwd.chunk_state;
 *   gateloop_scan_grad_reduce_{dtype}_v{T}: grid.x = B·H · value_tiles ·
 *     (num_chunks − 1), block = 32 · warps; the reverse aggregate (A, B) of
 *     chunk c ≥ 1: A into rev_gate[bh][c − 1][k], B into rev_state[bh][c − 1][k][v];
 *   gateloop_scan_grad_carry: grid.x = ceil(B·H·K·V / SCAN_CARRY_BLOCK);
 *     rev_state[bh][c] becomes the adjoint entering chunk c from its right
 *     (slot num_chunks − 1 = dh_final or 0), sequentially from the last chunk;
 *   gateloop_scan_grad_{dtype}_v{T}: grid.x = B·H · num_chunks, block = 32 ·
 *     warps; each block loops over the value tiles (T columns per thread)
 *     and the K rows, writes dq, dk, dv, dlog_gate of its chunk (no atomics)
 *     and, for chunk 0, dh0.
 * Block index order (fastest first): chunk, [value tile,] (b, h).
 * q, k, v, dy and dq, dk, dv have the element type `fwd.dtype` (the entry
 * point's infix); log_gate, h0, dh_final, dlog_gate, dh0 and the workspace
 * are complex f32 for every type, and all arithmetic is f32.
 * dh_final NULL: zero. dh0 NULL: not written (given without HAS_H0: the
 * gradient of the implicit zero initial state).
 */
/* Largest value tile of the gradient kernel (_v1, _v2). */
#define GATELOOP_SCAN_GRAD_MAX_VALUE_TILE 2

typedef struct GateloopScanGradParams {
    /* The forward's inputs, geometry and checkpoint workspace. */
    GateloopScanParams fwd;
    /* Upstream gradients (device pointers). */
    const void *dy;          /* [B, L, H, V] dtype */
    const float *dh_final;   /* [B, H, K, V] complex f32, or NULL (zero) */
    /* Gradients (device pointers). */
    void *dq;                /* [B, L, H, K] dtype */
    void *dk;                /* [B, L, H, K] dtype */
    void *dv;                /* [B, L, H, V] dtype */
    float *dlog_gate;        /* [B, L, H, gate_dim] complex f32 */
    float *dh0;              /* [B, H, K, V] complex f32, or NULL (not written) */
    /* Workspaces (device pointers, NULL when num_chunks == 1). */
    float *rev_gate;         /* [B·H, num_chunks, K] complex f32 */
    float *rev_state;        /* [B·H, num_chunks, K, V] complex f32 */

    GateloopSeqStrides dy_strides;
    GateloopSeqStrides dq_strides;
    GateloopSeqStrides dk_strides;
    GateloopSeqStrides dv_strides;
    GateloopSeqStrides dgate_strides;
    GateloopStateStrides dh_final_strides;
    GateloopStateStrides dh0_strides;

    int32_t value_tile;      /* value columns per thread: the T of the entry point */
    int32_t pad0;
    int64_t value_tiles;     /* ceil(V / value_tile) */
    /* The running sums over the value tiles of dq and dk for a 16-bit dtype
     * with value_tiles > 1 (workspace, device pointers): [B, L, H, K] f32
     * with dq_strides / dk_strides, written by the first tile, rounded into
     * dq, dk by the last. NULL otherwise (f32 sums in dq, dk themselves; a
     * single tile stores its sum directly). */
    float *dq_acc;
    float *dk_acc;
} GateloopScanGradParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopScanGradParams) == sizeof(GateloopScanParams) + 11 * 8 + 5 * 24 + 2 * 24 + 16,
                    "GateloopScanGradParams layout");

/*
 * The recurrent mode's backward (cuda/recurrent_grad.cu): the adjoint
 * recurrence δ̃_t = a_{t+1} ⊙ δ̃_{t+1} + q_tᵀ dy_t (δ̃ = conj δ, δ̃_L =
 * conj(dh_final), a_L = 1) on the forward kernel's mapping, and the gate
 * gradient per segment of GATELOOP_RECURRENT_GRAD_SEGMENT steps from the
 * states at its ends (the file's header derives it). Three launches on one
 * stream:
 *   gateloop_recurrent_grad_fwd_{dtype}_r{R}, then
 *   gateloop_recurrent_grad_bwd_{dtype}_r{R}: the geometry of
 *     GateloopRecurrentParams `fwd` (grid B·H·value_tiles, block (32,
 *     key_groups), R ∈ {1, 2, 4, 8} rows a thread, so K ≤ 128), with
 *     chunk_len a power of two dividing the segment and dynamic shared
 *     memory chunk_len · (16 · padded_key_dim + 4 · VALUE_TILE · (2 +
 *     key_groups)) + GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES bytes (above 48
 *     KiB where the staging fills them: the launcher raises the limit);
 *     fwd.y and fwd.h_final NULL;
 *   gateloop_recurrent_grad_gate_{dtype}: grid.x = B·H · segments (segment
 *     fastest), block GATE_BLOCK (≥ K): one thread per key row; dynamic
 *     shared memory GATE_SHARED_BYTES.
 * Workspaces (device pointers into one f32 buffer):
 *   checkpoints [B·H, segments, K, V] complex: the state after each
 *     segment's last step (written by _fwd);
 *   adjoints [B·H, segments, K, V] complex: δ̃ at each segment's last step
 *     (written by _bwd);
 *   partial_dq, partial_dk [value_tiles, B·H, L, K] f32: dq_t, dk_t summed
 *     over each value tile's columns (by _fwd, _bwd).
 * q, k, v, dy, dq, dk, dv have the element type fwd.dtype; log_gate, h0,
 * dh_final, dlog_gate, dh0 complex f32. dh_final NULL: zero. dh0 NULL: not
 * written. gateloop_recurrent_grad_real_{fwd,bwd}_{dtype}_r{R} and
 * gateloop_recurrent_grad_real_gate_{dtype}: the same launches with real
 * gates, log_gate, h0, dh_final, dlog_gate and dh0 real f32 (the
 * workspaces as above, complex with Im = 0).
 * Packed sequences (fwd.cu_seqlens non-NULL, the forward's convention:
 * dims.batch = N, q, k, v, log_gate, dy, dq, dk, dv, dlog_gate one batch
 * row of dims.len steps; h0, dh_final, dh0 [N, H, K, V]): each sequence's
 * segments count from its first step; the workspaces have H rows instead
 * of B·H: checkpoints and adjoints [H, segments, K, V] with segments =
 * floor(L / 64) + N, sequence b's from slot floor(cu[b] / 64) + b (no two
 * sequences share a slot), partials [value_tiles, H, L, K] at the packed
 * steps; the gate launch's grid is H · segments, a block whose slot lies
 * past its sequence's segments returning at once.
 */
#define GATELOOP_RECURRENT_GRAD_SEGMENT 64
/* Dynamic shared memory of a sweep block beyond its staging: the block's
 * sequence (first and end step, first checkpoint, first partial row: four
 * int64), batched or packed. */
#define GATELOOP_RECURRENT_GRAD_SEQUENCE_BYTES 32
#define GATELOOP_RECURRENT_GRAD_GATE_BLOCK 128
/* Dynamic shared memory of the gate launch, bytes. */
#define GATELOOP_RECURRENT_GRAD_GATE_SHARED_BYTES 24832

typedef struct GateloopRecurrentGradParams {
    /* The forward's inputs and geometry. */
    GateloopRecurrentParams fwd;
    /* Upstream gradients (device pointers). */
    const void *dy;          /* [B, L, H, V] dtype */
    const float *dh_final;   /* [B, H, K, V] complex f32, or NULL (zero) */
    /* Gradients (device pointers). */
    void *dq;                /* [B, L, H, K] dtype */
    void *dk;                /* [B, L, H, K] dtype */
    void *dv;                /* [B, L, H, V] dtype */
    float *dlog_gate;        /* [B, L, H, gate_dim] complex f32 */
    float *dh0;              /* [B, H, K, V] complex f32, or NULL (not written) */
    /* Workspaces (device pointers). */
    float *checkpoints;
    float *adjoints;
    float *partial_dq;
    float *partial_dk;

    GateloopSeqStrides dy_strides;
    GateloopSeqStrides dq_strides;
    GateloopSeqStrides dk_strides;
    GateloopSeqStrides dv_strides;
    GateloopSeqStrides dgate_strides;
    GateloopStateStrides dh_final_strides;
    GateloopStateStrides dh0_strides;

    int64_t segments;        /* ceil(L / GATELOOP_RECURRENT_GRAD_SEGMENT); packed: floor(L / 64) + N (above) */
} GateloopRecurrentGradParams;
GATELOOP_ABI_ASSERT(sizeof(GateloopRecurrentGradParams) ==
                        sizeof(GateloopRecurrentParams) + 11 * 8 + 5 * 24 + 2 * 24 + 8,
                    "GateloopRecurrentGradParams layout");

#endif /* GATELOOP_ABI_H */
