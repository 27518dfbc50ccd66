"""The ``chunkwise`` cell: exact chunkwise-parallel mLSTM, linear in S, states in and out (pure JAX).

Inside a chunk of ``chunk_size`` steps the output is computed in parallel; between chunks only
the (C, n, m) state is carried, so memory and time grow linearly in S. A sequence that is not a
multiple of the chunk size is padded inside with steps that leave the state unchanged.

Layout: one ``lax.scan`` over chunks whose body does all the work of a chunk (gate math, the
intra-chunk L x L part, the inter-chunk state part and the state update) as matmuls batched over
(B, NH). It reads its chunk of q, k, v and the gates in place and writes h in place, so neither
chunk-first copies of the inputs nor per-chunk temporaries of the whole sequence are materialised.
The backward is a custom VJP with hand-derived gradients: the forward keeps its inputs, h and the
state entering each chunk; a reverse scan recomputes each chunk's gates and q·kᵀ (not its outputs)
and writes the input gradients in place. It matches JAX's autodiff of the forward to float rounding,
including the gradients through the max stabilisers.

Precision: gates, cumulative sums, maxima and exponentials are float32; the states are float32.
With bfloat16 (or float16) q, k, v the matmul operands stay in that dtype and accumulate in
float32 ("bf16 compute, f32 state").
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field

from zoo.nn.cell import States, initial_states
from zoo.registry import hookimpl


class ChunkwiseKwargs(BaseModel):
    """Options of ``chunkwise``."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        64, description="steps per chunk (any sequence length works), or 'auto' to pick one per shape")


def choose_chunk_size(seq_len: int, dqk: int, dv: int, platform: str = "cpu") -> int:
    """The chunk size ``auto`` uses for a sequence of ``seq_len`` with head sizes ``dqk``, ``dv``.

    Per token, the intra-chunk part costs ~L·(DQK+DV) FLOPs and the inter-chunk part ~4·DQK·DV
    plus one (DQK, DV) state per chunk of memory traffic. On CPU the largest power of two
    ≤ DQK·DV / (DQK+DV), clipped to [64, 256], balances the two (measured best at the xLSTM-7B head
    shape: 128). GPUs and TPUs run the intra-chunk matmuls faster relative to the sequential scan,
    so they take twice that (max 256; 256 beat 128 by 1.45x at the 7B shape on an H200). Short
    sequences use a single chunk.
    """
    balance = dqk * dv // (dqk + dv)
    L = 64
    while L * 2 <= min(balance, 256):
        L *= 2
    if platform != "cpu":
        L = min(2 * L, 256)
    return max(1, min(L, seq_len))


def _matmul(spec: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)


def _max_weight(x: jax.Array, y: jax.Array) -> jax.Array:
    """The share of ``d max(x, y)`` that goes to ``x``: 1, 0, or 0.5 at a tie (as JAX differentiates ``maximum``)."""
    return jnp.where(x > y, 1.0, jnp.where(x == y, 0.5, 0.0))


def _argmax_share(x: jax.Array, x_max: jax.Array) -> jax.Array:
    """``d max(x, axis=-1)`` as weights over the last axis, split evenly between ties (as JAX does)."""
    hit = (x == x_max[..., None]).astype(jnp.float32)
    return hit / hit.sum(-1, keepdims=True)


