# The g++ flags of every emulator build (sourced by build_*.sh, which set
# $here and $root): C++20, no FMA contraction (the kernels' fmaf calls are
# explicit, as on the GPU), and AddressSanitizer when this g++ has it, so a
# kernel that reads or writes outside a global buffer (the drivers allocate
# each one at its exact size) or a static __shared__ array, or past its
# dynamic shared bytes (chunk_driver.cpp poisons the rest), aborts with a
# report instead of reading garbage — what compute-sanitizer's memcheck
# would say on a GPU. GATELOOP_EMU_ASAN=0 turns it off.
emu_flags=(-std=c++20 -O2 -pthread -ffp-contract=off -Wno-unknown-pragmas -I"$here/include" -I"$here" -I"$root/cuda")
if [ "${GATELOOP_EMU_ASAN:-1}" != 0 ] && echo 'int main(){}' | g++ -fsanitize=address -x c++ - -o /dev/null 2>/dev/null; then
    emu_flags+=(-fsanitize=address -fno-omit-frame-pointer)
fi
