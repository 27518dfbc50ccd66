"""xlstm-zoo: xLSTM's mLSTM sequence models in JAX + Flax, built from plugins.

Public API::

    cfg = zoo.load_config("tiny")            # a preset name, a JSON path, or a dict
    params = zoo.init_params(cfg, seed=0)
    logits = zoo.forward(cfg, params, tokens)  # tokens int32 (B, S) -> float32 (B, S, vocab)
    zoo.param_count(cfg)                      # computed abstractly, nothing allocated
    logits, state = zoo.prefill(cfg, params, prompt)      # chunkwise, returns the decoding state
    logits, state = zoo.step(cfg, params, token, state)   # one token (B,) per call, recurrent
    out = zoo.generate(cfg, params, prompt, 16)           # prefill, then one compiled step per token
    qcfg, qparams = zoo.quantize(cfg, params, "int8")    # int8 weights: a model every call above takes

This module is the package's face: it only gathers names from the layers below (the README's Layout
section lists them); ``zoo.init_state`` is the former name of ``zoo.init_decode_state``.
"""

from __future__ import annotations

from zoo.checkpoint import load, save
from zoo.checks import TokenError
from zoo.config import ModelConfig
from zoo.config_source import load_config
from zoo.errors import ZooError
from zoo.inference import Generation, generate
from zoo.model import build, param_count, param_shapes
from zoo.quantization import quantize
from zoo.runtime import forward, init_decode_state, init_params, prefill, step
from zoo.tokenizers import load_tokenizer
from zoo.version import __version__

init_state = init_decode_state

__all__ = ["Generation", "ModelConfig", "TokenError", "ZooError", "__version__", "build", "forward", "generate",
           "init_decode_state", "init_params", "init_state", "load", "load_config", "load_tokenizer", "param_count", "param_shapes",
           "prefill", "quantize", "save", "step"]
