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
from jax.sharding import Mesh

from zoo import presets, sharding
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigSourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigSourceError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigSourceError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return ModelConfig.model_validate(data)


def build(config: ModelConfig, mesh: Mesh | None = None) -> nn.Module:
    """The Flax module for ``config``; with a ``mesh``, its activations are constrained to the batch layout."""
    return LMModel(config, mesh=mesh)


def _init_fn(config: ModelConfig):
    model = build(config)
    return lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.lru_cache(maxsize=32)
def _compiled_init(config_json: str, mesh: Mesh | None):
    config = ModelConfig.model_validate_json(config_json)
    init = _init_fn(config)
    shardings = None if mesh is None else sharding.param_shardings(config, mesh)
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)


def init_params(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> Params:
    """Freshly initialised float32 parameters.

    With a ``mesh`` (by default the one ``config.parallel`` asks for, see ``zoo.sharding.make_mesh``)
    every device initialises only its own shards; the values equal a single-device init.
    """
    mesh = sharding.make_mesh(config) if mesh is None else mesh
    return _compiled_init(config.model_dump_json(), mesh)(jax.random.PRNGKey(seed))


def boxed_param_shapes(config: ModelConfig) -> Params:
    """The parameter tree with its logical partitioning boxes (``nn.Partitioned``); nothing is allocated."""
    return jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))


def param_shapes(config: ModelConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated."""
    return nn.unbox(boxed_param_shapes(config))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, computed abstractly."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(param_shapes(config)))


@functools.lru_cache(maxsize=32)
def _compiled(config_json: str, mode: str, mesh: Mesh | None):
    config = ModelConfig.model_validate_json(config_json)
    model = build(config, mesh)

    @jax.jit
    def run(params, tokens, document_borders, state):
        params = sharding.cast_for_gather(config, mesh, params)
        return model.apply({"params": params}, tokens, document_borders, mode=mode, state=state)

    return run


def _run(config: ModelConfig, mode: str, params: Params, tokens: jax.Array, document_borders: jax.Array | None,
         state: Any):
    """Run ``mode`` on the mesh the params live on, with the batch split over dp × fsdp."""
    mesh, (tokens, document_borders) = sharding.place_batch(config, params, tokens, document_borders)
    return _compiled(config.model_dump_json(), mode, mesh)(params, tokens, document_borders, state)


def _tokens(tokens: Any, ndim: int, what: str) -> jax.Array:
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {tokens.shape}")
    return tokens


def _borders(document_borders: Any, shape: tuple[int, ...]) -> jax.Array | None:
    if document_borders is None:
        return None
    document_borders = jnp.asarray(document_borders, bool)
    if document_borders.shape != shape:
        raise ValueError(f"document_borders shape {document_borders.shape} != tokens shape {shape}")
    return document_borders


def forward(config: ModelConfig, params: Params, tokens: Any, document_borders: Any = None) -> jax.Array:
    """Logits ``(B, S, vocab_size)`` float32 for int32 ``tokens (B, S)``, in eval mode (no dropout).

    ``document_borders`` (bool ``(B, S)``, True at each document's first token) resets the
    memory there when ``mlstm_cell.reset_at_document_boundaries`` is set.
    """
    tokens = _tokens(tokens, 2, "tokens")
    return _run(config, "forward", params, tokens, _borders(document_borders, tokens.shape), None)


State = dict[str, jax.Array]


def prefill(config: ModelConfig, params: Params, tokens: Any, state: State | None = None,
            document_borders: Any = None) -> tuple[jax.Array, State]:
    """Run a prompt ``(B, S)`` through ``mlstm_cell.prefill_backend``; returns logits and the decoding state.

    The state is a dict of float32 arrays with the block as leading axis: ``c (NB, B, NH, DQK, DV)``,
    ``n (NB, B, NH, DQK)``, ``m (NB, B, NH)`` and, for ``mlstm``, ``conv (NB, B, K-1, Di)``.
    Pass ``state`` to continue from an earlier prefill or step; it starts from zeros otherwise.
    """
    tokens = _tokens(tokens, 2, "tokens")
    return _run(config, "prefill", params, tokens, _borders(document_borders, tokens.shape), state)


def step(config: ModelConfig, params: Params, token: Any, state: State) -> tuple[jax.Array, State]:
    """Decode one token per sequence (``token (B,)``) through ``mlstm_cell.step_backend``.

    Returns logits ``(B, vocab_size)`` and the new state.
    """
    token = _tokens(token, 1, "token")
    logits, state = _run(config, "step", params, token[:, None], None, state)
    return logits[:, 0], state


def init_state(config: ModelConfig, batch_size: int) -> State:
    """An all-zero decoding state for ``batch_size`` sequences (what ``prefill`` starts from)."""
    model = build(config)
    shapes = jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32), mode="prefill")[0][1])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
