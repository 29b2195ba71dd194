#!/usr/bin/env python3
"""Side-by-side GPU benchmark of gateloop against its peers, in one run.

Peers (each in its own worker process, so a crash or an out-of-memory state
of one cannot take the others' results with it):

  jax_assoc_scan     the official formulation (benches/peers/gateloop_jax.py):
                     materialized kᵀv states, jax.lax.associative_scan,
                     complex64 gates; forward and forward+backward (jax.grad)
  torch_assoc_scan   the lucidrains formulation (gateloop_torch.py): heads
                     first, materialized complex64 kᵀv, a log-depth scan in
                     torch; forward and forward+backward (autograd)
  fla_chunk_gla      fla.ops.gla.chunk_gla, bf16, real gates (phase 0),
                     [B, T, H, K]; forward and forward+backward (the anchor
                     of the fwd+bwd table)
  fla_fused_recurrent_gla   fla.ops.gla.fused_recurrent_gla, same inputs; forward
  ours               every kernel `gateloop bench --list` names, through
                     `gateloop bench --json` on the same shapes (f32, bf16)

Usage:
  peers.py [--out DIR] [--budget-s S] [--shape B,L,H,K,V ...] [--gateloop BIN]
  peers.py --smoke [--gateloop BIN]    CPU: tiny shapes; the JAX and torch
                     formulations checked against each other and against
                     gateloop's f64 reference (`gateloop run --mode recurrent`),
                     then the whole pipeline on CPU (fla and ours unavailable)
  peers.py --compile-only --peers fla_chunk_gla [--shape ...]
                     each peer case called once, untimed, ours not run: fills
                     the compile caches (Triton's TRITON_CACHE_DIR, JAX's
                     JAX_COMPILATION_CACHE_DIR) for a timed run later on the
                     same machine, e.g. in the background of the bundle's
                     tests (bundle/run.sh warm); a case's status is then
                     `compiled` with first_call_s, its wall time

Results (rewritten after every measurement, so a kill loses nothing done):
  DIR/peers.json     every case: status ok | OOM | unavailable | skipped |
                     timeout | error | crashed (| compiled), median_ms, note,
                     checks; meta `caches`: the compile caches' entries at
                     the start (a warm cache skips fla's compiles)
  DIR/peers.md       the dated tables (card name from torch.cuda.get_device_name)
  DIR/peers-*.log    each worker's stderr; DIR/ours-bench-*.{json,txt}

Exit: 0 the run completed (OOM / unavailable cases are results, not
failures); 3 no GPU is present (everything reported unavailable, nothing
timed); 1 a smoke check failed or the runner itself failed.
"""
import argparse
import datetime
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = "gateloop-peers/1"

# fla's published benchmark shapes (B, T, H, D with K = V = D), then the two
# shapes of gateloop's own bench registry.
DEFAULT_SHAPES = [
    (1, 8192, 96, 128, 128),
    (2, 16384, 16, 128, 128),
    (4, 2048, 16, 128, 128),
    (8, 1024, 8, 64, 64),
    (8, 4096, 16, 64, 64),
    (1, 65536, 4, 64, 64),
]
SMOKE_SHAPES = [(2, 37, 3, 4, 5), (1, 64, 2, 8, 8)]

# (peer, column, dtype, gate); the order is the priority under the time budget.
PEERS = [
    ("fla_chunk_gla", "fwd", "bf16", "real"),
    ("fla_chunk_gla", "fwdbwd", "bf16", "real"),
    ("fla_fused_recurrent_gla", "fwd", "bf16", "real"),
    ("torch_assoc_scan", "fwd", "complex64", "complex"),
    ("jax_assoc_scan", "fwd", "complex64", "complex"),
    ("torch_assoc_scan", "fwdbwd", "complex64", "complex"),
    ("jax_assoc_scan", "fwdbwd", "complex64", "complex"),
]
MATERIALIZED = ("torch_assoc_scan", "jax_assoc_scan")
# Shares of the budget left after ours: fla chunk_gla compiles and autotunes
# a forward and a backward (Triton), the materialized forms have two columns.
WEIGHTS = {"fla_chunk_gla": 3.0, "fla_fused_recurrent_gla": 1.0, "torch_assoc_scan": 1.5, "jax_assoc_scan": 1.5}

# Seconds: a worker's imports; one case (compile, autotune and timing); the
# least budget worth starting a case with.
WORKER_START_S = int(os.environ.get("GATELOOP_PEERS_START_S", 90))
CASE_LIMIT_S = int(os.environ.get("GATELOOP_PEERS_CASE_LIMIT_S", 120))
MIN_CASE_S = 12

# The tensor-core floor. Dense bf16/f16 tensor-core flops per SM per clock by
# compute capability (A100 312 TFLOP/s = 108 SMs × 2048 × 1.41 GHz; H100/H200
# 989 TFLOP/s = 132 × 4096 × 1.83 GHz; B200 148 SMs × 8192); TF32 is half.
TC_BF16_FLOPS_PER_SM_CLK = {(8, 0): 2048, (8, 6): 1024, (8, 7): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}
TC_CHUNK = 64


def tc_flops(shape, gate):
    """The fewest matmul flops of a chunked evaluation with chunks of C = 64:
    per (b, h, token), q·S and the chunk-state update kᵀv (2·K·V each) and the
    causal half of the intra-chunk scores q kᵀ and scores·v (C·K + C·V);
    complex gates make the gated q̃, k̃ complex and double each product."""
    B, L, H, K, V = shape
    return B * H * L * (4.0 * K * V + TC_CHUNK * (K + V)) * (2.0 if gate == "complex" else 1.0)


def shape_key(s):
    return ",".join(str(x) for x in s)


def shape_label(s):
    B, L, H, K, V = s
    return f"{B}, {L}, {H}, {K}" if K == V else f"{B}, {L}, {H}, {K}, {V}"


def state_bytes(shape):
    """complex64 [B, L, H, K, V]: the materialized formulations' states."""
    B, L, H, K, V = shape
    return 8.0 * B * L * H * K * V


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def say(msg):
    print(f"[peers] {msg}", flush=True)


# --------------------------------------------------------------- inputs ---

def make_inputs(torch, shape, seed, device, real_gate=False, h0=False):
    """The shared inputs, drawn with torch's generator on `device` from
    `seed`: q, k, v uniform in (−1, 1); log_gate [.., K, 2] with Re in
    [−0.3, 0] and Im in (−π, π) (0 for real gates); the same draws for every
    peer on one machine (gateloop bench draws its own, same distributions)."""
    B, L, H, K, V = shape
    g = torch.Generator(device=device).manual_seed(seed)
    u = lambda *dims: torch.rand(*dims, generator=g, device=device, dtype=torch.float32) * 2 - 1
    q, k, v = u(B, L, H, K), u(B, L, H, K), u(B, L, H, V)
    re = -0.3 * torch.rand(B, L, H, K, generator=g, device=device, dtype=torch.float32)
    im = u(B, L, H, K) * math.pi
    if real_gate:
        im = torch.zeros_like(im)
    out = dict(q=q, k=k, v=v, log_gate=torch.stack([re, im], -1))
    if h0:
        out["h0"] = torch.complex(u(B, H, K, V), u(B, H, K, V))
    return out


