"""Weight quantisation inside the model: the quantizer contract and the interception that applies it.

With ``config.quantization`` set, ``LMModel`` runs inside :func:`quantized`, which intercepts every
``nn.Dense`` and ``nn.Embed`` of the model (built-in layers and third-party ones alike). A weight the
quantizer selects is created, stored and read in the quantizer's form: a dict of arrays in the weight's
place (int8's ``{"values": int8 (K, N), "scale": float32 (K/G, N)}``), so ``build``, ``init_params``, the
abstract shapes, checkpoints, exports and sharding all see the quantised tree and need no special case.

Every weight is offered as ``W (K, N)`` of ``y = x @ W``: a Dense kernel as it is, an embedding table
``(V, D)`` as its transpose ``(D, V)`` (its rows are then the columns of ``W``, and a per-output-channel
scale is a per-token scale). Weights are named by their module path below the model: ``blocks_0/xlstm/proj_up``,
``blocks/ffn/proj_down`` (scanned blocks), ``lm_head``, ``token_embedding``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.registry import resolve

Stored = dict[str, jax.Array]
"""A quantised weight as a checkpoint holds it: the arrays a quantizer's ``quantize`` returns."""
STORED_PARAMS = {"kernel": False, "embedding": True}
"""The param names whose value a quantizer replaces (``nn.Dense`` kernels, ``nn.Embed`` tables), and whether the
quantizer sees the transpose (a table ``(V, D)`` is offered as ``W (D, V)``)."""


class Quantizer:
    """The contract of a ``quantizer`` plugin, with default ``matmul`` and ``columns``; subclassing is optional.

    Built as ``cls(**kwargs)`` from ``quantization.kwargs``. Shapes: ``W (K, N)`` float32; ``x (..., K)``.
    """

    def select(self, path: str, shape: tuple[int, int]) -> bool:
        """Whether the weight at module ``path`` (e.g. ``blocks_0/xlstm/proj_up``), of shape ``(K, N)``, is
        stored quantised. Called while tracing: it must depend only on its arguments."""
        raise NotImplementedError

    def quantize(self, weight: jax.Array) -> Stored:
        """``W (K, N)`` float32 -> the dict of arrays stored in its place (traced with ``jax.eval_shape``, so
        written with ``jax.numpy``)."""
        raise NotImplementedError

    def dequantize(self, stored: Stored) -> jax.Array:
        """The stored dict -> ``W (K, N)`` float32, the weight the quantised model computes with."""
        raise NotImplementedError

    def axes(self, names: tuple[str | None, str | None]) -> dict[str, tuple[str | None, ...]]:
        """The logical axis names of each stored array, from ``W``'s two names (``("embed", "inner")``); each
        tuple has one name (or None) per axis of its array. ``zoo.sharding`` places the arrays by them."""
        raise NotImplementedError

    def matmul(self, x: jax.Array, stored: Stored) -> jax.Array:
        """``x (..., K) @ W -> (..., N)`` in ``x.dtype``; the default dequantises first."""
        return x @ self.dequantize(stored).astype(x.dtype)

    def columns(self, stored: Stored, ids: jax.Array) -> jax.Array:
        """``W[:, ids]`` moved to ``(*ids.shape, K)`` float32: the embedding rows of token ``ids``; the default
        dequantises the whole table first."""
        return jnp.take(self.dequantize(stored).T, ids, axis=0)


def make_quantizer(method: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The quantizer registered as ``method``, built with ``kwargs`` (``UnknownPluginError`` for another name)."""
    return resolve("quantizer", method)(**(kwargs or {}))


def _matmul(quantizer: Any, x: jax.Array, stored: Stored) -> jax.Array:
    matmul = getattr(quantizer, "matmul", None)
    return matmul(x, stored) if matmul is not None else Quantizer.matmul(quantizer, x, stored)


def _columns(quantizer: Any, stored: Stored, ids: jax.Array) -> jax.Array:
    columns = getattr(quantizer, "columns", None)
    return columns(stored, ids) if columns is not None else Quantizer.columns(quantizer, stored, ids)


def stored_init(quantizer: Any, init: Any, transposed: bool) -> Any:
    """The initializer of a quantised weight: ``init``'s float weight (transposed for a table), quantised, each
    stored array boxed with the logical names ``quantizer.axes`` gives when ``init`` names its axes."""

    def stored(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        boxed = init(key, shape, dtype)
        weight = nn.unbox(boxed).astype(jnp.float32)
        leaves = quantizer.quantize(weight.T if transposed else weight)
        if not isinstance(boxed, nn.Partitioned):
            return leaves
        names = tuple(boxed.names)[::-1] if transposed else tuple(boxed.names)
        axes = quantizer.axes(names)
        return {k: dataclasses.replace(boxed, value=v, names=tuple(axes[k])) for k, v in leaves.items()}

    return stored


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def _dense(quantizer: Any, module: nn.Dense, x: jax.Array) -> jax.Array | None:
    """``nn.Dense.__call__`` with the kernel in the quantizer's form; None when the quantizer leaves it float."""
    shape = (x.shape[-1], module.features)
    if not quantizer.select(_path(module), shape):
        return None
    stored = module.param("kernel", stored_init(quantizer, module.kernel_init, False), shape, module.param_dtype)
    dtype = module.dtype or jnp.promote_types(x.dtype, module.param_dtype)
    y = _matmul(quantizer, jnp.asarray(x, dtype), stored)
    if module.use_bias:
        y = y + module.param("bias", module.bias_init, (module.features,), module.param_dtype).astype(dtype)
    return y


def _embed_setup(quantizer: Any, module: nn.Embed) -> bool:
    """``nn.Embed.setup`` with the table in the quantizer's form; False when the quantizer leaves it float."""
    shape = (module.features, module.num_embeddings)
    if not quantizer.select(_path(module), shape):
        return False
    stored = module.param("embedding", stored_init(quantizer, module.embedding_init, True),
                          shape[::-1], module.param_dtype)
    module.quantized_table = stored
    module.embedding = quantizer.dequantize(stored).T  # for code that reads the table itself (a tied head)
    return True


def _interceptor(quantizer: Any):
    def intercept(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module, method = context.module, context.method_name
        if type(module) is nn.Dense and method == "__call__":
            y = _dense(quantizer, module, args[0] if args else kwargs["inputs"])
            return next_fun(*args, **kwargs) if y is None else y
        if type(module) is nn.Embed:
            if method == "setup":
                return None if _embed_setup(quantizer, module) else next_fun(*args, **kwargs)
            stored = getattr(module, "quantized_table", None)
            if stored is not None and method == "__call__":
                (ids,) = args
                rows = _columns(quantizer, stored, jnp.asarray(ids))
                return rows.astype(module.dtype or module.param_dtype)
            if stored is not None and method == "attend":
                (query,) = args
                dtype = module.dtype or jnp.promote_types(query.dtype, module.param_dtype)
                return _matmul(quantizer, jnp.asarray(query, dtype), stored)
        return next_fun(*args, **kwargs)

    return intercept


@contextlib.contextmanager
def quantized(quantization: Any) -> Iterator[None]:
    """Inside the block, every ``nn.Dense`` kernel and ``nn.Embed`` table that the quantizer of ``quantization``
    (a ``QuantizationConfig``; None: a no-op) selects is created, stored and used in its quantised form."""
    if quantization is None:
        yield
        return
    with nn.intercept_methods(_interceptor(make_quantizer(quantization.method, quantization.kwargs))):
        yield