def _chunk_gates(log_i: jax.Array, log_f: jax.Array, m: jax.Array) -> dict[str, jax.Array]:
    """The log-space gate terms of one chunk: ``log_i, log_f (B,NH,L)`` and the entering stabiliser ``m (B,NH)``.

    ``b`` is the chunk-local cumulative sum of ``log_f`` (at most L terms, so ``b_t − b_s`` loses at most
    ~L ulp of ``|b|``), ``g`` its total; ``log_D[t,s] = b_t − b_s + log_i_s`` for s ≤ t, −inf above.
    """
    L = log_f.shape[-1]
    b = jnp.cumsum(log_f, axis=-1)
    g = b[..., -1]
    a = g[..., None] - b + log_i
    a_max = a.max(-1)
    m_out = jnp.maximum(g + m, a_max)
    idx = jnp.arange(L)
    log_D = jnp.where(idx[:, None] >= idx[None, :], b[..., :, None] - b[..., None, :] + log_i[..., None, :], -jnp.inf)
    row_max = log_D.max(-1)
    m_t = jnp.maximum(b + m[..., None], row_max)
    return {"b": b, "g": g, "a": a, "a_max": a_max, "m_out": m_out, "log_D": log_D, "row_max": row_max,
            "D": jnp.exp(log_D - m_t[..., None]), "alpha": jnp.exp(b + m[..., None] - m_t),
            "beta": jnp.exp(a - m_out[..., None]), "decay": jnp.exp(g + m - m_out), "floor": jnp.exp(-m_t)}


def _slice(x: jax.Array, idx, L: int) -> jax.Array:
    """Chunk ``idx`` of a (B, NH, NC·L, ...) array, read in place (no chunk-first copy)."""
    return jax.lax.dynamic_slice_in_dim(x, idx * L, L, axis=2)


def _put(buf: jax.Array, x: jax.Array, idx, L: int) -> jax.Array:
    """``buf`` with chunk ``idx`` replaced by ``x``, written in place."""
    return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), idx * L, axis=2)


def _after(x: jax.Array, *reads: jax.Array) -> jax.Array:
    """``x`` (B, NH), made to depend on ``reads`` (each (B, NH, ...), finite): a state update scaled by it is then
    ordered after those reads of the state, so XLA updates the loop-carried buffer in place instead of copying it
    at every chunk. Adds ``0·read``, which is exactly 0."""
    for r in reads:
        x = x + 0.0 * r.reshape(*r.shape[:2], -1)[..., 0]
    return x


