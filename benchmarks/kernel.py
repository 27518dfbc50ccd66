"""Cell-kernel benchmarks: zoo ``chunkwise`` vs mlstm_kernels' PyTorch native kernels, the matmul roofline,
and time and planned memory vs S for every zoo backend.

FLOPs are counted from the chunkwise algorithm (see ``FLOP_FORMULA``): per head and token, the causal half
of the intra-chunk QKᵀ and WV products and the inter-chunk q·C product and kᵀv state update. Gate math and
the n vector (O(S·DQK)) are not counted, so the rate is a lower bound of what the kernel executes.

Every timed round runs under ``no_compiles`` (a compile inside it raises), after one untimed warm-up call of
each candidate. Each compare row keeps every round's wall time, the process CPU time of each call (less
sensitive to other processes on a shared machine than wall time; for PyTorch it includes OpenMP spin-waits,
so the lower of its two thread variants is used), the spread of each ratio across rounds, the load average
before and after, and the float32 matmul rate measured in the same rounds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cells
from benchmarks.common import (best_of_threads, interleaved, matmul_fn, median, memory, no_compiles,
                               torch_thread_variants)
from zoo.plugins.cells.chunkwise import choose_chunk_size

HEADS_7B = {"B": 1, "NH": 8, "DQK": 256, "DV": 512}  # xLSTM-7B head shape
FLOP_FORMULA = "FLOPs_fwd = 2·B·NH·S·((L+1)/2·(DQK+DV) + 2·DQK·DV)   (L = chunk size; causal half of the L×L block)"


def chunkwise_flops(B: int, NH: int, S: int, DQK: int, DV: int, L: int) -> float:
    """Forward FLOPs of the chunkwise algorithm per ``FLOP_FORMULA``."""
    return 2.0 * B * NH * S * ((L + 1) / 2 * (DQK + DV) + 2 * DQK * DV)


def _inputs(B: int, NH: int, S: int, DQK: int, DV: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S), (B, NH, S, DV)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    arrays[4] += 3.0  # forget-gate pre-activations around +3, as trained models have
    return arrays


def _zoo_fns(arrays: list[np.ndarray], L: int) -> dict[str, Any]:
    from zoo.plugins.cells.chunkwise import chunkwise

    q, k, v, i, f, w = (jnp.asarray(a) for a in arrays)
    fwd = jax.jit(lambda *a: chunkwise(*a, chunk_size=L))
    loss = lambda *a: jnp.sum(chunkwise(*a[:5], chunk_size=L) * a[5])  # noqa: E731
    fwdbwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    return {"zoo fwd": lambda: fwd(q, k, v, i, f).block_until_ready(),
            "zoo fwd+bwd": lambda: jax.block_until_ready(fwdbwd(q, k, v, i, f, w))}


def _torch_fns(arrays: list[np.ndarray], chunk_size: int, autograd: bool) -> dict[str, Any]:
    import torch
    from mlstm_kernels.torch import get_mlstm_kernel

    tensors = [torch.from_numpy(a) for a in arrays]
    custbw = get_mlstm_kernel("chunkwise--native_custbw")
    auto = get_mlstm_kernel("chunkwise--native_autograd")
    leaves = [t.clone().requires_grad_() for t in tensors[:5]]

    def fwd():
        with torch.no_grad():
            custbw(*tensors[:5], chunk_size=chunk_size)

    def fwdbwd(kernel):
        def run():
            for t in leaves:
                t.grad = None
            (kernel(*leaves, chunk_size=chunk_size) * tensors[5]).sum().backward()
        return run

    fns = {"torch native_custbw fwd": fwd, "torch native_custbw fwd+bwd": fwdbwd(custbw)}
    if autograd:
        fns["torch native_autograd fwd+bwd"] = fwdbwd(auto)
    return fns


def _per_head_matmul(heads: int, L: int, DQK: int, DV: int) -> tuple[Any, float]:
    """A blocking batched matmul of the kernel's per-chunk shape (q̄·C), repeated to ~S/L calls' worth of work.

    It measures the rate XLA reaches on the per-head matmul shapes the chunkwise form is made of: the
    ceiling for this algorithm on this backend, next to the large-matmul rate.
    """
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((16, heads, L, DQK)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((heads, DQK, DV)), jnp.float32)

    def chain(a, c):
        def body(c, a_k):
            return c, jnp.einsum("hld,hdv->hlv", a_k, c)
        return jax.lax.scan(body, c, a)[1]

    fn = jax.jit(chain)
    return (lambda: fn(a, c).block_until_ready()), 2.0 * 16 * heads * L * DQK * DV


def _cpu_timed(fns: dict[str, Callable[[], Any]], cpu: dict[str, list[float]]) -> dict[str, Callable[[], Any]]:
    """Each ``fn`` wrapped to append its call's process CPU seconds (all threads) to ``cpu[name]``."""
    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            t0 = time.process_time()
            out = fn()
            cpu.setdefault(name, []).append(time.process_time() - t0)
            return out
        return timed
    return {name: wrap(name, fn) for name, fn in fns.items()}


