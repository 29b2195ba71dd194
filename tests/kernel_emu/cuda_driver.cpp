// A fake libcuda.so: the part of the CUDA driver API that cudarc and
// gateloop's launchers (src/cuda) call, with every kernel of cuda/*.cu run
// by the CPU emulator (emu.h, runtime.cpp). A program that dlopens it
// instead of NVIDIA's driver (LD_LIBRARY_PATH; scripts/emulated-device.sh)
// runs the Rust launchers end to end: their parameter structs, grids, block
// shapes, dynamic shared memory sizes and attributes, workspace sizes,
// uploads and downloads, exactly as they would reach a GPU.
//
// What it checks that a GPU's driver checks (each failure prints why to
// stderr and returns the driver's error code):
//   - a launch: a grid or block dimension of 0 or beyond CUDA's limits, more
//     threads than the kernel's __launch_bounds__, more dynamic shared memory
//     than the function allows (48 KiB unless CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_
//     SHARED_SIZE_BYTES raised it), a function of an unloaded module;
//   - cuFuncSetAttribute beyond the device's opt-in shared memory;
//   - a copy or memset outside one live allocation; a module image that is
//     not a fatbin or cubin; a device other than 0.
// And what a GPU would only show as wrong numbers or a fault:
//   - fresh allocations hold 0xff bytes (NaN), never zeros;
//   - each allocation is 256-byte aligned and ends at an inaccessible page,
//     so a read or write past its end faults; the bytes between its end and
//     that page hold a NaN canary, checked after every launch (a write past
//     the end is reported and the launch fails with CUDA_ERROR_ILLEGAL_ADDRESS);
//   - a freed allocation is unmapped: a later access faults;
//   - dynamic shared memory is 0xff bytes before every block (static shared
//     memory too: emu_launch).
//
// Execution is synchronous: a launch, copy or memset has finished when its
// call returns, which is one of the schedules a GPU may take, so streams
// and events only keep time. Launches run one at a time (one lock): the
// emulator's static shared memory and block state are global.
//
// Not modelled: grids with y or z > 1 (CUDA_ERROR_NOT_SUPPORTED; the
// launchers use 1-D grids), cooperative launches, graphs, several devices.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"
#include "emu_kernels.h"

void emu_launch(unsigned grid, EmuDim3 block, const std::function<void()>& kernel);

// ---- the kernels' dynamic shared memory ---------------------------------

// The device's opt-in shared memory per block (an H100 / H200: 227 KiB).
static constexpr int kOptinShared = 232448;
// The default limit of a function's dynamic shared memory.
static constexpr int kDefaultDynamicShared = 48 * 1024;

// The block-scope `extern __shared__` arrays of cuda/recurrent.cu
// (namespace gateloop, float4) and cuda/chunk.cu, cuda/chunk_grad.cu
// (namespace gateloop::chunk, bytes), built with EMU_DYNAMIC_SHARED.
namespace gateloop {
alignas(128) float4 smem[kOptinShared / sizeof(float4)];
namespace chunk {
alignas(128) unsigned char smem[kOptinShared];
}
}  // namespace gateloop

#ifdef EMU_BANKS
// The static __shared__ section (runtime.cpp poisons it), for the bank model.
extern "C" unsigned char __start_emu_static_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_static_shared[] __attribute__((weak));
#endif

void emu_expect_shared(const void* p, const char* what) {
    emu_expect_in(p, gateloop::chunk::smem, sizeof(gateloop::chunk::smem), what);
}

// ---- the driver API's types -----------------------------------------------

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

// The driver's result codes this driver returns: the enum and the names
// cuGetErrorName gives, from one list.
#define EMU_CU_RESULTS(X)                     \
    X(CUDA_SUCCESS, 0)                        \
    X(CUDA_ERROR_INVALID_VALUE, 1)            \
    X(CUDA_ERROR_OUT_OF_MEMORY, 2)            \
    X(CUDA_ERROR_NOT_INITIALIZED, 3)          \
    X(CUDA_ERROR_INVALID_DEVICE, 101)         \
    X(CUDA_ERROR_INVALID_IMAGE, 200)          \
    X(CUDA_ERROR_INVALID_CONTEXT, 201)        \
    X(CUDA_ERROR_INVALID_HANDLE, 400)         \
    X(CUDA_ERROR_NOT_FOUND, 500)              \
    X(CUDA_ERROR_ILLEGAL_ADDRESS, 700)        \
    X(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, 701) \
    X(CUDA_ERROR_NOT_SUPPORTED, 801)

