"""Built-in norms: ``layernorm`` and ``rmsnorm``, single or multi-head (per-head scale)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.registry import hookimpl


class _Norm(nn.Module):
    """Normalise over the last axis with a learned scale over the trailing ``scale_ndim`` axes.

    ``scale_ndim=1`` is a plain norm; ``scale_ndim=2`` on ``(..., NH, DH)`` is the multi-head
    norm: statistics per head, scale ``(NH, DH)``. Statistics run in at least float32 and the
    result is cast to ``dtype``.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    scale_ndim: int = 1
    # subclasses define ``_normalize(x)``, the scale-free normalisation

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, x.shape[x.ndim - self.scale_ndim:], jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return (self._normalize(xf) * scale).astype(self.dtype)


class LayerNorm(_Norm):
    """LayerNorm without bias: ``(x - mean) / sqrt(var + eps) * scale``, var = E[x²] - mean² ≥ 0."""

    def _normalize(self, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        var = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
        return (x - mean) * jax.lax.rsqrt(var + self.eps)


class RMSNorm(_Norm):
    """RMSNorm: ``x / sqrt(mean(x²) + eps) * scale``."""

    def _normalize(self, x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)


@hookimpl
def register_norms(register):
    register("layernorm", LayerNorm, description="LayerNorm, scale only (flax fast variance)")
    register("rmsnorm", RMSNorm, description="RMSNorm, scale only")
