"""The ``chunkwise`` cell: exact chunkwise-parallel mLSTM, linear in S, states in and out (pure JAX).

Inside a chunk of ``chunk_size`` steps the output is computed in parallel; between chunks only
the (C, n, m) state is carried, so memory and time grow linearly in S. A sequence that is not a
multiple of the chunk size is padded inside with steps that leave the state unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field

from zoo.plugins.cells.common import initial_states, log_forget_matrix
from zoo.registry import hookimpl


class ChunkwiseKwargs(BaseModel):
    """Options of ``chunkwise``."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(64, ge=1, description="steps per chunk (any sequence length works)")


def _chunk_states(c0, n0, m0, g, a, k, v):
    """States before each chunk (and after the last) from the inter-chunk recurrence."""

    def body(carry, xs):
        c, n, m = carry
        g_k, a_k, k_k, v_k = xs
        m_new = jnp.maximum(g_k + m, a_k.max(-1))
        decay = jnp.exp(g_k + m - m_new)
        w = jnp.exp(a_k - m_new[..., None])
        c_new = decay[..., None, None] * c + jnp.einsum("bhl,bhld,bhlv->bhdv", w, k_k, v_k)
        n_new = decay[..., None] * n + jnp.einsum("bhl,bhld->bhd", w, k_k)
        return (c_new, n_new, m_new), (c, n, m)

    chunk_first = [jnp.moveaxis(x, 2, 0) for x in (g, a, k, v)]
    final, before = jax.lax.scan(body, (c0, n0, m0), chunk_first)
    return final, [jnp.moveaxis(x, 0, 2) for x in before]


def chunkwise(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
              eps=1e-6, chunk_size=64):
    """mLSTM in chunks of ``chunk_size``: O(S·chunk_size) time, O(S) memory, states in and out."""
    B, NH, S, DQK = q.shape
    DV, out_dtype = v.shape[-1], v.dtype
    c0, n0, m0 = initial_states(q, v, c_initial, n_initial, m_initial)
    symbolic = not isinstance(S, int)  # under jax.export with a symbolic sequence length
    L = chunk_size if symbolic else min(chunk_size, S)
    NC = (S + L - 1) // L
    pad = NC * L - S
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    log_f = jax.nn.log_sigmoid(f.astype(jnp.float32))
    log_i = i.astype(jnp.float32)
    if symbolic or pad:  # padded steps: no input (i = -inf) and no forgetting (log f = 0), so the state passes through
        widths = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*widths, (0, 0))) for x in (q, k, v))
        log_f = jnp.pad(log_f, widths)
        log_i = jnp.pad(log_i, widths, constant_values=-jnp.inf)
    q, k, v = (x.reshape(B, NH, NC, L, -1) for x in (q, k, v))
    log_f, log_i = log_f.reshape(B, NH, NC, L), log_i.reshape(B, NH, NC, L)

    b = jnp.cumsum(log_f, axis=-1)
    g = b[..., -1]
    (c_last, n_last, m_last), (c_prev, n_prev, m_prev) = _chunk_states(
        c0, n0, m0, g, g[..., None] - b + log_i, k, v)

    scale = 1.0 / math.sqrt(DQK)
    log_D = log_forget_matrix(log_f) + log_i[..., None, :]
    m_t = jnp.maximum(b + m_prev[..., None], log_D.max(-1))
    weights = jnp.einsum("bhctd,bhcsd->bhcts", q, k) * scale * jnp.exp(log_D - m_t[..., None])
    q_bar = q * (scale * jnp.exp(b + m_prev[..., None] - m_t))[..., None]
    num = jnp.einsum("bhctd,bhcdv->bhctv", q_bar, c_prev) + jnp.einsum("bhcts,bhcsv->bhctv", weights, v)
    den = jnp.einsum("bhctd,bhcd->bhct", q_bar, n_prev) + weights.sum(-1)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t))[..., None] + eps)
    h = h.reshape(B, NH, NC * L, DV)[:, :, :S].astype(out_dtype)
    return (h, (c_last, n_last, m_last)) if return_last_states else h


@hookimpl
def register_cells(register):
    register(
        "chunkwise",
        chunkwise,
        supports_state=True,
        exportable=True,
        platforms=("cpu", "cuda", "tpu"),
        sequence_constraint=None,
        kwargs_model=ChunkwiseKwargs,
        description="exact chunkwise form, linear in S, any S; states in and out",
    )
