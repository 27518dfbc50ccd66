"""int8 weight-only matmuls on this CPU: every formulation beside float32 and beside the memory's read bandwidth.

``python -m benchmarks int8 [--quick]``. For each weight shape (K, N) and rows M (the decode batch):

* ``f32 dot``: ``x @ w`` with float32 weights, the baseline;
* ``int8 convert+dot``: ``zoo.kernels.pure_int8_matmul``, the pure-JAX path (int8 → x.dtype, dot, scale);
* ``int8 dot_general pet``: ``dot_general(x, q, preferred_element_type=float32) * scale``, no explicit convert;
* ``int8×int8→int32``: x quantised per row to int8 inside the step, an integer dot, rescaled (other numerics:
  listed for its speed only);
* ``native pool`` / ``native 1 thread``: the zoo's FFI kernel on XLA's intra-op threads, or on the calling one
  (``int8_matmul`` runs one row on the calling thread and more on the pool).

Each candidate runs over R distinct copies of its weights (R·bytes ≥ 3× the last-level cache, 2× in quick
runs, so every matmul streams its weights from memory, as decode does), two ways: ``alone``, one jitted matmul
per call (dispatch included, tens of µs), and ``chain``, one jitted function of R matmuls, each input depending
on the previous output (no dispatch between them; but XLA may run the independent int8→float converts of the
pure-JAX paths all first, holding R float32 copies: as it would in an unrolled decode step). The figure per
matmul is the median over the rounds / R; GB/s counts the weight bytes one matmul reads (4·K·N for float32, K·N
for int8), beside the NumPy read bandwidth. All candidates of a shape run round-robin in the same rounds, so
load from other processes hits them alike.

Group-wise scales: the native kernel at M = 1 with scales per output channel (``(N,)``) and per group of 128 and
32 input rows (``(K/G, N)``, the quantizer's default G = 32), beside float32, on the 4096×4096 and 768×50304
shapes, chained as above; GB/s counts the int8 weights and the scales.

Also: the ``mlstm_v1-165m`` decode step's matmuls alone (its 12 blocks unscanned as the CPU decode layout
runs them, then the head), float32 vs the native int8 kernel at M = 1: the ceiling of what int8 can bring to its decode; and in
full runs, the float32-vs-int8 ratio under each XLA CPU flag that might change the int8 code (each in a child
process, since XLA reads its flags once).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import interleaved, median, no_compiles
from zoo import kernels

SHAPES = ((4096, 4096), (768, 50304), (768, 2048))
FLAG_SETS = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
             "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT", "--xla_cpu_use_onednn=true",
             "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
             "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_prefer_vector_width=512",
             "--xla_cpu_enable_fast_math=true")
MODEL = "mlstm_v1-165m"


def llc_bytes() -> int:
    """Size of the last-level cache in bytes (``/sys``; 32 MiB when unreadable)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
            best = max(best, int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def read_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the fastest of ``repeats`` NumPy sums of ``mib`` MiB of float32 (one thread)."""
    a = np.ones(mib * 2**18, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def _quant_i8(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    a = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127 + 1e-30
    acc = lax.dot_general(jnp.round(x / a).astype(jnp.int8), q, (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * a * scale


def _pet(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    return lax.dot_general(x, q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32) * scale


MATMULS: dict[str, tuple[Callable[..., jax.Array], bool]] = {
    "f32 dot": (lambda x, w: x @ w, False),
    "int8 convert+dot": (kernels.pure_int8_matmul, True),
    "int8 dot_general pet": (_pet, True),
    "int8×int8→int32": (_quant_i8, True),
    "native pool": (lambda x, q, s: kernels.native_int8_matmul(x, q, s, threads=0), True),
    "native 1 thread": (lambda x, q, s: kernels.native_int8_matmul(x, q, s, threads=1), True),
}


def _chain(mm: Callable[..., jax.Array], int8: bool) -> Callable[..., jax.Array]:
    """A jitted ``f(x, *weights)``: one matmul per weight, each input depending on the previous output (a
    1e-30 multiple of its first column), so XLA runs them one after another, each reading its own copy."""
    def f(x, *weights):
        dep = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
        for w in weights:
            y = mm(x + dep, *w) if int8 else mm(x + dep, w)
            dep = y[..., :1] * 1e-30
        return dep
    return jax.jit(f)


def _weights(K: int, N: int, copies: int, int8: bool, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    if not int8:
        return [jnp.asarray(rng.standard_normal((K, N), np.float32)) for _ in range(copies)]
    return [(jnp.asarray(rng.integers(-127, 128, (K, N), dtype=np.int8)),
             jnp.asarray(rng.random(N, np.float32) * 0.01)) for _ in range(copies)]


def _alone(mm: Callable[..., jax.Array], int8: bool) -> Callable[..., Any]:
    """A blocking call per weight copy of one jitted matmul (one dispatch each)."""
    f = jax.jit(lambda x, *w: mm(x, *w)) if int8 else jax.jit(mm)

    def run(x, *weights):
        for w in weights:
            (f(x, *w) if int8 else f(x, w)).block_until_ready()
    return run


def matmul_rows(Ms: list[int], repeats: int, names: list[str], shapes=SHAPES,
                cache_multiple: int = 3) -> list[dict[str, Any]]:
    """Per-matmul seconds of each candidate in ``names``, per shape and M, two ways (see the module docstring):
    ``alone`` (one jitted matmul per call, dispatch included) and ``chain`` (R dependent matmuls in one jitted
    function). The weight copies of one candidate add up to ``cache_multiple`` × the last-level cache."""
    llc = llc_bytes()
    rows = []
    for K, N in shapes:
        copies = max(2, math.ceil(cache_multiple * llc / (K * N)))  # int8; float32 has a quarter as many (≥ 2)
        w8 = _weights(K, N, copies, True, 0)
        w32 = _weights(K, N, max(2, math.ceil(copies / 4)), False, 1)
        for M in Ms:
            x = jnp.asarray(np.random.default_rng(M).standard_normal((M, K), np.float32))
            fns, calls = {}, {}
            for name in names:
                mm, int8 = MATMULS[name]
                ws = w8 if int8 else w32
                chain, alone = _chain(mm, int8), _alone(mm, int8)
                chain(x, *ws).block_until_ready()  # compile and warm
                alone(x, *ws)
                fns[f"{name}|alone"] = (lambda alone=alone, ws=ws: alone(x, *ws))
                fns[f"{name}|chain"] = (lambda chain=chain, ws=ws: chain(x, *ws).block_until_ready())
                calls[name] = len(ws)
            with no_compiles(f"the int8 matmul rounds (K={K} N={N} M={M})"):
                times = interleaved(fns, repeats)
            for name in names:
                nbytes = K * N * (1 if MATMULS[name][1] else 4)
                row = {"K": K, "N": N, "M": M, "candidate": name, "weight_bytes": nbytes, "calls_per_round": calls[name]}
                for way in ("alone", "chain"):
                    per = [t / calls[name] for t in times[f"{name}|{way}"]]
                    row[way] = {"median_s": median(per), "min_s": min(per), "max_s": max(per),
                                "gbs": nbytes / median(per) / 1e9}
                rows.append(row)
        del w8, w32
    return rows


def model_matmul_shapes(preset: str = MODEL) -> tuple[int, list[tuple[int, int]], tuple[int, int]]:
    """The decode step's weight matmuls of ``preset``: (layers, [(K, N) per stacked kernel], head (K, N)).

    Kernels with a dimension under 64 (the gate projections) are left out, as the int8 quantizer leaves them."""
    import zoo

    shapes = zoo.param_shapes(zoo.load_config(preset))
    stacked, head, layers = [], None, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        if getattr(path[-1], "key", None) != "kernel" or min(leaf.shape[-2:]) < 64:
            continue
        if leaf.ndim == 3:
            layers = leaf.shape[0]
            stacked.append(tuple(leaf.shape[1:]))
        else:
            head = tuple(leaf.shape)
    return layers, stacked, head


def model_step(repeats: int, preset: str = MODEL) -> dict[str, Any]:
    """The decode step's matmuls alone at M = 1, float32 vs ``int8_matmul``, laid out as the CPU decode layout
    runs them (``zoo.decode_layout``: blocks unscanned, each block's weights its own arrays), then the head."""
    layers, stacked, head = model_matmul_shapes(preset)
    rng = np.random.default_rng(0)
    shapes = [shape for _ in range(layers) for shape in stacked] + [head]
    xs = {k: jnp.asarray(rng.standard_normal((1, k), np.float32)) for k in sorted({k for k, _ in shapes})}
    f32 = [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes]
    i8 = [(jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8)), jnp.asarray(rng.random(shape[1], np.float32)))
          for shape in shapes]

    def step(mm):
        def run(xs, weights):
            dep = jnp.zeros((1, 1), jnp.float32)
            for w in weights:
                y = mm(xs[w[0].shape[0] if isinstance(w, tuple) else w.shape[0]] + dep, w)
                dep = y[:, :1] * 1e-30
            return dep
        return jax.jit(run)

    f_f32 = step(lambda x, w: x @ w)
    f_i8 = step(lambda x, qs: kernels.int8_matmul(x, *qs))
    fns = {"f32": lambda: f_f32(xs, f32).block_until_ready(), "int8 native": lambda: f_i8(xs, i8).block_until_ready()}
    for fn in fns.values():
        fn()
    with no_compiles("the model-step matmul rounds"):
        times = interleaved(fns, repeats)
    n_weights = sum(k * n for k, n in shapes)
    med = {k: median(v) for k, v in times.items()}
    return {"preset": preset, "layers": layers, "stacked_kernels": stacked, "head": head,
            "f32_bytes": 4 * n_weights, "int8_bytes": n_weights, "seconds": times, "median_s": med,
            "speedup": med["f32"] / med["int8 native"], "native": kernels.native_reason()}


