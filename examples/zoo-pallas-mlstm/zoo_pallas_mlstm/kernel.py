"""The chunkwise mLSTM forward as one Pallas kernel, with a ``custom_vjp`` backward.

One kernel program per (batch, head) walks the chunks of its sequence in a ``fori_loop``: for
each chunk it computes the chunk's outputs in parallel (the intra-chunk part plus the
contribution of the carried state) and then advances the max-stabilised (C, n, m) state. This is
the algorithm of zoo's built-in ``chunkwise`` cell, fused into one kernel.

Everything inside the kernel is 2-D (columns ``(L, 1)``, rows ``(1, L)``, the scalar ``m`` as
``(1, 1)``) and built from matmuls, element-wise ops, masks and reductions only: the within-chunk
cumulative sum of the log forget gates and the column-to-row "transpose" are masked reductions,
so no cumsum or 1-D transpose has to lower.

The backward pass is the reference one: ``jax.vjp`` of the built-in pure-JAX ``chunkwise`` cell,
taken from the public registry, including the gradients w.r.t. the initial states.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from zoo.registry import resolve

REFERENCE_CELL = "xlstm-zoo:chunkwise"  # the built-in, even if another plugin overrides the bare name
_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, contract=(1, 0)):
    """``a @ b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s axis ``contract[1]``, in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _mlstm_chunkwise_kernel(q_ref, k_ref, v_ref, logf_ref, logi_ref, c0_ref, n0_ref, m0_ref,
                            h_ref, c_ref, n_ref, m_ref, *, num_chunks, chunk, scale, eps):
    """One (batch, head): q, k (S_pad, DQK), v (S_pad, DV), gates (S_pad, 1), c (DQK, DV), n (1, DQK), m (1, 1)."""
    L = chunk
    row = jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)  # t (query step) or r
    col = jax.lax.broadcasted_iota(jnp.int32, (L, L), 1)  # s (key step)
    causal = col <= row  # [t, s]: s <= t
    anticausal = row <= col  # [r, s]: r <= s
    eye = col == row

    def body(j, carry):
        c, n, m = carry
        start = pl.multiple_of(j * L, L)
        sl = pl.ds(start, L)
        q = q_ref[sl, :].astype(jnp.float32)
        k = k_ref[sl, :].astype(jnp.float32)
        v = v_ref[sl, :].astype(jnp.float32)
        log_f = logf_ref[sl, :]  # (L, 1)
        log_i = logi_ref[sl, :]  # (L, 1)

        # rows (1, L) from columns (L, 1) by a masked reduction (a transpose that every backend lowers;
        # where, not a product with the identity, so the -inf of padded steps survives)
        f_row = jnp.sum(jnp.where(eye, log_f, 0.0), axis=0, keepdims=True)
        i_row = jnp.sum(jnp.where(eye, log_i, 0.0), axis=0, keepdims=True)
        # b[t] = sum_{r<=t} log_f[r], as a column and as a row
        b_col = jnp.sum(jnp.where(causal, f_row, 0.0), axis=1, keepdims=True)  # (L, 1)
        b_row = jnp.sum(jnp.where(anticausal, log_f, 0.0), axis=0, keepdims=True)  # (1, L): sum over r <= s
        g = jnp.sum(log_f, axis=0, keepdims=True)  # (1, 1): log forget of the whole chunk

        # outputs of this chunk: intra-chunk part plus the carried state's part
        log_d = jnp.where(causal, b_col - b_row + i_row, -jnp.inf)  # (L, L)
        m_t = jnp.maximum(b_col + m, jnp.max(log_d, axis=1, keepdims=True))  # (L, 1)
        weights = _dot(q, k, (1, 1)) * scale * jnp.exp(log_d - m_t)  # (L, L)
        q_bar = q * (scale * jnp.exp(b_col + m - m_t))  # (L, DQK)
        num = _dot(q_bar, c) + _dot(weights, v)  # (L, DV)
        den = jnp.sum(q_bar * n, axis=1, keepdims=True) + jnp.sum(weights, axis=1, keepdims=True)
        h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t)) + eps)
        h_ref[sl, :] = h.astype(h_ref.dtype)

        # state after this chunk
        a = g - b_col + log_i  # (L, 1)
        m_new = jnp.maximum(g + m, jnp.max(a, axis=0, keepdims=True))  # (1, 1)
        decay = jnp.exp(g + m - m_new)
        kw = k * jnp.exp(a - m_new)  # (L, DQK)
        c = decay * c + _dot(kw, v, (0, 0))  # (DQK, DV)
        n = decay * n + jnp.sum(kw, axis=0, keepdims=True)  # (1, DQK)
        return c, n, m_new

    init = (c0_ref[...], n0_ref[...], m0_ref[...])
    c, n, m = jax.lax.fori_loop(0, num_chunks, body, init)
    c_ref[...] = c
    n_ref[...] = n
    m_ref[...] = m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _layout(S: int, DQK: int, DV: int, chunk_size: int, hardware_shapes: bool) -> tuple[int, int, int, int]:
    """Chunk length, padded sequence length and padded feature sizes.

    In interpret mode any sizes work (chunk ``min(chunk_size, S)``, no feature padding). Compiled
    kernels (Triton in particular) want power-of-two block sizes of at least 16 for their matmuls,
    so there the chunk and the feature sizes are rounded up; zero features and padded steps change
    nothing.
    """
    if not hardware_shapes:
        L = min(chunk_size, S)
        return L, -(-S // L) * L, DQK, DV
    L = max(16, _next_pow2(min(chunk_size, S)))
    return L, -(-S // L) * L, max(16, _next_pow2(DQK)), max(16, _next_pow2(DV))


TARGETS = ("interpret", "triton", "mosaic_tpu")


def pallas_forward(q, k, v, i, f, c0, n0, m0, *, chunk_size: int, eps: float, target: str,
                   hardware_shapes: bool | None = None):
    """The kernel on full arrays: returns ``h`` (B, NH, S, DV) in ``v.dtype`` and float32 (c, n, m).

    ``target`` is ``interpret`` (plain XLA ops, any platform), ``triton`` (CUDA) or ``mosaic_tpu``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    interpret = target == "interpret"
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    if not all(isinstance(d, int) for d in (B, NH, S, DQK, DV)):
        raise ValueError("pallas_chunkwise needs static shapes (Pallas blocks cannot be symbolic); "
                         "export with a static batch and sequence length or use the 'chunkwise' cell")
    hardware_shapes = (not interpret) if hardware_shapes is None else hardware_shapes
    L, S_pad, DQK_p, DV_p = _layout(S, DQK, DV, chunk_size, hardware_shapes)
    BH = B * NH

    def pad(x, seq_value=0.0, feat=None):
        widths = [(0, 0), (0, S_pad - S)] + ([(0, feat - x.shape[-1])] if feat is not None else [])
        return jnp.pad(x, widths, constant_values=seq_value)

    q_ = pad(q.reshape(BH, S, DQK), feat=DQK_p)
    k_ = pad(k.reshape(BH, S, DQK), feat=DQK_p)
    v_ = pad(v.reshape(BH, S, DV), feat=DV_p)
    # padded steps: no input (log i = -inf) and no forgetting (log f = 0): the state passes through
    log_f = pad(jax.nn.log_sigmoid(f.astype(jnp.float32)).reshape(BH, S))[..., None]
    log_i = pad(i.astype(jnp.float32).reshape(BH, S), -jnp.inf)[..., None]
    c0_ = jnp.pad(c0.reshape(BH, DQK, DV), ((0, 0), (0, DQK_p - DQK), (0, DV_p - DV)))
    n0_ = jnp.pad(n0.reshape(BH, 1, DQK), ((0, 0), (0, 0), (0, DQK_p - DQK)))
    m0_ = m0.reshape(BH, 1, 1)

    def spec(*block):
        return pl.BlockSpec((pl.squeezed, *block), lambda b: (b,) + (0,) * len(block))

    kernel = functools.partial(_mlstm_chunkwise_kernel, num_chunks=S_pad // L, chunk=L,
                               scale=1.0 / math.sqrt(DQK), eps=eps)
    h, c, n, m = pl.pallas_call(
        kernel,
        grid=(BH,),
        in_specs=[spec(S_pad, DQK_p), spec(S_pad, DQK_p), spec(S_pad, DV_p), spec(S_pad, 1), spec(S_pad, 1),
                  spec(DQK_p, DV_p), spec(1, DQK_p), spec(1, 1)],
        out_specs=[spec(S_pad, DV_p), spec(DQK_p, DV_p), spec(1, DQK_p), spec(1, 1)],
        out_shape=[jax.ShapeDtypeStruct((BH, S_pad, DV_p), v.dtype),
                   jax.ShapeDtypeStruct((BH, DQK_p, DV_p), jnp.float32),
                   jax.ShapeDtypeStruct((BH, 1, DQK_p), jnp.float32),
                   jax.ShapeDtypeStruct((BH, 1, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1) if target == "triton" else None,
        name="mlstm_chunkwise_fwd",
    )(q_, k_, v_, log_f, log_i, c0_, n0_, m0_)
    return (h[:, :S, :DV].reshape(B, NH, S, DV),
            (c[:, :DQK, :DV].reshape(B, NH, DQK, DV), n[:, 0, :DQK].reshape(B, NH, DQK), m.reshape(B, NH)))


def initial_states(q, v, c_initial, n_initial, m_initial):
    """The given initial states in float32, or zeros; all three or none (as the cell contract says)."""
    given = [s is not None for s in (c_initial, n_initial, m_initial)]
    if any(given) and not all(given):
        raise ValueError("pass all of c_initial, n_initial and m_initial, or none of them")
    B, NH, _, DQK = q.shape
    DV = v.shape[-1]
    expected = {"c_initial": (B, NH, DQK, DV), "n_initial": (B, NH, DQK), "m_initial": (B, NH)}
    if not any(given):
        return tuple(jnp.zeros(shape, jnp.float32) for shape in expected.values())
    for (name, shape), state in zip(expected.items(), (c_initial, n_initial, m_initial)):
        if tuple(state.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(state.shape)}, expected {shape}")
    return tuple(jnp.asarray(s, jnp.float32) for s in (c_initial, n_initial, m_initial))


MODES = ("auto", "interpret", "compiled")


def forward(q, k, v, i, f, c0, n0, m0, *, chunk_size: int, eps: float, mode: str = "auto"):
    """The forward kernel for ``mode``, chosen per lowering platform unless ``interpret``.

    ``auto``: Triton on CUDA, Mosaic on TPU, interpreted anywhere else (the CPU). ``interpret``:
    interpreted everywhere. ``compiled``: Triton on CUDA, Mosaic on TPU, and no lowering elsewhere.
    The choice is made by ``jax.lax.platform_dependent`` when the computation is lowered, so a
    function traced on one machine and lowered for another gets the other's kernel.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    run = functools.partial(pallas_forward, chunk_size=chunk_size, eps=eps)
    args = (q, k, v, i, f, c0, n0, m0)
    if mode == "interpret":
        return run(*args, target="interpret")
    branches = {"cuda": functools.partial(run, target="triton"), "tpu": functools.partial(run, target="mosaic_tpu")}
    if mode == "auto":
        branches["default"] = functools.partial(run, target="interpret")
    return jax.lax.platform_dependent(*args, **branches)


def _reference(q, k, v, i, f, c0, n0, m0, chunk_size, eps):
    """The built-in ``chunkwise`` cell with states in and out: the backward pass differentiates it."""
    cell = resolve("cell", REFERENCE_CELL)
    return cell(q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True,
                eps=eps, chunk_size=chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _mlstm(q, k, v, i, f, c0, n0, m0, chunk_size, eps, mode):
    return forward(q, k, v, i, f, c0, n0, m0, chunk_size=chunk_size, eps=eps, mode=mode)


def _mlstm_fwd(q, k, v, i, f, c0, n0, m0, chunk_size, eps, mode):
    out = forward(q, k, v, i, f, c0, n0, m0, chunk_size=chunk_size, eps=eps, mode=mode)
    return out, (q, k, v, i, f, c0, n0, m0)


def _mlstm_bwd(chunk_size, eps, mode, residuals, cotangents):
    _, vjp = jax.vjp(lambda *args: _reference(*args, chunk_size, eps), *residuals)
    return vjp(cotangents)


_mlstm.defvjp(_mlstm_fwd, _mlstm_bwd)


def pallas_chunkwise(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
                     eps=1e-6, chunk_size=64, interpret=None):
    """mLSTM in chunks of ``chunk_size`` as one Pallas kernel; states in and out (see ``zoo.nn.cell``).

    ``interpret=None`` picks the kernel per lowering platform: Triton on CUDA, Mosaic on TPU and
    the interpreted kernel (plain XLA ops) elsewhere, which on this CPU-only build is what runs.
    ``True`` always interprets; ``False`` always compiles (no CPU lowering). Gradients, initial
    states included, are those of the built-in ``chunkwise`` cell.
    """
    c0, n0, m0 = initial_states(q, v, c_initial, n_initial, m_initial)
    mode = "auto" if interpret is None else ("interpret" if interpret else "compiled")
    h, states = _mlstm(q, k, v, i, f, c0, n0, m0, int(chunk_size), float(eps), mode)
    return (h, states) if return_last_states else h
