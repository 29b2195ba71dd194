#!/usr/bin/env python3
"""Files a GPU bundle run's results and reads the issues' targets off them.

    python3 scripts/gpu-results.py RESULTS [RESULTS...] [--into benches/results] [--dry-run]

RESULTS is what `bundle/run.sh` wrote: its ./results folder, or with the
device tool the `files_at` folder of the run, which holds results.tar.gz
(and profile-reps.tar.gz) since the tool returns only 8 files; a tarball
may also be named directly. Several runs (the default steps, then `carry
profile fuzz`) are merged in order: the runs' logs (.txt, .log) are
concatenated, each under a header naming its run; a JSON file a later run
wrote non-empty replaces an earlier one; the runs' steps are listed
together. Peer and bench runs are not merged: each run's ratios were
measured side by side in that run, so a later run's peers.json is filed as
peers/peers-<n>.json (and .md) and read off in its own targets section, and
a later run's bench.json as bench-<n>.json, each bench section (the rules,
the launches) written once per bench run that has its rows. The script copies what is worth keeping into
benches/results/gpu-<date>-<card>/ (the date of the run from env.txt, the card
from bench.json) and writes verdict.md there, which it also prints:

- the bundle's steps and their status (summary.json);
- issue 4's forward targets, from peers/peers.json: real gates bf16 ≥ 1.2×
  faster than fla chunk_gla, complex gates ≤ 2× our real-gate time, ≥ 100×
  faster than the JAX associative_scan formulation where it fits, and
  B8 L4096 H16 K=V=64 within 2× of the HBM floor;
- issue 5's target: forward+backward ≥ 1.2× faster than fla chunk_gla's;
- with several peer runs (the GPU plan's calls split issue 4's six shapes),
  every target at every shape over them all: the last run that settled it;
- the carry rule: chunked-sequential against chunked-separate over the
  sweep of the sequential grid (carry.json), and the SEQUENTIAL_MIN_BLOCKS
  (src/cuda/chunk.rs) it supports;
- the staging rule: recurrent-ahead against recurrent-batched (bench.json,
  the same run; "recurrent" runs the default, RecurrentStaging::Auto, which
  chooses between them by the grid's rounds of the SMs since 2026-12-04),
  and the staging it supports (src/cuda/recurrent.rs);
- the real carry rule: chunked-real-separate against chunked-real (the
  same run; chunked-real takes the sequential walk for 16-bit inputs from
  SEQUENTIAL_MIN_BLOCKS on, complex gates the separate carry since
  2026-12-04), and the real-gate carry it supports (src/cuda/chunk.rs);
- the rows rule: recurrent-rows4 against recurrent (the same run), and the
  RecurrentRows default (src/cuda/recurrent.rs) it supports;
- the output rule: chunked-frag against chunked and chunked-real-frag-fast
  against chunked-real-fast (bench.json), and the ChunkOutput default
  (src/cuda/chunk.rs) it supports for 16-bit inputs;
- the packed sequences: recurrent-varlen against recurrent, chunked-varlen
  against chunked-separate, chunked-grad-varlen against chunked-grad (the
  same run), what the packed path costs;
- the launches: each bench row of several launches split into its
  launches' median times (bench.json "phases"), where the time goes.

Each profile case's per-instruction page (profile/NAME.sass.csv) is filed
as its digest, profile/NAME.sass-digest.txt (scripts/sass-digest.py).

Only the standard library; nothing here needs a GPU. Missing files make
their sections say so rather than fail: a partial run is still filed.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches", "peers"))
import peers  # noqa: E402  (stdlib-only at import: its torch/JAX work runs in workers)


def _sass_digest():
    """scripts/sass-digest.py as a module (its name has a hyphen)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "sass_digest", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass-digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Files copied when present (relative to RESULTS_DIR), and the largest size
# kept whole; a larger text file keeps its first and last parts.
KEEP = [
    "summary.txt", "summary.json", "env.txt", "bench.txt", "bench.json", "carry.txt", "carry.json",
    "sanitizer.log", "tests.log", "fuzz.txt",
]
KEEP_GLOBS = [("profile", ".txt"), ("fuzz-failures", ""), ("profile", ".ncu-rep"), ("peers", ".json"), ("peers", ".md"),
              ("peers-warm", ".md")]
# Files whose numbers are compared within one run only (ratios side by side):
# a later run's is filed beside the first as NAME-<n>.json (.md), not over it.
PER_RUN = ("peers/peers.json", "peers/peers.md", "bench.json")
MAX_TEXT = 2 << 20
MAX_BINARY = 8 << 20

