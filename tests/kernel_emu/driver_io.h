// What the emulator drivers (driver.cpp, chunk_driver.cpp,
// attention_driver.cpp, recurrent_driver.cpp) share: raw little-endian f32
// files, as tests/emu_support writes and reads them, their conversion to and
// from the kernels' element types (f32, __half, __nv_bfloat16), the
// contiguous [B, L, H, D] strides of the launchers, and the dynamic shared
// memory's poisoning.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
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
// Element conversions of the kernels' input types: round to nearest even
// (exact for representable values) and widening (exact).
static float to_elem(float x, float) { return x; }
static __half to_elem(float x, __half) { return __float2half_rn(x); }
static __nv_bfloat16 to_elem(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }
static float widen(float x) { return x; }
static float widen(__half x) { return __half2float(x); }
static float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// `n` values of element type T from a raw f32 file, which must hold values
// representable in T (the tests round them first, so the f64 reference sees
// exactly what the kernel sees): a value the conversion would change exits.
template <class T>
static std::vector<T> read_elems(const std::string& path, size_t n) {
    const std::vector<float> x = read_f32(path, n);
    std::vector<T> out(n);
    for (size_t i = 0; i < n; ++i) {
        out[i] = to_elem(x[i], T{});
        if (widen(out[i]) != x[i]) {
            std::fprintf(stderr, "%s[%zu] = %a is not representable in the element type\n", path.c_str(), i, x[i]);
            std::exit(2);
        }
    }
    return out;
}
// `n` NaNs of element type T (poisoned outputs).
template <class T>
static std::vector<T> nan_elems(size_t n) {
    return std::vector<T>(n, to_elem(std::nanf(""), T{}));
}
// Writes `x` widened to f32 (exact) as a raw f32 file.
template <class T>
static void write_widened(const std::string& path, const std::vector<T>& x) {
    std::vector<float> w(x.size());
    for (size_t i = 0; i < x.size(); ++i) w[i] = widen(x[i]);
    write_f32(path, w);
}
static GateloopSeqStrides seq(int64_t L, int64_t H, int64_t D) { return GateloopSeqStrides{L * H * D, H * D, D}; }

// What every Gateloop*Params has in common, as the launchers set it
// (launch.rs: SeqParams::for_dims, then Buffers::bind): the buffers, dims,
// contiguous strides, the gate-layout and h0 flags (h0 null: no HAS_H0),
// the dtype. Each driver then sets its kernel's own fields.
template <class P>
static void bind_common(P& p, int64_t B, int64_t L, int64_t H, int64_t K, int64_t V, int64_t G, uint32_t dtype,
                        const void* q, const void* k, const void* v, const float* gate, const float* h0, void* y,
                        float* h_final) {
    p.q = q;
    p.k = k;
    p.v = v;
    p.log_gate = gate;
    p.h0 = h0;
    p.y = y;
    p.h_final = h_final;
    p.dims = GateloopDims{B, L, H, K, V, G};
    p.q_strides = p.k_strides = seq(L, H, K);
    p.v_strides = p.y_strides = seq(L, H, V);
    p.gate_strides = seq(L, H, G);
    p.h0_strides = p.h_final_strides = GateloopStateStrides{H * K * V, K * V, V};
    p.flags = (G == 1 ? GATELOOP_FLAG_PER_HEAD_GATE : 0) | (h0 ? GATELOOP_FLAG_HAS_H0 : 0);
    p.dtype = dtype;
}