def _forward(state: States, inputs, L: int, scale: float, eps: float, dtype, keep_states: bool):
    """All chunks in one ``lax.scan``: h written in place; with ``keep_states`` also the state entering each chunk
    (c as ``(NC, B, NH, DQK, DV)``, n and m likewise)."""
    q, k, v, log_i, log_f = inputs
    B, NH, SP, _ = q.shape
    NC = SP // L
    h0 = jnp.zeros((B, NH, SP, v.shape[-1]), jnp.float32)
    c_all = jnp.zeros((NC, *state[0].shape), jnp.float32) if keep_states else None

    def body(carry, idx):
        c, n, m, h, c_all = carry
        qk, kk, vk, li, lf = (_slice(x, idx, L) for x in inputs)
        gates = _chunk_gates(li, lf, m)
        weights = _matmul("bhtd,bhsd->bhts", qk, kk, dtype) * (gates["D"] * scale)
        q_bar = qk.astype(jnp.float32) * (gates["alpha"] * scale)[..., None]
        num = _matmul("bhtd,bhdv->bhtv", q_bar, c, dtype) + _matmul("bhts,bhsv->bhtv", weights, vk, dtype)
        den = jnp.einsum("bhtd,bhd->bht", q_bar, n) + weights.sum(-1)
        h_k = num / (jnp.maximum(jnp.abs(den), gates["floor"]) + eps)[..., None]
        k_w = kk.astype(jnp.float32) * gates["beta"][..., None]
        reads = (num,)
        if keep_states:
            c_all = jax.lax.dynamic_update_index_in_dim(c_all, c, idx, 0)
            reads += (jax.lax.dynamic_index_in_dim(c_all, idx, 0, keepdims=False),)
        decay = _after(gates["decay"], *reads)
        c_new = decay[..., None, None] * c + _matmul("bhld,bhlv->bhdv", k_w, vk, dtype)
        n_new = decay[..., None] * n + k_w.sum(-2)
        return (c_new, n_new, gates["m_out"], _put(h, h_k, idx, L), c_all), ((n, m) if keep_states else None)

    (c, n, m, h, c_all), entering = jax.lax.scan(body, (*state, h0, c_all), jnp.arange(NC))
    return h, (c, n, m), ((c_all, *entering) if keep_states else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _chunked(state: States, inputs, L: int, scale: float, eps: float, dtype):
    h, final, _ = _forward(state, inputs, L, scale, eps, dtype, keep_states=False)
    return h, final


def _chunked_fwd(state, inputs, L, scale, eps, dtype):
    h, final, entering = _forward(state, inputs, L, scale, eps, dtype, keep_states=True)
    return (h, final), (inputs, h, entering)


def _chunked_bwd(L, scale, eps, dtype, residuals, cotangents):
    """Reverse scan: per chunk, the hand-derived gradients of ``_forward``'s body (docs/numerics.md §4.4).

    Gradients of the stabilisers m (the per-step m_t and the chunk states' m) are kept exactly as JAX would
    differentiate the forward: they matter only through eps and the floor exp(−m_t) of the normaliser.
    """
    inputs, h, entering = residuals
    q, k, v, log_i, log_f = inputs
    dh, (dc_final, dn_final, dm_final) = cotangents
    f32 = jnp.float32

    def body(carry, x):
        dc, dn, dm_out, grads = carry
        idx, c, n, m = x
        qk, kk, vk, li, lf, hk, dhk = (_slice(a, idx, L) for a in (*inputs, h, dh))
        gates = _chunk_gates(li, lf, m)
        D, alpha, beta, decay, floor = (gates[name] for name in ("D", "alpha", "beta", "decay", "floor"))
        weights = _matmul("bhtd,bhsd->bhts", qk, kk, dtype) * (D * scale)
        q_bar = qk.astype(f32) * (alpha * scale)[..., None]
        k_w = kk.astype(f32) * beta[..., None]
        den_raw = jnp.einsum("bhtd,bhd->bht", q_bar, n) + weights.sum(-1)
        den = jnp.maximum(jnp.abs(den_raw), floor) + eps
        dhk = dhk.astype(f32)
        dnum = dhk / den[..., None]
        dden = -jnp.sum(dhk * hk.astype(f32), -1) / den
        on_raw = _max_weight(jnp.abs(den_raw), floor)
        dden_raw = dden * on_raw * jnp.sign(den_raw)
        dweights = _matmul("bhtv,bhsv->bhts", dnum, vk, dtype) + dden_raw[..., None]
        dscores = dweights * D * scale  # w.r.t. q·kᵀ
        dlog_D = dweights * weights
        dq_bar = _matmul("bhtv,bhdv->bhtd", dnum, c, dtype) + dden_raw[..., None] * n[..., None, :]
        dk_w = _matmul("bhlv,bhdv->bhld", vk, dc, dtype) + dn[..., None, :]
        dq = _matmul("bhts,bhsd->bhtd", dscores, kk, dtype) + dq_bar * (alpha * scale)[..., None]
        dk = _matmul("bhts,bhtd->bhsd", dscores, qk, dtype) + dk_w * beta[..., None]
        dv = _matmul("bhts,bhtv->bhsv", weights, dnum, dtype) + _matmul("bhld,bhdv->bhlv", k_w, dc, dtype)
        ddecay = jnp.sum(dc * c, (-2, -1)) + jnp.sum(dn * n, -1)
        dc_in = (_after(decay, dk_w, dv, ddecay)[..., None, None] * dc
                 + _matmul("bhtd,bhtv->bhdv", q_bar, dnum, dtype))
        dn_in = decay[..., None] * dn + jnp.einsum("bhtd,bht->bhd", q_bar, dden_raw)
        # log-space gate terms; m_t = max(b_t + m, row_max_t), m_out = max(g + m, max_s a_s)
        dlog_alpha = jnp.sum(q_bar * dq_bar, -1)
        dlog_beta = jnp.sum(k_w * dk_w, -1)
        dlog_decay = decay * ddecay
        dm_t = -dlog_D.sum(-1) - dlog_alpha - floor * dden * (1.0 - on_raw)
        to_m = _max_weight(gates["b"] + m[..., None], gates["row_max"])
        dlog_D = dlog_D + _argmax_share(gates["log_D"], gates["row_max"]) * (dm_t * (1.0 - to_m))[..., None]
        dm_out = dm_out - dlog_beta.sum(-1) - dlog_decay
        to_g = _max_weight(gates["g"] + m, gates["a_max"])
        da = dlog_beta + _argmax_share(gates["a"], gates["a_max"]) * (dm_out * (1.0 - to_g))[..., None]
        dm_in = dlog_alpha.sum(-1) + dlog_decay + jnp.sum(dm_t * to_m, -1) + dm_out * to_g
        dg = dlog_decay + dm_out * to_g + da.sum(-1)
        db = dlog_alpha + dm_t * to_m + dlog_D.sum(-1) - dlog_D.sum(-2) - da
        db = db.at[..., -1].add(dg)
        dlog_f = jnp.flip(jnp.cumsum(jnp.flip(db, -1), -1), -1)  # b = cumsum(log_f)
        dlog_i = dlog_D.sum(-2) + da
        grads = tuple(_put(buf, d, idx, L) if buf.ndim == d.ndim  # else buf is chunked: (B, NH, NC, L, ...)
                      else jax.lax.dynamic_update_index_in_dim(buf, d.astype(buf.dtype), idx, 2)
                      for buf, d in zip(grads, (dq, dk, dv, dlog_i, dlog_f)))
        return (dc_in, dn_in, dm_in, grads), None

    # zero buffers of distinct shapes (dq's, dv's and log_i's chunked): XLA would merge equal zero buffers (h's
    # among them) and then copy them apart; the chunked ones are reshaped back for free
    B, NH, SP = log_f.shape
    NC = SP // L
    grads0 = (jnp.zeros((B, NH, NC, L, q.shape[-1]), q.dtype), jnp.zeros_like(k),
              jnp.zeros((B, NH, NC, L, v.shape[-1]), v.dtype), jnp.zeros((B, NH, NC, L), log_i.dtype),
              jnp.zeros_like(log_f))
    carry0 = (dc_final, dn_final, dm_final, grads0)
    (dc0, dn0, dm0, grads), _ = jax.lax.scan(body, carry0, (jnp.arange(NC), *entering), reverse=True)
    return (dc0, dn0, dm0), tuple(g.reshape(x.shape) for g, x in zip(grads, inputs))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunkwise(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
              eps=1e-6, chunk_size: int | str = 64):
    """mLSTM in chunks of ``chunk_size``: O(S·chunk_size) time, O(S) memory, states in and out."""
    B, NH, S, DQK = q.shape
    DV, out_dtype = v.shape[-1], v.dtype
    state = initial_states(q, v, c_initial, n_initial, m_initial)
    symbolic = not isinstance(S, int)  # under jax.export with a symbolic sequence length
    if chunk_size == "auto":
        chunk_size = choose_chunk_size(S if not symbolic else 1 << 30, DQK, DV, jax.default_backend())
    L = chunk_size if symbolic else min(chunk_size, S)
    NC = (S + L - 1) // L
    pad = NC * L - S
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    log_f = jax.nn.log_sigmoid(f.astype(jnp.float32))
    log_i = i.astype(jnp.float32)
    if symbolic or pad:  # padded steps: no input (i = -inf) and no forgetting (log f = 0), so the state passes through
        widths = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*widths, (0, 0))) for x in (q, k, v))
        log_f = jnp.pad(log_f, widths)
        log_i = jnp.pad(log_i, widths, constant_values=-jnp.inf)
    h, last = _chunked(state, (q, k, v, log_i, log_f), L, 1.0 / math.sqrt(DQK), eps, dtype)
    h = h[:, :, :S].astype(out_dtype)
    return (h, last) if return_last_states else h


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
