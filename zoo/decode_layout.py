"""The decode layout: the config and parameter view every decoding call of a model in memory runs on.

One decoding step reads every weight once, so at small batch its speed limit is memory bandwidth. On a
CPU two things of a config keep XLA far from that limit (docs/decoding.md has the measurements):

- low-precision compute: XLA:CPU has no fast bfloat16 or float16 matrix-vector product, even on CPUs
  with ``avx512_bf16`` (a 4096² matvec: 3.3 ms in float32, 22 ms with bfloat16 weights, 25 ms with
  float32 weights converted inside the step), so ``dtype: bfloat16`` decodes about 4× slower;
- stacked blocks (``scan_blocks: true``): the scanned stack copies each block's weights out of the
  stacked arrays at every step (static slices inside the step copy them as well).

On the CPU platform decoding therefore computes in float32 (``dtype``, ``lm_head_dtype`` and the cell's
``gate_dtype``; ``prefill_config``, for prefill and step), and the steps run the blocks unscanned, on a
per-block view of the parameters (``decode_layout``): each block's arrays alias the rows of the stacked
arrays (no copy, no extra memory). Parameters stored in bfloat16 or float16 are converted to float32 once
for the steps, which takes twice their bytes again; the view or copy is cached for as long as the original
arrays live. Other platforms, and parameters laid out on a mesh, decode with the config as it is;
``forward`` always does.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo import compiled, sharding
from zoo.config import ModelConfig

EMULATED_DTYPES = {"cpu": ("bfloat16", "float16")}
"""Compute dtypes each platform runs at a fraction of float32's speed in XLA (emulated or unfused converts)."""
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
"""Stored parameter dtypes the decode layout converts to float32 where their compute dtype is emulated."""

_CACHE: dict[tuple[Any, ...], tuple[list[weakref.ref], Any]] = {}
_LOCK = threading.Lock()


def platform_of(params: Any) -> str:
    """The platform (``cpu``, ``gpu``, ``tpu``) of the params' device: that of their first ``jax.Array`` leaf,
    else of JAX's default device."""
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            return next(iter(leaf.devices())).platform
    return jax.devices()[0].platform


def emulated(dtype: Any, platform: str) -> bool:
    """Whether ``platform`` computes ``dtype`` (a name or dtype) slower than float32 (``EMULATED_DTYPES``)."""
    return jnp.dtype(dtype).name in EMULATED_DTYPES.get(platform, ())


def decode_config(config: ModelConfig, platform: str = "cpu", unscanned: bool = True) -> ModelConfig:
    """``config`` as decoding runs it on ``platform``: every compute dtype ``platform`` emulates set to float32 and,
    on ``cpu`` with ``unscanned``, ``scan_blocks`` false. ``config`` itself when nothing changes. Cached per config,
    platform and ``unscanned``."""
    changed = compiled.per_config(_decode_config, config, platform, unscanned)
    return config if changed is None else changed


def _decode_config(config: ModelConfig, platform: str, unscanned: bool) -> ModelConfig | None:
    changes: dict[str, Any] = {}
    for field, value in (("dtype", config.dtype), ("lm_head_dtype", config.lm_head_dtype),
                         ("mlstm_block.mlstm.mlstm_cell.gate_dtype", config.cell.gate_dtype)):
        if emulated(value, platform):
            changes[field] = "float32"
    if unscanned and platform == "cpu" and config.scan_blocks:
        changes["scan_blocks"] = False
    return config.with_overrides(changes) if changes else None


def per_block(config: ModelConfig, params: Any, convert: bool = False) -> Any:
    """``params`` of a ``scan_blocks`` config as the unscanned config lays them out (``blocks_0`` ...
    ``blocks_{NB-1}`` instead of one ``blocks`` subtree with a leading axis), with every bfloat16 and float16
    leaf as float32 when ``convert``. On one CPU device each block's float32 array aliases its rows of the
    stacked array: nothing is copied. Elsewhere (and for converted leaves) the arrays are new."""
    device = _device_of(params)
    on_cpu = device.platform == "cpu"

    def one(leaf: Any) -> Any:
        return _put(_as_float32(leaf) if convert and _low(leaf) else leaf, device)

    def rows(leaf: Any) -> list[Any]:
        if convert and _low(leaf):
            host = np.asarray(leaf)  # bfloat16 has no DLPack code NumPy reads; converted row by row below
            return [jax.device_put(host[i].astype(np.float32), device) for i in range(host.shape[0])]
        if on_cpu:  # zero-copy views; through DLPack they hold the buffer, not the jax.Array (which may be freed)
            host = np.from_dlpack(leaf) if isinstance(leaf, jax.Array) and not _low(leaf) else np.asarray(leaf)
            return [jax.device_put(host[i], device) for i in range(host.shape[0])]
        return [leaf[i] for i in range(leaf.shape[0])]

    out = {name: jax.tree_util.tree_map(one, sub) for name, sub in params.items() if name != "blocks"}
    if config.scan_blocks and "blocks" in params:
        leaves, tree = jax.tree_util.tree_flatten(params["blocks"])
        split = [rows(leaf) for leaf in leaves]
        for i in range(config.num_blocks):
            out[f"blocks_{i}"] = jax.tree_util.tree_unflatten(tree, [r[i] for r in split])
    return out


