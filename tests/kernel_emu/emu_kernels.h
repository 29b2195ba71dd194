// The fake CUDA driver's kernel registry (cuda_driver.cpp): every entry
// point of cuda/*.cu, registered by name from the translation unit that
// defines it (build.sh's generated wrapper), with the parameter struct type
// its signature names and the thread count of its __launch_bounds__.
#pragma once
#include <cstddef>
#include <cstring>
#include <functional>

struct EmuKernel {
    // The most threads a block may have (the kernel's __launch_bounds__).
    unsigned max_threads;
    // sizeof the kernel's one parameter, the Gateloop*Params struct.
    size_t param_bytes;
    // Runs the kernel body on the calling emulated thread with the
    // parameter struct read from `param` (param_bytes bytes).
    std::function<void(const void* param)> run;
};

void emu_add_kernel(const char* name, EmuKernel kernel);

// The parameter type comes from the kernel's own signature, never from its
// name, so the registry cannot call a kernel with the wrong struct.
template <class P>
bool emu_register_kernel(const char* name, void (*kernel)(P), unsigned max_threads) {
    emu_add_kernel(name, EmuKernel{max_threads, sizeof(P), [kernel](const void* param) {
                                       P p;
                                       std::memcpy(static_cast<void*>(&p), param, sizeof(P));
                                       kernel(p);
                                   }});
    return true;
}

#define EMU_REGISTER(name, max_threads) \
    static const bool emu_registered_##name = emu_register_kernel(#name, &name, static_cast<unsigned>(max_threads));
