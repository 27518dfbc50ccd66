"""Model prefill: zoo ``prefill`` vs NX-AI's PyTorch ``xlstm_large`` (native kernels), tokens/s at B=1."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import zoo
from benchmarks.common import best_of_threads, interleaved, median, torch_thread_variants
from benchmarks.models import PRESET, torch_model, zoo_config, zoo_params


def run(quick: bool) -> dict[str, Any]:
    """The ``model`` section of ``bench.json``: prefill tokens/s of both implementations, side by side."""
    import torch

    B, S, repeats = (1, 256, 2) if quick else (1, 2048, 3)
    cfg = zoo_config(quick)
    params = zoo_params(cfg)
    tmodel, tcount = torch_model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S)).astype(np.int32)
    ttokens = torch.from_numpy(tokens.astype(np.int64))

    def zoo_prefill():
        jax.block_until_ready(zoo.prefill(cfg, params, tokens))

    def torch_prefill():
        with torch.no_grad():
            tmodel(ttokens)

    times = interleaved({"zoo prefill": zoo_prefill,
                         **torch_thread_variants({"torch xlstm_large prefill": torch_prefill})}, repeats)
    med, chosen = best_of_threads({name: median(ts) for name, ts in times.items()})
    print("  prefill: " + ", ".join(f"{n} {t:.2f} s" for n, t in med.items()), flush=True)
    return {"preset": PRESET if not quick else f"{PRESET} (quick: {cfg.num_blocks} blocks, "
                                               f"dim {cfg.embedding_dim})",
            "dtype": "float32", "B": B, "S": S, "zoo_params": zoo.param_count(cfg), "torch_params": tcount,
            "torch_kernels": "chunkwise--native_custbw + native_sequence__native, inference mode, chunk 64",
            "zoo_prefill_backend": cfg.mlstm_block.mlstm.mlstm_cell.prefill_backend.model_dump(),
            "seconds": times, "median_s": med, "torch_threads_chosen": chosen,
            "tokens_per_s": {name: B * S / t for name, t in med.items()}}
