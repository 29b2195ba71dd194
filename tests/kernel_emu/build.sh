#!/usr/bin/env bash
# Builds one CPU emulation of CUDA kernels: the kernel files compiled
# UNCHANGED with g++ (emu.h force-included; see README.md) and linked with
# their driver, which launches them as the Rust launcher does.
#
#   build.sh KIND [OUT]    KIND: scan | chunk | attention | recurrent | check | libcuda | tensor-core
#
# OUT defaults to target/KIND_emu. Needs g++ ≥ 12 (C++20, _Float16).
# KIND banks builds that library with the shared-memory bank model
# (bank_model.cpp): the kernel files under g++'s ThreadSanitizer
# instrumentation, whose hooks it defines; scripts/smem-profile.sh runs it.
# KIND libcuda builds a shared library instead, a fake CUDA driver
# (cuda_driver.cpp) holding every kernel, for programs that load libcuda
# (scripts/emulated-device.sh); OUT is then a directory, which receives
# libcuda.so and libcuda.so.1. It is uninstrumented (GATELOOP_EMU_SANITIZER
# is ignored): it is loaded into uninstrumented Rust test binaries. It
# computes like a GPU at its documented worst (gpu_arith.h), unless
# GATELOOP_EMU_ARITH=exact.
#
# Flags: C++20, no FMA contraction (the kernels' fmaf calls are explicit, as
# on the GPU), and AddressSanitizer when this g++ has it, so a kernel that
# reads or writes outside a global buffer (the drivers allocate each one at
# its exact size) or a static __shared__ array, or past its dynamic shared
# bytes (the drivers poison the rest: emu_fill_shared), aborts with a report
# instead of reading garbage — what compute-sanitizer's memcheck would say
# on a GPU. GATELOOP_EMU_SANITIZER picks the instrumentation: address (the
# default), thread (ThreadSanitizer: every thread of a block is an OS thread
# and the barriers are std::barrier, so two threads touching the same shared
# or global word with no barrier between them, one of them writing, is a
# reported data race — what compute-sanitizer's racecheck says on a GPU;
# the report makes the emulator exit 66; blocks run last first), or none.
# Kernels with dynamic shared memory build with EMU_DYNAMIC_SHARED (emu.h).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
kind="${1:?usage: build.sh scan|chunk|attention|recurrent|check [OUT]}"
out="${2:-$root/target/${kind}_emu}"
# banks: the fake driver (libcuda) with the bank model.
banks=0
if [ "$kind" = banks ]; then kind=libcuda banks=1; fi
case "$kind" in
    scan) kernels=(scan scan_grad) driver=driver.cpp ;;
    chunk) kernels=(chunk chunk_grad) driver=chunk_driver.cpp ;;
    attention) kernels=(attention) driver=attention_driver.cpp ;;
    recurrent) kernels=(recurrent recurrent_grad) driver=recurrent_driver.cpp ;;
    check) kernels=(check) driver=check_driver.cpp ;;
    libcuda | banks) kernels=(scan scan_grad chunk chunk_grad attention recurrent recurrent_grad check selftest) driver=cuda_driver.cpp ;;
    # No kernels: the fake driver's tensor-core model, its vector path
    # against its scalar path (tensor_core_check.cpp).
    tensor-core) kernels=() driver=tensor_core_check.cpp ;;
    *) echo "build.sh: unknown kind '$kind' (scan, chunk, attention, recurrent, check, libcuda, banks, tensor-core)" >&2; exit 2 ;;
esac
# The kernels with a block-scope `extern __shared__` array (emu.h).
dynamic_shared() { case "$1" in chunk | chunk_grad | recurrent | recurrent_grad) return 0 ;; *) return 1 ;; esac; }
flags=(-std=c++20 -O2 -pthread -ffp-contract=off -Wno-unknown-pragmas -I"$here/include" -I"$here" -I"$root/cuda")
sanitizer="${GATELOOP_EMU_SANITIZER:-address}"
if [ "$kind" = tensor-core ]; then flags+=(-DEMU_GPU_ARITH); fi
if [ "$kind" = libcuda ]; then
    sanitizer=none
    # initial-exec: threadIdx / blockIdx are read on every index computation,
    # and the default model of a shared library calls __tls_get_addr each time.
    # Fibers (runtime.cpp): a barrier is a few context switches, not a
    # wake-up of every OS thread of the block.
    flags+=(-fPIC -ftls-model=initial-exec -DEMU_FIBERS)
    if [ "$banks" = 1 ]; then flags+=(-DEMU_BANKS -g); fi
    # The fake driver stands in for a GPU, so it computes like one at its
    # documented worst (gpu_arith.h): library functions and the SFU off by
    # their error bounds, tensor cores that truncate, and nvcc's default
    # contraction of a·b + c into one fma (g++'s -ffp-contract=fast, which
    # overrides the -ffp-contract=off above). GATELOOP_EMU_ARITH=exact keeps
    # the mirrors' arithmetic instead (to tell a bound from a bug).
    case "${GATELOOP_EMU_ARITH:-gpu}" in
        gpu) flags+=(-DEMU_GPU_ARITH -ffp-contract=fast) ;;
        exact) ;;
        *) echo "build.sh: unknown GATELOOP_EMU_ARITH '$GATELOOP_EMU_ARITH' (gpu, exact)" >&2; exit 2 ;;
    esac
