#!/usr/bin/env python3
"""Executed-instruction mix of each kernel in an Nsight Compute report,
without Nsight Compute.

    python3 scripts/ncu-opcodes.py REPORT.ncu-rep [--top N] [--json]

The GPU bundle's profile step (`bundle/run.sh profile`) writes a .ncu-rep;
the machine that reads it afterwards has no ncu. The report is a protobuf
stream; the metric sass__inst_executed_per_opcode is stored as a list of
(opcode string, f64 count) instances, which this reads by its wire pattern
(field 3 holding a length-prefixed name, then a fixed64 value), one run of
consecutive instances per kernel launch profiled. Of each launch's runs the
first is the plain per-opcode one (names without modifiers). Prints, per
launch, the total warp-level instructions executed and the top opcodes by
share. Counts are what the profiled launch executed (one launch, all SMs).
"""
import json
import re
import struct
import sys

# name string: 0x1a len 0x0a len 0x0a len NAME, then 0x12 0x09 0x19 <f64>
_INSTANCE = re.compile(rb"\x1a.\n.\n(.)([A-Z0-9_.]+)\x12\t\x19(.{8})", re.S)
_KERNEL = re.compile(rb"\*(.)(gateloop_[a-z0-9_]+|[A-Za-z_][A-Za-z0-9_]*_kernel[A-Za-z0-9_]*)2")


# Coarse classes of the per-opcode names (the rest: "other").
CLASSES = {
    "integer/address": {"IMAD", "IADD3", "IADD", "LEA", "ISETP", "SHF", "LOP3", "VIADD", "SEL", "MOV", "IMNMX",
                        "VIMNMX", "PRMT", "IABS", "POPC", "FLO", "BREV", "UIADD3", "UIMAD", "ULEA", "UMOV", "USHF",
                        "ULOP3", "UISETP", "USEL", "ULDC", "LDC", "S2R", "S2UR", "CS2R", "P2R", "R2P", "PLOP3"},
    "control": {"BRA", "BSSY", "BSYNC", "BAR", "EXIT", "WARPSYNC", "CALL", "RET", "NOP", "BMOV", "YIELD", "WARPGROUP"},
    "float": {"FADD", "FFMA", "FMUL", "FMNMX", "FSEL", "FSETP", "FRND", "MUFU", "F2F", "F2FP", "F2I", "I2F", "FCHK",
              "HADD2", "HFMA2", "HMUL2", "DADD", "DFMA", "DMUL"},
    "memory": {"LDS", "STS", "LDG", "STG", "LD", "ST", "LDSM", "LDL", "STL", "ATOMS", "ATOMG", "RED", "LDGSTS",
               "LDGDEPBAR", "DEPBAR", "SHFL"},
    "tensor": {"HMMA", "MOVM", "HGMMA", "IMMA"},
}


def classes(ops):
    """{class: share} of an opcode count map."""
    total = sum(ops.values())
    out = {c: 0.0 for c in list(CLASSES) + ["other"]}
    for name, v in ops.items():
        out[next((c for c, names in CLASSES.items() if name in names), "other")] += v / total
    return out


def launches(data):
    """[(kernel name, {opcode: count})] in report order, plain opcodes only."""
    kernels = [(m.start(), m.group(2).decode()) for m in _KERNEL.finditer(data) if m.group(1)[0] == len(m.group(2))]
    runs, cur, last = [], [], -1
    for m in _INSTANCE.finditer(data):
        name = m.group(2)
        if len(name) != m.group(1)[0]:
            continue
        if m.start() != last and cur:
            runs.append(cur)
            cur = []
        cur.append((m.start(), name.decode(), struct.unpack("<d", m.group(3))[0]))
        last = m.end()
    if cur:
        runs.append(cur)
    out, seen = [], set()
    for run in runs:
        at = run[0][0]
        owner = [k for k in kernels if k[0] < at]
        if not owner:
            continue
        key = owner[-1]
        # The first run after a kernel's header is the plain per-opcode metric.
        if key in seen or any("." in n for _, n, _ in run):
            continue
        seen.add(key)
        out.append((key[1], {n: v for _, n, v in run}))
    return out


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    top = int(argv[argv.index("--top") + 1]) if "--top" in argv else 20
    data = open(argv[1], "rb").read()
    result = launches(data)
    if not result:
        print(f"{argv[1]}: no per-opcode instruction counts found (profile without the InstructionStats section?)",
              file=sys.stderr)
        return 1
    if "--json" in argv:
        print(json.dumps([{"kernel": k, "total": sum(ops.values()), "classes": classes(ops), "opcodes": ops}
                          for k, ops in result], indent=1))
        return 0
    for kernel, ops in result:
        total = sum(ops.values())
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
        print(f"{kernel}: {total:.4g} warp instructions")
        print("  classes: " + "  ".join(f"{c} {v:.1%}" for c, v in classes(ops).items()))
        print("  opcodes: " + "  ".join(f"{n} {v / total:.1%}" for n, v in ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
