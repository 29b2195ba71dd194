#!/usr/bin/env python3
"""Shared-memory wavefronts of a warp's loads, modelled without a GPU.

A development tool (the build and the kernels never call it): before a
change to how a kernel's threads read its shared-memory tables, count what
the reads cost. The model is the usual one for 32 banks of 4 bytes: a warp's
access takes as many wavefronts as the most distinct 4-byte words that any
one bank must serve (lanes reading the same word share it: a broadcast).
A vector load (LDS.64, LDS.128) covers `width` consecutive words per lane.
It does not model the hardware's split of wide accesses into phases, so it
is a lower bound where lanes' addresses are all distinct; it ranks mappings.

    python3 scripts/smem-bank-model.py            # the diagonal pairs' mappings

prints, for the chunked kernels' diagonal sub-chunk pairs
(cuda/chunk_common.cuh, add_diagonal_pairs, real gates: per four channels
seven LDS.128, four on the query row, three on the key row), the wavefronts
per 16-channel slab of the loop as it is (one thread per causal pair,
diag_pair order) and of the remapping the speed log records as tried and
not kept (one thread per query row and group of four key steps), with
64-byte table rows (kSlab = 16 words) and the padded 80-byte ones
(GATELOOP_CHUNK_PREFIX_LD = 20).

Only the standard library.
"""

import sys

BANKS = 32
SUB = 16        # steps of a sub-chunk (GATELOOP_CHUNK_SUB_LEN)
SUBS = 4        # sub-chunks of a chunk
THREADS = 256   # GATELOOP_CHUNK_THREADS
WARP = 32


def wavefronts(lane_words, width=1):
    """Wavefronts of one warp access: lane_words holds each active lane's
    first word address (None: inactive), each lane reading `width`
    consecutive words."""
    banks = {}
    for w0 in lane_words:
        if w0 is None:
            continue
        for w in range(w0, w0 + width):
            banks.setdefault(w % BANKS, set()).add(w)
    return max((len(s) for s in banks.values()), default=0)


def diag_pair(t):
    """Causal pair t of a 16 × 16 block: (row, column), as the kernel's
    diag_pair numbers them (rows f and 15 − f share a fold of 17)."""
    f, e = divmod(t, SUB + 1)
    return (f, e) if e <= f else (SUB - 1 - f, e - f - 1)


def per_pair(ld):
    """Wavefronts per slab of the loop as written: thread i takes pair i,
    i + 256, ...; per group of four channels the query row's q, Re G (hi,
    lo) and reset index and the key row's k and Re G (hi, lo)."""
    pairs = SUBS * SUB * (SUB + 1) // 2
    total = 0
    for first in range(0, pairs, WARP):
        rows, cols = [], []
        for i in range(first, min(first + WARP, pairs)):
            sb, t = divmod(i, SUB * (SUB + 1) // 2)
            r, c = diag_pair(t)
            rows.append((sb * SUB + r) * ld)
            cols.append((sb * SUB + c) * ld)
        total += 4 * (4 * wavefronts(rows, 4) + 3 * wavefronts(cols, 4))
    return total


def row_groups(ld, hoisted):
    """Wavefronts per slab of the tried remapping: 40 items (row r, key
    group g, 4g ≤ r) per block, g-major, one a thread (160 threads); the
    query row's four reads once per four channels when `hoisted`, else once
    per key step as well."""
    items = [(r, g) for g in range(4) for r in range(4 * g, SUB)]
    total = 0
    for w in range(THREADS // WARP):
        rows, keys = [], []
        for lane in range(WARP):
            t = w * WARP + lane
            if t >= SUBS * len(items):
                rows.append(None)
                keys.append(None)
                continue
            sb, k = divmod(t, len(items))
            r, g = items[k]
            rows.append(sb * SUB + r)
            keys.append(sb * SUB + 4 * g)
        if all(x is None for x in rows):
            continue
        for _ in range(4):  # channel groups
            total += (1 if hoisted else 4) * 4 * wavefronts([None if x is None else x * ld for x in rows], 4)
            for i in range(4):
                total += 3 * wavefronts([None if x is None else (x + i) * ld for x in keys], 4)
    return total


def main(argv):
    if len(argv) > 1:
        print(__doc__.strip())
        return 0 if argv[1] in ("-h", "--help") else 2
    print("diagonal pairs, wavefronts per 16-channel slab (real gates)")
    print("| row stride (words) | per pair (kernel) | row groups, reloaded | row groups, hoisted |")
    print("|---|---|---|---|")
    for ld in (16, 20):
        print(f"| {ld} | {per_pair(ld)} | {row_groups(ld, False)} | {row_groups(ld, True)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
