"""Building blocks shared by the built-in layer plugins: headwise projections, causal conv, gates, cell call."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import CellConfig
from zoo.errors import ZooError
from zoo.parts import Initializer, partitioned
from zoo.registry import resolve


def is_integer(x: float) -> bool:
    """True when ``x`` is an integer up to float round-off."""
    return abs(x - round(x)) < 1e-9


class LinearHeadwiseExpand(nn.Module):
    """Block-diagonal projection: ``num_blocks`` groups of ``b`` inputs, group h mapped by its own ``W[h]``.

    ``x (..., num_blocks·b) -> (..., num_blocks·out_per_block)``; kernel ``(num_blocks, out_per_block, b)``.
    """

    num_blocks: int
    out_per_block: int
    use_bias: bool
    kernel_init: Initializer
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[-1] // self.num_blocks
        kernel = self.param("kernel", partitioned(self.kernel_init, "proj_blocks", None, None),
                            (self.num_blocks, self.out_per_block, b), jnp.float32)
        xs = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_blocks, b)
        y = jnp.einsum("...hi,hoi->...ho", xs, kernel.astype(self.dtype))
        y = y.reshape(*x.shape[:-1], self.num_blocks * self.out_per_block)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (y.shape[-1],), jnp.float32).astype(self.dtype)
        return y


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time: ``y[t,c] = bias[c] + Σ_j W[j,0,c]·x[t-K+1+j, c]``.

    ``x (B, S, C) -> (y (B, S, C), state (B, K-1, C))``. The state holds the last K-1 inputs
    (float32) and stands in for the left padding, zeros when not given; kernel ``(K, 1, C)`` and
    bias ``(C,)``, both U(±1/√K).
    """

    kernel_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
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
        return y, xp[:, xp.shape[1] - (K - 1):].astype(jnp.float32)


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



def run_cell(cell: CellConfig, q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array,
             document_borders: jax.Array | None, mode: str = "forward",
             state: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Soft-cap the gates, apply the document reset, and run the backend configured for ``mode``.

    ``q, k (B, S, NH, DQK)``, ``v (B, S, NH, DV)``, ``i, f (B, S, NH)`` -> ``h (B, S, NH, DV)`` and,
    except in ``forward`` mode, the new ``{"c", "n", "m"}`` state (zeros when ``state`` is None).
    """
    if cell.gate_soft_cap is not None:
        cap = cell.gate_soft_cap
        i, f = cap * jnp.tanh(i / cap), cap * jnp.tanh(f / cap)
    if cell.reset_at_document_boundaries and document_borders is not None:
        f = jnp.where(document_borders[..., None], jnp.asarray(cell.reset_fgate_value, f.dtype), f)
    backend = {"forward": cell.backend, "prefill": cell.prefill_backend, "step": cell.step_backend}[mode]
    fn = resolve("cell", backend.name)
    q, k, v, i, f = (jnp.swapaxes(a, 1, 2) for a in (q, k, v, i, f))  # to the cell's heads-first layout
    B, NH, S, DQK = q.shape
    expected = {"h": (B, NH, S, v.shape[-1]), "c": (B, NH, DQK, v.shape[-1]), "n": (B, NH, DQK), "m": (B, NH)}
    initial = {} if state is None else {"c_initial": state["c"], "n_initial": state["n"], "m_initial": state["m"]}
    try:
        if mode == "forward":
            out = {"h": fn(q, k, v, i, f, **backend.kwargs)}
        else:
            h, (c, n, m) = fn(q, k, v, i, f, return_last_states=True, **initial, **backend.kwargs)
            out = {"h": h, "c": c, "n": n, "m": m}
    except Exception as exc:
        raise CellError(f"cell backend {backend.name!r} from {_origin(backend.name)} failed in {mode}: "
                        f"{type(exc).__name__}: {exc}") from exc
    if CHECK_CELL_SHAPES:  # shapes are static, so this costs tracing time only, never run time
        wrong = {name: tuple(x.shape) for name, x in out.items() if tuple(x.shape) != expected[name]}
        if wrong:
            raise CellError(f"cell backend {backend.name!r} from {_origin(backend.name)} returned wrong shapes in "
                            f"{mode}: " + ", ".join(f"{name} {shape}, expected {expected[name]}"
                                                    for name, shape in wrong.items())
                            + " (the cell contract is in zoo.plugins.cells; ZOO_CHECK_CELL_SHAPES=0 skips this check)")
    h = jnp.swapaxes(out.pop("h"), 1, 2)
    return h, (out or None)


class CellError(ZooError, RuntimeError):
    """A cell backend plugin raised, or broke the cell contract (wrong output shapes); names the plugin."""


CHECK_CELL_SHAPES = os.environ.get("ZOO_CHECK_CELL_SHAPES", "1").strip().lower() not in {"0", "false", "no"}
"""Check every cell output's shape against the contract (``ZOO_CHECK_CELL_SHAPES=0`` turns it off)."""


def _origin(name: str) -> str:
    from zoo.registry import entry

    return entry("cell", name).origin
