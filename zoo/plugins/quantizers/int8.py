"""The ``int8`` quantizer: weight-only int8 with symmetric group-wise (default) or per-output-channel scales.

Each selected weight ``W (K, N)`` is stored as ``values`` int8 ``(K, N)`` and ``scale`` float32 ``(K/G, N)``:
groups of ``G = group_size`` consecutive input rows (default 32) share one scale per output channel,
``scale[g, n] = max_{k in group g} |W[k, n]| / 127`` (1 for an all-zero group), and ``values = round(W /
scale)`` (to nearest, ties to even, within ±127), so ``|W - values·scale| <= scale / 2`` elementwise. A weight
whose ``K`` is not a multiple of ``G`` is refused by name (``Int8Error``; every preset's dimensions are
multiples of 32); ``group_size: null`` stores one scale per output channel instead, ``scale (N,)`` with
``scale[n] = max_k |W[k, n]| / 127``. The model computes with ``x @ values · scale``, each group's partial sums
in float32 before its scale; activations stay in the model's dtype.

Why groups of 32 by default: on the training demo model, per-channel scales keep the held-out perplexity within
0.05% of float32 but agree with float32's top-1 next token at 98.92% of 7,763 held-out positions; groups of 128
and 64 change little (98.92%, 98.93%), groups of 32 reach 99.18% (``benchmarks/quantization.py``). They cost
one float32 scale per 32 weights: 1.125 bytes per weight instead of 1.

By default it quantises every ``nn.Dense`` kernel (the q/k/v/o and up/down projections of the layers and
the FFN) and the LM head; not the norms, the gate projections and biases (``GateProjection``), the
convolution, the headwise q/k/v blocks of ``mlstm`` (``LinearHeadwiseExpand``, small) or the embedding
table (``embedding: true`` quantises it too, with scales per token and group of ``G`` dimensions).
"""

from __future__ import annotations

from fnmatch import fnmatch

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field

from zoo import kernels
from zoo.errors import ZooError
from zoo.nn.quant import Quantizer, Stored
from zoo.registry import hookimpl

LEVELS = 127
"""The largest stored magnitude: symmetric int8 uses -127..127 (never -128)."""


class Int8Error(ZooError, ValueError):
    """A weight ``int8`` cannot store with the asked options (its ``K`` not a multiple of ``group_size``)."""


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """``(x @ q) * scale``: ``x (..., K)`` float, ``q (K, N)`` int8, ``scale (N,)`` or ``(K/G, N)`` float32 ->
    ``(..., N)`` in
    ``x.dtype``, accumulated and scaled in float32: ``zoo.kernels.int8_matmul`` (a native CPU kernel for
    decode-sized float32 and bfloat16 inputs), the pure-JAX path for float16."""
    if x.dtype in (jnp.float32, jnp.bfloat16):
        return kernels.int8_matmul(x, q, scale)
    return kernels.pure_int8_matmul(x, q, scale)


class Int8Kwargs(BaseModel):
    """Options of ``int8`` (``quantization.kwargs``; ``zoo quantize --option KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lm_head: bool = True
    """Quantise the LM head (``lm_head``), the largest projection of small models."""
    embedding: bool = False
    """Also quantise the token-embedding table, scales per token (a tied head then reads it too)."""
    group_size: int | None = Field(32, gt=0)
    """Rows of ``W (K, N)`` sharing one scale per output channel (``scale (K/G, N)``); null: one scale per
    output channel over all ``K`` rows (``scale (N,)``). Each selected weight's ``K`` must be a multiple."""
    exclude: list[str] = ["*igate*", "*fgate*"]
    """``fnmatch`` patterns of module paths left in float (``blocks_*/ffn/*``); gate projections by default."""


class Int8(Quantizer):
    """Weight-only int8 with group-wise or per-output-channel scales; see the module docstring."""

    def __init__(self, **kwargs: object) -> None:
        self.options = Int8Kwargs.model_validate(kwargs)

    def select(self, path: str, shape: tuple[int, int]) -> bool:
        """Every Dense kernel and the head unless excluded; the embedding table only when asked. Raises
        ``Int8Error`` for a selected weight whose ``K`` is not a multiple of ``group_size``."""
        if any(fnmatch(path, pattern) for pattern in self.options.exclude):
            return False
        chosen = {"token_embedding": self.options.embedding, "lm_head": self.options.lm_head}.get(path, True)
        group = self.options.group_size
        if chosen and group is not None and shape[0] % group:
            raise Int8Error(f"quantization.kwargs.group_size: {path} has {shape[0]} input rows (K), not a multiple "
                            f"of group_size={group}; choose a divisor of {shape[0]}, null (per-channel), or exclude it")
        return chosen

    def quantize(self, weight: jax.Array) -> Stored:
        """``W (K, N)`` -> ``{"values": int8 (K, N), "scale": float32 (K/G, N)}`` (``(N,)`` per-channel)."""
        w = weight.astype(jnp.float32)
        K, N = w.shape
        group = self.options.group_size
        grouped = w.reshape(K // group, group, N) if group is not None else w[None]
        amax = jnp.max(jnp.abs(grouped), axis=1)
        scale = jnp.where(amax > 0, amax / LEVELS, 1.0).astype(jnp.float32)
        values = jnp.clip(jnp.round(grouped / scale[:, None, :]), -LEVELS, LEVELS).astype(jnp.int8)
        return {"values": values.reshape(K, N), "scale": scale if group is not None else scale[0]}

    def dequantize(self, stored: Stored) -> jax.Array:
        """``values · scale`` as float32 ``(K, N)``, each group of rows times its row of scales."""
        values, scale = stored["values"].astype(jnp.float32), stored["scale"]
        if scale.ndim == 1:
            return values * scale
        K, N = values.shape
        return (values.reshape(scale.shape[0], -1, N) * scale[:, None, :]).reshape(K, N)

    def axes(self, names: tuple[str | None, str | None]) -> dict[str, tuple[str | None, ...]]:
        """``values`` keeps both names, ``scale`` the output one (its group axis is not sharded)."""
        if self.options.group_size is None:
            return {"values": tuple(names), "scale": (names[1],)}
        return {"values": tuple(names), "scale": (None, names[1])}

    def matmul(self, x: jax.Array, stored: Stored) -> jax.Array:
        """``x (..., K) -> (..., N)`` in ``x.dtype`` through :func:`int8_matmul`."""
        return int8_matmul(x, stored["values"], stored["scale"])

    def columns(self, stored: Stored, ids: jax.Array) -> jax.Array:
        """The table rows of ``ids``, ``(*ids.shape, K)`` float32, reading only those columns."""
        values = jnp.moveaxis(jnp.take(stored["values"], ids, axis=1), 0, -1)
        scale = stored["scale"]
        if scale.ndim == 1:
            return values.astype(jnp.float32) * jnp.take(scale, ids)[..., None]
        scale = jnp.moveaxis(jnp.take(scale, ids, axis=1), 0, -1)  # (*ids.shape, K/G)
        return values.astype(jnp.float32) * jnp.repeat(scale, values.shape[-1] // scale.shape[-1], axis=-1)


@hookimpl
def register_quantizers(register):
    register("int8", Int8, kwargs_model=Int8Kwargs,
             description="weight-only int8, symmetric scales per output channel and group of 32 input rows "
                         "(group_size); Dense kernels and the LM head")