enum : CUresult {
#define EMU_CU_ENUM(name, value) name = value,
    EMU_CU_RESULTS(EMU_CU_ENUM)
#undef EMU_CU_ENUM
};

struct EmuContext {
    int device = 0;
};
struct EmuModule {
    bool loaded = true;
};
struct EmuFunction {
    std::string name;
    const EmuKernel* kernel;
    EmuModule* module;
    int max_dynamic_shared = kDefaultDynamicShared;
};
struct EmuStream {};
struct EmuEvent {
    std::chrono::steady_clock::time_point at{};
    bool recorded = false;
};
using CUcontext = EmuContext*;
using CUmodule = EmuModule*;
using CUfunction = EmuFunction*;
using CUstream = EmuStream*;
using CUevent = EmuEvent*;

// ---- state ----------------------------------------------------------------

static std::mutex g_lock;  // every call below that touches shared state
static EmuContext g_context;
static thread_local CUcontext t_current = nullptr;

static std::unordered_map<std::string, EmuKernel>& kernel_registry() {
    static std::unordered_map<std::string, EmuKernel> r;
    return r;
}

void emu_add_kernel(const char* name, EmuKernel kernel) { kernel_registry().emplace(name, std::move(kernel)); }

static CUresult fail(CUresult code, const char* call, const std::string& why) {
    std::fprintf(stderr, "fake libcuda (gateloop kernel emulator): %s: %s\n", call, why.c_str());
    return code;
}

// ---- device memory ----------------------------------------------------------

struct Allocation {
    size_t bytes;      // what the caller asked for
    size_t span;       // bytes rounded up to 256: [start + bytes, start + span) holds the canary
    void* mapping;     // the whole mapping, guard page included
    size_t map_bytes;
};
static std::map<uintptr_t, Allocation> g_allocations;  // by start address
static constexpr uint32_t kCanary = 0x7fa5a5a5u;       // a NaN, unlike any the kernels or tests write
static size_t g_live_bytes = 0;
static constexpr size_t kTotalMemory = size_t(16) << 30;

static unsigned char canary_byte(uintptr_t address) {
    return static_cast<unsigned char>(kCanary >> (8 * (address % 4)));
}

static CUresult allocate(CUdeviceptr* out, size_t bytes, const char* call) {
    if (out == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, call, "null result pointer");
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, call, "0 bytes");
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t span = (bytes + 255) / 256 * 256;
    const size_t data_pages = (span + page - 1) / page * page;
    const size_t map_bytes = data_pages + page;
    std::lock_guard<std::mutex> lock(g_lock);
    if (g_live_bytes + span > kTotalMemory) return fail(CUDA_ERROR_OUT_OF_MEMORY, call, std::to_string(bytes) + " bytes");
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return fail(CUDA_ERROR_OUT_OF_MEMORY, call, std::to_string(bytes) + " bytes");
    unsigned char* guard = static_cast<unsigned char*>(m) + data_pages;
    mprotect(guard, page, PROT_NONE);
    unsigned char* start = guard - span;  // 256-aligned: the page is
    std::memset(start, 0xff, bytes);      // never zeros: NaN as f32
    for (size_t i = bytes; i < span; ++i) start[i] = canary_byte(reinterpret_cast<uintptr_t>(start + i));
    g_allocations[reinterpret_cast<uintptr_t>(start)] = Allocation{bytes, span, m, map_bytes};
    g_live_bytes += span;
    *out = reinterpret_cast<uintptr_t>(start);
    return CUDA_SUCCESS;
}

static CUresult release(CUdeviceptr p, const char* call) {
    std::lock_guard<std::mutex> lock(g_lock);
    auto it = g_allocations.find(static_cast<uintptr_t>(p));
    if (it == g_allocations.end()) return fail(CUDA_ERROR_INVALID_VALUE, call, "not the start of a live allocation");
    munmap(it->second.mapping, it->second.map_bytes);
    g_live_bytes -= it->second.span;
    g_allocations.erase(it);
    return CUDA_SUCCESS;
}

