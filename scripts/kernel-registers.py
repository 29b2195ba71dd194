#!/usr/bin/env python3
"""Registers, spills and register-limited occupancy of every kernel, from
the ptxas reports the build keeps, and what changed against an older list.

    python3 scripts/kernel-registers.py [--threads N] [LOG ...] > now.txt
    python3 scripts/kernel-registers.py --against before.txt [LOG ...]

build.rs compiles each cuda/*.cu with `-Xptxas -v` and keeps the report
beside the fatbin (OUT_DIR/NAME.ptxas.log); without LOG arguments this
reads those of the newest build under target/*/build/gateloop-*/out. Each
kernel is listed per arch as

    sm_90 gateloop_chunk_output_bf16_r_fast regs 78 spill 0/0 blocks 3

`blocks`: how many blocks of N threads (default 256, the chunked kernels'
block) an SM's 65,536 registers hold, at the register allocation's
granularity (8 a thread). A kernel's launch bound (its blocks per SM, in
the entry tables) is what ptxas compiled it for; a change that keeps every
kernel spill-free and in the same `blocks` class kept its occupancy.

With --against (a list this script wrote before a change), prints only
what changed: registers, spills, a class change (flagged `CLASS`), and
kernels added or gone; exit status 1 if any kernel spills or changed
class, else 0. Standard library only.
"""

import argparse
import glob
import os
import re
import sys

REGISTERS_PER_SM = 65536
GRANULE = 8  # registers a thread, as allocated


def newest_logs():
    outs = glob.glob("target/*/build/gateloop-*/out")
    outs = [o for o in outs if glob.glob(os.path.join(o, "*.ptxas.log"))]
    if not outs:
        sys.exit("kernel-registers: no ptxas reports under target/*/build/gateloop-*/out (build first)")
    newest = max(outs, key=lambda o: max(os.path.getmtime(p) for p in glob.glob(os.path.join(o, "*.ptxas.log"))))
    return sorted(glob.glob(os.path.join(newest, "*.ptxas.log")))


def blocks(regs, threads):
    per_thread = -(-max(regs, 1) // GRANULE) * GRANULE
    return REGISTERS_PER_SM // (per_thread * threads)


def parse(paths):
    """{(arch, kernel): [regs, spill stores, spill loads]} of ptxas -v reports."""
    entry = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
    spill = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
    used = re.compile(r"Used (\d+) registers")
    kernels = {}
    for path in paths:
        key = None
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = entry.search(line)
                if m:
                    key = (m.group(2), m.group(1))
                    kernels[key] = [0, 0, 0]
                    continue
                if key is None:
                    continue
                m = spill.search(line)
                if m:
                    kernels[key][1:] = [int(m.group(1)), int(m.group(2))]
                m = used.search(line)
                if m:
                    kernels[key][0] = int(m.group(1))
    return kernels


def read_list(path):
    """{(arch, kernel): [regs, stores, loads, blocks]} of a list written by this script."""
    kernels = {}
    line_re = re.compile(r"^(\S+) (\S+) regs (\d+) spill (\d+)/(\d+) blocks (\d+)$")
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = line_re.match(line.strip())
            if m:
                kernels[(m.group(1), m.group(2))] = [int(m.group(i)) for i in range(3, 7)]
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="*", help="ptxas -v reports (default: the newest build's)")
    ap.add_argument("--threads", type=int, default=256, help="threads a block for `blocks` (default 256)")
    ap.add_argument("--against", help="an older list written by this script")
    args = ap.parse_args()
    now = parse(args.logs or newest_logs())
    if not now:
        sys.exit("kernel-registers: no kernels in the reports")
    rows = {k: v + [blocks(v[0], args.threads)] for k, v in now.items()}
    if not args.against:
        for (arch, name), (regs, st, ld, b) in sorted(rows.items()):
            print(f"{arch} {name} regs {regs} spill {st}/{ld} blocks {b}")
        return 0
    old = read_list(args.against)
    bad = False
    for key in sorted(set(rows) | set(old)):
        arch, name = key
        if key not in old:
            regs, st, ld, b = rows[key]
            print(f"{arch} {name}: added, regs {regs} spill {st}/{ld} blocks {b}")
            bad |= st > 0 or ld > 0
            continue
        if key not in rows:
            print(f"{arch} {name}: gone")
            continue
        (r0, s0, l0, b0), (r1, s1, l1, b1) = old[key], rows[key]
        if (r0, s0, l0, b0) == (r1, s1, l1, b1):
            continue
        note = []
        if (s1, l1) != (s0, l0):
            note.append(f"spill {s0}/{l0} -> {s1}/{l1}")
        if b1 != b0:
            note.append(f"CLASS blocks {b0} -> {b1}")
        print(f"{arch} {name}: regs {r0} -> {r1}" + (", " + ", ".join(note) if note else ""))
        bad |= s1 > 0 or l1 > 0 or b1 != b0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
