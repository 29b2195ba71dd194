#!/usr/bin/env python3
"""Shared-memory wavefronts per kernel and per source line, without a GPU.

Reads the report of the fake CUDA driver's bank model
(tests/kernel_emu/bank_model.cpp; scripts/smem-profile.sh runs it) and
prints, per kernel: the sampled blocks, the wavefronts and ideal wavefronts
a block (Nsight Compute's "L1 Wavefronts Shared" and "... Ideal", divided
by the blocks), the excess share, and the sites with the most excess and
the most wavefronts, each named by its source lines (addr2line -i: the
innermost cuda/ line first, then the lines that inlined it).

    python3 scripts/smem-profile.py REPORT [--top N] [--kernel SUBSTRING]
    python3 scripts/smem-profile.py REPORT --against BEFORE   # per kernel, a block's wavefronts before → after

A development tool: the build and the tests never call it.
"""

import argparse
import collections
import os
import subprocess
import sys


def read_report(path):
    lib = None
    kernels = {}
    for line in open(path):
        f = line.split()
        if not f or f[0].startswith('#'):
            continue
        if f[0] == 'library':
            lib = f[1]
        elif f[0] == 'kernel':
            kernels[f[1]] = {'sampled': int(f[3]), 'launched': int(f[5]), 'sites': []}
        elif f[0] == 'site':
            name, off, kind = f[1], int(f[2], 16), f[3]
            count, wave, ideal, lanes = map(int, f[4:8])
            kernels[name]['sites'].append((off, kind, count, wave, ideal, lanes))
    return lib, kernels


def resolve(lib, offsets):
    """offset -> list of 'file:line' (innermost first), by addr2line -i."""
    offsets = sorted(set(offsets))
    if not offsets or lib is None or not os.path.exists(lib):
        return {o: ['0x%x' % o] for o in offsets}
    out = subprocess.run(['addr2line', '-i', '-a', '-e', lib] + ['0x%x' % o for o in offsets],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    chains, cur = {}, None
    for line in out:
        if line.startswith('0x'):
            cur = int(line, 16)
            chains[cur] = []
        elif cur is not None:
            loc = line.split(' (discriminator')[0]
            path, _, num = loc.rpartition(':')
            chains[cur].append(os.path.basename(path) + ':' + num)
    return chains


def label(chain, depth=3):
    # Innermost kernel-source frame first (the emulator's own headers are
    # the tile models and the vector types).
    own = [c for c in chain if c.split(':')[0].endswith(('.cu', '.cuh'))]
    return ' < '.join((own or chain)[:depth])


def per_block(k):
    n = max(k['sampled'], 1)
    wave = sum(s[3] for s in k['sites']) / n
    ideal = sum(s[4] for s in k['sites']) / n
    return wave, ideal


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('report')
    ap.add_argument('--top', type=int, default=8)
    ap.add_argument('--kernel', default='')
    ap.add_argument('--depth', type=int, default=3, help='source lines a site is named by (innermost first)')
    ap.add_argument('--against', help='an earlier report: each kernel\'s wavefronts a block, before → after')
    a = ap.parse_args()
    lib, kernels = read_report(a.report)
    if a.against:
        _, before = read_report(a.against)
        # A block's wavefronts, and all blocks' (a block's × the blocks
        # launched): kernels whose blocks changed shape compare by the latter.
        print('%-44s %10s %10s %7s %12s %12s %7s' % ('kernel', 'block was', 'block now', 'ratio', 'all was', 'all now',
                                                   'ratio'))
        total_b = total_n = 0
        for name in sorted(set(kernels) | set(before)):
            if a.kernel not in name:
                continue
            b = per_block(before[name])[0] if name in before else None
            n = per_block(kernels[name])[0] if name in kernels else None
            tb = b * before[name]['launched'] if b is not None else 0
            tn = n * kernels[name]['launched'] if n is not None else 0
            total_b += tb
            total_n += tn
            fmt = lambda x: '-' if x is None else '%.0f' % x
            ratio = '%7.3f' % (n / b) if b and n is not None else '      -'
            print('%-44s %10s %10s %s %12.0f %12.0f %s' % (name, fmt(b), fmt(n), ratio, tb, tn,
                                                        '%7.3f' % (tn / tb) if tb and tn else '      -'))
        print('%-44s %10s %10s %7s %12.0f %12.0f %7.3f' % ('all kernels', '', '', '', total_b, total_n,
                                                         total_n / max(total_b, 1)))
        return
    offsets = [s[0] for k in kernels.values() for s in k['sites']]
    chains = resolve(lib, offsets)
    for name in sorted(kernels):
        if a.kernel not in name:
            continue
        k = kernels[name]
        if not k['sites']:
            continue
        n = max(k['sampled'], 1)
        wave, ideal = per_block(k)
        print('== %s: %d of %d blocks sampled; a block: %.0f wavefronts, ideal %.0f, excess %.0f (%.0f%%)' % (
            name, k['sampled'], k['launched'], wave, ideal, wave - ideal, 100 * (wave - ideal) / max(wave, 1)))
        # Sites by source line (one line may be several instructions).
        lines = collections.defaultdict(lambda: [0, 0, 0, set()])
        for off, kind, count, w, i, lanes in k['sites']:
            key = label(chains.get(off, ['0x%x' % off]), a.depth)
            e = lines[key]
            e[0] += count / n
            e[1] += w / n
            e[2] += i / n
            e[3].add(kind)
        print('   most excess (a block: excess, wavefronts, accesses, kind, source):')
        for key, e in sorted(lines.items(), key=lambda kv: -(kv[1][1] - kv[1][2]))[:a.top]:
            if e[1] - e[2] <= 0:
                break
            print('   %9.0f %9.0f %8.0f  %-7s %s' % (e[1] - e[2], e[1], e[0], ','.join(sorted(e[3])), key))
        print('   most wavefronts:')
        for key, e in sorted(lines.items(), key=lambda kv: -kv[1][1])[:a.top]:
            print('   %9.0f %9.0f %8.0f  %-7s %s' % (e[1] - e[2], e[1], e[0], ','.join(sorted(e[3])), key))


if __name__ == '__main__':
    sys.exit(main())
