"""Compile time at abstract shapes: build (init) and forward of the 1.3B vs the 165M ``mlstm_v1`` preset."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp

import zoo
from benchmarks.common import median, spread

PRESETS = ("mlstm_v1-165m", "mlstm_v1-1.3b")


def _compile_seconds(preset: str, S: int, scan_blocks: bool) -> dict[str, float]:
    """Seconds to lower and compile init and forward for ``(1, S)`` tokens; nothing is allocated or run."""
    data = zoo.load_config(preset).model_dump(mode="json")
    data["scan_blocks"] = scan_blocks
    cfg = zoo.load_config(data)
    model = zoo.build(cfg)
    tokens = jax.ShapeDtypeStruct((1, S), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    out = {}
    t0 = time.perf_counter()
    jax.jit(lambda k, t: model.init(k, t)).lower(key, tokens).compile()
    out["init_s"] = time.perf_counter() - t0
    params = zoo.param_shapes(cfg)
    t0 = time.perf_counter()
    jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).compile()
    out["forward_s"] = time.perf_counter() - t0
    return out


def run(quick: bool) -> dict[str, Any]:
    """The ``compile`` section of ``bench.json``: median over alternating rounds, fresh functions each time."""
    S, rounds = 2048, (1 if quick else 2)
    load_start = list(os.getloadavg())
    results: dict[str, Any] = {}
    for scan in ((True,) if quick else (True, False)):
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in PRESETS}
        for _ in range(rounds if scan else 1):  # unscanned stacks compile slowly: one round shows the growth
            for preset in PRESETS:
                runs[preset].append(_compile_seconds(preset, S, scan))
        results[f"scan_blocks={scan}"] = {
            p: {"init_s": median([r["init_s"] for r in rs]), "forward_s": median([r["forward_s"] for r in rs]),
                "forward_spread": spread([r["forward_s"] for r in rs]), "rounds": rs,
                "params": zoo.param_count(zoo.load_config(p))} for p, rs in runs.items()}
        print(f"  compile scan_blocks={scan} (load average {os.getloadavg()[0]:.2f}): " + ", ".join(
            f"{p} init {v['init_s']:.1f} s forward {v['forward_s']:.1f} s (rounds spread {100 * v['forward_spread']:.0f}%)"
            for p, v in results[f"scan_blocks={scan}"].items()), flush=True)
    return {"S": S, "batch": 1, **results, "load_avg_start": load_start, "load_avg_end": list(os.getloadavg())}
