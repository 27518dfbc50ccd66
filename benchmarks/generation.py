"""Generation: a ragged batch of 8 prompts in one ``zoo.generate`` call vs the same prompts one at a time, beside
the machine's memory-bandwidth ceiling; and the second-call time of ``zoo generate`` with the persistent cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import zoo
from benchmarks.common import COMPILES, interleaved, matmul_fn, median, no_compiles, spread
from benchmarks.models import zoo_config, zoo_params
from zoo.model import decode_state_shapes

LENGTHS = (7, 17, 33, 40, 64, 90, 100, 128)  # padded to 16, 32, 64 and 128 when alone; to 128 together
QUICK_LENGTHS = (3, 5, 7, 9, 11, 13, 15, 16)  # one padded length: few compiles for the smoke run
REPO = Path(__file__).resolve().parent.parent
CLI_ARGS = ("--prompt-ids", "1,2,3,4", "--max-new-tokens", "12")
PRINTED = {"prefill_ms": r"prefill [^:]*:\s+([\d.]+) ms", "first_step_ms": r"first step\s+\(with\s+compile\)\s+([\d.]+) ms"}


def bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s: bytes read plus written by the fastest of ``repeats`` NumPy copies of ``mib`` MiB."""
    src = np.ones(mib * 2**18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def matmul_gflops(repeats: int = 3) -> float:
    """The machine's float32 rate in GFLOP/s: the fastest of ``repeats`` jitted 2048³ matmuls (after one warm-up)."""
    fn, flops = matmul_fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def bytes_per_step(cfg: Any, batch: int) -> int:
    """Bytes one decoding step of ``batch`` rows must move at least: every parameter but the embedding table (of
    which it gathers ``batch`` rows), and the recurrent state read and written."""
    params = zoo.param_shapes(cfg)
    table = params["token_embedding"]["embedding"]
    row = table.shape[1] * table.dtype.itemsize
    return _nbytes(params) - _nbytes(table) + batch * row + 2 * _nbytes(decode_state_shapes(cfg, batch))


def ragged(quick: bool) -> dict[str, Any]:
    """Tokens/s of 8 ragged prompts in one ``generate`` call vs 8 calls of one prompt, with no compile timed."""
    cfg = zoo_config(quick)
    params = zoo_params(cfg)
    lengths, new_tokens, rounds = (QUICK_LENGTHS, 8, 1) if quick else (LENGTHS, 32, 3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    runs: dict[str, list[dict[str, float]]] = {"batched": [], "sequential": []}

    def record(name: str, gens: list[zoo.Generation], wall_s: float) -> None:
        runs[name].append({"wall_s": wall_s, "prefill_s": sum(g.prefill_s for g in gens),
                           "decode_s": sum(g.decode_s for g in gens),
                           "new_tokens": sum(len(t) for g in gens for t in g.tokens),
                           "decode_tokens": sum(len(g.tokens) * (g.steps - 1) for g in gens)})

    def batched() -> None:
        t0 = time.perf_counter()
        g = zoo.generate(cfg, params, prompts, new_tokens)
        record("batched", [g], time.perf_counter() - t0)

    def sequential() -> None:
        t0 = time.perf_counter()
        gens = [zoo.generate(cfg, params, [p], new_tokens) for p in prompts]
        record("sequential", gens, time.perf_counter() - t0)

    fns = {"batched": batched, "sequential": sequential}
    bandwidth, gflops = bandwidth_gbs(), matmul_gflops()
    table = zoo.param_shapes(cfg)["token_embedding"]["embedding"]
    compute_ceiling = gflops * 1e9 / (2 * (zoo.param_count(cfg) - table.size))  # 2 FLOPs per weight read, per token
    before_warmup = COMPILES.count
    interleaved(fns, repeats=0)  # the warm-up round compiles every shape; its figures are dropped
    for rs in runs.values():
        rs.clear()
    warm = COMPILES.count
    with no_compiles("the timed rounds"):
        interleaved(fns, rounds, warmup=0)
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        batch = len(prompts) if name == "batched" else 1
        need = bytes_per_step(cfg, batch)
        ceiling = batch * bandwidth * 1e9 / need
        wall = [r["new_tokens"] / r["wall_s"] for r in rs]
        decode = [r["decode_tokens"] / r["decode_s"] for r in rs]
        out[name] = {"rows_per_call": batch, "calls": len(prompts) // batch, "tokens_per_s": median(wall),
                     "decode_tokens_per_s": median(decode), "decode_ceiling_tokens_per_s": ceiling,
                     "bytes_per_step": need, "fraction_of_ceiling": median(decode) / ceiling,
                     "fraction_of_binding_ceiling": median(decode) / min(ceiling, compute_ceiling),
                     "prefill_s": median([r["prefill_s"] for r in rs]),
                     "tokens_per_s_rounds": wall, "decode_tokens_per_s_rounds": decode,
                     "spread": spread(wall), "decode_spread": spread(decode), "rounds": rs}
        row = out[name]
        print(f"  {name:>10}: {row['tokens_per_s']:7.1f} new tokens/s wall, {row['decode_tokens_per_s']:7.1f} decode-only"
              f" ({100 * row['fraction_of_ceiling']:.0f}% of {ceiling:.0f} tok/s bandwidth ceiling); spread "
              f"{100 * row['spread']:.0f}%", flush=True)
    b, s = out["batched"], out["sequential"]
    ratio = {"tokens_per_s": b["tokens_per_s"] / s["tokens_per_s"],
             "decode_tokens_per_s": b["decode_tokens_per_s"] / s["decode_tokens_per_s"]}
    print(f"  batched / sequential: {ratio['tokens_per_s']:.2f}x wall, {ratio['decode_tokens_per_s']:.2f}x decode-only"
          f"; memory bandwidth {bandwidth:.1f} GB/s; f32 matmul {gflops:.0f} GFLOP/s: compute ceiling "
          f"{compute_ceiling:.0f} tok/s at any batch", flush=True)
    return {"preset": "tiny --quick variant of mlstm_v1-165m" if quick else "mlstm_v1-165m", "dtype": "float32",
            "params": zoo.param_count(cfg), "prompt_lengths": list(lengths), "new_tokens": new_tokens,
            "sampling": "greedy", "rounds": rounds, "compiles_in_warmup": warm - before_warmup,
            "compiles_in_timed_rounds": COMPILES.count - warm, "bandwidth_gbs": bandwidth,
            "bandwidth_method": "fastest of 5 NumPy copies of 512 MiB, bytes read + written (one thread)",
            "matmul_gflops": gflops, "compute_ceiling_tokens_per_s": compute_ceiling,
            "compute_ceiling_method": "fastest 2048³ f32 matmul / (2 FLOPs x parameters but the embedding table)",
            "ratio": ratio, **out}


def _cli_call(checkpoint: Path, cache: str) -> dict[str, float]:
    """Wall seconds of one ``zoo generate`` process with ``ZOO_COMPILATION_CACHE=cache``, and the times it printed."""
    env = {**os.environ, "ZOO_COMPILATION_CACHE": cache, "COLUMNS": "200"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", str(checkpoint), *CLI_ARGS], env=env,
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    printed = {key: re.search(pattern, proc.stdout) for key, pattern in PRINTED.items()}
    if proc.returncode or not all(printed.values()):
        raise RuntimeError(f"zoo generate (ZOO_COMPILATION_CACHE={cache}) exited {proc.returncode} without its "
                           f"timings:\n{proc.stdout}\n{proc.stderr}")
    return {"wall_s": wall, **{key: float(m.group(1)) for key, m in printed.items()}}


def cli_second_call(quick: bool) -> dict[str, Any]:
    """``zoo generate`` on the demo model as separate processes: cold cache, warm cache (the second call), no cache."""
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, cache = Path(tmp) / "demo", str(Path(tmp) / "jax-cache")
        cfg = zoo.load_config(str(REPO / "configs" / "demo.json"))
        zoo.save(checkpoint, cfg, zoo.init_params(cfg, seed=0))
        cold = _cli_call(checkpoint, cache)
        runs: dict[str, list[dict[str, float]]] = {"warm": [], "off": []}
        for _ in range(repeats):  # alternating, so machine load hits both alike
            runs["warm"].append(_cli_call(checkpoint, cache))
            runs["off"].append(_cli_call(checkpoint, "0"))
        cached_files = sum(len(files) for _, _, files in os.walk(cache))
    out: dict[str, Any] = {"command": f"python -m zoo.cli generate DEMO {' '.join(CLI_ARGS)}", "repeats": repeats,
                           "cache_files": cached_files, "cold": cold, "second_call": runs["warm"][0]}
    for name, rs in runs.items():
        out[name] = {key: median([r[key] for r in rs]) for key in cold}
        out[name]["spread"] = spread([r["wall_s"] for r in rs])
        out[name]["rounds"] = rs
    for name, label in (("cold", "cold cache"), ("warm", "warm cache"), ("off", "no cache")):
        print(f"  zoo generate, {label:>10}: {out[name]['wall_s']:.2f} s wall, prefill "
              f"{out[name]['prefill_ms']:.0f} ms, first step {out[name]['first_step_ms']:.0f} ms", flush=True)
    return out


def run(quick: bool) -> dict[str, Any]:
    """The ``generation`` section of ``bench.json``."""
    load_start = list(os.getloadavg())
    out = {"ragged_batch": ragged(quick), "cli": cli_second_call(quick)}
    return {**out, "load_avg_start": load_start, "load_avg_end": list(os.getloadavg())}
