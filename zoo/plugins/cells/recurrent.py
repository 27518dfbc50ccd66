"""The ``recurrent`` cell: the stabilised step recurrence under ``lax.scan``; S=1 is one decoding step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field

from zoo.nn.cell import States, initial_states
from zoo.registry import hookimpl


class RecurrentKwargs(BaseModel):
    """Options of ``recurrent``."""

    model_config = ConfigDict(extra="forbid")

    unroll: int = Field(1, ge=1, description="steps unrolled per scan iteration (speed only)")


def recurrent_step(state: States, q, k, v, i, f, eps: float = 1e-6) -> tuple[jax.Array, States]:
    """One step: ``q, k (B, NH, DQK)``, ``v (B, NH, DV)``, ``i, f (B, NH)`` -> ``h (B, NH, DV)``, new state."""
    c, n, m = state
    log_f = jax.nn.log_sigmoid(f)
    m_new = jnp.maximum(log_f + m, i)
    decay = jnp.exp(log_f + m - m_new)
    inp = jnp.exp(i - m_new)
    c = decay[..., None, None] * c + inp[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = decay[..., None] * n + inp[..., None] * k
    q = q / math.sqrt(q.shape[-1])
    num = jnp.einsum("bhd,bhdv->bhv", q, c)
    den = jnp.abs(jnp.einsum("bhd,bhd->bh", q, n))
    h = num / (jnp.maximum(den, jnp.exp(-m_new))[..., None] + eps)
    return h, (c, n, m_new)


def recurrent(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
              eps=1e-6, unroll=1):
    """mLSTM step by step over the sequence: O(S) time, states in and out."""
    state = initial_states(q, v, c_initial, n_initial, m_initial)
    seq_first = [jnp.moveaxis(x.astype(jnp.float32), 2, 0) for x in (q, k, v, i, f)]

    def body(carry, xs):
        h, carry = recurrent_step(carry, *xs, eps=eps)
        return carry, h

    final, hs = jax.lax.scan(body, state, seq_first, unroll=unroll)
    h = jnp.moveaxis(hs, 0, 2).astype(v.dtype)
    return (h, final) if return_last_states else h


@hookimpl
def register_cells(register):
    register(
        "recurrent",
        recurrent,
        supports_state=True,
        exportable=True,
        platforms=("cpu", "cuda", "tpu"),
        sequence_constraint=None,
        kwargs_model=RecurrentKwargs,
        description="step recurrence under lax.scan; states in and out; the decoding path",
    )
