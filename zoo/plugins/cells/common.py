"""Helpers shared by the built-in cell backends (not a plugin itself)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

States = tuple[jax.Array, jax.Array, jax.Array]


def log_forget_matrix(log_f: jax.Array) -> jax.Array:
    """``logF[t, s] = Σ_{s<r≤t} log_f[r]`` for s ≤ t and -inf above the diagonal; shape (..., S, S).

    Summing the masked gates directly (rather than differencing two cumulative sums) avoids
    cancellation on long sequences.
    """
    S = log_f.shape[-1]
    idx = jnp.arange(S)
    after_s = idx[None, :] > idx[:, None]  # [s, r]: r > s
    sums = jnp.cumsum(jnp.where(after_s, log_f[..., None, :], 0.0), axis=-1)  # [s, t]
    log_F = jnp.swapaxes(sums, -1, -2)  # [t, s]
    return jnp.where(idx[:, None] >= idx[None, :], log_F, -jnp.inf)


def initial_states(q: jax.Array, v: jax.Array, c_initial, n_initial, m_initial) -> States:
    """The given initial states in float32, or zeros; all three or none must be given."""
    given = [s is not None for s in (c_initial, n_initial, m_initial)]
    if any(given) and not all(given):
        raise ValueError("pass all of c_initial, n_initial and m_initial, or none of them")
    B, NH, _, DQK = q.shape
    DV = v.shape[-1]
    if not any(given):
        return (jnp.zeros((B, NH, DQK, DV), jnp.float32), jnp.zeros((B, NH, DQK), jnp.float32),
                jnp.zeros((B, NH), jnp.float32))
    expected = {"c_initial": (B, NH, DQK, DV), "n_initial": (B, NH, DQK), "m_initial": (B, NH)}
    for (name, shape), state in zip(expected.items(), (c_initial, n_initial, m_initial)):
        if tuple(state.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(state.shape)}, expected {shape}")
    return (c_initial.astype(jnp.float32), n_initial.astype(jnp.float32), m_initial.astype(jnp.float32))
