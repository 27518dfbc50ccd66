"""Decoding: ms/token of every shipped 165m preset, as shipped and in float32, at batch 1 and context 128, beside a
memory-bandwidth roofline measured in the same run and the PyTorch step API; a batch-8 row; latency vs context.

Each zoo row times ``ModelRunner.step`` (the compiled step fused with greedy sampling that ``zoo.generate`` and
the engine run) from the state after prefilling a 128-token prompt. Its roofline is the bytes one step must
read (every weight but the embedding table, of which it gathers one row per sequence, plus the state read and
written) over the read bandwidth that NumPy reaches with as many threads as the candidate uses: XLA:CPU uses
every core, PyTorch its ``torch.get_num_threads()``. Rows and PyTorch candidates run round-robin, so machine
load hits all alike; every timed round is checked to compile nothing; the spread across rounds and the load
average at the start and the end are printed and stored.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from benchmarks.common import interleaved, median, no_compiles, spread, torch_thread_variants
from benchmarks.export import with_dtype
from benchmarks.generation import bytes_per_step
from benchmarks.models import QUICK, replace_keys, torch_model
from zoo.decode_layout import decode_layout
from zoo.inference import ModelRunner, SamplingParams, decode_loop, sampler_state

PRESETS = ("mlstm_v1-165m", "mlstm-165m")
VARIANTS = ("as shipped", "float32")
CONTEXT = 128
BATCH_ROW = ("mlstm_v1-165m", "as shipped", 8)  # the batched row: preset, variant, batch
INT8_ROW = "mlstm_v1-165m"  # also decoded with int8 weights (zoo.quantize's default), beside its float32 row
PROBE_MIB = 512


def read_bandwidth_gbs(threads: int, mib: int = PROBE_MIB, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: ``mib`` MiB of float32 summed by NumPy in ``threads`` threads (one slice each; NumPy
    releases the GIL while it sums), the fastest of ``repeats`` passes after one to fault the pages in."""
    data = np.ones(mib * 2**18, np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            if i:
                best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


def preset_config(preset: str, variant: str, quick: bool) -> zoo.ModelConfig:
    """``preset`` as shipped or with float32 compute; ``--quick`` shrinks it (width 256, 2 blocks, 1024 tokens)."""
    data = zoo.load_config(preset).model_dump(mode="json")
    if variant == "float32":
        data = with_dtype(data, "float32")
    return zoo.load_config(replace_keys(data, QUICK) if quick else data)


class ZooRow:
    """One zoo candidate: a runner, a prefilled state to start every round from, and its per-step times."""

    def __init__(self, name: str, cfg: zoo.ModelConfig, params: Any, batch: int, context: int, steps: int,
                 preset: str = "", variant: str = ""):
        self.name, self.cfg, self.batch, self.steps = name, cfg, batch, steps
        self.preset, self.variant = preset, variant
        self.runner = ModelRunner(cfg, params)
        tokens = np.random.default_rng(context).integers(0, cfg.vocab_size, (batch, context)).astype(np.int32)
        self.sampler = sampler_state([SamplingParams()] * batch, tokens.tolist(), cfg.vocab_size)  # greedy
        _, self.first, self.state, _ = self.runner.prefill(tokens, np.full(batch, context, np.int32), self.sampler, 0)
        jax.block_until_ready(self.state)
        self.times: list[float] = []

    def __call__(self) -> None:
        state = jax.tree_util.tree_map(jnp.copy, self.state)  # the step donates state and sampler
        sampler = jax.tree_util.tree_map(jnp.copy, self.sampler)
        jax.block_until_ready((state, sampler))

        def step(token: jax.Array, carry: tuple[Any, Any]) -> tuple[jax.Array, tuple[Any, Any]]:
            sampled, state, sampler = self.runner.step(token, *carry, 0)
            return sampled.tokens, (state, sampler)

        out = decode_loop(step, self.first.tokens, (state, sampler), self.steps + 1)  # self.steps steps, all timed
        self.times.append((out.first_step_s + out.decode_s) / self.steps)


def _neurips_model(cfg: zoo.ModelConfig) -> Any:
    """NX-AI's NeurIPS ``xLSTMLMModel`` with the sizes of an ``mlstm`` config (float32, random weights)."""
    import torch
    from xlstm import mLSTMBlockConfig, mLSTMLayerConfig, xLSTMLMModel, xLSTMLMModelConfig

    layer = cfg.layer
    tcfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(
            num_heads=layer.num_heads, conv1d_kernel_size=layer.conv1d_kernel_size,
            qkv_proj_blocksize=layer.qkv_proj_blocksize, proj_factor=layer.proj_factor)),
        context_length=CONTEXT, num_blocks=cfg.num_blocks, embedding_dim=cfg.embedding_dim,
        vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    return xLSTMLMModel(tcfg).eval()