def _round_ratios(times: dict[str, list[float]], torch_name: str, zoo_name: str) -> list[float]:
    """Per round: the faster PyTorch thread variant's time over the zoo's (the spread of a ratio)."""
    variants = [ts for key, ts in times.items() if key.rsplit(" @", 1)[0] == torch_name]
    return [min(ts[r] for ts in variants) / z for r, z in enumerate(times[zoo_name])]


def compare(seq_lens: list[int], repeats: int, torch_chunk: int = 64) -> list[dict[str, Any]]:
    """Zoo chunkwise vs PyTorch native kernels at the 7B head shape, with the matmul rate, one S at a time."""
    B, NH, DQK, DV = HEADS_7B.values()
    mm, mm_flops = matmul_fn()
    rows = []
    for S in seq_lens:
        L = choose_chunk_size(S, DQK, DV, jax.default_backend())
        arrays = _inputs(B, NH, S, DQK, DV)
        head_mm, head_flops = _per_head_matmul(B * NH, L, DQK, DV)
        cpu: dict[str, list[float]] = {}
        fns = _cpu_timed({"matmul 2048³ f32": mm, "matmul per head": head_mm, **_zoo_fns(arrays, L),
                          **torch_thread_variants(_torch_fns(arrays, torch_chunk, autograd=S == max(seq_lens)))}, cpu)
        interleaved(fns, 0)  # one warm-up call of each: compiles; not timed
        cpu.clear()
        load_before = list(os.getloadavg())
        with no_compiles(f"the kernel rounds at S={S}"):
            times = interleaved(fns, repeats, warmup=0)
        load_after = list(os.getloadavg())
        med, torch_threads_chosen = best_of_threads({name: median(ts) for name, ts in times.items()})
        cpu_med, _ = best_of_threads({name: median(ts) for name, ts in cpu.items()})  # PyTorch: the lower variant
        flops = chunkwise_flops(B, NH, S, DQK, DV, L)
        ratios = {}
        for label, torch_name, zoo_name in (("fwd", "torch native_custbw fwd", "zoo fwd"),
                                            ("fwd+bwd", "torch native_custbw fwd+bwd", "zoo fwd+bwd")):
            per_round = _round_ratios(times, torch_name, zoo_name)
            ratios[label] = {"median": med[torch_name] / med[zoo_name], "rounds_min": min(per_round),
                             "rounds_max": max(per_round), "cpu_time": cpu_med[torch_name] / cpu_med[zoo_name]}
        row = {"S": S, **HEADS_7B, "zoo_chunk_size": L, "torch_chunk_size": torch_chunk, "seconds": times,
               "cpu_seconds": cpu, "torch_threads_chosen": torch_threads_chosen, "median_s": med,
               "median_cpu_s": cpu_med, "spread_s": {name: [min(ts), max(ts)] for name, ts in times.items()},
               "ratios": ratios, "load_avg_before": load_before, "load_avg_after": load_after,
               "matmul_gflops": mm_flops / med["matmul 2048³ f32"] / 1e9,
               "matmul_gflops_best_round": mm_flops / min(times["matmul 2048³ f32"]) / 1e9,
               "per_head_matmul": f"{B * NH} x ({L}x{DQK} @ {DQK}x{DV}), one batched dot, f32",
               "per_head_matmul_gflops": head_flops / med["matmul per head"] / 1e9,
               "fwd_flops": flops, "zoo_fwd_gflops": flops / med["zoo fwd"] / 1e9,
               "torch_fwd_gflops": flops / med["torch native_custbw fwd"] / 1e9}
        rows.append(row)
        _print_row(row, repeats)
    return rows


def _print_row(row: dict[str, Any], repeats: int) -> None:
    """The ratios with their spread, the matmul rate and the load of one compare row."""
    load0, load1 = row["load_avg_before"][0], row["load_avg_after"][0]
    print(f"  kernel S={row['S']} (zoo L={row['zoo_chunk_size']}, torch L={row['torch_chunk_size']}), median of "
          f"{repeats} rounds, load average {load0:.1f} -> {load1:.1f}: f32 matmul 2048³ {row['matmul_gflops']:.0f} "
          f"GFLOP/s (best round {row['matmul_gflops_best_round']:.0f}); zoo fwd {row['zoo_fwd_gflops']:.0f} GFLOP/s",
          flush=True)
    for label, r in row["ratios"].items():
        print(f"    {label}: torch/zoo {r['median']:.2f}x (rounds {r['rounds_min']:.2f}..{r['rounds_max']:.2f}; "
              f"process CPU time {r['cpu_time']:.2f}x)", flush=True)
    chosen = row["torch_threads_chosen"]
    parts = []
    for name, t in row["median_s"].items():
        lo, hi = row["spread_s"][f"{name} @{chosen[name]}" if name in chosen else name]
        parts.append(f"{name} {t * 1e3:.0f} [{lo * 1e3:.0f}..{hi * 1e3:.0f}]")
    print("    median [min..max] ms: " + ", ".join(parts), flush=True)