// Whether [p, p + bytes) lies inside one live allocation (call locked).
static bool inside_allocation(CUdeviceptr p, size_t bytes) {
    auto it = g_allocations.upper_bound(static_cast<uintptr_t>(p));
    if (it == g_allocations.begin()) return false;
    --it;
    const uintptr_t start = it->first;
    return p >= start && p - start <= it->second.bytes && bytes <= it->second.bytes - (p - start);
}

static CUresult check_range(CUdeviceptr p, size_t bytes, const char* call) {
    if (bytes == 0) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> lock(g_lock);
    if (!inside_allocation(p, bytes)) {
        char why[160];
        std::snprintf(why, sizeof why, "[0x%llx, +%zu bytes) is not inside one live allocation", p, bytes);
        return fail(CUDA_ERROR_INVALID_VALUE, call, why);
    }
    return CUDA_SUCCESS;
}

// The allocations whose canary a launch overwrote (call locked).
static std::string overwritten_canaries() {
    std::string out;
    for (const auto& [start, a] : g_allocations) {
        const unsigned char* b = reinterpret_cast<const unsigned char*>(start);
        for (size_t i = a.bytes; i < a.span; ++i) {
            if (b[i] != canary_byte(start + i)) {
                char line[160];
                std::snprintf(line, sizeof line, " allocation 0x%lx of %zu bytes written at byte %zu;", start, a.bytes, i);
                out += line;
                break;
            }
        }
    }
    return out;
}

