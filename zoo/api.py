"""The public functions behind ``import zoo``: configs in, models, params and logits out."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import presets
from zoo.config import ModelConfig
from zoo.model import LMModel

Params = dict[str, Any]


class ConfigSourceError(ValueError):
    """A config could not be read: missing file, unknown preset or malformed JSON."""


def load_config(source: str | os.PathLike | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A validated ``ModelConfig`` from a preset name, a JSON file path, or a dict.

    Raises ``pydantic.ValidationError`` for invalid content and ``ConfigSourceError`` when the
    source cannot be read.
    """
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, Mapping):
        return ModelConfig.model_validate(source)
    path = Path(source)
    if not path.is_file():
        if str(source) in presets.names():
            path = presets.path(str(source))
        else:
            raise ConfigSourceError(
                f"{str(source)!r} is neither a config file nor a preset; presets: {', '.join(presets.names())}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigSourceError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigSourceError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return ModelConfig.model_validate(data)


class BuildError(RuntimeError):
    """A valid config that cannot be built here (for example, one that asks for several devices)."""


def check_devices(config: ModelConfig) -> None:
    """Refuse configs whose ``parallel`` section needs a multi-device mesh, which is not implemented yet."""
    p = config.parallel
    if p is None:
        return
    wanted = {name: size for name in ("data_axis_size", "fsdp_axis_size", "pipeline_axis_size", "model_axis_size")
              if (size := getattr(p, name)) > 1}
    if wanted:
        listed = ", ".join(f"parallel.{name}={size}" for name, size in wanted.items())
        raise BuildError(f"{listed}: sharding over several devices is not implemented yet; set these sizes to 1 "
                         f"to build on one device (param shapes and counts are available with --abstract)")


def build(config: ModelConfig) -> nn.Module:
    """The Flax module for ``config``."""
    return LMModel(config)


def _init_fn(config: ModelConfig):
    model = build(config)
    return lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.lru_cache(maxsize=32)
def _compiled_init(config_json: str):
    return jax.jit(_init_fn(ModelConfig.model_validate_json(config_json)))


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """Freshly initialised float32 parameters (on one device)."""
    check_devices(config)
    return _compiled_init(config.model_dump_json())(jax.random.PRNGKey(seed))


def param_shapes(config: ModelConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated."""
    return jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, computed abstractly."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(param_shapes(config)))


@functools.lru_cache(maxsize=32)
def _compiled_forward(config_json: str):
    model = build(ModelConfig.model_validate_json(config_json))

    @jax.jit
    def run(params, tokens, document_borders):
        return model.apply({"params": params}, tokens, document_borders)

    return run


def forward(config: ModelConfig, params: Params, tokens: Any, document_borders: Any = None) -> jax.Array:
    """Logits ``(B, S, vocab_size)`` float32 for int32 ``tokens (B, S)``, in eval mode (no dropout).

    ``document_borders`` (bool ``(B, S)``, True at each document's first token) resets the
    memory there when ``mlstm_cell.reset_at_document_boundaries`` is set.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, sequence), got {tokens.shape}")
    if document_borders is not None:
        document_borders = jnp.asarray(document_borders, bool)
        if document_borders.shape != tokens.shape:
            raise ValueError(f"document_borders shape {document_borders.shape} != tokens shape {tokens.shape}")
    return _compiled_forward(config.model_dump_json())(params, tokens, document_borders)