def rel_l2(torch, got, ref):
    got, ref = got.to(ref.dtype), ref
    den = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(got - ref).item() / (den if den > 0 else 1.0)


# --------------------------------------------------------------- timing ---

def time_torch(torch, fn, device, grad_to_none=None):
    """(median ms, method): triton.testing.do_bench's median on a GPU (CUDA
    events, L2 flushed between calls), else a wall-clock median."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            try:
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
            except TypeError:  # older triton: no return_mode
                ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
            return float(ms), "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)"
        times = []
        fn()
        torch.cuda.synchronize()
        for _ in range(20):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return float(sorted(times)[len(times) // 2]), "CUDA events, median of 20"
    return wall_median(fn, lambda: None, grad_to_none)


def wall_median(fn, sync, grad_to_none=None, target_s=0.3):
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    est = max(time.perf_counter() - t0, 1e-6)
    n = int(min(50, max(3, target_s / est)))
    times = []
    for _ in range(n):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2], f"wall clock, median of {n} (synchronized)"


def is_oom(exc):
    s = f"{type(exc).__name__}: {exc}"
    return any(w in s for w in ("OutOfMemoryError", "out of memory", "RESOURCE_EXHAUSTED", "Out of memory",
                                "CUDA_ERROR_OUT_OF_MEMORY", "Resource exhausted"))


# --------------------------------------------------------------- worker ---

class Worker:
    """One peer's cases in this process: imports, a correctness check at a
    small shape, then one measurement per case."""

    def __init__(self, peer, device, seed):
        self.peer, self.device, self.seed = peer, device, seed
        if peer == "jax_assoc_scan":
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import torch
        self.torch = torch
        self.unavailable = None
        if device == "cuda" and not torch.cuda.is_available():
            self.unavailable = "no CUDA GPU visible to torch"
            return
        if peer.startswith("fla_"):
            try:
                from fla.ops.gla import chunk_gla, fused_recurrent_gla
                import fla
                self.fla_version = getattr(fla, "__version__", "?")
                self.fn = chunk_gla if peer == "fla_chunk_gla" else fused_recurrent_gla
            except Exception as e:  # noqa: BLE001 - any import failure means unavailable
                self.unavailable = f"fla not importable: {type(e).__name__}: {e}"[:300]
                return
            # The driver's --fla-tune (fla_tune.py: why, and what a quick
            # time means).
            self.tune = os.environ.get("GATELOOP_PEERS_FLA_TUNE", "full")
            if self.tune == "quick":
                sys.path.insert(0, HERE)
                from fla_tune import quick_tune_fla
                self.tune_note = quick_tune_fla()
            else:
                self.tune_note = "autotune full (fla's own configurations)"
            if not torch.cuda.is_available():
                self.unavailable = f"no CUDA GPU (fla {self.fla_version} imported; its Triton kernels need a GPU)"
        elif peer == "torch_assoc_scan":
            sys.path.insert(0, HERE)
            from gateloop_torch import gateloop_torch
            self.fn = gateloop_torch
        elif peer == "jax_assoc_scan":
            try:
                import jax
                import jax.numpy as jnp
                from jax import lax
                sys.path.insert(0, HERE)
                from gateloop_jax import gateloop_scan
            except Exception as e:  # noqa: BLE001
                self.unavailable = f"jax not importable: {type(e).__name__}: {e}"[:300]
                return
            self.jax, self.jnp, self.lax, self.scan = jax, jnp, lax, gateloop_scan
            platform = jax.devices()[0].platform
            if device == "cuda" and platform not in ("gpu", "cuda"):
                self.unavailable = f"jax has no GPU backend (jax {jax.__version__}, devices: {platform})"
        else:
            raise SystemExit(f"unknown peer {peer}")

    def free(self):
        import gc
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        if self.peer == "jax_assoc_scan" and hasattr(self, "jax"):
            try:
                self.jax.clear_caches()
            except Exception:  # noqa: BLE001
                pass

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    # -- the formulation of each peer on torch inputs; returns (y, h_final) --
    def forward_fn(self, inp, column):
        torch = self.torch
        if self.peer.startswith("fla_"):
            q, k, v = (inp[n].to(torch.bfloat16) for n in ("q", "k", "v"))
            g = inp["log_gate"][..., 0].to(torch.bfloat16)
            fwdbwd = column == "fwdbwd"
            if fwdbwd:
                for t in (q, k, v, g):
                    t.requires_grad_(True)
            if self.peer == "fla_chunk_gla":
                call = lambda: self.fn(q, k, v, g, scale=1.0, output_final_state=True)
            else:
                call = lambda: self.fn(q, k, v, gk=g, scale=1.0, output_final_state=True)
            if not fwdbwd:
                return call, None, dict(q=q, k=k, v=v, g=g)
            do = torch.rand_like(v) * 2 - 1

            def step():
                o, _ = call()
                o.backward(do)
            return step, [q, k, v, g], dict(q=q, k=k, v=v, g=g)
        if self.peer == "torch_assoc_scan":
            q, k, v, lg = (inp[n] for n in ("q", "k", "v", "log_gate"))
            if column == "fwd":
                return (lambda: self.fn(q, k, v, lg)), None, inp
            for t in (q, k, v, lg):
                t.requires_grad_(True)
            dy = torch.rand_like(v) * 2 - 1

            def step():
                y, _ = self.fn(q, k, v, lg)
                (y * dy).sum().backward()
            return step, [q, k, v, lg], inp
        raise AssertionError(self.peer)

    def jax_fn(self, inp, column):
        jax, jnp, lax, scan = self.jax, self.jnp, self.lax, self.scan
        args = [jnp.asarray(inp[n].detach().cpu().numpy()) for n in ("q", "k", "v", "log_gate")]

        def fwd(q, k, v, lg):
            return scan(jnp, lax, q, k, v, lg[..., 0] + 1j * lg[..., 1], None)

        if column == "fwd":
            f = jax.jit(fwd)
        else:
            dy = jnp.asarray((self.torch.rand_like(inp["v"]) * 2 - 1).cpu().numpy())
            loss = lambda q, k, v, lg: jnp.sum(fwd(q, k, v, lg)[0] * dy)
            f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        return (lambda: jax.block_until_ready(f(*args))), args

    def check(self, shape):
        """rel L2 of y against the torch float64 materialized formulation on
        the same inputs (bf16-rounded for fla; phase 0 for fla)."""
        torch = self.torch
        sys.path.insert(0, HERE)
        from gateloop_torch import gateloop_torch
        real = self.peer.startswith("fla_")
        inp = make_inputs(torch, shape, self.seed + 7, self.device, real_gate=real)
        if real:
            inp = {n: t.to(torch.bfloat16).to(torch.float32) for n, t in inp.items()}
        ref_y, ref_h = gateloop_torch(*(inp[n].double() for n in ("q", "k", "v", "log_gate")))
        if self.peer == "jax_assoc_scan":
            call, _ = self.jax_fn(inp, "fwd")
            y, h = call()
            import numpy as np
            y, h = torch.from_numpy(np.asarray(y)), torch.from_numpy(np.asarray(h))
        else:
            call, _, _ = self.forward_fn(inp, "fwd")
            y, h = call()
            y, h = y.float().cpu(), h.cpu()
        bound = 2e-2 if real else 1e-4
        err_y, err_h = rel_l2(torch, y, ref_y.cpu()), rel_l2(torch, h.to(ref_h.dtype), ref_h.cpu())
        ok = err_y <= bound and err_h <= bound
        return dict(shape=list(shape), against="torch float64 materialized scan, same inputs",
                    y_rel_l2=err_y, h_final_rel_l2=err_h, bound=bound, passed=ok)

    def run_case(self, case, inject_oom=False):
        torch = self.torch
        shape = tuple(case["shape"])
        res = dict(case)
        if self.peer in MATERIALIZED and self.device == "cuda":
            free, _total = torch.cuda.mem_get_info()
            # Certain to fail: the scanned states (the output) and the first
            # level's half-length pair products are live together.
            need = 1.5 * state_bytes(shape)
            if need > free:
                res.update(status="OOM", note=f"predicted, not attempted: the scanned states and the scan's first "
                                              f"level alone need {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free")
                return res
        real = case["gate"] == "real"
        inp = make_inputs(torch, shape, self.seed, self.device, real_gate=real)
        compile_only = os.environ.get("GATELOOP_PEERS_COMPILE_ONLY") == "1"
        try:
            if inject_oom:
                raise RuntimeError("CUDA out of memory (injected by GATELOOP_PEERS_INJECT)")
            if self.peer == "jax_assoc_scan":
                call, keep = self.jax_fn(inp, case["column"])
                del inp
                self.free()
                grads = None
            else:
                call, grads, keep = self.forward_fn(inp, case["column"])
            if compile_only:
                # One call (the compiles, Triton's or XLA's, and one run), no
                # timing: what a later timed run of the case finds cached.
                t0 = time.perf_counter()
                call()
                self.sync()
                res.update(status="compiled", first_call_s=round(time.perf_counter() - t0, 2))
            elif self.peer == "jax_assoc_scan":
                ms, method = wall_median(call, lambda: None)
                res.update(status="ok", median_ms=ms,
                           method="jax: " + method + " (block_until_ready), after a compiling call")
            else:
                ms, method = time_torch(torch, call, self.device, grads)
                res.update(status="ok", median_ms=ms, method=method)
            if self.peer.startswith("fla_"):
                res["tune"] = self.tune
        except Exception as e:  # noqa: BLE001 - each case reports its own failure
            if is_oom(e):
                res.update(status="OOM", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            else:
                res.update(status="error", note=f"{type(e).__name__}: {e}"[:400])
        return res


def worker_main(args):
    """Protocol on stdout: @@READY {info} once, then per case @@START id and
    @@RESULT {json}; everything else goes to stderr."""
    cases = json.load(open(args.cases))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not break the protocol

    def emit(tag, obj):
        real_stdout.write(f"@@{tag} {json.dumps(obj)}\n")
        real_stdout.flush()

    try:
        w = Worker(args.peer, args.device, args.seed)
    except Exception as e:  # noqa: BLE001
        emit("READY", dict(unavailable=f"worker failed to start: {type(e).__name__}: {e}"[:300]))
        return
    info = dict(unavailable=w.unavailable)
    if getattr(w, "fla_version", None):
        info["fla_version"] = w.fla_version
    if getattr(w, "tune_note", None):
        info["fla_tune"] = w.tune_note
    if w.unavailable is None and args.check_shape:
        try:
            info["check"] = w.check(tuple(int(x) for x in args.check_shape.split(",")))
        except Exception as e:  # noqa: BLE001
            info["check"] = dict(passed=False, error=f"{type(e).__name__}: {e}"[:300])
        w.free()
    emit("READY", info)
    if w.unavailable:
        return
    # For testing the driver's recovery: GATELOOP_PEERS_INJECT=PEER=crash|hang|oom
    # makes the first case of the peer's first worker (the one that runs the
    # check) exit, hang, or raise an out-of-memory error.
    inject = dict(x.split("=", 1) for x in os.environ.get("GATELOOP_PEERS_INJECT", "").split(",") if "=" in x)
    for i, case in enumerate(cases):
        emit("START", case["id"])
        fault = inject.get(args.peer) if i == 0 and args.check_shape else None
        if fault == "crash":
            os._exit(7)
        if fault == "hang":
            time.sleep(1e6)
        res = w.run_case(case, inject_oom=fault == "oom")
        w.free()
        emit("RESULT", res)


# --------------------------------------------------------------- driver ---

class Report:
    """peers.json and peers.md, rewritten after every change."""

    def __init__(self, out_dir, meta):
        self.out_dir, self.meta = out_dir, meta
        self.cases = []
        self.ours = dict(status="not run", kernels=[], results=[], failures=[])
        self.checks = {}
        self.workers = {}

    def add(self, res):
        self.cases.append(res)
        self.write()

    def write(self):
        doc = dict(schema=SCHEMA, **self.meta, written=now_utc(), ours=self.ours, checks=self.checks,
                   workers=self.workers, cases=self.cases, ratios=self.ratios())
        tmp = os.path.join(self.out_dir, ".peers.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, "peers.json"))
        tmp = os.path.join(self.out_dir, ".peers.md.tmp")
        with open(tmp, "w") as fh:
            fh.write(self.markdown())
        os.replace(tmp, os.path.join(self.out_dir, "peers.md"))

    # ours: the fastest kernel of a column at a shape in a dtype
    def ours_best(self, shape, column, dtype, gate, prefix=""):
        """Ours' fastest kernel of `column` at `shape` in `dtype` for `gate`
        ("complex" or "real") gates, among those whose name starts with
        `prefix`. f32 compares only the exact kernels (f32-level precision,
        like the complex64 formulations); 16-bit dtypes also the `-fast`
        ones (one rounding of the tensor-core operands, fla's own
        precision)."""
        rows = [r for r in self.ours["results"] if r["shape_key"] == shape_key(shape) and r["column"] == column
                and r["dtype"] == dtype and r.get("gate", "complex") == gate and r["kernel"].startswith(prefix)
                and not (dtype == "f32" and r["kernel"].endswith("-fast"))]
        return min(rows, key=lambda r: r["median_ms"]) if rows else None

    @staticmethod
    def ours_for(case):
        """The (dtype, gate) of ours that a peer case is compared with: fla
        runs real gates in bf16, the materialized formulations complex gates
        in complex64 (f32)."""
        return ("bf16" if case["dtype"] == "bf16" else "f32"), case.get("gate", "complex")

    def ratios(self):
        """peer median / ours median; forward peers against ours' fastest
        forward kernel in the matching dtype (f32 for the complex64
        formulations, bf16 for fla); fwd+bwd peers also against fla
        chunk_gla fwd+bwd (the anchor)."""
        out = []
        for c in self.cases:
            if c.get("status") != "ok":
                continue
            ours = self.ours_best(c["shape"], c["column"], *self.ours_for(c))
            r = dict(id=c["id"], peer=c["peer"], column=c["column"], shape=c["shape"])
            if ours:
                r.update(ours_kernel=ours["kernel"], ours_dtype=ours["dtype"], ours_ms=ours["median_ms"],
                         peer_over_ours=c["median_ms"] / ours["median_ms"])
            if c["column"] == "fwdbwd":
                anchor = self.find("fla_chunk_gla", "fwdbwd", c["shape"])
                if anchor and anchor.get("status") == "ok":
                    r["peer_over_fla_chunk_gla"] = c["median_ms"] / anchor["median_ms"]
            out.append(r)
        return out

    def find(self, peer, column, shape):
        for c in self.cases:
            if c["peer"] == peer and c["column"] == column and list(c["shape"]) == list(shape):
                return c
        return None

    def cell(self, peer, column, shape, ref_ms):
        c = self.find(peer, column, shape)
        if c is None:
            return "—"
        if c["status"] == "ok":
            s = fmt_ms(c["median_ms"])
            if ref_ms:
                s += f" ({c['median_ms'] / ref_ms:.2f}×)"
            return s
        if c["status"] == "OOM":
            return "OOM"
        return f"{c['status']}†"

    def markdown(self):
        m = self.meta
        L = []
        L.append(f"# GateLoop peer benchmark, {m['date']}, {m.get('device_name') or 'no GPU'}\n")
        L.append(f"Run by `benches/peers/peers.py` ({m.get('mode')}), {m.get('started')} to {now_utc()}. "
                 f"Versions: {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items())}.\n")
        caches = m.get("caches") or {}
        if caches:
            L.append("Compile caches at the start: " + ", ".join(f"{k} {v['entries']} entries ({v['dir']})"
                                                                for k, v in caches.items()) + ".\n")
        if m.get("compile_only"):
            L.append("**Compile-only run** (`--compile-only`): each case was called once, untimed, to fill the "
                     "compile caches for a timed run on the same machine; nothing below is a time. Status and "
                     "first-call seconds per case:\n")
            for c in self.cases:
                L.append(f"- {c['peer']} {c['column']} {shape_label(c['shape'])}: {c['status']}"
                         + (f", first call {c['first_call_s']:.1f} s" if c.get("first_call_s") is not None else "")
                         + (f" ({c['note'][:160]})" if c.get("note") else ""))
            return "\n".join(L) + "\n"
        ceil = self.ours.get("ceilings") or {}
        if ceil:
            L.append(f"Ceilings (gateloop bench, same run): copy {ceil.get('copy_gb_per_s_measured', 0):.0f} GB/s "
                     f"measured; tensor-core peak (dense) bf16 {m.get('tc_bf16_tflops') or '?'} TFLOP/s, TF32 half "
                     f"that ({m.get('tc_basis', '')}).\n")
        L.append("Times are medians in ms; (×) = peer time / ours (> 1: ours is faster), like against like: the "
                 "complex64 formulations (complex gates) against ours' fastest exact complex-gate f32 kernel, fla "
                 "(real gates, phase 0, bf16) against ours' fastest real-gate bf16 kernel. The complex bf16 column "
                 "shows what complex support costs over real gates (issue 4: at most 2×). "
                 "OOM: out of device memory; † see the notes.\n")
        quick = m.get("fla_tune") == "quick"
        fla_tag = " (quick-tuned)" if quick else ""
        if quick:
            L.append("fla ran with its Triton autotune cut to one configuration per kernel (`--fla-tune quick`, "
                     "benches/peers/fla_tune.py): its times are upper bounds on fla's fully tuned times, so a ratio "
                     "short of a target (or below 1: ours slower) holds against fla, one that meets it does not yet.\n")
        L.append("## Forward\n")
        L.append("| B, L, H, K=V | ours complex f32 (kernel; of HBM / TC floor) | ours complex bf16 | ours real bf16 "
                 "| JAX associative_scan, complex64 | torch associative scan, complex64 "
                 f"| fla chunk_gla, bf16{fla_tag} | fla fused_recurrent_gla, bf16{fla_tag} |")
        L.append("|---|---|---|---|---|---|---|---|")
        for s in m["shapes"]:
            o32 = self.ours_best(s, "fwd", "f32", "complex")
            oc16, or16 = self.ours_best(s, "fwd", "bf16", "complex"), self.ours_best(s, "fwd", "bf16", "real")
            r32, r16 = (o32 or {}).get("median_ms"), (or16 or {}).get("median_ms")
            L.append(f"| {shape_label(s)} | {ours_cell(o32, self.ours)} | {ours_cell(oc16, self.ours)} "
                     f"| {ours_cell(or16, self.ours)} "
                     f"| {self.cell('jax_assoc_scan', 'fwd', s, r32)} | {self.cell('torch_assoc_scan', 'fwd', s, r32)} "
                     f"| {self.cell('fla_chunk_gla', 'fwd', s, r16)} "
                     f"| {self.cell('fla_fused_recurrent_gla', 'fwd', s, r16)} |")
        L.append("\n## Forward + backward\n")
        L.append("(×) = time / fla chunk_gla fwd+bwd, the anchor (issue 5).\n")
        L.append(f"| B, L, H, K=V | ours fwd+bwd | fla chunk_gla fwd+bwd, bf16{fla_tag} | torch associative scan "
                 "fwd+bwd, complex64 | JAX associative_scan fwd+bwd, complex64 |")
        L.append("|---|---|---|---|---|")
        for s in m["shapes"]:
            anchor = self.find("fla_chunk_gla", "fwdbwd", s)
            a_ms = anchor["median_ms"] if anchor and anchor.get("status") == "ok" else None
            ob = next((o for o in (self.ours_best(s, "fwdbwd", dt, g) for g in ("real", "complex")
                                           for dt in ("bf16", "f32")) if o), None)
            ours_s = (f"{fmt_ms(ob['median_ms'])} ({ob['kernel']} {ob['dtype']})" if ob
                      else ("unavailable†" if self.ours["status"] != "not run" else "—"))
            L.append(f"| {shape_label(s)} | {ours_s} | {self.cell('fla_chunk_gla', 'fwdbwd', s, None)} "
                     f"| {self.cell('torch_assoc_scan', 'fwdbwd', s, a_ms)} "
                     f"| {self.cell('jax_assoc_scan', 'fwdbwd', s, a_ms)} |")
        L.append("\n## Ours, every kernel\n")
        if self.ours["results"]:
            L.append("| kernel | dtype | B, L, H, K=V | median ms | of HBM floor | of TC floor |")
            L.append("|---|---|---|---|---|---|")
            for r in self.ours["results"]:
                L.append(f"| {r['kernel']} | {r['dtype']} | {shape_label(r['shape'])} | {fmt_ms(r['median_ms'])} "
                         f"| {fmt_frac(r.get('of_hbm_floor'))} | {fmt_frac(r.get('of_tc_floor'))} |")
        else:
            L.append(f"(none: {self.ours['status']})")
        L.append("\n## Checks (each peer's y and h_final at a small shape against the torch float64 formulation)\n")
        for peer, c in self.checks.items():
            if "error" in c:
                L.append(f"- {peer}: check failed to run: {c['error']}")
            else:
                L.append(f"- {peer}: y rel L2 {c['y_rel_l2']:.2e}, h_final rel L2 {c['h_final_rel_l2']:.2e} "
                         f"(bound {c['bound']:.0e}) at {shape_label(c['shape'])}: "
                         f"{'passed' if c['passed'] else 'FAILED'}")
        if not self.checks:
            L.append("(none ran)")
        L.append("\n## Notes\n")
        notes = [f"- ours: {self.ours['status']}" + (f": {self.ours['note']}" if self.ours.get("note") else "")]
        if self.ours.get("fwdbwd_note"):
            notes.append(f"- ours fwd+bwd: unavailable: {self.ours['fwdbwd_note']}")
        for f in self.ours.get("failures", []):
            notes.append(f"- ours {f.get('kernel')} {f.get('dtype')} {f.get('shape')}: {f.get('error')}")
        # one line per (peer, column, status, note), listing its shapes
        groups = {}
        for c in self.cases:
            if c["status"] != "ok":
                groups.setdefault((c["peer"], c["column"], c["status"], c.get("note") or ""), []).append(c["shape"])
        for (peer, column, status, note), shapes in groups.items():
            where = ("every shape" if len(shapes) == len(m["shapes"]) and len(shapes) > 1
                     else "; ".join(shape_label(s) for s in shapes))
            notes.append(f"- {peer} {column} ({where}): {status}" + (f": {note}" if note else ""))
        L.extend(notes)
        L.append(f"\nTC floor: {' '.join(tc_flops.__doc__.split(':', 1)[1].split())} / the dense tensor-core peak (bf16 for "
                 "bf16 inputs, TF32 for f32). HBM floor: gateloop bench's minimum bytes / the copy bandwidth it "
                 "measured in the same run.\n")
        return "\n".join(L) + "\n"


def fmt_ms(ms):
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def fmt_frac(x):
    return "—" if x is None else f"{100 * x:.3g}%"


def ours_cell(r, ours):
    if r is None:
        return "unavailable†" if ours["status"] not in ("ok", "not run") else "—"
    return (f"{fmt_ms(r['median_ms'])} ({r['kernel']}; {fmt_frac(r.get('of_hbm_floor'))} / "
            f"{fmt_frac(r.get('of_tc_floor'))})")


class Deadline:
    """A time budget; `share(s)` is a part of it that ends after s seconds
    or with its parent, whichever is first."""

    def __init__(self, budget_s, parent=None):
        self.budget_s, self.t0, self.parent = budget_s, time.monotonic(), parent

    def left(self):
        own = self.budget_s - (time.monotonic() - self.t0)
        return min(own, self.parent.left()) if self.parent else own

    def share(self, seconds):
        return Deadline(seconds, parent=self)

    def why(self):
        return (f"time budget: {max(self.left(), 0):.0f}s left of this part's {self.budget_s:.0f}s, under the "
                f"{MIN_CASE_S}s a case needs at least (see benches/peers/README.md: the time budget)")


def find_gateloop(arg):
    cands = [arg, os.environ.get("GATELOOP_BIN"), os.path.join(HERE, "..", "bin", "gateloop")]
    if os.environ.get("CARGO_TARGET_DIR"):
        cands.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "gateloop"))
    cands += [os.path.join(HERE, "..", "..", "target", "release", "gateloop"), shutil.which("gateloop")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    return None


def bench_list(gl):
    """[(name, [dtypes])] from `gateloop bench --list`: the kernel lines end
    in their dtype list; a tuning entry's (e.g. chunked-sequential) ends in
    `tuning` after it and is left out: it measures a launcher's choice, not
    a kernel a user calls."""
    r = subprocess.run([gl, "bench", "--list"], capture_output=True, text=True, timeout=30)
    out = []
    for line in r.stdout.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("]") and "[" in line:
            name = line.split()[0]
            dts = [d.strip() for d in line[line.rindex("[") + 1:-1].split(",") if d.strip()]
            out.append((name, dts))
    return out


def ours_column(name):
    """fwd, fwdbwd (a kernel named *fwd-bwd*: forward then backward, the
    number compared with fla's fwd+bwd) or bwd (a backward alone, e.g.
    chunked-grad: listed in the every-kernel table only, compared with no
    peer)."""
    if "fwd-bwd" in name or "fwdbwd" in name:
        return "fwdbwd"
    return "bwd" if any(w in name for w in ("bwd", "backward", "grad")) else "fwd"


def run_ours(report, gl, shapes, deadline, out_dir, runs, tc, only=None):
    """Every kernel of `gateloop bench --list` through `gateloop bench --json`,
    one call per kernel over every shape (one call per shape when a kernel
    rejects one). Returns False when there is no GPU."""
    ours = report.ours
    if gl is None:
        ours.update(status="unavailable", note="no gateloop binary (give --gateloop or GATELOOP_BIN)")
        report.write()
        return True
    kernels = bench_list(gl)
    if only:
        # --ours: a subset (a second run in what is left of a device lease),
        # run in the order given: the first named are timed first when the
        # budget runs short (2026-12-04's first call reached 6 of 11 in the
        # registry's order, none of the chunked fwd+bwd rows it named).
        kernels = sorted(((n, d) for n, d in kernels if n in only), key=lambda nd: only.index(nd[0]))
    ours["kernels"] = [dict(name=n, dtypes=d, column=ours_column(n)) for n, d in kernels]
    if not any(ours_column(n) == "fwdbwd" for n, _ in kernels):
        ours["fwdbwd_note"] = "no forward+backward kernel in gateloop's bench registry (`gateloop bench --list`)"
    ours["status"] = "running"
    report.write()

    def one_call(name, dtypes, shape_list, tag):
        left = deadline.left()
        if left < MIN_CASE_S:
            return "skipped", deadline.why()
        jpath = os.path.join(out_dir, f"ours-bench-{tag}.json")
        cmd = [gl, "bench", "--json", jpath, "--kernel", name, "--runs", str(runs), "--warmup", "3"]
        for d in dtypes:
            cmd += ["--dtype", d]
        for s in shape_list:
            cmd += ["--shape", shape_key(s)]
        say(f"ours: {' '.join(cmd[1:])}")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, min(CASE_LIMIT_S * 2, left - 2)))
        except subprocess.TimeoutExpired:
            return "timeout", f"gateloop bench {name} ran past {min(CASE_LIMIT_S * 2, left - 2):.0f}s"
        with open(os.path.join(out_dir, f"ours-bench-{tag}.txt"), "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\nexit {r.returncode}\n{r.stdout}\n--- stderr\n{r.stderr}")
        if r.returncode == 2 and "needs a GPU" in (r.stdout + r.stderr):
            line = next((x for x in (r.stdout + r.stderr).splitlines() if "needs a GPU" in x), "")
            return "nogpu", line.strip()
        try:
            doc = json.load(open(jpath))
        except Exception:  # noqa: BLE001
            doc = None
        if doc is None or not doc.get("gpu"):
            err = next((x for x in (r.stdout + r.stderr).splitlines() if x.startswith("error")), f"exit {r.returncode}")
            return "error", err.strip()[:300]
        ours["device"], ours["ceilings"] = doc.get("device"), doc.get("ceilings")
        dev = doc.get("device") or {}
        if not tc and dev.get("max_sm_clock_khz"):  # no nvidia-smi clock: take the bench's device query
            found, basis = tc_peak(dict(capability=[int(x) for x in str(dev.get("compute_capability", "0.0")).split(".")],
                                        sm_count=dev.get("sm_count"), max_sm_clock_mhz=dev["max_sm_clock_khz"] / 1e3))
            tc.update(found)
            report.meta.update(tc_basis=basis, tc_bf16_tflops=round(found["bf16_flops"] / 1e12, 1) if found else None)
        for x in doc.get("results", []):
            sh = x["shape"]
            s = (sh["batch"], sh["len"], sh["heads"], sh["key_dim"], sh["value_dim"])
            gate = "real" if "real" in x["kernel"] else "complex"
            peak = tc.get("bf16_flops") if x["dtype"] in ("bf16", "f16") else tc.get("tf32_flops")
            tc_ms = tc_flops(s, gate) / peak * 1e3 if peak else None
            ours["results"].append(dict(
                kernel=x["kernel"], dtype=x["dtype"], shape=list(s), shape_key=shape_key(s), gate=gate,
                gate_layout=sh.get("gate"), column=ours_column(x["kernel"]), median_ms=x["median_ms"],
                min_ms=x.get("min_ms"), bytes=x.get("bytes"), floor_mem_ms=x.get("floor_mem_ms"),
                of_hbm_floor=(x["floor_mem_ms"] / x["median_ms"]) if x.get("floor_mem_ms") else None,
                tc_floor_ms=tc_ms, of_tc_floor=(tc_ms / x["median_ms"]) if tc_ms else None,
                outputs_finite=x.get("outputs_finite")))
        ours["failures"] += doc.get("failures", [])
        report.write()
        return "ok", ""

    for name, dts in kernels:
        dtypes = [d for d in ("f32", "bf16") if d in dts] or dts[:1]
        st, note = one_call(name, dtypes, shapes, name)
        if st == "nogpu":
            ours.update(status="unavailable", note=f"no GPU: {note}")
            report.write()
            return False
        if st == "error":  # a shape the kernel rejects: one call per shape
            for s in shapes:
                st2, note2 = one_call(name, dtypes, [s], f"{name}-{shape_key(s).replace(',', 'x')}")
                if st2 != "ok":
                    ours["failures"].append(dict(kernel=name, dtype=",".join(dtypes), shape=list(s),
                                                 error=f"{st2}: {note2}"))
        elif st != "ok":
            ours["failures"].append(dict(kernel=name, dtype=",".join(dtypes), shape="all", error=f"{st}: {note}"))
        report.write()
    ours["status"] = "ok" if ours["results"] else "no results"
    report.write()
    return True


def probe(device):
    """The card and versions, from a subprocess (so a broken import is a
    note, not a crash)."""
    code = r"""
