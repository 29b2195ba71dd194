#!/usr/bin/env python3
"""A short text digest of Nsight Compute's per-instruction source page.

    python3 scripts/sass-digest.py NAME.sass.csv [--top N] > NAME.sass-digest.txt

NAME.sass.csv is what `bundle/run.sh profile` exports for each case (`ncu
--page source --print-source sass --csv`): for every kernel profiled, one
row per SASS instruction. Those pages run to megabytes, too large to keep,
yet they hold what the details page does not: which instructions the warps
stall on and which shared-memory accesses cost more wavefronts than they
need (bank conflicts). This keeps that, per kernel: the executed
instructions, the warp-stall samples by reason, the shared-memory
wavefronts (all, ideal, excess) and global sectors, the instructions with
the most stall samples and those with the most excess shared wavefronts.
`scripts/gpu-results.py` writes it beside each profile case it files.
Standard library only.
"""

import argparse
import csv
import sys


def kernels(path):
    """(kernel name, header, rows) for each kernel section of the page."""
    name, header, rows = None, None, []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            if row[0] == "Kernel Name":
                if name is not None:
                    yield name, header, rows
                name, header, rows = (row[1] if len(row) > 1 else "?"), None, []
            elif header is None and row[0] == "Address":
                header = row
            elif header is not None:
                rows.append(row)
    if name is not None:
        yield name, header, rows


def num(x):
    try:
        return float(x.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


SAMPLES = "Warp Stall Sampling (All Samples)"
WAVES, IDEAL, EXCESS = "L1 Wavefronts Shared", "L1 Wavefronts Shared Ideal", "L1 Wavefronts Shared Excessive"
SECTORS, SECTORS_EXCESS = "L2 Theoretical Sectors Global", "L2 Theoretical Sectors Global Excessive"
EXECUTED = "Instructions Executed"


def digest(path, top):
    out, seen = [], set()
    for name, header, rows in kernels(path):
        # A kernel launched several times appears once per launch: the first.
        if name in seen or header is None:
            continue
        seen.add(name)
        ix = {k: i for i, k in enumerate(header)}

        def col(row, key):
            return num(row[ix[key]]) if key in ix and ix[key] < len(row) else 0.0

        def total(key):
            return sum(col(r, key) for r in rows)

        src = ix.get("Source", 1)
        out.append(f"== {name}: {len(rows)} instructions, {total(EXECUTED):.4g} executed")
        waves, excess = total(WAVES), total(EXCESS)
        share = f" ({excess / waves:.0%} excess)" if waves else ""
        out.append(f"   shared wavefronts {waves:.4g}, ideal {total(IDEAL):.4g}, excess {excess:.4g}{share}")
        out.append(f"   global L2 sectors {total(SECTORS):.4g}, excess {total(SECTORS_EXCESS):.4g}")
        stalls = sorted(((total(k), k[len("stall_"):]) for k in ix if k.startswith("stall_") and "Not Issued" not in k),
                        reverse=True)
        all_samples = total(SAMPLES)
        if all_samples:
            out.append(f"   warp-stall samples {all_samples:.4g}: " +
                       ", ".join(f"{k} {v / all_samples:.0%}" for v, k in stalls[:8] if v))
        out.append(f"   most stall samples (samples, excess shared wavefronts, instruction):")
        for r in sorted(rows, key=lambda r: -col(r, SAMPLES))[:top]:
            if col(r, SAMPLES):
                out.append(f"     {col(r, SAMPLES):9.0f} {col(r, EXCESS):11.0f}  {r[src].strip()[:80]}")
        worst = [r for r in sorted(rows, key=lambda r: -col(r, EXCESS))[:top] if col(r, EXCESS)]
        if worst:
            out.append("   most excess shared wavefronts (excess, all, instruction):")
            for r in worst:
                out.append(f"     {col(r, EXCESS):11.0f} {col(r, WAVES):11.0f}  {r[src].strip()[:80]}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="a profile case's NAME.sass.csv")
    ap.add_argument("--top", type=int, default=8, help="instructions listed per kernel and list")
    a = ap.parse_args()
    sys.stdout.write(digest(a.csv, a.top))


if __name__ == "__main__":
    main()