// ---- the API --------------------------------------------------------------

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    if (n == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (d == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return fail(CUDA_ERROR_INVALID_DEVICE, "cuDeviceGet", "only device 0 is emulated");
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, static_cast<size_t>(len), "%s", "gateloop kernel emulator (CPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case 1: *v = 1024; break;                // max threads per block
        case 2: *v = 1024; break;                // max block dim x
        case 3: *v = 1024; break;                // y
        case 4: *v = 64; break;                  // z
        case 5: *v = 2147483647; break;          // max grid dim x
        case 6: case 7: *v = 65535; break;       // y, z
        case 8: *v = kDefaultDynamicShared; break;  // shared memory per block
        case 10: *v = 32; break;                 // warp size
        case 13: *v = 1980000; break;            // clock rate, kHz
        case 16: *v = 132; break;                // multiprocessors
        case 36: *v = 2619000; break;            // memory clock, kHz
        case 37: *v = 6144; break;               // memory bus width, bits
        case 38: *v = 50 * 1024 * 1024; break;   // L2 bytes
        case 75: *v = 9; break;                  // compute capability major
        case 76: *v = 0; break;                  // minor
        case 97: *v = kOptinShared; break;       // opt-in shared memory per block
        case 115: *v = 1; break;                 // memory pools supported
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *bytes = kTotalMemory;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::memset(uuid, 0x6e, 16);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *c = &g_context;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return d == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }
CUresult cuCtxSetCurrent(CUcontext c) {
    if (c != nullptr && c != &g_context) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent", "unknown context");
    t_current = c;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = t_current;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c != nullptr) *c = t_current;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new EmuStream;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUresult cuStreamDestroy_v2(CUstream s) {
    delete s;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuLaunchHostFunc(CUstream, void (*f)(void*), void* data) {
    f(data);
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new EmuEvent;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    e->at = std::chrono::steady_clock::now();
    e->recorded = true;
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (!start->recorded || !end->recorded) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime", "event never recorded");
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }
CUresult cuEventDestroy_v2(CUevent e) {
    delete e;
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return allocate(p, bytes, "cuMemAlloc"); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return allocate(p, bytes, "cuMemAllocAsync"); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p, "cuMemFree"); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p, "cuMemFreeAsync"); }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> lock(g_lock);
    *free_bytes = kTotalMemory - g_live_bytes;
    *total = kTotalMemory;
    return CUDA_SUCCESS;
}
// cudarc allocates with cuMemAllocAsync from the device's pool; this
// driver has one pool, which holds nothing once freed (the allocations are
// unmapped at once), so trimming it has nothing to do.
struct EmuMemPool {};
static EmuMemPool g_pool;
CUresult cuDeviceGetMemPool(EmuMemPool** pool, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &g_pool;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetDefaultMemPool(EmuMemPool** pool, CUdevice d) { return cuDeviceGetMemPool(pool, d); }
CUresult cuMemPoolTrimTo(EmuMemPool* pool, size_t) { return pool == &g_pool ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }
CUresult cuMemPoolGetAttribute(EmuMemPool* pool, int, void* value) {
    if (pool != &g_pool || value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::memset(value, 0, sizeof(unsigned long long));  // the largest attribute type (cuuint64_t)
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(EmuMemPool* pool, int, void*) {
    return pool == &g_pool ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes == 0 ? 1 : bytes);
    return *p != nullptr ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    std::free(p);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    if (CUresult r = check_range(dst, bytes, "cuMemcpyHtoD")) return r;
    if (bytes) std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    if (CUresult r = check_range(src, bytes, "cuMemcpyDtoH")) return r;
    if (bytes) std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, bytes);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    if (CUresult r = check_range(src, bytes, "cuMemcpyDtoD (source)")) return r;
    if (CUresult r = check_range(dst, bytes, "cuMemcpyDtoD (destination)")) return r;
    if (bytes) std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, bytes);
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    if (CUresult r = check_range(dst, n, "cuMemsetD8")) return r;
    if (n) std::memset(reinterpret_cast<void*>(dst), value, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream) { return cuMemsetD8_v2(dst, value, n); }
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned value, size_t n) {
    if (CUresult r = check_range(dst, n * 4, "cuMemsetD32")) return r;
    unsigned* p = reinterpret_cast<unsigned*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = value;
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, CUstream) { return cuMemsetD32_v2(dst, value, n); }

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (m == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    uint32_t magic;
    std::memcpy(&magic, image, 4);
    // A fatbin (nvcc -fatbin) or a cubin (ELF); the emulated kernels stand
    // in for whatever it holds.
    if (magic != 0xba55ed50u && magic != 0x464c457fu) {
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData", "the image is neither a fatbin nor a cubin");
    }
    *m = new EmuModule;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule m) {
    // Functions of an unloaded module fail to launch, as on a GPU; the
    // handle stays allocated so that such a launch is reported, not UB.
    m->loaded = false;
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (f == nullptr || m == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    auto it = kernel_registry().find(name);
    if (it == kernel_registry().end()) return fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction", std::string("no kernel named ") + name);
    *f = new EmuFunction{name, &it->second, m};
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attribute, CUfunction f) {
    if (v == nullptr || f == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case 0: *v = static_cast<int>(f->kernel->max_threads); break;  // max threads per block
        case 8: *v = f->max_dynamic_shared; break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, int attribute, int value) {
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > kOptinShared) {
            return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute",
                        f->name + ": max dynamic shared memory " + std::to_string(value) + " > the device's " +
                            std::to_string(kOptinShared));
        }
        f->max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }
