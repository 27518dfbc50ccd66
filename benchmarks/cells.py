"""Benchmark the registered mLSTM cell backends: forward and forward+backward time, and XLA's planned memory.

Usage (defaults shown)::

    python benchmarks/cells.py --seq-lens 256,1024,4096,16384 --batch 1 --heads 4 --dqk 64 --dv 64 \
        --chunk-size 64 --repeats 3 --out benchmarks/results/cells.json

For every backend and sequence length S the script

* compiles ``jit(cell)`` (forward) and ``jit(value_and_grad(sum(h * w)))`` w.r.t. q, k, v, i, f (forward+backward)
  with ``.lower(...).compile()``;
* reads ``compiled.memory_analysis()``: ``temp`` = ``temp_size_in_bytes`` (XLA's planned scratch buffers) and
  ``peak`` = temp + argument + output - alias bytes (the planned footprint of one call);
* runs each compiled function once as warm-up, then ``--repeats`` timed calls with ``block_until_ready`` and reports
  the median in milliseconds.

A configuration whose planned peak exceeds ``--max-run-gib`` (default 4 GiB; e.g. ``parallel_stabilized`` at
S=16384, whose S x S matrices alone are 4 GiB per matrix at NH=4) is compiled only: its memory is reported and its
time is "-".  Ratios ``t(4S)/t(S)`` (and the memory ratio) are printed for consecutive lengths that differ by 4x,
so linear (~4) vs quadratic (~16) scaling is visible.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zoo.registry import available, entry, resolve

GIB = 1024**3
DEFAULT_BACKENDS = ("parallel_stabilized", "chunkwise", "recurrent")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="256,1024,4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated cell names")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dqk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64, help="chunk_size of the chunkwise backend")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of q, k, v (gates f32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-gib", type=float, default=4.0,
                   help="compile only (no timing) when the planned peak of a function exceeds this many GiB")
    p.add_argument("--out", default="benchmarks/results/cells.json")
    return p.parse_args(argv)


def make_inputs(B, NH, S, DQK, DV, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NH, S, DQK))
    k = rng.standard_normal((B, NH, S, DQK))
    v = rng.standard_normal((B, NH, S, DV))
    i = rng.standard_normal((B, NH, S))
    f = 3.0 + rng.standard_normal((B, NH, S))
    w = rng.standard_normal((B, NH, S, DV))
    qkv = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return (*qkv, jnp.asarray(i, jnp.float32), jnp.asarray(f, jnp.float32)), jnp.asarray(w, jnp.float32)


def build_fns(name, kwargs):
    cell = resolve("cell", name)

    def fwd(q, k, v, i, f):
        return cell(q, k, v, i, f, **kwargs)

    def loss(q, k, v, i, f, w):
        return jnp.sum(cell(q, k, v, i, f, **kwargs).astype(jnp.float32) * w)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def memory(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    temp = int(ma.temp_size_in_bytes)
    peak = temp + int(ma.argument_size_in_bytes) + int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)
    return {"temp_bytes": temp, "peak_bytes": peak, "argument_bytes": int(ma.argument_size_in_bytes),
            "output_bytes": int(ma.output_size_in_bytes)}


def time_call(compiled, args, repeats):
    jax.block_until_ready(compiled(*args))  # warm-up (excluded)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, times


def measure(fn, args, repeats, max_run_bytes):
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = memory(compiled)
    res = {"compile_s": round(compile_s, 3), "memory": mem, "ran": False, "ms": None, "all_ms": None}
    if mem is not None and mem["peak_bytes"] > max_run_bytes:
        res["skipped"] = f"planned peak {mem['peak_bytes'] / GIB:.1f} GiB > {max_run_bytes / GIB:.1f} GiB"
        return res
    ms, times = time_call(compiled, args, repeats)
    res.update(ran=True, ms=ms, all_ms=[t * 1e3 for t in times])
    del compiled
    return res


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_bytes(b):
    if b is None:
        return "?"
    for unit, div in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.1f}"


def print_tables(rows, ratios, meta):
    headers = ["backend", "S", "fwd ms", "fwd+bwd ms", "fwd temp", "fwd peak", "fwd+bwd temp", "fwd+bwd peak"]
    body = [[r["backend"], str(r["S"]), fmt_ms(r["fwd"]["ms"]), fmt_ms(r["fwdbwd"]["ms"]),
             fmt_bytes((r["fwd"]["memory"] or {}).get("temp_bytes")),
             fmt_bytes((r["fwd"]["memory"] or {}).get("peak_bytes")),
             fmt_bytes((r["fwdbwd"]["memory"] or {}).get("temp_bytes")),
             fmt_bytes((r["fwdbwd"]["memory"] or {}).get("peak_bytes"))] for r in rows]
    rheaders = ["backend", "S -> 4S", "fwd t ratio", "fwd+bwd t ratio", "fwd+bwd temp ratio"]
    rbody = [[x["backend"], f"{x['S']} -> {x['S4']}", x["fwd_time"], x["fwdbwd_time"], x["fwdbwd_temp"]]
             for x in ratios]
    title = (f"mLSTM cells on {meta['device']} | B={meta['batch']} NH={meta['heads']} DQK={meta['dqk']} "
             f"DV={meta['dv']} chunk={meta['chunk_size']} {meta['dtype']} | median of {meta['repeats']}")
    note = ("temp = XLA temp_size_in_bytes; peak = temp + arguments + outputs - aliases (planned, per call); "
            f"'-' = compiled only (planned peak > {meta['max_run_gib']} GiB)")
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=140)
        for ttl, hdr, data in ((title, headers, body), ("time and memory ratios for 4x S (linear ~4, quadratic ~16)",
                                                          rheaders, rbody)):
            table = Table(title=ttl)
            for j, h in enumerate(hdr):
                table.add_column(h, justify="left" if j == 0 else "right")
            for row in data:
                table.add_row(*row)
            console.print(table)
        console.print(note)
    except ImportError:  # plain text
        for ttl, hdr, data in ((title, headers, body), ("ratios for 4x S", rheaders, rbody)):
            widths = [max(len(h), *(len(row[j]) for row in data)) for j, h in enumerate(hdr)]
            print(ttl)
            print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
            for row in data:
                print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
            print()
        print(note)


def main(argv=None):
    args = parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in available("cell")]
    if unknown:
        sys.exit(f"unknown cell backend(s) {unknown}; registered: {available('cell')}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    max_run_bytes = int(args.max_run_gib * GIB)
    dev = jax.devices()[0]
    meta = {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "batch": args.batch, "heads": args.heads, "dqk": args.dqk, "dv": args.dv, "chunk_size": args.chunk_size,
        "dtype": args.dtype, "repeats": args.repeats, "max_run_gib": args.max_run_gib, "seq_lens": seq_lens,
        "loss": "sum(h * w), grads w.r.t. q, k, v, i, f",
        "memory_fields": "temp_bytes = memory_analysis().temp_size_in_bytes; peak_bytes = temp + argument + output "
                         "- alias bytes",
    }
    rows = []
    for name in backends:
        kwargs = {}
        if "chunk_size" in entry("cell", name).metadata["kwargs_model"].model_fields:
            kwargs["chunk_size"] = args.chunk_size
        fwd, fwdbwd = build_fns(name, kwargs)
        for S in seq_lens:
            inputs, w = make_inputs(args.batch, args.heads, S, args.dqk, args.dv, dtype)
            t0 = time.perf_counter()
            r_f = measure(fwd, inputs, args.repeats, max_run_bytes)
            r_b = measure(fwdbwd, (*inputs, w), args.repeats, max_run_bytes)
            rows.append({"backend": name, "kwargs": kwargs, "S": S, "fwd": r_f, "fwdbwd": r_b})
            print(f"  {name:20s} S={S:6d}: fwd {fmt_ms(r_f['ms']):>8s} ms, fwd+bwd {fmt_ms(r_b['ms']):>8s} ms, "
                  f"fwd+bwd temp {fmt_bytes((r_b['memory'] or {}).get('temp_bytes')):>10s} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    ratios = []
    by_key = {(r["backend"], r["S"]): r for r in rows}
    for name in backends:
        for S in seq_lens:
            r4 = by_key.get((name, 4 * S))
            if r4 is None:
                continue
            r = by_key[(name, S)]
            temp = lambda x: (x["fwdbwd"]["memory"] or {}).get("temp_bytes")  # noqa: E731
            ratios.append({"backend": name, "S": S, "S4": 4 * S,
                           "fwd_time": fmt_ratio(r4["fwd"]["ms"], r["fwd"]["ms"]),
                           "fwdbwd_time": fmt_ratio(r4["fwdbwd"]["ms"], r["fwdbwd"]["ms"]),
                           "fwdbwd_temp": fmt_ratio(temp(r4), temp(r))})
    print_tables(rows, ratios, meta)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "ratios": ratios}, indent=2,
                              default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