fi
# The kernels' fmaf as one instruction instead of a libm call, when this CPU
# has it: the same correctly rounded result (-ffp-contract=off keeps the
# compiler from fusing anything else), several times faster on the WMMA
# emulation's inner products.
if grep -qw fma /proc/cpuinfo 2>/dev/null; then flags+=(-mfma); fi
# AVX2 for the fake driver's tensor-core model (include/mma.h: four outputs
# per vector, the same values as its scalar loop).
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then flags+=(-mavx2); fi
case "$sanitizer" in
    address)
        # Optional: a g++ without ASan builds an uninstrumented emulator.
        if echo 'int main(){}' | g++ -fsanitize=address -x c++ - -o /dev/null 2>/dev/null; then
            flags+=(-fsanitize=address -fno-omit-frame-pointer)
        fi
        # With UndefinedBehaviorSanitizer beside it when this g++ has it,
        # fatal at the first report: its alignment check is the GPU's
        # misaligned-address fault (emu.h gives float2/float4 CUDA's
        # alignment), and a signed overflow or an out-of-range shift in an
        # index is a wrong address on the GPU too. Without its null check:
        # the linker rewrites the thread_local threadIdx's address add into
        # a flag-less lea, and the check's branch then reads stale flags
        # (a false "null pointer" report at -O2); a null access faults
        # under ASan anyway.
        if echo 'int main(){}' | g++ -fsanitize=undefined -x c++ - -o /dev/null 2>/dev/null; then
            flags+=(-fsanitize=undefined -fno-sanitize=null -fno-sanitize-recover=all)
        fi
        ;;
    # Asked for by name, so no silent fallback: the build fails without it.
    # The race build also runs each grid's blocks last first (runtime.cpp
    # EMU_REVERSE_BLOCKS): a block that reads what another block of the
    # same launch writes then reads poison.
    thread) flags+=(-fsanitize=thread -fno-omit-frame-pointer -g -DEMU_REVERSE_BLOCKS) ;;
    none) ;;
    *) echo "build.sh: unknown GATELOOP_EMU_SANITIZER '$sanitizer' (address, thread, none)" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$out")"
# One kernel file: compile it to $out.$k.o (run in the background, one job
# per kernel file: the files compile independently, and the largest ones
# take minutes each under the sanitizers).
compile_kernel() {
    local k=$1 src sec
    local kflags=("${flags[@]}")
    if dynamic_shared "$k"; then kflags+=(-DEMU_DYNAMIC_SHARED); fi
    # The bank model's hooks on every load and store (bank_model.cpp), of
    # the accesses as written: a float4 one 16-byte access (no scalar
    # replacement of aggregates), no vectorized loops.
    if [ "$banks" = 1 ]; then
        kflags+=(-fsanitize=thread --param tsan-instrument-func-entry-exit=0 -fno-tree-sra -fno-tree-vectorize)
    fi
    src="$root/cuda/$k.cu"
    if [ "$kind" = libcuda ]; then
        # The fake driver finds kernels by name: compile the kernel file with
        # one registration per entry point appended (emu_kernels.h), each
        # with the thread count of its __launch_bounds__, listed from the
        # preprocessed source (emu.h's EMU_LIST_ENTRIES keeps the bounds).
        src="$out.$k.wrapper.cpp"
        {
            echo "#include \"$root/cuda/$k.cu\""
            echo '#include "emu_kernels.h"'
            g++ "${kflags[@]}" -DEMU_LIST_ENTRIES -E -x c++ -include "$here/emu.h" "$root/cuda/$k.cu" | tr '\n' ' ' |
                grep -oE 'EMU_LAUNCH_BOUNDS *\( *[^,)]*[^)]*\) *gateloop_[a-z0-9_]+' |
                sed -E 's/EMU_LAUNCH_BOUNDS *\( *([^,)]*[^,) ])[^)]*\) *(gateloop_[a-z0-9_]+)/EMU_REGISTER(\2, \1)/'
        } > "$src"
        if ! grep -q EMU_REGISTER "$src"; then echo "build.sh: no entry point found in cuda/$k.cu" >&2; exit 1; fi
    fi
    g++ "${kflags[@]}" -x c++ -include "$here/emu.h" -c "$src" -o "$out.$k.o"
    if [ "$kind" = libcuda ]; then rm -f "$src"; fi
    # Static __shared__ variables of kernel templates are COMDAT statics,
    # for which g++ ignores emu.h's section attribute: move their sections
    # (.bss._ZZN8gateloop…, the function-local statics of namespace
    # gateloop, which in kernel code are __shared__ only) into that section,
    # which emu_launch poisons before every block.
    local renames=()
    while read -r sec; do
        renames+=(--rename-section "$sec=emu_static_shared")
    done < <(readelf -SW "$out.$k.o" | grep -oE '\.bss\._ZZN8gateloop[^ ]*' | sort -u)
    if [ "${#renames[@]}" -gt 0 ]; then objcopy "${renames[@]}" "$out.$k.o"; fi
}
objs=()
pids=()
for k in "${kernels[@]}"; do
    compile_kernel "$k" &
    pids+=($!)
    objs+=("$out.$k.o")
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [ "$failed" != 0 ]; then echo "build.sh: compiling a kernel file failed (its g++ error is above)" >&2; rm -f "${objs[@]}"; exit 1; fi
if [ "$kind" = libcuda ]; then
    mkdir -p "$out"
    extra=()
    if [ "$banks" = 1 ]; then extra=("$here/bank_model.cpp" -ldl); fi
    g++ "${flags[@]}" -shared -Wl,-soname,libcuda.so.1 -Wl,--no-undefined "$here/runtime.cpp" "$here/$driver" \
        "${extra[@]}" "${objs[@]}" -o "$out/libcuda.so"
    ln -sf libcuda.so "$out/libcuda.so.1"
elif [ "$kind" = tensor-core ]; then
    g++ "${flags[@]}" "$here/$driver" -o "$out"
else
    g++ "${flags[@]}" "$here/runtime.cpp" "$here/$driver" "${objs[@]}" -o "$out"
fi
rm -f "${objs[@]}"
echo "$out"
