"""mLSTMsig: the mLSTM with a sigmoid input gate (TFLA paper, Beck et al. 2025).

With ``f = σ(f̃)`` and ``i = σ(ĩ)`` both in (0, 1)::

    C_t = f_t C_{t-1} + i_t k_t v_tᵀ        n_t = f_t n_{t-1} + i_t k_t
    h_t = C_tᵀ q̂_t / (max(|n_tᵀ q̂_t|, 1) + eps)          q̂ = q / √DQK

In parallel form ``log D = log F + log σ(ĩ)``. Every exponent is ≤ 0, so no max stabiliser is
needed. States follow the cell contract's ``(c, n, m)``: ``m`` is always returned as zeros, and
given states are read as stabilised ones (true ``C = exp(m)·c``), so a state handed over from a
stabilised cell means the same thing here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _initial(q, v, c_initial, n_initial, m_initial):
    B, NH, _, DQK = q.shape
    if c_initial is None:
        return jnp.zeros((B, NH, DQK, v.shape[-1]), jnp.float32), jnp.zeros((B, NH, DQK), jnp.float32)
    scale = jnp.exp(m_initial.astype(jnp.float32))
    return c_initial.astype(jnp.float32) * scale[..., None, None], n_initial.astype(jnp.float32) * scale[..., None]


def _gates(i, f):
    return jax.nn.log_sigmoid(i.astype(jnp.float32)), jax.nn.log_sigmoid(f.astype(jnp.float32))


def _normalise(num, den, eps):
    return num / (jnp.maximum(jnp.abs(den), 1.0) + eps)[..., None]


def _log_decay(log_f):
    """``log F[t, s] = Σ_{s<r≤t} log f_r`` on and below the diagonal, -inf above (shape ..., L, L)."""
    b = jnp.cumsum(log_f, axis=-1)
    L = log_f.shape[-1]
    causal = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    return jnp.where(causal, b[..., :, None] - b[..., None, :], -jnp.inf)


def parallel_sig(q, k, v, i, f, *, eps=1e-6):
    """Quadratic parallel form, the reference of the other two; no states."""
    log_i, log_f = _gates(i, f)
    qs = q.astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bhtd,bhsd->bhts", qs, k.astype(jnp.float32))
    weights = scores * jnp.exp(_log_decay(log_f) + log_i[..., None, :])
    num = jnp.einsum("bhts,bhsv->bhtv", weights, v.astype(jnp.float32))
    return _normalise(num, weights.sum(-1), eps).astype(v.dtype)


def recurrent_sig(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
                  eps=1e-6):
    """One step at a time; states in and out."""
    c0, n0 = _initial(q, v, c_initial, n_initial, m_initial)
    log_i, log_f = _gates(i, f)
    qs = q.astype(jnp.float32) / math.sqrt(q.shape[-1])

    def step(carry, xs):
        c, n = carry
        q_t, k_t, v_t, li, lf = xs
        fg, ig = jnp.exp(lf), jnp.exp(li)
        c = fg[..., None, None] * c + ig[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = fg[..., None] * n + ig[..., None] * k_t
        h = _normalise(jnp.einsum("bhd,bhdv->bhv", q_t, c), jnp.einsum("bhd,bhd->bh", q_t, n), eps)
        return (c, n), h

    time_first = [jnp.moveaxis(x, 2, 0) for x in (qs, k.astype(jnp.float32), v.astype(jnp.float32), log_i, log_f)]
    (c, n), h = jax.lax.scan(step, (c0, n0), time_first)
    h = jnp.moveaxis(h, 0, 2).astype(v.dtype)
    return (h, (c, n, jnp.zeros(c.shape[:2], jnp.float32))) if return_last_states else h


def chunkwise_sig(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
                  eps=1e-6, chunk_size=64):
    """Parallel inside chunks of ``chunk_size``, recurrent across them: linear in S, any S."""
    B, NH, S, DQK = q.shape
    c0, n0 = _initial(q, v, c_initial, n_initial, m_initial)
    log_i, log_f = _gates(i, f)
    L = chunk_size if not isinstance(S, int) else min(chunk_size, S)
    NC = (S + L - 1) // L
    pad = NC * L - S
    qs, ks, vs = q.astype(jnp.float32) / math.sqrt(DQK), k.astype(jnp.float32), v.astype(jnp.float32)
    if pad or not isinstance(S, int):  # padded steps: no input, no forgetting
        widths = ((0, 0), (0, 0), (0, pad))
        qs, ks, vs = (jnp.pad(x, (*widths, (0, 0))) for x in (qs, ks, vs))
        log_f = jnp.pad(log_f, widths)
        log_i = jnp.pad(log_i, widths, constant_values=-jnp.inf)
    qs, ks, vs = (x.reshape(B, NH, NC, L, -1) for x in (qs, ks, vs))
    log_f, log_i = log_f.reshape(B, NH, NC, L), log_i.reshape(B, NH, NC, L)
    b = jnp.cumsum(log_f, axis=-1)
    to_end = jnp.exp(b[..., -1:] - b + log_i)  # weight of step s in the state at the end of its chunk

    def carry_state(carry, xs):
        c, n = carry
        decay, w, k_c, v_c = xs
        c_next = decay[..., None, None] * c + jnp.einsum("bhl,bhld,bhlv->bhdv", w, k_c, v_c)
        n_next = decay[..., None] * n + jnp.einsum("bhl,bhld->bhd", w, k_c)
        return (c_next, n_next), (c, n)

    chunk_first = [jnp.moveaxis(x, 2, 0) for x in (jnp.exp(b[..., -1]), to_end, ks, vs)]
    (c_last, n_last), (c_prev, n_prev) = jax.lax.scan(carry_state, (c0, n0), chunk_first)
    c_prev, n_prev = jnp.moveaxis(c_prev, 0, 2), jnp.moveaxis(n_prev, 0, 2)

    weights = jnp.einsum("bhctd,bhcsd->bhcts", qs, ks) * jnp.exp(_log_decay(log_f) + log_i[..., None, :])
    q_decayed = qs * jnp.exp(b)[..., None]
    num = jnp.einsum("bhctd,bhcdv->bhctv", q_decayed, c_prev) + jnp.einsum("bhcts,bhcsv->bhctv", weights, vs)
    den = jnp.einsum("bhctd,bhcd->bhct", q_decayed, n_prev) + weights.sum(-1)
    h = _normalise(num, den, eps).reshape(B, NH, NC * L, -1)[:, :, :S].astype(v.dtype)
    return (h, (c_last, n_last, jnp.zeros(c_last.shape[:2], jnp.float32))) if return_last_states else h