def memory_vs_s(seq_lens: list[int]) -> list[dict[str, Any]]:
    """Planned peak memory of chunkwise forward+backward at the 7B head shape (compiled, not run)."""
    from zoo.plugins.cells.chunkwise import chunkwise

    B, NH, DQK, DV = HEADS_7B.values()
    rows = []
    for S in seq_lens:
        L = choose_chunk_size(S, DQK, DV, jax.default_backend())
        loss = lambda *a: jnp.sum(chunkwise(*a[:5], chunk_size=L) * a[5])  # noqa: E731
        specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
                 [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S), (B, NH, S, DV)]]
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*specs).compile()
        rows.append({"S": S, "chunk_size": L, **memory(compiled)})
    for prev, row in zip(rows, rows[1:]):
        row["marginal_bytes_per_token"] = (row["peak_bytes"] - prev["peak_bytes"]) / (row["S"] - prev["S"])
    return rows


def _measure(fn: Any, args: tuple, repeats: int, max_run_bytes: int) -> dict[str, Any]:
    """``cells.measure``'s figures (compile time, planned memory, median ms), with the timed calls under
    ``no_compiles``: compiled ahead, one untimed warm-up call, then ``repeats`` timed calls."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    res = {"compile_s": round(time.perf_counter() - t0, 3), "memory": cells.memory(compiled), "ran": False,
           "ms": None, "all_ms": None}
    peak = (res["memory"] or {}).get("peak_bytes", 0)
    if peak > max_run_bytes:
        res["skipped"] = f"planned peak {peak / 1024**3:.1f} GiB > {max_run_bytes / 1024**3:.1f} GiB"
        return res
    jax.block_until_ready(compiled(*args))
    times = []
    with no_compiles("the sweep's timed calls"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    res.update(ran=True, ms=median(times) * 1e3, all_ms=[t * 1e3 for t in times])
    return res


def sweep(seq_lens: list[int], repeats: int, shape: dict[str, int]) -> list[dict[str, Any]]:
    """Time and planned memory vs S for every built-in backend (``benchmarks/cells.py``'s measurement)."""
    rows = []
    for name in cells.DEFAULT_BACKENDS:
        kwargs = {"chunk_size": "auto"} if name == "chunkwise" else {}
        fwd, fwdbwd = cells.build_fns(name, kwargs)
        for S in seq_lens:
            if name == "recurrent" and S > 4096:
                continue  # the step-by-step scan is the decoding path; long prefills use chunkwise
            inputs, w = cells.make_inputs(shape["B"], shape["NH"], S, shape["DQK"], shape["DV"], jnp.float32)
            r_f = _measure(fwd, inputs, repeats, 4 * 1024**3)
            r_b = _measure(fwdbwd, (*inputs, w), repeats, 4 * 1024**3)
            rows.append({"backend": name, "S": S, **shape, "fwd": r_f, "fwdbwd": r_b})
            print(f"  sweep {name} S={S}: fwd {r_f['ms']} ms, fwd+bwd {r_b['ms']} ms", flush=True)
    return rows


def run(quick: bool) -> dict[str, Any]:
    """The kernel section of ``bench.json``."""
    B, NH, DQK, DV = HEADS_7B.values()
    cmp_lens, repeats = ([512, 1024], 2) if quick else ([1024, 4096], 3)
    mem_lens = [1024, 2048, 4096] if quick else [2048, 4096, 8192, 16384, 32768, 65536]
    sweep_lens = [256, 1024] if quick else [256, 1024, 4096, 16384]
    small = {"B": 1, "NH": 4, "DQK": 64, "DV": 64}
    print(f"kernel: {FLOP_FORMULA}", flush=True)
    return {"flop_formula": FLOP_FORMULA, "compare": compare(cmp_lens, repeats), "memory": memory_vs_s(mem_lens),
            "sweep": sweep(sweep_lens, repeats, small), "sweep_shape": small,
            "chunk_size_rule": {str(S): choose_chunk_size(S, DQK, DV, jax.default_backend()) for S in cmp_lens}}
