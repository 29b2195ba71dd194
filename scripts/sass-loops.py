#!/usr/bin/env python3
"""The loops of one entry point's machine code, without a GPU: every
backward branch of the entry in a disassembly that scripts/sass-lines.sh
kept (its SASS_OUT, nvdisasm -g), with its body's static instruction count
and the source lines that emit most of it. A loop body runs once per
iteration, so a slab or chunk loop's body size is the instructions a
thread issues per slab or chunk (inner loops and both sides of a branch
counted once: read the nested loops' rows beside it). How speed log items
52 to 54 counted a slab's or chunk's instructions. A development tool: the
build and the tests never call it.

    scripts/sass-lines.sh chunk.cu gateloop_chunk_state_wide_bf16_c_fast 5 /tmp/k.sass
    scripts/sass-loops.py /tmp/k.sass gateloop_chunk_state_wide_bf16_c_fast [--min 50]
"""
import argparse
import collections
import re

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("sass")
ap.add_argument("kernel")
ap.add_argument("--min", type=int, default=0, help="list loops of at least this many instructions")
args = ap.parse_args()

rows = open(args.sass).read().splitlines()
start = next((i for i, r in enumerate(rows) if r.startswith("//-") and f".text.{args.kernel} " in r + " "), None)
if start is None:
    raise SystemExit(f"sass-loops: no entry point {args.kernel} in {args.sass}")
code, labels, pending, where = [], {}, [], None
for row in rows[start + 2:]:
    if row.startswith("//-"):
        break
    m = re.search(r'//## File "([^"]+)", line (\d+)', row)
    if m:
        where = f"{m.group(1).split('/')[-1]}:{m.group(2)}"
        continue
    m = re.match(r"^(\.L_x_\d+):", row.strip())
    if m:
        pending.append(m.group(1))
        continue
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", row)
    if m:
        for label in pending:
            labels[label] = len(code)
        pending = []
        code.append((m.group(1), where))
print(f"{args.kernel}: {len(code)} instructions (static)")
for i, (ins, _) in enumerate(code):
    m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ins)
    if m and labels.get(m.group(1), i + 1) <= i:
        first = labels[m.group(1)]
        if i - first + 1 < args.min:
            continue
        lines = collections.Counter(w for _, w in code[first:i + 1] if w)
        top = ", ".join(f"{w} ({n})" for w, n in lines.most_common(5))
        print(f"  loop at {first}..{i}: {i - first + 1} instructions; {top}")