class TorchRow:
    """The PyTorch step API at the sizes of ``preset``: ``xlstm_large`` (mlstm_v1) or the NeurIPS package's
    ``xLSTMLMModel.step`` (mlstm), float32, from the state after the same prompt length."""

    def __init__(self, preset: str, quick: bool, context: int, steps: int):
        import torch

        self.preset, self.steps = preset, steps
        cfg = preset_config(preset, "float32", quick)
        prompt = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context)))
        with torch.no_grad():
            if cfg.layer.layer_type == "mlstm_v1":
                self.api = "xlstm_large step"
                self.model, _ = torch_model(cfg)
                logits, self.state = self.model(prompt)
                self.call = lambda token, state: self.model(token[:, None], state)
            else:
                self.api = "xLSTMLMModel.step (NeurIPS package)"
                self.model = _neurips_model(cfg)
                state = None
                for t in range(context):  # this model's forward returns no state: the prompt is stepped through
                    logits, state = self.model.step(prompt[:, t:t + 1], state)
                self.state = state
                self.call = lambda token, state: self.model.step(token[:, None], state)
        self.token = logits[:, -1].argmax(-1)
        self.times: dict[int, list[float]] = {}

    def __call__(self) -> None:
        import torch

        state, token = copy.deepcopy(self.state), self.token
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(self.steps):
                logits, state = self.call(token, state)
                token = logits[:, -1].argmax(-1)
            elapsed = time.perf_counter() - t0
        self.times.setdefault(torch.get_num_threads(), []).append(elapsed / self.steps)


def latency_vs_context(cfg: zoo.ModelConfig, params: Any, contexts: list[int], steps: int,
                       rounds: int) -> list[dict[str, Any]]:
    """Per-token latency of the runner from the state after prefilling each context length (round-robin)."""
    unlimited = zoo.load_config({**cfg.model_dump(mode="json"), "context_length": -1})  # decoding past the preset's
    rows = {c: ZooRow(f"context {c}", unlimited, params, 1, c, steps) for c in contexts}
    fns = {str(c): r for c, r in rows.items()}
    interleaved(fns, 0)  # the warm-up call of each context compiles; dropped below
    with no_compiles("the decode latency rounds"):
        interleaved(fns, rounds, warmup=0)
    out = []
    for c, r in rows.items():
        ts = r.times[1:]
        out.append({"context": c, "zoo_ms_per_token": 1e3 * median(ts), "ms_per_token_rounds": [1e3 * t for t in ts],
                    "spread": spread(ts)})
        print(f"  latency at context {c}: {out[-1]['zoo_ms_per_token']:.1f} ms/token", flush=True)
    return out