// Resident blocks per SM, as an H100 / H200 SM limits them: 2048 threads,
// 32 blocks, 228 KiB of shared memory with 1 KiB reserved per block. Registers
// are not modelled (the emulator does not know a kernel's register count; a
// GPU's driver counts them too), so this is an upper bound of the card's
// answer. A block larger than the kernel's __launch_bounds__ holds 0.
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, CUfunction f, int block_size,
                                                             size_t dynamic_shared, unsigned) {
    if (blocks == nullptr || f == nullptr || block_size <= 0) return CUDA_ERROR_INVALID_VALUE;
    constexpr long kSmThreads = 2048, kSmBlocks = 32, kSmShared = 233472, kReservedPerBlock = 1024;
    if (static_cast<unsigned>(block_size) > f->kernel->max_threads) {
        *blocks = 0;
        return CUDA_SUCCESS;
    }
    long n = std::min(kSmThreads / block_size, kSmBlocks);
    n = std::min(n, kSmShared / (static_cast<long>(dynamic_shared) + kReservedPerBlock));
    *blocks = static_cast<int>(n);
    return CUDA_SUCCESS;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, CUfunction f, int block_size, size_t dynamic_shared) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, f, block_size, dynamic_shared, 0);
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, CUstream, void** params, void** extra) {
    static const char* call = "cuLaunchKernel";
    if (f == nullptr) return fail(CUDA_ERROR_INVALID_HANDLE, call, "null function");
    const std::string who = f->name + ": ";
    if (!f->module->loaded) return fail(CUDA_ERROR_INVALID_HANDLE, call, who + "its module was unloaded");
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) {
        return fail(CUDA_ERROR_INVALID_VALUE, call,
                    who + "a zero dimension: grid (" + std::to_string(gx) + ", " + std::to_string(gy) + ", " +
                        std::to_string(gz) + "), block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                        std::to_string(bz) + ")");
    }
    if (gx > 2147483647u || gy > 65535u || gz > 65535u || bx > 1024u || by > 1024u || bz > 64u) {
        return fail(CUDA_ERROR_INVALID_VALUE, call, who + "a grid or block dimension beyond CUDA's limits");
    }
    const unsigned threads = bx * by * bz;
    if (threads > 1024u || threads > f->kernel->max_threads) {
        return fail(CUDA_ERROR_INVALID_VALUE, call,
                    who + std::to_string(threads) + " threads per block > its __launch_bounds__ (" +
                        std::to_string(f->kernel->max_threads) + ")");
    }
    if (gz != 1) return fail(CUDA_ERROR_NOT_SUPPORTED, call, who + "the emulator runs 1-D and 2-D grids only");
    if (static_cast<int>(shared_bytes) > f->max_dynamic_shared || shared_bytes > static_cast<unsigned>(kOptinShared)) {
        return fail(CUDA_ERROR_INVALID_VALUE, call,
                    who + std::to_string(shared_bytes) + " bytes of dynamic shared memory > the function's limit " +
                        std::to_string(f->max_dynamic_shared) +
                        " (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES raises it)");
    }
    if (extra != nullptr) return fail(CUDA_ERROR_NOT_SUPPORTED, call, who + "`extra` parameters");
    if (params == nullptr || params[0] == nullptr) return fail(CUDA_ERROR_INVALID_VALUE, call, who + "no parameters");
    // The parameter struct is copied at the launch, as the driver does.
    std::vector<unsigned char> param(f->kernel->param_bytes);
    std::memcpy(param.data(), params[0], param.size());
    const EmuKernel* kernel = f->kernel;
    std::lock_guard<std::mutex> lock(g_lock);
    // A 2-D grid as gy rows of gx blocks, in order (a row of a GPU's grid
    // may run before, after or beside another: the kernels must not care).
    emu_grid_rows = gy;
#ifdef EMU_BANKS
    {
        // The shared memory a block of this launch may touch: the dynamic
        // buffers (their first shared_bytes) and the static __shared__ section.
        const void* buffers[] = {gateloop::smem, gateloop::chunk::smem, __start_emu_static_shared};
        const size_t bytes[] = {shared_bytes, shared_bytes,
                                static_cast<size_t>(__stop_emu_static_shared - __start_emu_static_shared)};
        emu_banks_launch(f->name.c_str(), buffers, bytes, 3, gx * gy);
    }
#endif
    for (unsigned row = 0; row < gy; ++row) {
        emu_grid_row = row;
        emu_launch(gx, EmuDim3{bx, by, bz}, [&] {
            if (emu_thread_rank() == 0) {
                std::memset(gateloop::smem, 0xff, shared_bytes);
                std::memset(gateloop::chunk::smem, 0xff, shared_bytes);
            }
            __syncthreads();
            kernel->run(param.data());
        });
    }
    emu_grid_row = 0;
    emu_grid_rows = 1;
    const std::string overwritten = overwritten_canaries();
    if (!overwritten.empty()) {
        return fail(CUDA_ERROR_ILLEGAL_ADDRESS, call, who + "wrote past the end of a buffer:" + overwritten);
    }
    return CUDA_SUCCESS;
}

static const char* error_name(CUresult r) {
    switch (r) {
#define EMU_CU_NAME(name, value) \
    case name:                   \
        return #name;
        EMU_CU_RESULTS(EMU_CU_NAME)
#undef EMU_CU_NAME
        default: return "CUDA_ERROR_UNKNOWN";
    }
}
CUresult cuGetErrorName(CUresult r, const char** s) {
    *s = error_name(r);
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult r, const char** s) {
    *s = error_name(r);
    return CUDA_SUCCESS;
}

}  // extern "C"
