"""The one cache of what the zoo derives from a config: jitted functions and abstract shapes.

Everything is keyed on the config's JSON (``ModelConfig.model_dump_json``, which two equal configs
share) and on hashable static arguments, so a function is traced and compiled once per config, static
arguments and input shapes, and two equal configs share it. Callers that need several entries for one
call may pass the JSON itself instead of the config, to serialise it once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable
from typing import Any

import jax

from zoo.config import ModelConfig

CACHE_SIZE = 64
"""Entries kept (least recently used dropped): about 8 per config in use."""


def config_json(config: ModelConfig | str) -> str:
    """The cache key of ``config``: its JSON (a string is taken to be that JSON already)."""
    return config if isinstance(config, str) else config.model_dump_json()


def per_config(make: Callable[..., Any], config: ModelConfig | str, *static: Hashable) -> Any:
    """``make(config, *static)``, computed once per ``make``, config and ``static`` (the value is shared: do not
    mutate it)."""
    return _cached(make, config_json(config), static)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached(make: Callable[..., Any], key: str, static: tuple[Hashable, ...]) -> Any:
    return make(ModelConfig.model_validate_json(key), *static)


def compiled(make: Callable[..., Callable], config: ModelConfig | str, mesh: Any, *static: Hashable) -> "Committed":
    """The jitted function ``make(config, mesh, *static)`` returns, built once per config, mesh and ``static``.

    ``mesh`` is the ``jax.sharding.Mesh`` the call runs on, or None on one device. On one device, the
    returned function first commits every array argument that is not yet committed to a device (NumPy
    arrays, ``jnp`` arrays, the outputs of an uncommitted call) to the device the committed ones live on
    (default: the first device): ``jax.jit`` keys its compilations on committedness, so otherwise params
    from ``zoo.init_params`` and from ``zoo.load`` would compile every entry twice.
    """
    return per_config(_committed, config, mesh, make, *static)


def _committed(config: ModelConfig, mesh: Any, make: Callable[..., Callable], *static: Hashable) -> "Committed":
    return Committed(make(config, mesh, *static), mesh is None)


class Committed:
    """A jitted function whose array arguments are committed to one device first (see ``compiled``)."""

    def __init__(self, fn: Callable, commit: bool):
        self.fn, self.commit = fn, commit

    def __call__(self, *args: Any) -> Any:
        return self.fn(*(commit(args) if self.commit else args))

    def lower(self, *args: Any) -> jax.stages.Lowered:
        """The lowered call (``jax.jit(...).lower``) on committed arguments."""
        return self.fn.lower(*(commit(args) if self.commit else args))


def commit(tree: Any) -> Any:
    """``tree`` with every array leaf committed to one device: the device of its committed jax.Array leaves
    (they must share one), else the first device. Committed leaves and non-array leaves are returned as they
    are; a tree holding tracers (a call inside the caller's own ``jax.jit``) is returned unchanged."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")]
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return tree
    if all(isinstance(x, jax.Array) and x.committed for x in leaves):
        return tree
    device = next((next(iter(x.devices())) for x in leaves if isinstance(x, jax.Array) and x.committed),
                  jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda x: x if not hasattr(x, "dtype") or (isinstance(x, jax.Array) and x.committed)
        else jax.device_put(x, device), tree)


CACHE_ENV = "ZOO_COMPILATION_CACHE"
"""A folder for JAX's persistent compilation cache, or ``0``/``off`` to turn it off (the CLI reads it)."""


def enable_persistent_cache() -> str | None:
    """Turn on JAX's persistent compilation cache, so a later process reuses this one's compiled functions.

    The folder is ``$ZOO_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/xlstm-zoo/jax`` (default
    ``~/.cache/xlstm-zoo/jax``); ``ZOO_COMPILATION_CACHE=0`` (or ``off``) turns it off, and a folder already set
    through JAX's own ``JAX_COMPILATION_CACHE_DIR`` is left as it is. Every compile is cached, however short.
    Returns the folder in use, or None. The CLI calls this at start; the library does not.
    """
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in {"0", "off", "false", "no"}:
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = setting or os.path.join(base, "xlstm-zoo", "jax")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
