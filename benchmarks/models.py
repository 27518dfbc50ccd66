"""Matched zoo and PyTorch ``xlstm_large`` models for the model-level benchmarks (random weights)."""

from __future__ import annotations

from typing import Any

import jax

import zoo
from benchmarks.export import with_dtype

PRESET = "mlstm_v1-165m"
# a 2-block model of the same family, for --quick smoke runs
QUICK = {"embedding_dim": 256, "num_blocks": 2, "vocab_size": 1024}


def zoo_config(quick: bool, dtype: str = "float32") -> zoo.config.ModelConfig:
    """The ``mlstm_v1-165m`` preset in ``dtype`` (or its small ``--quick`` variant); prefill uses ``chunk_size: auto``."""
    data = with_dtype(zoo.load_config(PRESET).model_dump(mode="json"), dtype)
    if quick:
        data = replace_keys(data, QUICK)
    data["mlstm_block"]["mlstm"]["mlstm_cell"]["prefill_backend"] = {"name": "chunkwise",
                                                                     "kwargs": {"chunk_size": "auto"}}
    return zoo.load_config(data)


def replace_keys(data: Any, values: dict[str, Any]) -> Any:
    """``data`` with every key in ``values`` set to its value, at any depth (inner copies included)."""
    if isinstance(data, dict):
        return {k: values[k] if k in values else replace_keys(v, values) for k, v in data.items()}
    return data


def torch_model(cfg: zoo.config.ModelConfig, kernel: str = "chunkwise--native_custbw") -> tuple[Any, int]:
    """NX-AI's ``xLSTMLarge`` with the sizes of ``cfg``, native kernels, inference mode, float32; and its size."""
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    layer = cfg.mlstm_block.mlstm
    ff = cfg.mlstm_block.feedforward
    tcfg = xLSTMLargeConfig(
        embedding_dim=cfg.embedding_dim, num_heads=layer.num_heads, num_blocks=cfg.num_blocks,
        vocab_size=cfg.vocab_size, qk_dim_factor=layer.qk_dim_factor, v_dim_factor=layer.v_dim_factor,
        ffn_proj_factor=ff.proj_up_dim / cfg.embedding_dim, chunkwise_kernel=kernel, sequence_kernel="native_sequence__native",
        step_kernel="native", mode="inference", chunk_size=64, return_last_states=True,
        autocast_kernel_dtype="float32", inference_state_dtype="float32", weight_mode="fused")
    torch.manual_seed(0)
    model = xLSTMLarge(tcfg).eval()
    return model, sum(p.numel() for p in model.parameters())


def zoo_params(cfg: zoo.config.ModelConfig) -> Any:
    """Random float32 params of ``cfg``."""
    return jax.block_until_ready(zoo.init_params(cfg, seed=0))
