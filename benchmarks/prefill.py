"""Model prefill: zoo ``prefill`` vs NX-AI's PyTorch ``xlstm_large`` (native kernels), tokens/s at B=1, each beside
the float32 matmul rate measured in the same rounds.

A prefill of S tokens multiplies every weight outside the embedding table by S activation rows: ``2·B·S·W``
FLOPs for W such weights (the cell's chunkwise recurrence adds its own, the same for both implementations), so
``2·B·S·W / matmul rate`` is a floor on its time, and each candidate's fraction of that rate bounds how much
faster any implementation could be on this machine.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

import zoo
from benchmarks.common import (best_of_threads, interleaved, matmul_fn, median, no_compiles, spread,
                               torch_thread_variants)
from benchmarks.models import PRESET, torch_model, zoo_config, zoo_params

MATMUL = "f32 2048³ matmul"


def run(quick: bool) -> dict[str, Any]:
    """The ``model`` section of ``bench.json``: prefill tokens/s of both implementations, side by side."""
    import torch

    B, S, repeats = (1, 256, 2) if quick else (1, 2048, 5)
    load_start = list(os.getloadavg())
    cfg = zoo_config(quick)
    params = zoo_params(cfg)
    tmodel, tcount = torch_model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
    ttokens = torch.from_numpy(tokens.astype(np.int64))
    mm, mm_flops = matmul_fn()
    weights = zoo.param_count(cfg) - cfg.vocab_size * cfg.embedding_dim  # all but the embedding table
    weight_flops = 2.0 * B * S * weights

    def zoo_prefill():
        jax.block_until_ready(zoo.prefill(cfg, params, tokens))

    def torch_prefill():
        with torch.no_grad():
            tmodel(ttokens)

    fns = {"zoo prefill": zoo_prefill, **torch_thread_variants({"torch xlstm_large prefill": torch_prefill}),
           MATMUL: mm}
    interleaved(fns, 0)  # the warm-up call of each candidate compiles; dropped below
    with no_compiles("the prefill rounds"):
        times = interleaved(fns, repeats, warmup=0)
    load_end = list(os.getloadavg())
    matmul_gflops = mm_flops / median(times.pop(MATMUL)) / 1e9
    med, chosen = best_of_threads({name: median(ts) for name, ts in times.items()})
    floor_s = weight_flops / (matmul_gflops * 1e9)
    fraction = {name: floor_s / t for name, t in med.items()}
    print(f"  prefill (load {load_start[0]:.2f} -> {load_end[0]:.2f}; {MATMUL} at {matmul_gflops:.0f} GFLOP/s, "
          f"weight-FLOP floor {floor_s:.2f} s): " + ", ".join(
              f"{n} {t:.2f} s ({100 * fraction[n]:.0f}% of the matmul rate)" for n, t in med.items()), flush=True)
    return {"preset": PRESET if not quick else f"{PRESET} (quick: {cfg.num_blocks} blocks, "
                                               f"dim {cfg.embedding_dim})",
            "dtype": "float32", "B": B, "S": S, "zoo_params": zoo.param_count(cfg), "torch_params": tcount,
            "torch_kernels": "chunkwise--native_custbw + native_sequence__native, inference mode, chunk 64",
            "zoo_prefill_backend": cfg.mlstm_block.mlstm.mlstm_cell.prefill_backend.model_dump(),
            "seconds": times, "median_s": med, "torch_threads_chosen": chosen,
            "spread": {name: spread(ts) for name, ts in times.items()},
            "tokens_per_s": {name: B * S / t for name, t in med.items()},
            "matmul_gflops": matmul_gflops, "weight_flops": weight_flops, "weight_flop_floor_s": floor_s,
            "fraction_of_matmul_rate": fraction,
            "max_ratio_vs_torch": med["torch xlstm_large prefill"] / floor_s,
            "load_avg_start": load_start, "load_avg_end": load_end}
