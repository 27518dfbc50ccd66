"""xlstm-zoo: xLSTM's mLSTM sequence models in JAX + Flax, built from plugins.

Public API::

    cfg = zoo.load_config("tiny")            # a preset name, a JSON path, or a dict
    params = zoo.init_params(cfg, seed=0)
    logits = zoo.forward(cfg, params, tokens)  # tokens int32 (B, S) -> float32 (B, S, vocab)
    zoo.param_count(cfg)                      # computed abstractly, nothing allocated
    logits, state = zoo.prefill(cfg, params, prompt)      # chunkwise, returns the decoding state
    logits, state = zoo.step(cfg, params, token, state)   # one token (B,) per call, recurrent
"""

from __future__ import annotations

__version__ = "0.1.0"

from zoo.api import (  # noqa: E402
    TokenError, build, forward, init_params, init_state, load_config, param_count, param_shapes, prefill, step)
from zoo.config import ModelConfig  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.export.checkpoint import load, save  # noqa: E402

__all__ = ["ModelConfig", "TokenError", "ZooError", "__version__", "build", "forward", "init_params", "init_state",
           "load", "load_config", "param_count", "param_shapes", "prefill", "save", "step"]
