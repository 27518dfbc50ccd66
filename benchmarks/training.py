"""Training: tokens/s and MFU of the zoo's jitted train step vs PyTorch ``xlstm_large`` forward + backward + AdamW.

Both train on the same shapes (``mlstm_v1-165m`` sizes, float32, B=4, S=512, next-token loss on random ids,
AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.1, gradient clipping at norm 1). FLOPs per token are counted
as ``FLOP_FORMULA`` says; MFU is those FLOPs times tokens/s over the fastest float32 2048³ matmul timed in
the same rounds. Recomputation under the preset's remat is not counted: model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from benchmarks.common import (COMPILES, best_of_threads, interleaved, matmul_fn, median, no_compiles,
                               torch_thread_variants)
from benchmarks.kernel import chunkwise_flops
from benchmarks.models import PRESET, torch_model, zoo_config, zoo_params
from zoo import training

FLOP_FORMULA = ("FLOPs/token = 6·N + 3·layers·FLOPs_fwd(mLSTM cell, chunkwise, per token); N = parameters "
                "but the embedding table (a gather, no matmul); the cell's matmuls per kernel.FLOP_FORMULA, x3 for "
                "forward + backward; gate math, norms and remat recomputation not counted")
MATMUL = "matmul 2048³ f32"
ZOO = "zoo train_step"
TORCH = "torch xlstm_large fwd+bwd+AdamW"
OPTIMIZER = {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0}


def flops_per_token(cfg: zoo.config.ModelConfig, params: int, embedding: int) -> float:
    """Training FLOPs per token of a model with ``cfg``'s head shapes, ``params`` parameters of which ``embedding``
    are the input embedding table (see ``FLOP_FORMULA``)."""
    layer = cfg.mlstm_block.mlstm
    dqk = int(cfg.embedding_dim * layer.qk_dim_factor) // layer.num_heads
    dv = int(cfg.embedding_dim * layer.v_dim_factor) // layer.num_heads
    chunk = layer.mlstm_cell.backend.kwargs.get("chunk_size", 64)
    cell = chunkwise_flops(1, layer.num_heads, 1, dqk, dv, chunk)
    return 6.0 * (params - embedding) + 3 * cfg.num_blocks * cell


def _zoo_trainer(cfg: zoo.config.ModelConfig, tokens: np.ndarray) -> tuple[Callable[[int], list[float]], int]:
    """``run(n)``: ``n`` blocking zoo train steps on ``tokens (B, S+1)``, returning their losses; and the model's
    embedding-table size."""
    optimizer = training.adamw(cfg, **OPTIMIZER)
    box = [training.init_train_state(cfg, zoo_params(cfg), optimizer)]
    batch = jnp.asarray(tokens)

    def run(n: int) -> list[float]:
        losses = []
        for _ in range(n):
            box[0], loss = training.train_step(cfg, optimizer, box[0], batch)  # donates the old state
            losses.append(float(jax.block_until_ready((box[0], loss))[1]))
        return losses

    return run, int(np.prod(zoo.param_shapes(cfg)["token_embedding"]["embedding"].shape))


def _torch_trainer(cfg: zoo.config.ModelConfig, tokens: np.ndarray) -> tuple[Callable[[int], list[float]], int, int]:
    """``run(n)``: ``n`` PyTorch training steps (forward, cross-entropy, backward, clipping, AdamW) of
    ``xlstm_large`` in train mode on ``tokens (B, S+1)``; its parameter count and embedding-table size."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge

    inference, _ = torch_model(cfg)  # the sizes of cfg, native kernels; rebuilt in train mode
    # return_last_states stays True: xlstm_large's layer always unpacks (h, state) from its backend
    train_cfg = dataclasses.replace(inference.config, mode="train")
    del inference
    torch.manual_seed(0)
    model = xLSTMLarge(train_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["learning_rate"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
                            eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
    ids = torch.from_numpy(tokens.astype(np.int64))
    inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)

    def run(n: int) -> list[float]:
        losses = []
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            logits, _ = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_norm"])
            opt.step()
            losses.append(loss.item())
        return losses

    return run, sum(p.numel() for p in model.parameters()), model.embedding.weight.numel()


def run(quick: bool) -> dict[str, Any]:
    """The ``training`` section of ``bench.json``: train-step tokens/s and MFU of both implementations.

    Raises ``RuntimeError`` when an XLA compile happens inside a timed round, or a loss is not finite.
    """
    import torch

    B, S, steps, rounds = (2, 128, 1, 2) if quick else (4, 512, 1, 3)  # full: ~7 min on 2 busy cores
    cfg = zoo_config(quick)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S + 1)).astype(np.int32)  # S inputs, S targets
    zoo_run, zoo_embedding = _zoo_trainer(cfg, tokens)
    torch_run, torch_params, torch_embedding = _torch_trainer(cfg, tokens)
    mm, mm_flops = matmul_fn()
    losses: dict[str, list[float]] = {}
    mm_times: list[float] = []

    def matmuls() -> None:
        for _ in range(5):
            t0 = time.perf_counter()
            mm()
            mm_times.append(time.perf_counter() - t0)

    def timed(name: str, fn: Callable[[int], list[float]], n: int) -> Callable[[], None]:
        return lambda: losses.setdefault(name, []).extend(fn(n))

    def candidates(n: int) -> dict[str, Callable[[], Any]]:
        return {MATMUL: matmuls, ZOO: timed(ZOO, zoo_run, n),
                TORCH: lambda: timed(f"{TORCH} @{torch.get_num_threads()}t", torch_run, n)()}

    load_before = os.getloadavg()
    before_warmup = COMPILES.count
    interleaved(candidates(1), repeats=0)  # one untimed step each (torch at one thread count): compiles, allocations
    warm = COMPILES.count
    mm_times.clear()
    fns = candidates(steps)
    fns.update(torch_thread_variants({TORCH: fns.pop(TORCH)}))
    with no_compiles("the timed training rounds"):
        times = interleaved(fns, rounds, warmup=0)
    if not all(np.isfinite(x) for ls in losses.values() for x in ls):
        raise RuntimeError(f"a training loss is not finite: {losses}")
    per_step = {name: [t / steps for t in ts] for name, ts in times.items() if name != MATMUL}
    med, chosen = best_of_threads({name: median(ts) for name, ts in per_step.items()})
    # the peak is the fastest single matmul: on a loaded machine XLA's all-core matmul is slowed like any
    # all-core program, and a median could put a one-thread PyTorch run above 100%
    matmul_gflops = mm_flops / min(mm_times) / 1e9
    counts = {ZOO: zoo.param_count(cfg), TORCH: torch_params}
    flops = {ZOO: flops_per_token(cfg, counts[ZOO], zoo_embedding),
             TORCH: flops_per_token(cfg, torch_params, torch_embedding)}
    tps = {name: B * S / t for name, t in med.items()}
    gflops = {name: flops[name] * tps[name] / 1e9 for name in med}
    spread = {name: (max(ts) - min(ts)) / median(ts) for name, ts in per_step.items()}
    torch_rounds = [min(ts) for ts in zip(*(ts for name, ts in per_step.items() if name.startswith(TORCH)))]
    ratio_rounds = [t / z for t, z in zip(torch_rounds, per_step[ZOO])]  # zoo / best torch tokens/s, round by round
    out = {"preset": PRESET if not quick else f"{PRESET} (quick: {cfg.num_blocks} blocks, dim {cfg.embedding_dim}, "
                                              f"vocab {cfg.vocab_size})",
           "dtype": "float32", "B": B, "S": S, "steps_per_round": steps, "rounds": rounds, "params": counts,
           "zoo_remat": list(cfg.parallel.remat),
           "zoo_cell_backend": cfg.mlstm_block.mlstm.mlstm_cell.backend.model_dump(),
           "torch_kernels": "chunkwise--native_custbw, train mode, chunk 64", "optimizer": OPTIMIZER,
           "flop_formula": FLOP_FORMULA, "flops_per_token": flops, "seconds_per_step": per_step,
           "median_s_per_step": med,
           "torch_threads_chosen": chosen, "tokens_per_s": tps, "achieved_gflops": gflops,
           "matmul_gflops": matmul_gflops, "matmul_seconds": mm_times,
           "matmul_method": "the fastest of 5 jitted 2048³ f32 matmuls per round, interleaved with the steps",
           "mfu": {name: g / matmul_gflops for name, g in gflops.items()}, "ratio_tokens_per_s": tps[ZOO] / tps[TORCH],
           "ratio_tokens_per_s_rounds": ratio_rounds, "spread": spread, "losses": losses,  # every step's, warm-up included; torch's variants train one model
           "compiles_in_warmup": warm - before_warmup, "compiles_in_timed_rounds": COMPILES.count - warm,
           "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg())}
    _print(out)
    if max(out["mfu"].values()) > 1:
        print("  warning: an MFU above 100% means the matmul peak was measured under more load than the step",
              flush=True)
    return out


def _print(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training, {out['preset']}, B={out['B']} S={out['S']} {out['dtype']}: medians of "
                        f"{out['rounds']} rounds x {out['steps_per_round']} steps after a warm-up step; f32 matmul "
                        f"peak {out['matmul_gflops']:.0f} GFLOP/s; load avg {out['load_avg_before'][0]:.1f} -> "
                        f"{out['load_avg_after'][0]:.1f}")
    for h in ("candidate", "s/step", "tokens/s", "GFLOP/s", "MFU", "spread of rounds"):
        table.add_column(h, justify="left" if h == "candidate" else "right")
    for name, t in out["median_s_per_step"].items():
        threads = out["torch_threads_chosen"].get(name)
        spread = out["spread"][f"{name} @{threads}" if threads else name]
        table.add_row(name + (f" (best: {threads})" if threads else ""), f"{t:.2f}", f"{out['tokens_per_s'][name]:.0f}",
                      f"{out['achieved_gflops'][name]:.0f}", f"{100 * out['mfu'][name]:.1f}%", f"{100 * spread:.0f}%")
    Console(width=160).print(table)
    print(f"  zoo / torch tokens/s: {out['ratio_tokens_per_s']:.2f}x (round by round: "
          f"{', '.join(f'{r:.2f}' for r in out['ratio_tokens_per_s_rounds'])}); {FLOP_FORMULA}", flush=True)