def group_scales(repeats: int, cache_multiple: int = 3) -> list[dict[str, Any]]:
    """Per-matmul seconds at M = 1 of the native kernel with per-channel scales and groups of 128 and 32 rows,
    beside float32, on ``SHAPES[:2]`` (weights streamed from memory, chained; see the module docstring)."""
    rng = np.random.default_rng(0)
    rows = []
    for K, N in SHAPES[:2]:
        copies = max(2, math.ceil(cache_multiple * llc_bytes() / (K * N)))
        q = [jnp.asarray(rng.integers(-127, 128, (K, N), dtype=np.int8)) for _ in range(copies)]
        w32 = _weights(K, N, max(2, math.ceil(copies / 4)), False, 1)
        cands = {"f32 dot": (_chain(lambda x, w: x @ w, False), w32, 4 * K * N)}
        for name, groups in (("per-channel", None), ("group 128", K // 128), ("group 32", K // 32)):
            shape = (N,) if groups is None else (groups, N)
            ws = [(qq, jnp.asarray(rng.random(shape, np.float32) * 0.01)) for qq in q]
            cands[name] = (_chain(kernels.int8_matmul, True), ws, K * N + 4 * math.prod(shape))
        x = jnp.asarray(rng.standard_normal((1, K), np.float32))
        fns = {}
        for name, (f, ws, _) in cands.items():
            f(x, *ws).block_until_ready()
            fns[name] = (lambda f=f, ws=ws: f(x, *ws).block_until_ready())
        with no_compiles(f"the group-scale rounds (K={K} N={N})"):
            times = interleaved(fns, repeats)
        for name, (_, ws, nbytes) in cands.items():
            per = [t / len(ws) for t in times[name]]
            rows.append({"K": K, "N": N, "M": 1, "candidate": name, "bytes": nbytes, "median_s": median(per),
                         "min_s": min(per), "max_s": max(per), "gbs": nbytes / median(per) / 1e9})
    return rows


def _probe(repeats: int) -> dict[str, Any]:
    rows = matmul_rows([1], repeats, ["f32 dot", "int8 convert+dot", "int8 dot_general pet"], shapes=((4096, 4096),))
    return {r["candidate"]: r["alone"]["median_s"] for r in rows}


def flag_sweep(repeats: int) -> list[dict[str, Any]]:
    """f32 vs the pure-JAX int8 formulations at 4096×4096, M = 1, under each of ``FLAG_SETS`` (child processes)."""
    out = []
    for flags in FLAG_SETS:
        env = {**os.environ, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "2"}
        run = subprocess.run([sys.executable, "-m", "benchmarks.int8", "--probe", str(repeats)], env=env,
                             capture_output=True, text=True, timeout=900)
        line = next((ln for ln in reversed(run.stdout.splitlines()) if ln.startswith("{")), None)
        row = {"xla_flags": flags or "(none)", **(json.loads(line) if line else {"error": run.stderr[-300:]})}
        out.append(row)
        if line:
            f32 = row["f32 dot"]
            print(f"  flags {row['xla_flags']}: f32 {f32 * 1e3:.2f} ms, convert+dot ×{row['int8 convert+dot'] / f32:.1f}, "
                  f"pet ×{row['int8 dot_general pet'] / f32:.1f} of f32", flush=True)
        else:
            print(f"  flags {row['xla_flags']}: failed: {row['error'][-120:]}", flush=True)
    return out


def print_table(rows: list[dict[str, Any]], bandwidth: float) -> None:
    """One line per shape, M and candidate: ms per matmul alone (with its spread) and in a chain, GB/s and its
    fraction of ``bandwidth``, and the speed relative to float32 measured the same way."""
    print(f"  {'K×N':>11} {'M':>3}  {'candidate':21} {'alone ms':>9} {'[min–max]':>17} {'chain ms':>9} "
          f"{'GB/s':>5} {'of bw':>5} {'vs f32 alone':>12} {'vs f32 chain':>12}")
    base = {(r["K"], r["N"], r["M"]): r for r in rows if r["candidate"] == "f32 dot"}
    for r in rows:
        f32 = base.get((r["K"], r["N"], r["M"]))
        a, c = r["alone"], r["chain"]
        gbs = max(a["gbs"], c["gbs"])
        ratios = [f"×{f32[w]['median_s'] / r[w]['median_s']:.2f}" if f32 else "" for w in ("alone", "chain")]
        print(f"  {r['K']:>5}×{r['N']:<5} {r['M']:>3}  {r['candidate']:21} {a['median_s'] * 1e3:9.3f} "
              f"[{a['min_s'] * 1e3:7.3f}–{a['max_s'] * 1e3:7.3f}] {c['median_s'] * 1e3:9.3f} {gbs:5.1f} "
              f"{gbs / bandwidth:5.0%} {ratios[0]:>12} {ratios[1]:>12}", flush=True)


def run(quick: bool) -> dict[str, Any]:
    """The int8 section of ``bench.json``."""
    load_before = list(os.getloadavg())
    bandwidth = read_bandwidth_gbs(256 if quick else 512)
    print(f"int8: {kernels.native_reason()}; read bandwidth {bandwidth:.1f} GB/s (NumPy sum, one thread); "
          f"last-level cache {llc_bytes() / 2**20:.0f} MiB; load average {load_before[0]:.1f}", flush=True)
    names = list(MATMULS)
    if not kernels.native_available():
        names = [n for n in names if not n.startswith("native")]
    repeats = 3 if quick else 9
    multiple = 2 if quick else 3
    rows = matmul_rows([1, 8], repeats, names, shapes=SHAPES[2:] if quick else SHAPES, cache_multiple=multiple)
    print_table(rows, bandwidth)
    crossover = matmul_rows([32, 128] if quick else [32, 64, 128, 256, 512], repeats,
                            [n for n in ("f32 dot", "int8 convert+dot", "native pool") if n in names],
                            shapes=((768, 2048),), cache_multiple=multiple)
    print("  more rows: where the native kernel should hand over to the pure-JAX path (now above MAX_NATIVE_ROWS = "
          f"{kernels.MAX_NATIVE_ROWS}):", flush=True)
    print_table(crossover, bandwidth)
    result: dict[str, Any] = {"native": kernels.native_reason(), "read_bandwidth_gbs": bandwidth,
                              "bandwidth_method": "fastest NumPy float32 sum, one thread",
                              "llc_bytes": llc_bytes(), "rows": rows, "crossover": crossover}
    if kernels.native_available():
        result["group_scales"] = groups = group_scales(repeats, multiple)
        print("  native kernel, M = 1, by scale layout:", flush=True)
        for r in groups:
            base = next(b for b in groups if (b["K"], b["N"], b["candidate"]) == (r["K"], r["N"], "per-channel"))
            print(f"  {r['K']:>5}×{r['N']:<5} {r['candidate']:12} {r['median_s'] * 1e3:8.3f} ms "
                  f"[{r['min_s'] * 1e3:7.3f}–{r['max_s'] * 1e3:7.3f}] {r['gbs']:5.1f} GB/s "
                  f"{r['gbs'] / bandwidth:5.0%} of bw  vs per-channel ×{base['median_s'] / r['median_s']:.2f}",
                  flush=True)
        step = model_step(repeats)
        result["model_step"] = step
        ms = step["median_s"]
        print(f"  {MODEL} decode-step matmuls, M = 1 ({step['layers']} blocks unscanned + head): f32 "
              f"{ms['f32'] * 1e3:.1f} ms ({step['f32_bytes'] / ms['f32'] / 1e9:.1f} GB/s), int8 native "
              f"{ms['int8 native'] * 1e3:.1f} ms ({step['int8_bytes'] / ms['int8 native'] / 1e9:.1f} GB/s): "
              f"×{step['speedup']:.2f}", flush=True)
    if not quick:
        result["flags"] = flag_sweep(5)
    result["load_avg"] = {"before": load_before, "after": list(os.getloadavg())}
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(_probe(int(sys.argv[2]))))
    else:
        run("--quick" in sys.argv)
