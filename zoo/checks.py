"""Host-side checks of what the public functions are given: token ids, seeds, params and decoding states.

Each check raises before anything is dispatched to a device, with one line naming the argument, the
first offending path or index, and what was expected.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo import compiled
from zoo.config import ModelConfig
from zoo.errors import ZooError
from zoo.model import decode_state_shapes, param_shapes


def check_int(value: Any, name: str, low: int, high: int | None = None, high_text: str = "") -> int:
    """``value`` when it is an integer (not a bool) in ``[low, high)``; ``TypeError`` or ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high_text or high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_seed(seed: int) -> int:
    """``seed`` when it is an integer with ``0 <= seed < 2**32``, else ``TypeError``/``ValueError``:
    ``jax.random.PRNGKey`` folds other seeds onto these (``2**32`` gives the key of 0) or overflows."""
    return check_int(seed, "seed", 0, 2**32, "2**32")


Layout = dict[str, tuple[tuple[int, ...], Any]]


def _expected_params(config: ModelConfig) -> tuple[Any, tuple[tuple[tuple[int, ...], Any], ...], Layout]:
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    layout = {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype)
              for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    return treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves), layout


@functools.cache
def _floating(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _fits(dtype: Any, expected: Any) -> bool:
    """Any float dtype where the config has a float parameter; exactly ``expected`` otherwise (a quantizer's int8)."""
    return _floating(dtype) if _floating(expected) else jnp.dtype(dtype) == jnp.dtype(expected)


def check_params(config: ModelConfig | str, params: Any) -> None:
    """``TypeError``/``ValueError`` naming the first path of ``params`` that is missing, not a parameter of
    ``config``, of another shape, or of another dtype; nothing when ``params`` fits (any float dtype for a float
    parameter, the config's own dtype, such as int8, for the arrays of a quantised weight).

    Compares tree structure and shapes with the config's abstract tree (cached per config), so it is cheap
    enough for every ``step`` call."""
    treedef, expected, layout = compiled.per_config(_expected_params, config)
    leaves, got = jax.tree_util.tree_flatten(params)
    if got == treedef and all(getattr(leaf, "shape", None) == shape and _fits(leaf.dtype, dtype)
                              for leaf, (shape, dtype) in zip(leaves, expected)):
        return
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be the dict of arrays from zoo.init_params or zoo.load, "
                        f"got {type(params).__name__}")
    found = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, (shape, dtype) in layout.items():
        if path not in found:
            raise ValueError(f"params{path} is missing: this config needs it with shape {shape} (were the params "
                             f"made for another config?)")
        leaf = found[path]
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"params{path} must be an array, got {type(leaf).__name__}")
        if tuple(leaf.shape) != shape:
            raise ValueError(f"params{path} has shape {tuple(leaf.shape)}; this config needs {shape}")
        if not _fits(leaf.dtype, dtype):
            raise ValueError(f"params{path} has dtype {leaf.dtype}; " + (
                "parameters must be float arrays" if _floating(dtype) else
                f"this config stores it as {dtype} (a weight its quantization stores quantised)"))
    extra = next((path for path in found if path not in layout), None)
    if extra is not None:
        raise ValueError(f"params{extra} is not a parameter of this config (were the params made for another "
                         f"config?)")


class TokenError(ZooError, ValueError):
    """Token ids the model cannot take: wrong shape or dtype, outside the vocabulary, or a prompt longer
    than ``context_length``. Raised on the host, before anything is dispatched to a device."""


def check_tokens(config: ModelConfig, tokens: Any, ndim: int, what: str, *, prompt: bool) -> jax.Array:
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


def check_lengths(lengths: Any, shape: tuple[int, int]) -> jax.Array | None:
    """``lengths`` of a ragged batch of tokens of ``shape (B, S)`` as an int32 ``(B,)`` array, or None.

    ``TokenError`` naming ``lengths`` unless they are integers of shape ``(B,)`` with ``1 <= lengths[b] <= S``
    (values are checked whenever they can be read: not for tracers)."""
    if lengths is None:
        return None
    if not isinstance(lengths, jax.Array):
        try:
            lengths = np.asarray(lengths)
        except ValueError as exc:
            raise TokenError(f"lengths must be a (B,) array of integers ({exc})") from None
    batch, length = shape
    if lengths.shape != (batch,):
        raise TokenError(f"lengths must have shape ({batch},), one length per row of tokens, got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TokenError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if not isinstance(lengths, jax.core.Tracer) and getattr(lengths, "is_fully_addressable", True):
        values = np.asarray(jax.device_get(lengths))
        bad = np.flatnonzero((values < 1) | (values > length))
        if bad.size:
            raise TokenError(f"lengths[{bad[0]}] is {int(values[bad[0]])}; each length must be in [1, {length}]: the "
                             f"number of real tokens at the start of its row (tokens has {length} columns)")
    return jnp.asarray(lengths, jnp.int32)


def check_borders(document_borders: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """``document_borders`` as a bool array of ``shape`` (the tokens' shape), or None; ``ValueError`` otherwise."""
    if document_borders is None:
        return None
    document_borders = jnp.asarray(document_borders, bool)
    if document_borders.shape != shape:
        raise ValueError(f"document_borders shape {document_borders.shape} != tokens shape {shape}")
    return document_borders


def check_state(config: ModelConfig | str, state: Any, batch_size: int) -> None:
    """``ValueError`` naming the first key or shape of ``state`` that does not fit ``config`` and the batch."""
    expected = decode_state_shapes(config, batch_size)
    if not isinstance(state, Mapping) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state must be a dict with keys {sorted(expected)} (from zoo.init_decode_state, prefill or "
                         f"step), got {got}")
    for key, want in expected.items():
        if tuple(jnp.shape(state[key])) != want.shape:
            raise ValueError(f"state[{key!r}] has shape {tuple(jnp.shape(state[key]))}; this config with batch size "
                             f"{batch_size} needs {want.shape}")


