#!/usr/bin/env python3
"""The official GateLoop formulation in JAX, as an independent peer.

The paper's parallel mode exactly as its authors run it: materialize every
per-step state contribution k_tᵀ v_t (a complex K×V matrix per step), then
`jax.lax.associative_scan` with the operator
(a_i, b_i)•(a_j, b_j) = (a_j a_i, a_j b_i + b_j), then y_t = Re(q_t h_t).

Two uses:
  crosscheck IN OUT     read a gateloop input file (q, k, v, log_gate[..,2],
                        optional h0[..,2]), compute in float64, and write
                        IN's tensors plus expected_y, expected_h_final[..,2].
  time [--batch ...]    time the float32 formulation on this CPU (median of
                        --repeat jitted runs after a warm-up), and, with
                        --gateloop BIN, time `BIN run --mode chunked` on the
                        same inputs in the same run, printing the ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def gateloop_scan(jnp, lax, q, k, v, log_gate, h0):
    """y [B,L,H,V], h_final [B,H,K,V] from the materialized associative scan."""
    a = jnp.exp(log_gate)[..., None]                 # [B,L,H,Kg,1], broadcast over V (and K if Kg=1)
    kv = (k[..., :, None] * v[..., None, :]).astype(a.dtype)  # [B,L,H,K,V]
    if h0 is not None:
        # h0 enters through the first step: h_0 = a_0 h0 + k_0ᵀ v_0.
        kv = kv.at[:, 0].add(a[:, 0] * h0)

    def op(earlier, later):
        a_i, b_i = earlier
        a_j, b_j = later
        return a_j * a_i, a_j * b_i + b_j

    _, h = lax.associative_scan(op, (a, kv), axis=1)
    y = jnp.einsum("blhk,blhkv->blhv", q.astype(h.dtype), h).real
    return y, h[:, -1]


def complex_of(x):
    return x[..., 0] + 1j * x[..., 1]


def crosscheck(args):
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax
    from safetensors.numpy import load_file, save_file

    t = load_file(args.input)
    f64 = lambda name: np.asarray(t[name], dtype=np.float64)
    log_gate = complex_of(f64("log_gate"))
    h0 = complex_of(f64("h0")) if "h0" in t else None
    y, hf = gateloop_scan(jnp, lax, jnp.asarray(f64("q")), jnp.asarray(f64("k")), jnp.asarray(f64("v")),
                          jnp.asarray(log_gate), None if h0 is None else jnp.asarray(h0))
    hf = np.asarray(hf)
    out = dict(t)
    out["expected_y"] = np.asarray(y, dtype=np.float64)
    out["expected_h_final"] = np.ascontiguousarray(np.stack([hf.real, hf.imag], axis=-1))
    save_file(out, args.output, metadata={"producer": f"benches/peers/gateloop_jax.py crosscheck, jax {jax.__version__}, float64"})
    print(f"wrote {args.output}: y {out['expected_y'].shape}, finite={np.isfinite(out['expected_y']).all()}")


def time_jax(args):
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(args.seed)
    B, L, H, K, V = args.batch, args.len, args.heads, args.key_dim, args.value_dim
    q = rng.uniform(-1, 1, (B, L, H, K)).astype(np.float32)
    k = rng.uniform(-1, 1, (B, L, H, K)).astype(np.float32)
    v = rng.uniform(-1, 1, (B, L, H, V)).astype(np.float32)
    lg = np.stack([-rng.uniform(0, 0.3, (B, L, H, K)), rng.uniform(-np.pi, np.pi, (B, L, H, K))], -1).astype(np.float32)

    f = jax.jit(lambda q, k, v, g: gateloop_scan(jnp, lax, q, k, v, g, None))
    g = jnp.asarray(complex_of(lg).astype(np.complex64))
    args_dev = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), g)
    jax.block_until_ready(f(*args_dev))
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args_dev))
        times.append(time.perf_counter() - t0)
    jax_ms = 1e3 * float(np.median(times))
    result = {"shape": dict(B=B, L=L, H=H, K=K, V=V), "jax_version": jax.__version__,
              "jax_associative_scan_f32_ms": jax_ms, "cpu_count": os.cpu_count()}
    print(f"jax associative_scan (float32, materialized kv): median {jax_ms:.1f} ms over {args.repeat}", flush=True)

    if args.gateloop:
        from safetensors.numpy import save_file
        with tempfile.TemporaryDirectory() as d:
            inp, out = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
            save_file({"q": q, "k": k, "v": v, "log_gate": lg}, inp)
            r = subprocess.run([args.gateloop, "run", "--input", inp, "--output", out, "--mode", "chunked",
                                "--device", "cpu", "--repeat", str(args.repeat)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"gateloop failed: {r.stderr}")
            sys.stdout.write(r.stdout)
            ours = [float(w.split("=")[1]) for w in r.stdout.split() if w.startswith("median_ms=")]
            ours_ms = ours[0]
        result["gateloop_chunked_f32_ms"] = ours_ms
        result["speedup"] = jax_ms / ours_ms
        print(f"gateloop chunked f32: median {ours_ms:.2f} ms -> {jax_ms / ours_ms:.1f}x faster than JAX")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crosscheck")
    c.add_argument("input")
    c.add_argument("output")
    t = sub.add_parser("time")
    for name, default in [("batch", 2), ("len", 2048), ("heads", 8), ("key-dim", 64), ("value-dim", 64),
                          ("repeat", 5), ("seed", 0)]:
        t.add_argument(f"--{name}", type=int, default=default)
    t.add_argument("--gateloop", help="path to the gateloop binary to time side by side")
    t.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    crosscheck(args) if args.cmd == "crosscheck" else time_jax(args)


if __name__ == "__main__":
    main()
