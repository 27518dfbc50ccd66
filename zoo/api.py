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
import numpy as np
from jax.sharding import Mesh

from zoo import presets, sharding
from zoo.config import ModelConfig
from zoo.errors import ZooError
from zoo.model import LMModel

Params = dict[str, Any]


class ConfigSourceError(ZooError, ValueError):
    """A config could not be read: missing file, unknown preset, malformed JSON, too large or too deep."""


MAX_CONFIG_BYTES = 2**20
"""Largest config file read (1 MiB; a preset is about 1 KiB)."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of objects and lists in a config (the zoo's own sections nest 6 levels)."""


def _too_deep(where: str) -> ConfigSourceError:
    return ConfigSourceError(f"{where}: objects and lists nested more than {MAX_CONFIG_DEPTH} levels deep "
                             f"(a config nests about 6)")


def _check_depth(data: Any, where: str) -> None:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (Mapping, list, tuple)):
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(where)
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, Mapping) else node))


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array"}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ConfigSourceError(f"key {key!r} appears twice in one JSON object (a config sets each key once)")
        data[key] = value
    return data


def load_config(source: str | os.PathLike | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A validated ``ModelConfig`` from a preset name, a JSON file path, or a dict.

    Values are parsed strictly (see ``zoo.config``). Raises ``pydantic.ValidationError`` for invalid
    content, ``TypeError`` for a ``source`` of another type, and ``ConfigSourceError`` when the source
    cannot be read: no such file or preset (with the closest preset name), not UTF-8, malformed JSON, a
    key repeated in one object, a top level that is not an object, a file over ``MAX_CONFIG_BYTES``, or
    objects and lists nested deeper than ``MAX_CONFIG_DEPTH``.
    """
    if isinstance(source, ModelConfig):
        return source
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(f"config must be a preset name, a JSON file path, a dict or a ModelConfig, "
                        f"got {type(source).__name__}")
    if isinstance(source, Mapping):
        _check_depth(source, "the config dict")
        return ModelConfig.model_validate(source)
    path = Path(source)
    if not path.is_file():
        if str(source) in presets.names():
            path = presets.path(str(source))
        else:
            raise ConfigSourceError(f"{str(source)!r} is neither a config file nor a preset; "
                                    f"{presets.hint(str(source))}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigSourceError(f"{path}: {size:,} bytes is over the {MAX_CONFIG_BYTES:,}-byte (1 MiB) limit of a "
                                f"config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ConfigSourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigSourceError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ConfigSourceError as exc:  # a repeated key
        raise ConfigSourceError(f"{path}: {exc}") from None
    except RecursionError:  # deeper than the JSON parser goes
        raise _too_deep(str(path)) from None
    _check_depth(data, str(path))
    if not isinstance(data, dict):
        raise ConfigSourceError(f"{path}: the top level must be a JSON object, got {_JSON_TYPES[type(data)]}")
    return ModelConfig.model_validate(data)


def check_config(config: Any) -> ModelConfig:
    """``config`` when it is a ``ModelConfig``, else ``TypeError`` (``load_config`` makes one from a preset name,
    a path or a dict)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a zoo.ModelConfig (zoo.load_config makes one from a preset name, a JSON "
                        f"path or a dict), got {type(config).__name__}")
    return config


def _check_int(value: Any, name: str, low: int, high: int | None = None, high_text: str = "") -> int:
    """``value`` when it is an integer (not a bool) in ``[low, high)``; ``TypeError`` or ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high_text or high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def build(config: ModelConfig, mesh: Mesh | None = None) -> nn.Module:
    """The Flax module for ``config``; with a ``mesh``, its activations are constrained to the batch layout.

    Raises ``TypeError`` when ``config`` is not a ``ModelConfig``."""
    return LMModel(check_config(config), mesh=mesh)


def _init_fn(config: ModelConfig):
    model = build(config)
    return lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.lru_cache(maxsize=32)
def _compiled_init(config_json: str, mesh: Mesh | None):
    config = ModelConfig.model_validate_json(config_json)
    init = _init_fn(config)
    shardings = None if mesh is None else sharding.param_shardings(config, mesh)
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)


def check_seed(seed: int) -> int:
    """``seed`` when it is an integer with ``0 <= seed < 2**32``, else ``TypeError``/``ValueError``:
    ``jax.random.PRNGKey`` folds other seeds onto these (``2**32`` gives the key of 0) or overflows."""
    return _check_int(seed, "seed", 0, 2**32, "2**32")


def init_params(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> Params:
    """Freshly initialised float32 parameters; ``seed`` an integer in ``[0, 2**32)`` (else ``TypeError`` or
    ``ValueError``; ``TypeError`` too when ``config`` is not a ``ModelConfig``).

    With a ``mesh`` (by default the one ``config.parallel`` asks for, see ``zoo.sharding.make_mesh``)
    every device initialises only its own shards; the values equal a single-device init.
    """
    check_config(config)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    key = jax.random.PRNGKey(check_seed(seed))
    mesh = sharding.make_mesh(config) if mesh is None else mesh
    return _compiled_init(config.model_dump_json(), mesh)(key)


def boxed_param_shapes(config: ModelConfig) -> Params:
    """The parameter tree with its logical partitioning boxes (``nn.Partitioned``); nothing is allocated."""
    return jax.eval_shape(_init_fn(check_config(config)), jax.random.PRNGKey(0))


def param_shapes(config: ModelConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated (``TypeError`` for a
    ``config`` that is not a ``ModelConfig``)."""
    return nn.unbox(boxed_param_shapes(config))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, computed abstractly (``TypeError`` for a ``config`` that is not a ``ModelConfig``)."""
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


@functools.lru_cache(maxsize=32)
def _expected_params(config_json: str) -> tuple[Any, tuple[tuple[int, ...], ...], dict[str, tuple[int, ...]]]:
    shapes = param_shapes(ModelConfig.model_validate_json(config_json))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    layout = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    return treedef, tuple(leaf.shape for leaf in leaves), layout


@functools.cache
def _floating(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def check_params(config: ModelConfig, params: Any) -> None:
    """``TypeError``/``ValueError`` naming the first path of ``params`` that is missing, not a parameter of
    ``config``, of another shape, or not a float array; nothing when ``params`` fits (any float dtype).

    Compares tree structure and shapes with the config's abstract tree (cached per config), so it is cheap
    enough for every ``step`` call."""
    treedef, shapes, layout = _expected_params(config.model_dump_json())
    leaves, got = jax.tree_util.tree_flatten(params)
    if got == treedef and all(getattr(leaf, "shape", None) == shape and _floating(leaf.dtype)
                              for leaf, shape in zip(leaves, shapes)):
        return
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be the dict of arrays from zoo.init_params or zoo.load, "
                        f"got {type(params).__name__}")
    found = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, shape in layout.items():
        if path not in found:
            raise ValueError(f"params{path} is missing: this config needs it with shape {shape} (were the params "
                             f"made for another config?)")
        leaf = found[path]
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"params{path} must be an array, got {type(leaf).__name__}")
        if tuple(leaf.shape) != shape:
            raise ValueError(f"params{path} has shape {tuple(leaf.shape)}; this config needs {shape}")
        if not _floating(leaf.dtype):
            raise ValueError(f"params{path} has dtype {leaf.dtype}; parameters must be float arrays")
    extra = next((path for path in found if path not in layout), None)
    if extra is not None:
        raise ValueError(f"params{extra} is not a parameter of this config (were the params made for another "
                         f"config?)")


def _run(config: ModelConfig, mode: str, params: Params, tokens: jax.Array, document_borders: jax.Array | None,
         state: Any):
    """Run ``mode`` on the mesh the params live on, with the batch split over dp × fsdp."""
    mesh, (tokens, document_borders) = sharding.place_batch(config, params, tokens, document_borders)
    return _compiled(config.model_dump_json(), mode, mesh)(params, tokens, document_borders, state)


class TokenError(ZooError, ValueError):
    """Token ids the model cannot take: wrong shape or dtype, outside the vocabulary, or a prompt longer
    than ``context_length``. Raised on the host, before anything is dispatched to a device."""


def _tokens(config: ModelConfig, tokens: Any, ndim: int, what: str, *, prompt: bool) -> jax.Array:
    """``tokens`` as an int32 array after the host-side checks (``TokenError``).

    Shape, dtype and (for a ``prompt``) the length bound are static and always checked. Values are checked
    when they are on the host (lists, NumPy), and for a ``prompt`` also when they are a concrete jax.Array
    (one device-to-host copy of the ids); never for tracers, nor for a device-resident ``step`` token,
    where reading the value would stall the decode loop on a device-to-host sync.
    """
    on_host = not isinstance(tokens, jax.Array)
    if on_host:
        try:
            tokens = np.asarray(tokens)
        except ValueError as exc:
            raise TokenError(f"{what} must be a rectangular array of token ids ({exc})") from None
    if tokens.ndim != ndim or 0 in tokens.shape:
        raise TokenError(f"{what} must be a non-empty {'(B, S)' if ndim == 2 else '(B,)'} array of token ids, "
                         f"got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TokenError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
    length = tokens.shape[-1]
    if prompt and isinstance(length, int) and 0 < config.context_length < length:
        raise TokenError(f"{what}: sequence length {length} exceeds context_length={config.context_length}; "
                         f"context_length bounds each forward or prefill call (decoding with step may go past it)")
    if on_host or (prompt and not isinstance(tokens, jax.core.Tracer) and tokens.is_fully_addressable):
        ids = tokens if on_host else jax.device_get(tokens)
        outside = (ids < 0) | (ids >= config.vocab_size)
        if outside.any():
            where = tuple(int(i) for i in np.argwhere(outside)[0])
            raise TokenError(f"{what}: id {int(ids[where])} at index {where if ndim > 1 else where[0]} is outside "
                             f"the vocabulary, valid ids are 0 to {config.vocab_size - 1}")
    return jnp.asarray(tokens, jnp.int32)


def _borders(document_borders: Any, shape: tuple[int, ...]) -> jax.Array | None:
    if document_borders is None:
        return None
    document_borders = jnp.asarray(document_borders, bool)
    if document_borders.shape != shape:
        raise ValueError(f"document_borders shape {document_borders.shape} != tokens shape {shape}")
    return document_borders


def forward(config: ModelConfig, params: Params, tokens: Any, document_borders: Any = None) -> jax.Array:
    """Logits ``(B, S, vocab_size)`` float32 for integer ``tokens (B, S)``, in eval mode (no dropout).

    ``document_borders`` (bool ``(B, S)``, True at each document's first token) resets the
    memory there when ``mlstm_cell.reset_at_document_boundaries`` is set.

    Raises ``TokenError`` (a ``ValueError``) on the host, before dispatch, when ``tokens`` is not a
    non-empty integer ``(B, S)`` array, when ``S`` exceeds ``context_length`` (when it is set, i.e. > 0),
    or when an id lies outside ``[0, vocab_size)``. Ids are checked whenever they are concrete (lists,
    NumPy, jax.Array); under a caller's own ``jax.jit`` they are tracers and are not checked: there an id
    in ``[-vocab_size, 0)`` counts from the end of the vocabulary (NumPy indexing) and any other
    out-of-range id gives NaN logits for its sequence.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    check_params(check_config(config), params)
    tokens = _tokens(config, tokens, 2, "tokens", prompt=True)
    return _run(config, "forward", params, tokens, _borders(document_borders, tokens.shape), None)


State = dict[str, jax.Array]


def prefill(config: ModelConfig, params: Params, tokens: Any, state: State | None = None,
            document_borders: Any = None) -> tuple[jax.Array, State]:
    """Run a prompt ``(B, S)`` through ``mlstm_cell.prefill_backend``; returns logits and the decoding state.

    The state is a dict of float32 arrays with the block as leading axis: ``c (NB, B, NH, DQK, DV)``,
    ``n (NB, B, NH, DQK)``, ``m (NB, B, NH)`` and, for ``mlstm``, ``conv (NB, B, K-1, Di)``.
    Pass ``state`` to continue from an earlier prefill or step; it starts from zeros otherwise.

    ``context_length`` (when > 0) bounds the prompt: each call takes at most ``context_length`` tokens,
    while decoding with ``step`` (or a further ``prefill`` from the returned state) may continue past it,
    since the state has a fixed size. Raises ``TokenError`` (a ``ValueError``) as ``forward`` does: a
    longer prompt, a bad shape or dtype, or an id outside ``[0, vocab_size)``; ``ValueError`` for a
    ``state`` whose keys or shapes do not fit the config and batch size.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    check_params(check_config(config), params)
    tokens = _tokens(config, tokens, 2, "tokens", prompt=True)
    if state is not None:
        _check_state(config, state, tokens.shape[0])
    return _run(config, "prefill", params, tokens, _borders(document_borders, tokens.shape), state)


def step(config: ModelConfig, params: Params, token: Any, state: State) -> tuple[jax.Array, State]:
    """Decode one token per sequence (``token (B,)``) through ``mlstm_cell.step_backend``.

    Returns logits ``(B, vocab_size)`` and the new state. ``context_length`` does not limit ``step``.

    Raises ``TokenError`` (a ``ValueError``) for a token that is not a non-empty integer ``(B,)`` array, and
    for an id outside ``[0, vocab_size)`` when the token is host data (a list or NumPy array). A jax.Array
    token is not read back to check its values: that would make every decoding step wait for a
    device-to-host copy. An out-of-range id on the device gives NaN logits (an id in ``[-vocab_size, 0)``
    counts from the end of the vocabulary). A ``state`` whose keys or shapes do not fit the config and
    batch size is a ``ValueError``.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    check_params(check_config(config), params)
    token = _tokens(config, token, 1, "token", prompt=False)
    _check_state(config, state, token.shape[0])
    logits, state = _run(config, "step", params, token[:, None], None, state)
    return logits[:, 0], state


@functools.lru_cache(maxsize=32)
def _state_shapes(config_json: str, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    model = build(ModelConfig.model_validate_json(config_json))
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32), mode="prefill")[0][1])


def _check_state(config: ModelConfig, state: Any, batch_size: int) -> None:
    """``ValueError`` naming the first key or shape of ``state`` that does not fit ``config`` and the batch."""
    expected = _state_shapes(config.model_dump_json(), batch_size)
    if not isinstance(state, Mapping) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state must be a dict with keys {sorted(expected)} (from zoo.init_state, prefill or "
                         f"step), got {got}")
    for key, want in expected.items():
        if tuple(jnp.shape(state[key])) != want.shape:
            raise ValueError(f"state[{key!r}] has shape {tuple(jnp.shape(state[key]))}; this config with batch size "
                             f"{batch_size} needs {want.shape}")


def init_state(config: ModelConfig, batch_size: int) -> State:
    """An all-zero decoding state for ``batch_size`` sequences (what ``prefill`` starts from).

    Raises ``TypeError`` for a ``config`` that is not a ``ModelConfig`` or a ``batch_size`` that is not an
    integer, ``ValueError`` for ``batch_size < 1``."""
    shapes = _state_shapes(check_config(config).model_dump_json(), _check_int(batch_size, "batch_size", 1))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
