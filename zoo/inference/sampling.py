"""Choosing the next token from logits: greedy (temperature 0) or temperature sampling among the top k."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zoo.checks import check_seed


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    """Next tokens ``(B,)`` int32 from float logits ``(B, V)``: argmax at ``temperature`` 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (``top_k`` 0: all of them).

    ``temperature`` is a traced scalar (changing it does not recompile); ``top_k`` is static."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, seed: int) -> None:
    """``ValueError`` naming the first argument of ``generate`` that is out of range."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 samples among all tokens), got {top_k}")
    check_seed(seed)