def run(quick: bool, rounds: int | None = None, steps: int | None = None, torch_rows: bool = True,
        latency: bool = True) -> dict[str, Any]:
    """The ``decode`` section of ``bench.json`` (``rounds``/``steps`` override the defaults; ``torch_rows`` and
    ``latency`` False skip those parts, for a short check)."""
    context = 32 if quick else CONTEXT
    rounds = rounds or (2 if quick else 5)
    steps = steps or (8 if quick else 32)
    cores = os.cpu_count() or 1
    load_start = list(os.getloadavg())
    probe = {n: read_bandwidth_gbs(n) for n in sorted({1, 2, cores})}
    print("  read bandwidth: " + ", ".join(f"{bw:.1f} GB/s at {n} thread{'s' * (n > 1)}" for n, bw in probe.items()),
          flush=True)

    params = {p: jax.block_until_ready(zoo.init_params(preset_config(p, "float32", quick), seed=0)) for p in PRESETS}
    rows = [ZooRow(f"zoo {p} {v}", preset_config(p, v, quick), params[p], 1, context, steps, p, v)
            for p in PRESETS for v in VARIANTS]
    p, v, b = BATCH_ROW
    rows.append(ZooRow(f"zoo {p} {v} B={b}", preset_config(p, v, quick), params[p], b, context, steps, p, v))
    qcfg, qparams = zoo.quantize(preset_config(INT8_ROW, "float32", quick), params[INT8_ROW], "int8")
    rows.append(ZooRow(f"zoo {INT8_ROW} int8", qcfg, qparams, 1, context, steps, INT8_ROW, "int8"))
    fns: dict[str, Any] = {r.name: r for r in rows}
    torch_by_preset = {}
    if torch_rows:
        for p in PRESETS:
            torch_by_preset[p] = TorchRow(p, quick, context, max(4, steps // 4))
        fns.update(torch_thread_variants({f"torch {p}": t for p, t in torch_by_preset.items()}))
    interleaved(fns, 0)  # the warm-up call of each candidate compiles; dropped below
    with no_compiles("the decode rounds"):
        interleaved(fns, rounds, warmup=0)
    load_end = list(os.getloadavg())

    torch_out = {}
    for p, t in torch_by_preset.items():
        per_threads = {n: ts[1:] for n, ts in t.times.items()}
        best = min(per_threads, key=lambda n: median(per_threads[n]))
        ts = per_threads[best]
        need = bytes_per_step(preset_config(p, "float32", quick), 1)  # the same weights in float32
        ms = 1e3 * median(ts)
        roof = 1e3 * need / (probe.get(best, read_bandwidth_gbs(best)) * 1e9)
        torch_out[p] = {"api": t.api, "threads": best, "ms_per_token": ms, "ms_per_token_rounds": [1e3 * x for x in ts],
                        "spread": spread(ts), "tokens_per_s": 1e3 / ms, "roofline_ms": roof,
                        "fraction_of_roofline": roof / ms,
                        "by_threads_ms": {str(n): 1e3 * median(x) for n, x in per_threads.items()}}
    out_rows = []
    for r in rows:
        ts = r.times[1:]
        ms = 1e3 * median(ts)
        need = bytes_per_step(r.cfg, r.batch)
        roof = 1e3 * need / (probe[cores] * 1e9)
        target, _ = decode_layout(r.cfg, r.runner.params)
        torch_ms = torch_out.get(r.preset, {}).get("ms_per_token")
        out_rows.append({
            "name": r.name, "preset": r.preset, "variant": r.variant, "batch": r.batch, "context": context,
            "dtype": r.cfg.dtype, "scan_blocks": r.cfg.scan_blocks,
            "decode_layout": {"dtype": target.dtype, "lm_head_dtype": target.lm_head_dtype,
                              "scan_blocks": target.scan_blocks},
            "ms_per_step": ms, "ms_per_token": ms / r.batch, "ms_per_step_rounds": [1e3 * t for t in ts],
            "spread": spread(ts), "tokens_per_s": 1e3 * r.batch / ms, "bytes_per_step": need, "threads": cores,
            "bandwidth_gbs": probe[cores], "roofline_ms_per_step": roof, "fraction_of_roofline": roof / ms,
            "vs_torch": torch_ms / ms if torch_ms and r.batch == 1 else None})
    by_name = {r["name"]: r for r in out_rows}
    int8, f32 = by_name[f"zoo {INT8_ROW} int8"], by_name[f"zoo {INT8_ROW} float32"]
    int8["vs_float32"] = f32["ms_per_token"] / int8["ms_per_token"]
    _print_table(out_rows, torch_out, probe, load_start, load_end, rounds)
    result = {"context": context, "steps_per_round": steps, "rounds": rounds, "rows": out_rows, "torch": torch_out,
              "bandwidth_probe_gbs": {str(n): bw for n, bw in probe.items()},
              "bandwidth_method": f"NumPy sum of {PROBE_MIB} MiB float32 split over N threads, fastest of 5 passes",
              "load_avg_start": load_start, "load_avg_end": load_end,
              "roofline": "bytes per step (float32 weights but the embedding table, B embedding rows, state read and "
                          "written) / read bandwidth at the candidate's thread count"}
    if latency:
        contexts = [context, 4 * context] if quick else [128, 512, 2048, 8192]
        first = rows[0]
        result["latency_vs_context"] = latency_vs_context(first.cfg, params[first.preset], contexts, 16,
                                                          min(rounds, 3))
        result["latency_row"] = first.name
    return result


def _print_table(rows: list[dict[str, Any]], torch_out: dict[str, Any], probe: dict[int, float],
                 load_start: list[float], load_end: list[float], rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode, context {rows[0]['context']}: median of {rounds} rounds; load average "
                        f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; read bandwidth "
                        + ", ".join(f"{bw:.1f} GB/s @{n}t" for n, bw in probe.items()))
    for col in ("row", "layout run", "threads", "ms/token", "spread", "tokens/s", "roofline ms", "of roofline",
                "vs torch"):
        table.add_column(col, justify="left" if col in ("row", "layout run") else "right")
    for r in rows:
        layout = r["decode_layout"]
        table.add_row(r["name"], f"{layout['dtype']}, {'scanned' if layout['scan_blocks'] else 'per block'}",
                      str(r["threads"]), f"{r['ms_per_token']:.3g}" + (f" ({r['ms_per_step']:.3g}/step)" if r["batch"] > 1
                                                                        else ""),
                      f"{100 * r['spread']:.0f}%", f"{r['tokens_per_s']:.1f}", f"{r['roofline_ms_per_step']:.3g}",
                      f"{r['fraction_of_roofline']:.2f}", "" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}x")
    for p, t in torch_out.items():
        table.add_row(f"torch {p} ({t['api']})", "float32", str(t["threads"]), f"{t['ms_per_token']:.3g}",
                      f"{100 * t['spread']:.0f}%", f"{t['tokens_per_s']:.1f}", f"{t['roofline_ms']:.3g}",
                      f"{t['fraction_of_roofline']:.2f}", "1x")
    console = Console(width=200)
    console.print(table)
    if any(r["fraction_of_roofline"] > 1 for r in [*rows, *torch_out.values()]):
        console.print("  a fraction above 1: those weights stay in the CPU's cache between steps, so main memory "
                      "does not bound them (the --quick shapes)")
