"""``rmsnorm_offset``: RMSNorm with a learned scale and a learned offset (bias), per head when multi-head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class OffsetRMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * scale + offset``, statistics over the last axis.

    Follows the zoo norm contract: built as ``cls(eps=..., dtype=..., scale_ndim=...)``; with
    ``scale_ndim=2`` on ``(..., NH, DH)`` each head has its own statistics, scale and offset.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    scale_ndim: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[x.ndim - self.scale_ndim:]
        scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
        offset = self.param("offset", nn.initializers.zeros, shape, jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        normed = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + self.eps)
        return (normed * scale + offset).astype(self.dtype)
