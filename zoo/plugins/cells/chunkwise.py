"""The ``chunkwise`` cell: exact chunkwise-parallel mLSTM, linear in S, states in and out (pure JAX).

Inside a chunk of ``chunk_size`` steps the output is computed in parallel; between chunks only
the (C, n, m) state is carried, so memory and time grow linearly in S. A sequence that is not a
multiple of the chunk size is padded inside with steps that leave the state unchanged.

Layout: one ``lax.scan`` over chunks whose body does all the work of a chunk (gate math, the
intra-chunk L x L part, the inter-chunk state part and the state update) as matmuls batched over
(B, NH). It reads its chunk of q, k, v and the gates in place and writes h in place, so neither
chunk-first copies of the inputs nor the per-chunk states are materialised in the forward pass.
The backward is a custom VJP: the forward keeps only its inputs and the state entering each
chunk; a reverse scan recomputes each chunk's forward and differentiates it, passing the state
cotangent back and writing the input gradients in place.

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

from zoo.nn.cell import States, initial_states, log_forget_matrix
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


def _chunk(state: States, xs, *, scale: float, eps: float, dtype) -> tuple[States, jax.Array]:
    """One chunk: ``q, k (B,NH,L,DQK)``, ``v (B,NH,L,DV)``, ``log_i, log_f (B,NH,L)`` -> new state, ``h (B,NH,L,DV)``."""
    c, n, m = state
    q, k, v, log_i, log_f = xs
    b = jnp.cumsum(log_f, axis=-1)
    g = b[..., -1]
    # intra-chunk (uses the state entering the chunk for the inter-chunk term)
    log_D = log_forget_matrix(log_f) + log_i[..., None, :]
    m_t = jnp.maximum(b + m[..., None], log_D.max(-1))
    weights = _matmul("bhtd,bhsd->bhts", q, k, dtype) * (scale * jnp.exp(log_D - m_t[..., None]))
    q_bar = q.astype(jnp.float32) * (scale * jnp.exp(b + m[..., None] - m_t))[..., None]
    num = _matmul("bhtd,bhdv->bhtv", q_bar, c, dtype) + _matmul("bhts,bhsv->bhtv", weights, v, dtype)
    den = jnp.einsum("bhtd,bhd->bht", q_bar, n) + weights.sum(-1)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t))[..., None] + eps)
    # state update
    a = g[..., None] - b + log_i
    m_new = jnp.maximum(g + m, a.max(-1))
    decay = jnp.exp(g + m - m_new)
    k_w = k.astype(jnp.float32) * jnp.exp(a - m_new[..., None])[..., None]
    c_new = decay[..., None, None] * c + _matmul("bhld,bhlv->bhdv", k_w, v, dtype)
    n_new = decay[..., None] * n + k_w.sum(-2)
    return (c_new, n_new, m_new), h


def _slices(inputs, idx, L: int):
    """Chunk ``idx`` of each (B, NH, NC·L, ...) input, read in place (no chunk-first copy of the inputs)."""
    return tuple(jax.lax.dynamic_slice_in_dim(x, idx * L, L, axis=2) for x in inputs)


def _scan_chunks(state: States, inputs, L: int, scale: float, eps: float, dtype, keep_states: bool):
    """Forward over all chunks, writing h in place; with ``keep_states`` also the state entering each chunk."""
    B, NH, SP, _ = inputs[0].shape
    h0 = jnp.zeros((B, NH, SP, inputs[2].shape[-1]), jnp.float32)

    def body(carry, idx):
        state, h = carry
        new, h_k = _chunk(state, _slices(inputs, idx, L), scale=scale, eps=eps, dtype=dtype)
        h = jax.lax.dynamic_update_slice_in_dim(h, h_k, idx * L, axis=2)
        return (new, h), (state if keep_states else None)

    (final, h), entering = jax.lax.scan(body, (state, h0), jnp.arange(SP // L))
    return h, final, entering


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _chunked(state: States, inputs, L: int, scale: float, eps: float, dtype):
    h, final, _ = _scan_chunks(state, inputs, L, scale, eps, dtype, keep_states=False)
    return h, final


def _chunked_fwd(state, inputs, L, scale, eps, dtype):
    h, final, entering = _scan_chunks(state, inputs, L, scale, eps, dtype, keep_states=True)
    return (h, final), (entering, inputs)


def _chunked_bwd(L, scale, eps, dtype, residuals, cotangents):
    entering, inputs = residuals
    dh, dfinal = cotangents
    step = functools.partial(_chunk, scale=scale, eps=eps, dtype=dtype)

    def body(carry, x):
        dstate, grads = carry
        idx, state = x
        _, vjp = jax.vjp(step, state, _slices(inputs, idx, L))
        dstate_prev, dxs = vjp((dstate, jax.lax.dynamic_slice_in_dim(dh, idx * L, L, axis=2)))
        grads = tuple(jax.lax.dynamic_update_slice_in_dim(g, d.astype(g.dtype), idx * L, axis=2)
                      for g, d in zip(grads, dxs))
        return (dstate_prev, grads), None

    grads0 = tuple(jnp.zeros_like(x) for x in inputs)
    (dstate0, grads), _ = jax.lax.scan(body, (dfinal, grads0), (jnp.arange(dh.shape[2] // L), entering),
                                       reverse=True)
    return dstate0, grads


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