TARGET_SHAPE = (8, 4096, 16, 64, 64)
# The one target of a single shape (TARGET_SHAPE); every other is read at every shape.
HBM_TARGET = "within 2× of the HBM floor"


def load_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-gpu"


def run_date(results):
    try:
        with open(os.path.join(results, "env.txt")) as fh:
            for line in fh:
                m = re.match(r"date: (\d{4}-\d{2}-\d{2})", line)
                if m:
                    return m.group(1)
    except OSError:
        pass
    return None


def card_name(bench, carry, peers_doc):
    for doc in (bench, carry, (peers_doc or {}).get("ours")):
        name = ((doc or {}).get("device") or {}).get("name")
        if name:
            return name
    return (peers_doc or {}).get("device_name")


def copy_results(results, dest):
    """Copies KEEP and KEEP_GLOBS into dest; returns the relative paths copied."""
    copied = []

    def put(rel):
        src = os.path.join(results, rel)
        if not os.path.isfile(src):
            return
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        size = os.path.getsize(src)
        binary = not rel.endswith((".txt", ".log", ".json", ".md"))
        if binary and size > MAX_BINARY:
            return
        if not binary and size > MAX_TEXT:
            with open(src, "rb") as fh:
                head = fh.read(MAX_TEXT // 2)
                fh.seek(size - MAX_TEXT // 2)
                tail = fh.read()
            with open(out, "wb") as fh:
                fh.write(head + f"\n[... {size - MAX_TEXT} bytes left out by gpu-results.py ...]\n".encode() + tail)
        else:
            shutil.copyfile(src, out)
        copied.append(rel)

    for rel in KEEP:
        put(rel)
    # The per-instruction pages (profile/NAME.sass.csv, megabytes each) are
    # not kept; their digest is (scripts/sass-digest.py): stalls and excess
    # shared wavefronts per instruction, what found speed-log item 20.
    prof = os.path.join(results, "profile")
    pages = sorted(n for n in os.listdir(prof) if n.endswith(".sass.csv")) if os.path.isdir(prof) else []
    if pages:
        sass_digest = _sass_digest()
        os.makedirs(os.path.join(dest, "profile"), exist_ok=True)
        for name in pages:
            rel = os.path.join("profile", name[:-len(".sass.csv")] + ".sass-digest.txt")
            with open(os.path.join(dest, rel), "w") as fh:
                fh.write(sass_digest.digest(os.path.join(prof, name), 8))
            copied.append(rel)
    for name in run_files(results, "bench")[1:]:
        put(name)
    for folder, ext in KEEP_GLOBS:
        d = os.path.join(results, folder)
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if name.endswith(ext):
                    put(os.path.join(folder, name))
    return copied


def unpack_run(src, into):
    """One run's results into a folder: a folder as it is, or the tarballs
    run.sh packs for the device tool (in it, or named directly)."""
    if os.path.isfile(src):
        tars = [src]
    else:
        tars = [os.path.join(src, t) for t in ("results.tar.gz", "profile-reps.tar.gz")
                if os.path.isfile(os.path.join(src, t))]
        if not tars:
            shutil.copytree(src, into, dirs_exist_ok=True)
            return
    for t in tars:
        with tarfile.open(t) as tf:
            tf.extractall(into, filter="data")


def merge_runs(sources, into):
    """Merges several runs' results into `into` (see the module doc)."""
    steps, verdicts, texts, total_s, require = [], [], [], 0, None
    for i, src in enumerate(sources):
        run = os.path.join(into, f".run{i}")
        unpack_run(src, run)
        summary = load_json(os.path.join(run, "summary.json"))
        if summary:
            steps += summary.get("steps", [])
            verdicts.append(summary.get("verdict"))
            total_s += summary.get("total_s") or 0
            require = summary.get("require_gpu") if require is None else require
        try:
            with open(os.path.join(run, "summary.txt")) as fh:
                texts.append(fh.read())
        except OSError:
            pass
        for base, _, files in os.walk(run):
            for name in files:
                rel = os.path.relpath(os.path.join(base, name), run)
                out = os.path.join(into, rel)
                if rel in ("summary.json", "summary.txt"):
                    continue
                if rel in PER_RUN and os.path.isfile(out) and os.path.getsize(out):
                    stem, ext = os.path.splitext(rel)
                    n = 2
                    while os.path.exists(os.path.join(into, f"{stem}-{n}{ext}")):
                        n += 1
                    out = os.path.join(into, f"{stem}-{n}{ext}")
                src = os.path.join(base, name)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                if os.path.getsize(src) == 0:
                    if not os.path.exists(out):
                        shutil.copyfile(src, out)
                elif name.endswith((".txt", ".log")):
                    with open(out, "a") as dst, open(src) as fh:
                        dst.write(f"######## run {i + 1} of the merge: {sources[i]}\n" + fh.read())
                else:
                    shutil.copyfile(src, out)
        shutil.rmtree(run)
    if verdicts:
        verdict = "OK" if all(v == "OK" for v in verdicts) else "FAILED"
        with open(os.path.join(into, "summary.json"), "w") as fh:
            json.dump({"schema": "gateloop-bundle/1", "verdict": verdict, "require_gpu": require, "total_s": total_s,
                       "runs": len(verdicts), "steps": steps}, fh, indent=2)
    if texts:
        with open(os.path.join(into, "summary.txt"), "w") as fh:
            fh.write("\n".join(texts))


def label(s):
    B, L, H, K, V = s
    return f"B{B} L{L} H{H} K=V={K}" if K == V else f"B{B} L{L} H{H} K={K} V={V}"


def peers_report(doc):
    """peers.py's own Report over a peers.json, for its lookups: ours_best
    (ours' fastest kernel of a column, by its rule) and find (a peer case)."""
    rep = peers.Report(None, doc)
    rep.cases, rep.ours = doc["cases"], doc["ours"]
    return rep


def fmt(ms):
    return "—" if ms is None else (f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms")


def verdict_cell(ok):
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def steps_section(summary):
    L = ["## Bundle steps\n"]
    if not summary:
        return L + ["(no summary.json)\n"]
    runs = f" over {summary['runs']} runs" if summary.get("runs", 1) > 1 else ""
    L.append(f"Verdict: **{summary.get('verdict')}** in {summary.get('total_s')} s{runs} "
             f"(GATELOOP_REQUIRE_GPU={summary.get('require_gpu')}).\n")
    L.append("| step | status | s | note |")
    L.append("|---|---|---|---|")
    for s in summary.get("steps", []):
        note = s.get("note", "").replace("|", "\\|")
        L.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {note} |")
    return L + [""]


def run_files(d, stem):
    """The names of every run's STEM.json in folder d: STEM.json,
    STEM-2.json, ... in the order of the runs (merge_runs, PER_RUN)."""
    return sorted((n for n in os.listdir(d) if re.fullmatch(stem + r"(-\d+)?\.json", n)),
                  key=lambda n: int(re.sub(r"\D", "", n) or 1)) if os.path.isdir(d) else []


def filed_runs(d, stem):
    """[(name, doc)] of every run's STEM.json in folder d (run_files)."""
    return [(n, load_json(os.path.join(d, n))) for n in run_files(d, stem)] or [(f"{stem}.json", None)]


def peer_runs(results):
    """[(name, doc)] of every peers run filed: peers.json, peers-2.json, ..."""
    return filed_runs(os.path.join(results, "peers"), "peers")


def bench_sections(bench_runs, sections):
    """The sections read off bench.json, each from one bench run (its ratios
    are side by side in that run). With several runs, each section is
    written once per run that has its rows, titled with the run's file; a
    section no run has rows for is written once, saying so."""
    L = []
    for section in sections:
        if len(bench_runs) == 1:
            L += section(bench_runs[0][1])
            continue
        parts = [(name, section(doc)) for name, doc in bench_runs]
        measured = [(name, lines) for name, lines in parts if not any(x.startswith("(no bench.json") for x in lines)]
        for name, lines in measured or parts[:1]:
            L += [f"{lines[0].rstrip()} ({name})\n"] + lines[1:]
    return L


def targets_section(doc, name="peers.json"):
    """Issue 4's forward targets and issue 5's fwd+bwd target, one row per
    (target, shape): the section's lines, and its rows as (target, shape,
    measured, ok) for the section over every run (targets_overall)."""
    L = [f"## Targets (issues 4 and 5), from {name}\n"]
    rows = []
    if not doc or not doc.get("ours", {}).get("results"):
        return L + ["(no peers.json with our results: the peer step did not run or found no GPU)\n"], rows
    rep = peers_report(doc)
    # fla quick-tuned (peers.py --fla-tune quick): its time is an upper
    # bound on fla's, so a ratio over fla that misses a target holds, one
    # that meets it does not yet (benches/peers/fla_tune.py).
    fla_quick = doc.get("fla_tune") == "quick"
    if fla_quick:
        L.append("fla ran quick-tuned (one Triton configuration per kernel): a target against fla that this run "
                 "misses is missed, one it meets stays not measured until fla's full autotune runs.\n")
    L.append("| target | shape | measured | verdict |")
    L.append("|---|---|---|---|")
    shapes = [tuple(s) for s in doc.get("shapes", [])]
    tally = {True: 0, False: 0, None: 0}

    def row(target, shape, measured, ok):
        tally[ok] += 1
        rows.append((target, tuple(shape), measured, ok))
        L.append(f"| {target} | {label(shape)} | {measured} | {verdict_cell(ok)} |")

    def ratio_row(target, shape, num, den, bound, above, what, num_is_fla=False):
        """num/den against bound (above: ratio ≥ bound is met)."""
        if num is None or den is None:
            row(target, shape, what, None)
            return
        r = num / den
        ok = r >= bound if above else r <= bound
        if num_is_fla and fla_quick:
            what += "; fla quick-tuned"
            if ok:
                what += ": met against its one configuration only, its full autotune not run"
                ok = None
        row(target, shape, f"{r:.2f}× ({what})", ok)

    for s in shapes:
        # 1. real gates, bf16: fla chunk_gla time / ours ≥ 1.2.
        fla = rep.find("fla_chunk_gla", "fwd", s)
        real = rep.ours_best(s, "fwd", "bf16", "real")
        fla_ms = fla["median_ms"] if fla and fla.get("status") == "ok" else None
        why = (f"fla {fmt(fla_ms)} / ours {fmt(real and real['median_ms'])} {real['kernel'] if real else ''}"
               if fla_ms and real else f"fla {fla['status'] if fla else 'not run'}; ours {'ok' if real else 'none'}")
        ratio_row("real bf16 ≥ 1.2× faster than fla chunk_gla", s, fla_ms, real and real["median_ms"], 1.2, True, why,
                  num_is_fla=True)
        # 2. complex ≤ 2× real, bf16: the chunked kernel with each gate (the
        # same algorithm; the complex state doubles its arithmetic).
        cplx = rep.ours_best(s, "fwd", "bf16", "complex", "chunked")
        creal = rep.ours_best(s, "fwd", "bf16", "real", "chunked")
        why = (f"{cplx['kernel']} {fmt(cplx['median_ms'])} / {creal['kernel']} {fmt(creal['median_ms'])}"
               if cplx and creal else "ours missing")
        ratio_row("chunked complex ≤ 2× chunked real (bf16)", s, cplx and cplx["median_ms"],
                  creal and creal["median_ms"], 2.0, False, why)
        # 3. ≥ 100× faster than the JAX formulation, where it fits.
        jax = rep.find("jax_assoc_scan", "fwd", s)
        o32 = rep.ours_best(s, "fwd", "f32", "complex")
        if jax and jax.get("status") == "OOM":
            row("≥ 100× faster than JAX associative_scan", s, "JAX out of memory (the target applies where it fits)",
                True)
        else:
            jax_ms = jax["median_ms"] if jax and jax.get("status") == "ok" else None
            why = (f"JAX {fmt(jax_ms)} / ours {o32['kernel']} f32 {fmt(o32['median_ms'])}" if jax_ms and o32
                   else f"JAX {jax['status'] if jax else 'not run'}")
            ratio_row("≥ 100× faster than JAX associative_scan", s, jax_ms, o32 and o32["median_ms"], 100, True, why)
        # issue 5: fwd+bwd ≥ 1.2× faster than fla chunk_gla fwd+bwd.
        fla_fb = rep.find("fla_chunk_gla", "fwdbwd", s)
        # Ours with real gates in bf16 first (fla's own operator, apples to
        # apples), then complex gates (bf16, f32) where no real-gate fwd+bwd ran.
        ofb = next((o for o in (rep.ours_best(s, "fwdbwd", dt, g)
                                for g, dt in (("real", "bf16"), ("complex", "bf16"), ("complex", "f32"))) if o), None)
        fb_ms = fla_fb["median_ms"] if fla_fb and fla_fb.get("status") == "ok" else None
        why = (f"fla {fmt(fb_ms)} / ours {ofb['kernel']} {ofb['dtype']} {fmt(ofb['median_ms'])} ({ofb['gate']} gates)"
               if fb_ms and ofb else f"fla {fla_fb['status'] if fla_fb else 'not run'}; ours {'ok' if ofb else 'none'}")
        ratio_row("fwd+bwd ≥ 1.2× faster than fla chunk_gla (issue 5)", s, fb_ms, ofb and ofb["median_ms"], 1.2, True,
                  why, num_is_fla=True)
    # 4. B8 L4096 H16 K=V=64 within 2× of the HBM floor: the best chunked forward.
    chunked = [r for r in doc["ours"]["results"] if r["shape_key"] == peers.shape_key(TARGET_SHAPE)
               and r["column"] == "fwd" and r["kernel"].startswith("chunked") and r.get("of_hbm_floor")]
    if chunked:
        best = max(chunked, key=lambda r: r["of_hbm_floor"])
        row(HBM_TARGET, TARGET_SHAPE,
            f"{100 * best['of_hbm_floor']:.0f}% of the floor ({best['kernel']} {best['dtype']}, "
            f"{fmt(best['median_ms'])})", best["of_hbm_floor"] >= 0.5)
    else:
        row(HBM_TARGET, TARGET_SHAPE, "no chunked forward at this shape", None)
    L.append(f"\n{tally[True]} met, {tally[False]} missed, {tally[None]} not measured. A missed target is listed in "
             "the README with its gap and reason.\n")
    return L, rows


def targets_overall(per_run):
    """Every target at every shape issue 4 names (peers.DEFAULT_SHAPES, then
    any other shape a run measured), over the peer runs [(name, rows)]: the
    verdict of the last run that settled it (met or missed; a later run, as
    fla's full autotune after its quick one, supersedes an earlier), else
    not measured. The table that says what is left of issues 4 and 5 when
    the runs split the shapes between them (the GPU plan's two calls)."""
    if sum(1 for _, rows in per_run if rows) < 2:
        return []  # one run: its own section is the whole answer
    targets, shapes = [], list(peers.DEFAULT_SHAPES)
    for _, rows in per_run:
        for target, shape, _, _ in rows:
            if target not in targets:
                targets.append(target)
            if shape not in shapes:
                shapes.append(shape)
    L = ["## Targets over every peer run\n",
         "Each target at each shape from the last run that settled it (met or missed), else not measured: "
         "the runs' ratios are each measured side by side in one run, never across runs.\n",
         "| target | shape | measured | verdict | run |", "|---|---|---|---|---|"]
    tally = {True: 0, False: 0, None: 0}
    for target in targets:
        for shape in shapes:
            found = [(name, measured, ok) for name, rows in per_run
                     for t, sh, measured, ok in rows if t == target and sh == shape]
            if not found:
                if target == HBM_TARGET:
                    continue
                found = [("—", "not run at this shape", None)]
            settled = [f for f in found if f[2] is not None]
            name, measured, ok = (settled or found)[-1]
            tally[ok] += 1
            L.append(f"| {target} | {label(shape)} | {measured} | {verdict_cell(ok)} | {name} |")
    L.append(f"\nOver every run: {tally[True]} met, {tally[False]} missed, {tally[None]} not measured.\n")
    return L


def carry_rule(carry):
    """The carry section's lines: the sweep's table and the
    SEQUENTIAL_MIN_BLOCKS it supports."""
    L = ["## Carry rule (chunked-sequential against chunked-separate)\n"]
    if not carry or not carry.get("results"):
        return L + ["(no carry.json: `bash bundle/run.sh carry` did not run)\n"]
    by = {}
    for r in carry["results"]:
        sh = r["shape"]
        d = (sh["batch"], sh["len"], sh["heads"], sh["key_dim"], sh["value_dim"])
        by.setdefault((r["dtype"], d), {})[r["kernel"]] = r["median_ms"]
    L.append("| dtype | shape | sequential grid | sequential | separate | sequential / separate |")
    L.append("|---|---|---|---|---|---|")
    wins = {}
    for (dtype, d), t in sorted(by.items(), key=lambda kv: (kv[0][0], seq_grid(kv[0][1]))):
        seq, sep = t.get("chunked-sequential"), t.get("chunked-separate")
        g = seq_grid(d)
        ratio = seq / sep if seq and sep else None
        L.append(f"| {dtype} | {label(d)} | {g} | {fmt(seq)} | {fmt(sep)} | "
                 f"{'—' if ratio is None else f'{ratio:.3f}'} |")
        if ratio is not None:
            wins.setdefault(dtype, []).append((g, ratio <= 1.0))
    # Per dtype: the smallest grid from which the sequential carry wins at every
    # larger grid of the sweep; the rule takes the largest over the dtypes.
    thresholds = []
    for dtype, pts in wins.items():
        pts.sort()
        t = None
        for i, (g, _) in enumerate(pts):
            if all(w for _, w in pts[i:]):
                t = g
                break
        thresholds.append((dtype, t))
    if not thresholds or any(t is None for _, t in thresholds):
        never = [d for d, t in thresholds if t is None]
        why = f"the sequential carry does not win at the sweep's largest grid for {', '.join(never) or 'any dtype'}"
        L.append(f"\nSuggested: keep `ChunkCarry::Separate` for Auto, or measure larger grids ({why}).\n")
        return L
    best = max(t for _, t in thresholds)
    why = "; ".join(f"{d}: sequential wins from {t} blocks on" for d, t in thresholds)
    L.append(f"\nSuggested `SEQUENTIAL_MIN_BLOCKS = {best}` ({why}; src/cuda/chunk.rs has {current_min_blocks()}).\n")
    return L


# Ahead must be this much faster (ahead / batched ≤ this) to count as a win:
# the two kernels' medians of one run differ by noise of about a percent.
STAGING_WIN = 0.97


def variant_rule(bench, title, pairs, suggest_variant, suggest_keep, grid=None, only=None):
    """Lines of a section comparing a variant kernel with the default one it
    stands beside, per dtype and shape, from one bench run: `pairs` is
    [(default kernel, variant kernel)]; a case is a win when the variant
    takes ≤ STAGING_WIN of the default's time; the suggestion follows from
    all, none or some of the cases. `grid(d)`: a column of the launch's
    blocks, when it says something. `only(d)`: the shapes (B, L, H, K, V)
    where the two differ, when not all do."""
    L = [f"## {title}\n"]
    table, ratios = variant_table(bench, pairs, grid, only)
    L += table
    if not ratios:
        return L
    wins = [ratio <= STAGING_WIN for ratio in ratios]
    n, won = len(wins), sum(wins)
    if won == n:
        L.append(f"\nSuggested: {suggest_variant} as the default (faster by ≥ {1 - STAGING_WIN:.0%} in "
                 f"all {n} cases).\n")
    elif won == 0:
        L.append(f"\nSuggested: keep {suggest_keep} as the default (the variant never faster by "
                 f"≥ {1 - STAGING_WIN:.0%}, {n} cases).\n")
    else:
        L.append(f"\nMixed: the variant faster by ≥ {1 - STAGING_WIN:.0%} in {won} of {n} cases; a rule by "
                 "shape or dtype needs the rows above.\n")
    return L


def variant_table(bench, pairs, grid=None, only=None):
    """The table of variant_rule: (lines, the variant / default ratio of
    each row); lines saying "not measured" and no ratios when no dtype and
    shape (of those `only` keeps) has both kernels of a pair."""
    L = []
    names = {k for pair in pairs for k in pair}
    by = {}
    for r in (bench or {}).get("results") or []:
        if r.get("kernel") not in names or r.get("median_ms") is None:
            continue
        sh = r["shape"]
        d = (sh["batch"], sh["len"], sh["heads"], sh["key_dim"], sh["value_dim"])
        if only is not None and not only(d):
            continue
        by.setdefault((r["dtype"], d, sh.get("gate", "channel")), {})[r["kernel"]] = r["median_ms"]
    rows = [(k, base, var, t[base], t[var]) for k, t in by.items() for base, var in pairs if base in t and var in t]
    if not rows:
        both = " / ".join(f"{b} and {v}" for b, v in pairs)
        return L + [f"(no bench.json with both {both}: not measured)\n"], []
    grid_head = " grid |" if grid else ""
    L.append(f"| dtype | shape | gate |{grid_head} default | ms | variant | ms | variant / default |")
    L.append("|---|---|---|" + ("---|" if grid else "") + "---|---|---|---|---|")
    ratios = []
    order = (lambda x: (x[0][0], grid(x[0][1]), x[0][1], x[1])) if grid else (lambda x: (x[0][0], x[0][1], x[1]))
    for (dtype, d, gate), base, var, t_base, t_var in sorted(rows, key=order):
        ratio = t_var / t_base
        ratios.append(ratio)
        g = f" {grid(d)} |" if grid else ""
        L.append(f"| {dtype} | {label(d)} | {gate} |{g} {base} | {fmt(t_base)} | {var} | {fmt(t_var)} | "
                 f"{ratio:.3f} |")
    return L, ratios


def staging_rule(bench):
    """The staging section: recurrent-ahead against recurrent-batched (each
    staging forced), and the staging they support."""
    return variant_rule(bench, "Staging rule (recurrent-ahead against recurrent-batched)",
                        [("recurrent-batched", "recurrent-ahead")],
                        "`RecurrentStaging::Ahead` (`Auto` takes it wherever it needs no more rounds of the SMs)",
                        "`RecurrentStaging::Batched`", grid=recurrent_grid)


def real_carry_rule(bench):
    """The real-gate carry section: chunked-real-separate (the separate
    carry forced) against chunked-real (the automatic carry: the sequential
    walk for 16-bit inputs from SEQUENTIAL_MIN_BLOCKS on; f32 rows run the
    separate carry on both sides), and the real-gate rule they support."""
    return variant_rule(bench, "Real-gate carry rule (chunked-real-separate against chunked-real)",
                        [("chunked-real", "chunked-real-separate")],
                        "`ChunkCarry::Separate` for real gates too (`Auto`: the separate carry always)",
                        "the sequential walk for real gates from `SEQUENTIAL_MIN_BLOCKS` on")


def rows_rule(bench):
    """The rows section: recurrent-rows4 (four state rows a thread, twice
    the warps a block at K = 64) against recurrent (eight), and the
    RecurrentRows default they support."""
    return variant_rule(bench, "Rows rule (recurrent-rows4 against recurrent)", [("recurrent", "recurrent-rows4")],
                        "`RecurrentRows::Four`", "`RecurrentRows::Eight`", grid=recurrent_grid)


def output_rule(bench):
    """The output section: the register-fragment output launch against the
    staged one (chunked-frag against chunked, chunked-real-frag-fast against
    chunked-real-fast), and the ChunkOutput default they support for 16-bit
    inputs."""
    return variant_rule(bench, "Output rule (register fragments against staged tiles)",
                        [("chunked", "chunked-frag"), ("chunked-real-fast", "chunked-real-frag-fast")],
                        "`ChunkOutput::Fragments` for f16 and bf16 inputs", "`ChunkOutput::Staged`")


def wide_rule(bench):
    """The output blocks' section: chunked-real-fast (the staged output
    launch in blocks of 128 value columns where V > 64) against
    chunked-real-fast-narrow (blocks of 64 at every V), at V > 64 only
    (below, both run the same kernel), and the ChunkOutput::Staged rule
    they support."""
    return variant_rule(bench, "Output blocks (64 value columns against 128, V > 64)",
                        [("chunked-real-fast", "chunked-real-fast-narrow")],
                        "`ChunkOutput::StagedNarrow` (blocks of 64 columns at every V)",
                        "`ChunkOutput::Staged` (blocks of 128 columns where V > 64)", only=lambda d: d[4] > 64)


def state_blocks_rule(bench):
    """The state blocks' section: the state launches in blocks of 128 value
    columns where V > 64 (ChunkStateBlocks::Auto: the real-gate walk on
    sm_90, speed log item 52; the separate carry's state kernel, item 54;
    16-bit inputs) against blocks of 64 at every V (ChunkStateBlocks::Narrow):
    chunked-real-fast against chunked-real-fast-narrow-state (whichever
    carry the plan takes) and chunked-fast against chunked-fast-narrow-state
    (complex gates: the separate carry), at V > 64 only (below, both run the
    same kernels), and the rule they support; the launches' split says
    which state launch ran."""
    return variant_rule(bench, "State blocks (64 value columns against 128, V > 64)",
                        [("chunked-real-fast", "chunked-real-fast-narrow-state"),
                         ("chunked-fast", "chunked-fast-narrow-state")],
                        "`ChunkStateBlocks::Narrow` (state blocks of 64 columns at every V)",
                        "`ChunkStateBlocks::Auto` (state blocks of 128 columns where V > 64)", only=lambda d: d[4] > 64)


def packed_cost(bench):
    """The packed section: recurrent-varlen (the B sequences packed into one
    row, forward_varlen_into, the same problem and bits) against recurrent,
    chunked-varlen against chunked-separate (the packed chunked launch
    takes the separate carry) and chunked-grad-varlen against chunked-grad
    (f32); what packing costs, not a default to choose."""
    L = ["## Packed sequences (recurrent-varlen against recurrent)\n"]
    table, ratios = variant_table(bench, [("recurrent", "recurrent-varlen")], grid=recurrent_grid)
    L += table
    chunked, chunked_ratios = variant_table(bench, [("chunked-separate", "chunked-varlen")])
    L += ["\nThe chunked forward's packed launch (chunked-varlen against chunked-separate):\n\n"] + chunked
    grad, grad_ratios = variant_table(bench, [("chunked-grad", "chunked-grad-varlen")])
    L += ["\nThe chunked backward's packed launches (chunked-grad-varlen against chunked-grad, f32: both the "
          "separate carry):\n\n"] + grad
    ratios = ratios + chunked_ratios + grad_ratios
    if ratios:
        worst = max(ratios)
        if worst <= 1 / STAGING_WIN:
            L.append(f"\nThe packed path costs nothing measurable (at most {worst:.3f}× recurrent, within "
                     f"the {1 / STAGING_WIN - 1:.0%} of noise, {len(ratios)} cases).\n")
        else:
            L.append(f"\nThe packed path costs up to {worst:.3f}× recurrent ({sum(r > 1 / STAGING_WIN for r in ratios)} "
                     f"of {len(ratios)} cases beyond the {1 / STAGING_WIN - 1:.0%} of noise): the offsets' "
                     "upload and the per-block sequence read, worth a look.\n")
    return L


def residency(phase):
    """`; 4/SM, 0.97 waves` from a phase's geometry (bench.json rows since
    2026-12-02, later: the driver's occupancy calculator), or nothing."""
    if phase.get("resident_per_sm") is None:
        return ""
    waves = phase.get("waves")
    return f"; {phase['resident_per_sm']}/SM" + (f", {waves:.2f} waves" if waves is not None else "")


def launch_split(bench):
    """The launches section: each bench row of more than one launch, its
    launches' median times and shares (bench.json "phases") with the blocks
    one SM held and the grid's waves, the time the next change should go
    after. Rows of the GPU runs before 2026-12-02 have none."""
    L = ["## Launches (where each row's time goes)\n"]
    rows = [r for r in (bench or {}).get("results") or [] if r.get("phases")]
    if not rows:
        return L + ["(no bench.json row with per-launch times: not measured)\n"]
    L.append("| kernel | dtype | shape | gate | ms | launches: ms (share) |")
    L.append("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["shape"]["len"])):
        sh = r["shape"]
        d = (sh["batch"], sh["len"], sh["heads"], sh["key_dim"], sh["value_dim"])
        total = sum(p["median_ms"] for p in r["phases"]) or 1.0
        parts = ", ".join(f"{p['kernel'].removeprefix('gateloop_')} {fmt(p['median_ms'])} "
                          f"({p['median_ms'] / total:.0%}{residency(p)})" for p in r["phases"])
        L.append(f"| {r['kernel']} | {r['dtype']} | {label(d)} | {sh.get('gate', 'channel')} | "
                 f"{fmt(r['median_ms'])} | {parts} |")
    return L + [""]


def recurrent_grid(d):
    """B·H·ceil(V/32) (src/cuda/recurrent.rs plan)."""
    B, _, H, _, V = d
    return B * H * -(-V // 32)


def current_min_blocks():
    """SEQUENTIAL_MIN_BLOCKS as src/cuda/chunk.rs has it now."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "cuda", "chunk.rs")) as fh:
            m = re.search(r"pub const SEQUENTIAL_MIN_BLOCKS: usize = (\d+);", fh.read())
        return m.group(1) if m else "?"
    except OSError:
        return "?"


def seq_grid(d):
    """B·H·value_tiles·key_slabs (src/cuda/chunk.rs plan_with)."""
    B, _, H, K, V = d
    return B * H * -(-V // 64) * -(-K // 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="a bundle run's results: a folder, or its results.tar.gz")
    ap.add_argument("--into", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches",
                                                   "results"), help="where the dated folder goes")
    ap.add_argument("--dry-run", action="store_true", help="print verdict.md, copy nothing")
    a = ap.parse_args()
    for r in a.results:
        if not os.path.exists(r):
            sys.exit(f"gpu-results: no folder or file {r}")
    with tempfile.TemporaryDirectory() as merged:
        merge_runs(a.results, merged)
        file_results(merged, a.into, a.dry_run)


def file_results(results, into, dry_run):
    """verdict.md for the (merged) results folder, and the copy into `into`."""
    summary = load_json(os.path.join(results, "summary.json"))
    benches = filed_runs(results, "bench")
    bench = benches[0][1]
    carry = load_json(os.path.join(results, "carry.json"))
    runs = peer_runs(results)
    date = run_date(results) or "undated"
    card = card_name(bench, carry, runs[0][1]) or "unknown GPU"
    dest = os.path.normpath(os.path.join(into, f"gpu-{date}-{slug(card)}"))

    L = [f"# GPU bundle results, {date}, {card}\n",
         "Filed by `scripts/gpu-results.py` from the bundle's output. Files beside this one: the bundle's own "
         "(summary, env, bench, carry, peers, fuzz, profile).\n"]
    L += steps_section(summary)
    per_run = []
    for name, doc in runs:
        lines, rows = targets_section(doc, name)
        L += lines
        per_run.append((name, rows))
    L += targets_overall(per_run)
    L += carry_rule(carry)
    L += bench_sections(benches, [staging_rule, real_carry_rule, rows_rule, output_rule, wide_rule, state_blocks_rule, packed_cost,
                                  launch_split])
    text = "\n".join(L) + "\n"
    if not dry_run:
        os.makedirs(dest, exist_ok=True)
        copied = copy_results(results, dest)
        with open(os.path.join(dest, "verdict.md"), "w") as fh:
            fh.write(text)
        print(f"gpu-results: {len(copied)} files and verdict.md in {dest}", file=sys.stderr)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
