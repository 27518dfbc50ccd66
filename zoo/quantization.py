"""Quantise a float model's parameters (``zoo quantize``), and dequantise them back for reference.

``quantize(config, params, "int8")`` returns the config with ``quantization`` set and the parameter tree that
config builds: each weight the quantizer selects (``zoo.model.quantized_weights``) replaced by what its
``quantize`` stores, every other parameter as it was. Stacked weights (``scan_blocks``: a leading block axis)
are quantised block by block. The result is an ordinary checkpoint's ``(config, params)``: ``zoo.save``,
``zoo.forward``, ``zoo.generate``, the exporters and the server take it as they take a float model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import ValidationError

from zoo import registry
from zoo.checks import check_params
from zoo.config import ModelConfig, check_config
from zoo.errors import ZooError
from zoo.model import Params, param_shapes, quantized_weights
from zoo.nn.quant import STORED_PARAMS, make_quantizer


class QuantizationError(ZooError, ValueError):
    """A model that cannot be quantised as asked: already quantised, an unknown method or option, a layout in
    which the method finds nothing to quantise, or a weight that is not finite."""


def quantized_config(config: ModelConfig, method: str = "int8", kwargs: dict[str, Any] | None = None) -> ModelConfig:
    """``config`` with ``quantization = {method, kwargs}``; ``QuantizationError`` (one line) for a config that is
    already quantised, an unknown ``method``, a bad option, or a model in which the method selects no weight
    (computed abstractly: no array is touched)."""
    check_config(config)
    if config.quantization is not None:
        raise QuantizationError(f"the model is already quantised (quantization.method="
                                f"{config.quantization.method!r}); quantise its float original instead")
    try:
        registry.entry("quantizer", method)
    except registry.UnknownPluginError as exc:
        raise QuantizationError(f"--method: {exc}") from None
    try:
        target = ModelConfig.model_validate({**config.model_dump(mode="json"),
                                             "quantization": {"method": method, "kwargs": dict(kwargs or {})}})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise QuantizationError(f"quantizer {method!r}: {problems}") from None
    try:
        selected = quantized_weights(target)
    except ZooError as exc:  # a weight the quantizer cannot store with these options, named by it
        raise QuantizationError(f"quantizer {method!r}: {exc}") from None
    if not selected:
        raise QuantizationError(f"quantizer {method!r} selects no weight of this model (layer_type "
                                f"{config.layer.layer_type!r}, options {target.quantization.kwargs}): nothing to "
                                f"quantise; it quantises nn.Dense kernels and nn.Embed tables")
    return target


def _by_path(tree: Any) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(items: dict[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _per_block(fn: Any, ndim: int) -> Any:
    """``fn`` of a 2-D weight mapped over the leading axes of an ``ndim``-D one (the stacked blocks), jitted."""
    for _ in range(ndim - 2):
        fn = jax.vmap(fn)
    return jax.jit(fn)


def quantize(config: ModelConfig, params: Params, method: str = "int8",
             kwargs: dict[str, Any] | None = None) -> tuple[ModelConfig, Params]:
    """``(quantised config, quantised params)`` of the float model ``(config, params)``.

    Raises ``QuantizationError`` for a config that is already quantised, an unknown method or option, a model in
    which the method selects no weight (naming the layer type) and a weight holding NaN or infinity (naming
    it); ``TypeError``/``ValueError`` for ``params`` that do not fit ``config`` (``zoo.checks.check_params``).
    """
    target = quantized_config(config, method, kwargs)
    check_params(config, params)
    weights = quantized_weights(target)
    quantizer = make_quantizer(method, target.quantization.kwargs)
    items = _by_path(params)
    for path in weights:
        weight = jnp.asarray(items.pop(path), jnp.float32)
        if not bool(jnp.isfinite(weight).all()):
            raise QuantizationError(f"params{jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path))} "
                                    f"holds NaN or infinity; {method} cannot quantise it")
        if STORED_PARAMS[path[-1]]:
            weight = jnp.swapaxes(weight, -1, -2)
        for name, value in _per_block(quantizer.quantize, weight.ndim)(weight).items():
            items[(*path, name)] = value
    quantized = _nested(items)
    check_params(target, quantized)
    return target, quantized


def dequantize(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """``(float config, float32 params)`` that compute what the quantised ``(config, params)`` computes, up to
    float rounding: every quantised weight replaced by its quantizer's ``dequantize``. A float model is returned
    as it is."""
    check_config(config)
    if config.quantization is None:
        return config, params
    check_params(config, params)
    quantizer = make_quantizer(config.quantization.method, config.quantization.kwargs)
    plain = config.model_copy(update={"quantization": None})
    shapes = _by_path(param_shapes(plain))
    items = _by_path(params)
    for path in quantized_weights(config):
        stored = {key[-1]: items.pop(key) for key in [k for k in items if k[:len(path)] == path]}
        weight = _per_block(quantizer.dequantize, len(shapes[path].shape))(stored)
        items[path] = jnp.swapaxes(weight, -1, -2) if STORED_PARAMS[path[-1]] else weight
    return plain, _nested(items)


def stored_bytes(params: Params) -> int:
    """Bytes of every array of ``params`` (what a checkpoint stores, before compression)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))
