"""Parts of mLSTM layers: the layer preamble, headwise projections, the causal conv, gate projections.

A layer plugin (registered through ``register_layers``) is a flax module with fields ``config``
(a ``LayerConfig``) and ``num_blocks`` (the number of residual blocks, which scales the output
init), called as ``layer(x, document_borders=None, deterministic=True, mode="forward", state=None)``
on ``x (B, S, D)`` and returning ``(y (B, S, D), state)``; for a ragged batch also with ``lengths (B,)``
int32, to pass on to ``run_cell`` and any ``CausalConv1d`` (see the layer hook in ``zoo.registry.kinds``).
Inside its compact ``__call__`` it starts with :func:`preamble` and ends with
:meth:`LayerPreamble.project_down`::

    p = preamble(self.config, x)                       # sizes, dtype, the column-parallel dense
    h = p.dense(width, name="proj_up")(x)              # (B, S, width), kernel axes ("embed", "inner")
    ...                                                # the cell: zoo.nn.cell.run_cell
    return p.project_down(h, self.num_blocks, deterministic), state
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import LayerConfig
from zoo.nn.factories import Initializer, initializer, partitioned


def is_integer(x: float) -> bool:
    """True when ``x`` is an integer up to float round-off."""
    return abs(x - round(x)) < 1e-9


@dataclass(frozen=True)
class LayerPreamble:
    """What every layer derives first from its config and its input ``x (B, S, D)``.

    ``dense`` is ``nn.Dense`` with the layer's bias and compute dtype, float32 parameters and the
    ``small`` init of ``cfg.init_distribution`` over D, its kernel named ``("embed", "inner")``
    (column-parallel); call it as ``dense(features, name=...)`` and override ``kernel_init`` as needed.
    """

    config: LayerConfig
    B: int
    S: int
    D: int
    NH: int
    dtype: jnp.dtype
    small_init: Initializer
    dense: Callable[..., nn.Dense]

    def project_down(self, y: jax.Array, num_blocks: int, deterministic: bool) -> jax.Array:
        """``y (B, S, F) -> (B, S, D)``: the row-parallel ``proj_down`` (kernel ``("inner", "embed")``, init
        ``cfg.output_init_fn`` scaled for ``num_blocks`` residual blocks), then dropout ``cfg.dropout``.

        Call it inside the layer's compact ``__call__``: it adds the ``proj_down`` parameters to the layer.
        """
        cfg = self.config
        out_init = initializer(cfg.output_init_fn, cfg.init_distribution, self.D, num_blocks)
        y = self.dense(self.D, kernel_init=partitioned(out_init, "inner", "embed"), name="proj_down")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


def preamble(cfg: LayerConfig, x: jax.Array) -> LayerPreamble:
    """The :class:`LayerPreamble` of a layer configured by ``cfg`` on ``x (B, S, D)``; creates no parameters."""
    B, S, D = x.shape
    dtype = jnp.dtype(cfg.dtype)
    small = initializer("small", cfg.init_distribution, D)
    dense = partial(nn.Dense, use_bias=cfg.bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(small, "embed", "inner"))
    return LayerPreamble(cfg, B, S, D, cfg.num_heads, dtype, small, dense)


class LinearHeadwiseExpand(nn.Module):
    """Block-diagonal projection: ``num_proj_blocks`` groups of ``b`` inputs, group h mapped by its own ``W[h]``.

    ``x (..., num_proj_blocks·b) -> (..., num_proj_blocks·out_per_block)``; kernel
    ``(num_proj_blocks, out_per_block, b)`` with logical axes ``("proj_blocks", None, None)``.
    """

    num_proj_blocks: int
    out_per_block: int
    use_bias: bool
    kernel_init: Initializer
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[-1] // self.num_proj_blocks
        kernel = self.param("kernel", partitioned(self.kernel_init, "proj_blocks", None, None),
                            (self.num_proj_blocks, self.out_per_block, b), jnp.float32)
        xs = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_proj_blocks, b)
        y = jnp.einsum("...hi,hoi->...ho", xs, kernel.astype(self.dtype))
        y = y.reshape(*x.shape[:-1], self.num_proj_blocks * self.out_per_block)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (y.shape[-1],), jnp.float32).astype(self.dtype)
        return y


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: ``y[t,c] = bias[c] + Σ_j W[j,0,c]·x[t-K+1+j, c]``.

    ``x (B, S, C) -> (y (B, S, C), state (B, K-1, C))``. The state holds the last K-1 inputs
    (float32) and stands in for the left padding, zeros when not given; kernel ``(K, 1, C)`` and
    bias ``(C,)``, both U(±1/√K). With ``lengths (B,)`` int32 (a right-padded ragged batch) the state of
    row b holds the K-1 inputs before position ``lengths[b]`` instead (the given state where the row is
    shorter than K-1); ``y`` is causal, so padding never reaches the outputs of real positions.
    """

    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, state: jax.Array | None = None,
                 lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        K, C = self.kernel_size, x.shape[-1]
        bound = 1.0 / math.sqrt(K)
        init = nn.initializers.uniform(2 * bound)

        def shifted(key, shape, dtype=jnp.float32):
            return init(key, shape, dtype) - bound

        kernel = self.param("kernel", partitioned(shifted, None, None, "inner"), (K, 1, C), jnp.float32)
        bias = self.param("bias", partitioned(shifted, "inner"), (C,), jnp.float32)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        if state is None:
            state = jnp.zeros((x.shape[0], K - 1, C), jnp.float32)
        xp = jnp.concatenate([state.astype(self.dtype), x.astype(self.dtype)], axis=1)
        S = x.shape[1]
        y = bias + sum(kernel[j, 0] * xp[:, j:j + S] for j in range(K))
        if lengths is None:
            return y, xp[:, xp.shape[1] - (K - 1):].astype(jnp.float32)
        last = lengths[:, None] + jnp.arange(K - 1)  # x[lengths-K+1 : lengths] is xp[lengths : lengths+K-1]
        return y, jnp.take_along_axis(xp, last[..., None], axis=1).astype(jnp.float32)


class GateProjection(nn.Module):
    """Gate pre-activations ``(B, S, NH)`` from one or more inputs; kernel zeros, bias from ``bias_init``.

    Dense: the inputs are concatenated, kernel ``(F, NH)``. Headwise: every input is split into NH
    slices, regrouped per head as ``[x1_h | x2_h | ...]``, and head h sees only its slice; kernel
    ``(NH, 1, F/NH)``.
    """

    num_heads: int
    headwise: bool
    bias_init: Initializer
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
        xs = [x.astype(self.dtype) for x in inputs]
        bias = self.param("bias", self.bias_init, (self.num_heads,), jnp.float32)
        if self.headwise:
            x = jnp.concatenate([x.reshape(*x.shape[:-1], self.num_heads, -1) for x in xs], axis=-1)
            kernel = self.param("kernel", nn.initializers.zeros, (self.num_heads, 1, x.shape[-1]), jnp.float32)
            y = jnp.einsum("...hi,hoi->...ho", x, kernel.astype(self.dtype))[..., 0]
        else:
            x = jnp.concatenate(xs, axis=-1)
            kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.num_heads), jnp.float32)
            y = x @ kernel.astype(self.dtype)
        return y + bias.astype(self.dtype)
