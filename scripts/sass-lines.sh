#!/usr/bin/env bash
# Where a kernel's instructions come from, without a GPU: compiles one CUDA
# file for sm_90 (-lineinfo), disassembles it with nvdisasm and prints, for
# one entry point, its static instruction count, its opcode mix and the
# source lines that emit the most instructions.
#
#   scripts/sass-lines.sh FILE.cu KERNEL [TOP] [SASS_OUT]
#
#   FILE.cu   a file under cuda/ (e.g. chunk.cu)
#   KERNEL    an entry point (e.g. gateloop_chunk_output_bf16_c_exact)
#   TOP       source lines to list (default 30)
#   SASS_OUT  keep the full disassembly there (default: a temporary file)
#
# Static counts are per instruction in the binary, not per execution: a
# loop body counts once, an unrolled loop once per copy. The executed mix of
# a profiled launch comes from scripts/ncu-opcodes.py. nvdisasm is not in the
# nvcc wheels: scripts/find-nvdisasm.sh takes a system one (next to $NVCC or
# on PATH), else installs PyPI's nvidia-cuda-nvdisasm 13.2 into a cache.
# A development tool: the build and the tests never call it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
file="${1:?usage: sass-lines.sh FILE.cu KERNEL [TOP] [SASS_OUT]}"
kernel="${2:?usage: sass-lines.sh FILE.cu KERNEL [TOP] [SASS_OUT]}"
top="${3:-30}"
nvcc="$(bash "$root/scripts/provision-nvcc.sh" | tail -1)"
nvdisasm="$(bash "$root/scripts/find-nvdisasm.sh" "$nvcc")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sass="${4:-$work/out.sass}"
(cd "$root" && "$nvcc" -cubin -O3 -std=c++17 -lineinfo -Icuda -gencode arch=compute_90,code=sm_90 \
    -o "$work/out.cubin" "cuda/$file")
"$nvdisasm" -g -c "$work/out.cubin" > "$sass"
python3 - "$sass" "$kernel" "$top" <<'PY'
import collections, re, sys
path, kernel, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(path).read()
start = text.find(".text." + kernel + ":")
if start < 0:
    sys.exit(f"sass-lines: no entry point {kernel} in the disassembly")
end = text.find(".section", start + 10)
line, per_line, ops, n = None, collections.Counter(), collections.Counter(), 0
for row in text[start:end if end > 0 else None].splitlines():
    m = re.search(r'//## File "([^"]+)", line (\d+)', row)
    if m:
        line = f"{m.group(1).split('/')[-1]}:{m.group(2)}"
        continue
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", row)
    if m:
        n += 1
        per_line[line] += 1
        ops[m.group(2).split(".")[0]] += 1
print(f"{kernel}: {n} instructions (static)")
print("  " + "  ".join(f"{k} {v}" for k, v in ops.most_common(16)))
for where, count in per_line.most_common(top):
    print(f"  {count:6d}  {where}")
PY
