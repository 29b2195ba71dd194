#!/usr/bin/env bash
# Which CUDA entry points' machine code a change touched, without a GPU:
# compiles BASE's and this tree's kernel files for sm_80 and sm_90 (the
# build's flags, -lineinfo included), disassembles both with nvdisasm and
# compares every entry point's instructions, branch labels and nvcc's
# internal helper names renumbered (they shift when entries are added).
# Prints, per file and architecture, the entries whose code differs, and
# those added or gone; "same N" counts the identical ones. A change meant
# to touch only new entries (a new variant beside the old ones) shows
# "differs 0". A development tool: the build and the tests never call it.
#
#   scripts/sass-diff.sh [BASE] [FILE.cu ...]   BASE: a commit (default HEAD);
#                                               files under cuda/ (default chunk.cu chunk_grad.cu)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
base="${1:-HEAD}"
shift || true
files=("$@")
if [[ ${#files[@]} -eq 0 ]]; then files=(chunk.cu chunk_grad.cu); fi
nvcc="$(bash "$root/scripts/provision-nvcc.sh" | tail -1)"
nvdisasm="$(bash "$root/scripts/find-nvdisasm.sh" "$nvcc")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/base" "$work/tree"
git -C "$root" archive "$base" cuda | tar -x -C "$work/base"
cp -r "$root/cuda" "$work/tree/"
for side in base tree; do
    for f in "${files[@]}"; do
        for sm in 80 90; do
            (cd "$work/$side" && "$nvcc" -cubin -O3 -std=c++17 -lineinfo -Icuda \
                -gencode "arch=compute_$sm,code=sm_$sm" -o "$f.$sm.cubin" "cuda/$f") &
        done
    done
    wait
done
for f in "${files[@]}"; do
    for sm in 80 90; do
        echo "== $f sm_$sm"
        python3 - "$nvdisasm" "$work/base/$f.$sm.cubin" "$work/tree/$f.$sm.cubin" <<'PY'
import re, subprocess, sys
nvdisasm, before, after = sys.argv[1:4]
def entries(cubin):
    text = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    out, cur = {}, None
    for row in text.splitlines():
        m = re.match(r"\s*\.text\.(\w+):", row)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", row)
        if m and cur is not None:
            cur.append(m.group(1))
    for name, code in out.items():
        labels = {}
        renumber = lambda m: labels.setdefault(m.group(0), f"L{len(labels)}")
        out[name] = [re.sub(r"__internal_\d+_", "__internal_", re.sub(r"\.L_x_\d+", renumber, i)) for i in code]
    return out
a, b = entries(before), entries(after)
differs = sorted(k for k in a if k in b and a[k] != b[k])
for k in differs:
    print(f"  differs {k} ({len(a[k])} -> {len(b[k])} instructions)")
for k in sorted(set(b) - set(a)):
    print(f"  added   {k} ({len(b[k])} instructions)")
for k in sorted(set(a) - set(b)):
    print(f"  gone    {k}")
print(f"  same {sum(1 for k in a if k in b and a[k] == b[k])}, differs {len(differs)}, "
      f"added {len(set(b) - set(a))}, gone {len(set(a) - set(b))}")
PY
    done
done