def decode_layout(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """The config and params every decoding step of a model in memory runs on (see the module docstring).

    Returns ``(config, params)`` unchanged when the layout is the config's own (float32 compute and
    unscanned on CPU, any accelerator, params on a mesh). Otherwise the params of ``decode_config`` are built
    once and cached until any of ``params``' arrays is freed, so repeated ``generate`` or ``zoo.step`` calls on
    the same arrays reuse them. The decoding state has the same layout either way (``zoo.prefill``'s).
    """
    if sharding.mesh_of(params) is not None:
        return config, params
    platform = platform_of(params)
    target = decode_config(config, platform)
    leaves = jax.tree_util.tree_leaves(params)
    convert = platform == "cpu" and any(_low(x) for x in leaves)
    restack = config.scan_blocks and not target.scan_blocks
    if not (restack or convert):  # the same arrays: nothing to build or cache
        return target, params
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside a caller's own jit: nothing to view or cache
        return decode_config(config, platform, unscanned=False), params
    key = (compiled.config_json(config), platform, tuple(map(id, leaves)))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and all(ref() is leaf for ref, leaf in zip(hit[0], leaves)):
            return target, hit[1]
    if restack:
        view = per_block(config, params, convert)
    else:
        device = _device_of(params)
        view = jax.tree_util.tree_map(lambda x: _put(_as_float32(x) if _low(x) else x, device), params)
    try:
        # the view holds no reference to a stacked or converted leaf, so the user's freeing of one drops the entry
        refs = [weakref.ref(leaf, functools.partial(_forget, key, _CACHE, _LOCK)) for leaf in leaves]
    except TypeError:  # a leaf that takes no weak reference (a Python scalar): not cached
        return target, view
    with _LOCK:
        _CACHE[key] = (refs, view)
    return target, view


@jax.jit
def per_block_state(state: Any) -> list[Any]:
    """A stacked decoding state (leaves ``(NB, B, ...)``, as ``zoo.prefill`` returns it) as one state per block
    (a list of ``NB`` dicts of ``(B, ...)`` arrays, new buffers), the form the decoding steps of an unscanned
    layout take and return. Each block's state then lives in buffers of its own, so a step that donates it
    updates it in place; a stacked state makes XLA:CPU allocate (and page-fault in) a new one at every step."""
    count = jax.tree_util.tree_leaves(state)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a: a[i], state) for i in range(count)]


def state_batch_axis(state: Any) -> int:
    """The batch axis of ``state``'s leaves: 0 for a per-block state (``per_block_state``), 1 for a stacked one."""
    return 0 if isinstance(state, (list, tuple)) else 1


def prefill_config(config: ModelConfig, params: Any) -> ModelConfig:
    """The config a decoding prefill of ``params`` runs: ``decode_config``'s compute dtypes with the config's own
    block layout and parameters (a prompt amortises the weight reads over its tokens). ``config`` itself on a
    mesh or where nothing changes."""
    if sharding.mesh_of(params) is not None:
        return config
    return decode_config(config, platform_of(params), unscanned=False)


def cached_layouts() -> int:
    """How many decode layouts are cached now (each lives as long as the arrays it was built from)."""
    with _LOCK:
        return len(_CACHE)


def decode_extra_bytes(layout: dict[str, tuple[tuple[int, ...], str]], platform: str = "cpu") -> int:
    """Bytes the decode layout adds on ``platform`` to params of ``layout`` (``path -> (shape, dtype name)``, as
    ``zoo.checkpoint.tree_layout`` gives): a float32 copy of every bfloat16/float16 array on CPU, else 0."""
    if platform != "cpu":
        return 0
    return sum(4 * int(np.prod(shape)) for shape, dtype in layout.values() if jnp.dtype(dtype) in LOW_PRECISION)


def _forget(key: tuple[Any, ...], cache: dict, lock: threading.Lock, _: Any = None) -> None:
    with lock:
        cache.pop(key, None)


def _low(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.dtype(leaf.dtype) in LOW_PRECISION


def _as_float32(leaf: Any) -> np.ndarray:
    return np.asarray(leaf).astype(np.float32)


def _device_of(params: Any) -> jax.Device:
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array) and leaf.committed:
            return next(iter(leaf.devices()))
    return jax.devices()[0]


def _put(leaf: Any, device: jax.Device) -> Any:
    """``leaf`` on ``device`` (a NumPy array is placed without a copy on CPU: JAX aliases aligned host memory)."""
    if isinstance(leaf, jax.Array):
        return leaf
    return jax.device_put(leaf, device)