import json, os, sys, subprocess
info = {"versions": {"python": sys.version.split()[0]}}
try:
    import torch
    info["versions"]["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = [p.major, p.minor]
        info["sm_count"] = p.multi_processor_count
        info["total_memory"] = p.total_memory
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"[:300]
    info["cuda"] = False
for mod in ("triton", "jax", "numpy"):
    try:
        m = __import__(mod)
        info["versions"][mod] = m.__version__
    except Exception as e:
        info["versions"][mod] = f"unavailable ({type(e).__name__})"
try:
    import jax
    info["jax_backend"] = jax.default_backend()
except Exception as e:
    info["jax_backend"] = f"unavailable ({type(e).__name__})"
try:  # importable here means the bundled wheels were unpacked onto PYTHONPATH
    import fla, fla.ops.gla
    info["versions"]["fla-core"] = fla.__version__
    info["fla"] = f"fla {fla.__version__} importable from {os.path.dirname(fla.__file__)}"
except Exception as e:
    info["versions"]["fla-core"] = "not importable"
    info["fla"] = f"fla not importable: {type(e).__name__}: {e}"[:300]
try:
    r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=20)
    info["max_sm_clock_mhz"] = float(r.stdout.split()[0])
except Exception:
    pass
print(json.dumps(info))
"""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"versions": {}, "cuda": False, "probe_error": f"{type(e).__name__}: {e}"[:300]}


def tc_peak(info):
    cap = tuple(info.get("capability") or ())
    per = TC_BF16_FLOPS_PER_SM_CLK.get(cap)
    sms, mhz = info.get("sm_count"), info.get("max_sm_clock_mhz")
    if not (per and sms and mhz):
        return {}, f"unknown for compute capability {cap} / SMs {sms} / clock {mhz} MHz"
    bf16 = per * sms * mhz * 1e6
    return (dict(bf16_flops=bf16, tf32_flops=bf16 / 2),
            f"{sms} SMs × {per} bf16 flops/clock/SM × {mhz:.0f} MHz max SM clock")


# The process groups of the running workers (each in its own session), so
# that a driver stopped from outside (SIGTERM: a step's timeout, the bundle
# ending a background warm-up) stops them too instead of leaving them on the
# GPU under the next step's timings.
LIVE_WORKERS = set()


def stop_workers_and_exit(signum, _frame):
    for pid in list(LIVE_WORKERS):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    say(f"stopped by signal {signum}; {len(LIVE_WORKERS)} worker(s) killed")
    sys.exit(128 + signum)


def cache_state():
    """The compile caches a run can reuse: Triton's (TRITON_CACHE_DIR, else
    ~/.triton/cache: one directory per compiled kernel) and JAX's persistent
    cache (JAX_COMPILATION_CACHE_DIR, when set), with their entries now."""
    out = {}
    for name, env, default in (("triton", "TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache")),
                               ("jax", "JAX_COMPILATION_CACHE_DIR", None)):
        d = os.environ.get(env) or default
        if not d:
            continue
        try:
            entries = len(os.listdir(d))
        except OSError:
            entries = 0
        out[name] = dict(dir=d, entries=entries)
    return out


def run_worker(peer, cases, device, seed, deadline, report, out_dir, check_shape):
    """Runs `cases` of one peer in worker processes, restarting after a crash
    or a timeout until every case has a result or the budget is gone."""
    pending = list(cases)
    log = open(os.path.join(out_dir, f"peers-{peer}.log"), "a")
    first = True
    while pending:
        left = deadline.left()
        if left < MIN_CASE_S:
            for c in pending:
                report.add(dict(c, status="skipped", note=deadline.why()))
            return
        fd, cpath = tempfile.mkstemp(suffix=".json", prefix="peers-cases-")
        with os.fdopen(fd, "w") as fh:
            json.dump(pending, fh)
        cmd = [sys.executable, os.path.abspath(__file__), "worker", "--peer", peer, "--cases", cpath,
               "--device", device, "--seed", str(seed)]
        if first and check_shape:
            cmd += ["--check-shape", shape_key(check_shape)]
        say(f"{peer}: worker for {len(pending)} case(s), {left:.0f}s of budget left")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        LIVE_WORKERS.add(proc.pid)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()

        def next_msg(limit):
            try:
                line = lines.get(timeout=max(1.0, limit))
            except queue.Empty:
                return "TIMEOUT", None
            if line is None:
                return "EOF", None
            if line.startswith("@@"):
                tag, _, rest = line[2:].partition(" ")
                return tag, json.loads(rest)
            log.write(line)
            return "OTHER", None

        def kill():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            LIVE_WORKERS.discard(proc.pid)

        current, t_case = None, time.monotonic()
        limit = min(WORKER_START_S + (60 if first and check_shape else 0), deadline.left())
        state = "start"
        while True:
            tag, obj = next_msg(limit - (time.monotonic() - t_case))
            if tag == "OTHER":
                continue
            if tag == "READY":
                report.workers[peer] = obj
                if obj.get("check"):
                    report.checks[peer] = obj["check"]
                if obj.get("unavailable"):
                    for c in pending:
                        report.add(dict(c, status="unavailable", note=obj["unavailable"]))
                    pending = []
                    kill()
                    break
                state, t_case = "ready", time.monotonic()
                limit = min(CASE_LIMIT_S, deadline.left())
                report.write()
                continue
            if tag == "START":
                left = deadline.left()
                if left < MIN_CASE_S:
                    kill()
                    break
                current = next(c for c in pending if c["id"] == obj)
                t_case = time.monotonic()
                limit = min(CASE_LIMIT_S, left)
                say(f"{peer}: {current['column']} {shape_label(current['shape'])} (limit {limit:.0f}s)")
                continue
            if tag == "RESULT":
                pending = [c for c in pending if c["id"] != obj["id"]]
                obj["wall_s"] = round(time.monotonic() - t_case, 1)
                report.add(obj)
                say(f"{peer}: {obj['column']} {shape_label(obj['shape'])}: {obj['status']}"
                    + (f" {obj['median_ms']:.3f} ms" if obj.get("median_ms") is not None else "")
                    + (f" ({obj['note'][:120]})" if obj.get("note") else ""))
                current, t_case = None, time.monotonic()
                limit = min(CASE_LIMIT_S, deadline.left())
                continue
            # TIMEOUT or EOF
            kill()
            what = "timeout" if tag == "TIMEOUT" else "crashed"
            if current is not None:
                note = (f"ran past its {limit:.0f}s limit" if tag == "TIMEOUT"
                        else f"the worker exited ({proc.returncode}) during the case; see peers-{peer}.log")
                pending = [c for c in pending if c["id"] != current["id"]]
                report.add(dict(current, status=what, note=note))
            elif state == "start":
                note = (f"the worker did not start within {limit:.0f}s" if tag == "TIMEOUT"
                        else f"the worker exited ({proc.returncode}) before it was ready; see peers-{peer}.log")
                for c in pending:
                    report.add(dict(c, status="timeout" if tag == "TIMEOUT" else "crashed", note=note))
                pending = []
            break
        first = False
        try:
            os.unlink(cpath)
        except OSError:
            pass
    log.close()


def driver(args):
    if args.out:
        out_dir = args.out
    elif os.environ.get("OUT"):
        out_dir = os.path.join(os.environ["OUT"], "peers")
    else:
        out_dir = os.path.join(os.getcwd(), "results", "peers")
    os.makedirs(out_dir, exist_ok=True)
    deadline = Deadline(args.budget_s)
    signal.signal(signal.SIGTERM, stop_workers_and_exit)
    device = "cpu" if args.cpu else "cuda"
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else \
        (SMOKE_SHAPES if args.cpu else DEFAULT_SHAPES)
    info = probe(device)
    tc, tc_basis = tc_peak(info) if device == "cuda" else ({}, "no GPU")
    meta = dict(date=datetime.date.today().isoformat(), started=now_utc(), mode="CPU smoke" if args.cpu else "GPU",
                device_name=info.get("device_name"), probe=info, versions=info.get("versions", {}),
                budget_s=args.budget_s, shapes=[list(s) for s in shapes], seed=args.seed,
                tc_bf16_tflops=round(tc["bf16_flops"] / 1e12, 1) if tc else None, tc_basis=tc_basis,
                fla_wheel=os.environ.get("GATELOOP_FLA_WHEEL"), fla_tune=args.fla_tune,
                compile_only=args.compile_only, caches=cache_state())
    os.environ["GATELOOP_PEERS_FLA_TUNE"] = args.fla_tune  # read by the fla workers
    os.environ["GATELOOP_PEERS_COMPILE_ONLY"] = "1" if args.compile_only else "0"
    report = Report(out_dir, meta)
    report.write()
    say(f"results in {out_dir}; device {info.get('device_name') or 'none'}; budget {args.budget_s:.0f}s")

    gl = find_gateloop(args.gateloop)
    only = args.ours.split(",") if args.ours else None
    if args.compile_only:
        ours = report.ours
        ours["status"], ours["note"] = "not run", "--compile-only (peers' compiles only)"
        have_gpu = True
    else:
        have_gpu = run_ours(report, gl, shapes, deadline.share(args.ours_share * args.budget_s), out_dir, args.runs,
                            tc, only)
    no_gpu = device == "cuda" and not info.get("cuda")
    if no_gpu:
        reason = f"no GPU present (torch: {info.get('torch_error') or 'torch.cuda.is_available() is False'})"
        say(reason)
        say(f"{info.get('fla')}; jax backend: {info.get('jax_backend')}")
        for peer, column, dtype, gate in PEERS:
            note = reason + (f"; {info.get('fla')}" if peer.startswith("fla_") else "")
            for s in shapes:
                report.cases.append(dict(id=f"{peer}/{column}/{shape_key(s)}", peer=peer, column=column,
                                         shape=list(s), dtype=dtype, gate=gate, status="unavailable", note=note))
        report.write()
        say(f"wrote {out_dir}/peers.json and peers.md (nothing timed: no GPU)")
        return 3
    if not have_gpu and device == "cuda":
        say("note: gateloop bench found no GPU although torch did")

    selected = [p for p in PEERS if not args.peers or p[0] in args.peers.split(",")]
    by_peer = {}
    for peer, column, dtype, gate in selected:
        by_peer.setdefault(peer, []).extend(
            dict(id=f"{peer}/{column}/{shape_key(s)}", peer=peer, column=column, shape=list(s), dtype=dtype, gate=gate)
            for s in shapes)
    check_shape = (1, 37, 2, 4, 5) if args.cpu else (2, 300, 4, 64, 64)
    weights = [WEIGHTS.get(p, 1.0) for p in by_peer]
    for i, (peer, cases) in enumerate(by_peer.items()):
        # smallest shapes first, forward before forward+backward at each, so
        # a peer that runs out of its share loses its largest cases; with
        # --fwd-first every forward before any forward+backward (a short
        # budget: fla compiles and autotunes its backward kernels apart)
        if args.fwd_first:
            cases.sort(key=lambda c: (c["column"] != "fwd", state_bytes(c["shape"])))
        else:
            cases.sort(key=lambda c: (state_bytes(c["shape"]), c["column"] != "fwd"))
        share = deadline.share(max(deadline.left(), 0) * weights[i] / sum(weights[i:]))
        run_worker(peer, cases, device, args.seed, share, report, out_dir, check_shape)
    report.write()
    bad_checks = [p for p, c in report.checks.items() if not c.get("passed")]
    say(f"wrote {out_dir}/peers.json and peers.md in {time.monotonic() - deadline.t0:.0f}s"
        + (f"; CHECK FAILED: {', '.join(bad_checks)}" if bad_checks else ""))
    return 0


# ---------------------------------------------------------------- smoke ---

def smoke_crosscheck(gl):
    """CPU: the JAX and torch formulations (float64 and float32) against
    gateloop's f64 recurrent reference and against each other, on tiny
    adversarial problems. Returns the number of failures."""
    import numpy as np
    import torch
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax
    from safetensors.numpy import load_file, save_file
    sys.path.insert(0, HERE)
    from gateloop_jax import gateloop_scan
    from gateloop_torch import gateloop_torch

    if gl is None:
        say("smoke: no gateloop binary (build it: cargo build --release --bin gateloop)")
        return 1
    rng = np.random.default_rng(20261129)
    # name, (B, L, H, K, V), per-head gate, h0, gate regime
    problems = [
        ("L=37 per-channel, h0", (2, 37, 3, 4, 5), False, True, "normal"),
        ("L=1 K=V=1", (1, 1, 1, 1, 1), False, False, "normal"),
        ("L=50 per-head gate", (2, 50, 2, 3, 4), True, False, "normal"),
        ("L=64 |a|=1, phases >> 2pi, h0", (1, 64, 2, 4, 4), False, True, "unit"),
        ("L=45 resets (Re g = -inf and -200), h0", (2, 45, 2, 3, 3), False, True, "resets"),
    ]
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        for name, (B, L, H, K, V), per_head, with_h0, regime in problems:
            kg = 1 if per_head else K
            q, k = rng.uniform(-1, 1, (B, L, H, K)), rng.uniform(-1, 1, (B, L, H, K))
            v = rng.uniform(-1, 1, (B, L, H, V))
            re = -rng.uniform(0, 0.3, (B, L, H, kg))
            im = rng.uniform(-np.pi, np.pi, (B, L, H, kg))
            if regime == "unit":
                re, im = np.zeros_like(re), rng.uniform(-60, 60, (B, L, H, kg))
            if regime == "resets":
                mask = rng.uniform(size=re.shape)
                re = np.where(mask < 0.05, -np.inf, np.where(mask < 0.1, -200.0, re))
            lg = np.stack([re, im], -1)
            h0 = rng.uniform(-1, 1, (B, H, K, V, 2)) if with_h0 else None
            tensors = dict(q=q, k=k, v=v, log_gate=lg)
            if with_h0:
                tensors["h0"] = h0
            inp, out = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
            save_file({n: np.ascontiguousarray(t) for n, t in tensors.items()}, inp)
            r = subprocess.run([gl, "run", "--input", inp, "--output", out, "--mode", "recurrent"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                say(f"smoke: gateloop run failed on {name}: {r.stderr.strip()}")
                failures += 1
                continue
            ref = load_file(out)
            ref_y, ref_h = ref["y"], ref["h_final"][..., 0] + 1j * ref["h_final"][..., 1]
            h0c = None if h0 is None else h0[..., 0] + 1j * h0[..., 1]
            got = {}
            for prec, rdt in (("f64", np.float64), ("f32", np.float32)):
                cdt = np.complex128 if rdt == np.float64 else np.complex64
                qq, kk, vv = (x.astype(rdt) for x in (q, k, v))
                g = (re + 1j * im).astype(cdt)
                y, h = gateloop_scan(jnp, lax, jnp.asarray(qq), jnp.asarray(kk), jnp.asarray(vv), jnp.asarray(g),
                                     None if h0c is None else jnp.asarray(h0c.astype(cdt)))
                got[f"jax {prec}"] = (np.asarray(y, np.float64), np.asarray(h, np.complex128))
                tdt = torch.float64 if rdt == np.float64 else torch.float32
                t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(tdt)
                y, h = gateloop_torch(t(qq), t(kk), t(vv), t(lg),
                                      None if h0c is None else torch.from_numpy(h0c.astype(cdt)))
                got[f"torch {prec}"] = (y.double().numpy(), h.to(torch.complex128).numpy())
            say(f"smoke: {name}")
            for who, (y, h) in got.items():
                ey = np.linalg.norm(y - ref_y) / max(np.linalg.norm(ref_y), 1e-300)
                eh = np.linalg.norm(h - ref_h) / max(np.linalg.norm(ref_h), 1e-300)
                ma = np.max(np.abs(y - ref_y))
                bound = 1e-10 if who.endswith("f64") else 5e-5
                ok = ey <= bound and eh <= bound and np.isfinite(y).all()
                failures += not ok
                say(f"smoke:   {who:<10} vs gateloop f64 reference: y rel L2 {ey:.2e} (max abs {ma:.1e}), "
                    f"h_final rel L2 {eh:.2e}, bound {bound:.0e}: {'ok' if ok else 'FAILED'}")
            ey = np.linalg.norm(got["jax f32"][0] - got["torch f32"][0]) / np.linalg.norm(ref_y)
            ok = ey <= 5e-5
            failures += not ok
            say(f"smoke:   jax f32 vs torch f32: y rel L2 {ey:.2e}: {'ok' if ok else 'FAILED'}")
    return failures


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("worker")
        ap.add_argument("--peer", required=True)
        ap.add_argument("--cases", required=True)
        ap.add_argument("--device", default="cuda")
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--check-shape")
        worker_main(ap.parse_args())
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="results directory (default: $OUT/peers, else ./results/peers)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="time budget of the whole run, seconds")
    ap.add_argument("--shape", action="append", help="B,L,H,K,V (repeatable; default: issue 4's six shapes)")
    ap.add_argument("--peers", help="comma-separated subset of: " + ", ".join(sorted({p[0] for p in PEERS})))
    ap.add_argument("--ours", help="comma-separated subset of `gateloop bench --list` to run, in this order "
                    "(default: every kernel, in the list's order)")
    ap.add_argument("--fwd-first", action="store_true", help="each peer's forwards before its forward+backwards")
    ap.add_argument("--ours-share", type=float, default=0.4, help="the part of the budget ours may take (default 0.4)")
    ap.add_argument("--gateloop", help="the gateloop binary (default: the bundle's bin/, GATELOOP_BIN, target/)")
    ap.add_argument("--runs", type=int, default=20, help="timed launches per case of gateloop bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="run the materialized formulations on the CPU")
    ap.add_argument("--smoke", action="store_true", help="CPU cross-check, then the pipeline on CPU at tiny shapes")
    ap.add_argument("--compile-only", action="store_true",
                    help="call each peer case once, untimed, and skip ours: fills the Triton and JAX compile caches "
                         "for a timed run later on the same machine (bundle/run.sh warm)")
    ap.add_argument("--fla-tune", choices=("full", "quick"), default=os.environ.get("GATELOOP_PEERS_FLA_TUNE", "full"),
                    help="fla's Triton autotune: full (its own configurations; default, or GATELOOP_PEERS_FLA_TUNE) "
                         "or quick (one configuration per kernel: an upper bound on fla's time; fla_tune.py)")
    args = ap.parse_args()
    if args.smoke:
        fails = smoke_crosscheck(find_gateloop(args.gateloop))
        say(f"smoke cross-check: {fails} failure(s)")
        args.cpu = True
        rc = driver(args)
        return 1 if fails or rc not in (0,) else 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
