"""Parameter factories: initializers looked up by plugin name, logical axis names, gate-bias inits, norms.

Every layer plugin (built-in or third-party) builds its parameters with these, so that the init
and norm plugins named in the config are honoured and ``zoo.sharding`` can place the parameters by
their logical axis names (``embed``, ``inner``, ``heads``, ``mlp``, ``vocab``, ``proj_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.registry import resolve

Initializer = Callable[..., jax.Array]
"""A JAX initializer: ``init(key, shape, dtype=float32) -> jax.Array``."""


def initializer(fn: str, distribution: str, dim: int, num_blocks: int = 1) -> Initializer:
    """The JAX initializer of init function ``fn`` drawing from ``distribution``.

    ``dim`` is the width the init scales with (usually ``embedding_dim``) and ``num_blocks`` the
    number of residual blocks (``wang`` scales by it). Unknown names raise ``UnknownPluginError``.
    """
    return resolve("init", fn)(dim, num_blocks, resolve("distribution", distribution))


def partitioned(init: Initializer, *names: str | None) -> Initializer:
    """``init`` with logical axis names for its parameter, one per axis (``None``: never split).

    A thin wrapper of ``nn.with_logical_partitioning``; ``zoo.sharding`` maps the names onto a mesh.
    """
    return nn.with_logical_partitioning(init, names)


def linspace_init(start: float, end: float) -> Initializer:
    """1-D init with ``linspace(start, end, n)`` (both ends included; n=1 gives [start])."""

    def init(key, shape, dtype=jnp.float32):
        (n,) = shape
        return jnp.linspace(start, end, n, dtype=dtype) if n > 1 else jnp.full(shape, start, dtype)

    return init


def gate_bias_init(spec: tuple[float, float] | float | None) -> Initializer:
    """Gate-bias init from a config value: tuple → linspace, float → constant, None → N(0, 0.1²)."""
    if spec is None:
        return jax.nn.initializers.normal(0.1)
    if isinstance(spec, tuple | list):
        return linspace_init(*spec)
    return jax.nn.initializers.constant(spec)


def make_norm(norm_type: str, eps: float, dtype: Any, scale_ndim: int = 1, *, name: str,
              parent: nn.Module | None = None) -> nn.Module:
    """An instance of the norm plugin ``norm_type`` (``scale_ndim=2`` for a per-head scale on ``(..., NH, DH)``).

    Called inside a compact method the norm becomes a child of the module being built; ``parent``
    names another parent explicitly.
    """
    kwargs = {} if parent is None else {"parent": parent}
    return resolve("norm", norm_type)(eps=eps, dtype=dtype, scale_ndim=scale_ndim, name=name, **kwargs)
