"""The chunkwise cell's own code paths: the recomputing custom VJP (including gradients through the initial
and final states), bfloat16 compute with float32 state, and ``chunk_size: auto``; checked against the
independent ``recurrent`` and ``parallel_stabilized`` backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.plugins.cells.chunkwise import ChunkwiseKwargs, choose_chunk_size, chunkwise
from zoo.plugins.cells.parallel import parallel_stabilized
from zoo.plugins.cells.recurrent import recurrent

B, NH, S, DQK, DV = 1, 2, 40, 8, 16  # 40 = 2 * 16 + 8: a ragged tail with chunk 16


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, NH, S, DQK)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, NH, S, DV)), jnp.float32)
    i = jnp.asarray(rng.standard_normal((B, NH, S)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((B, NH, S)) + 3.0, jnp.float32)
    c0 = jnp.asarray(rng.standard_normal((B, NH, DQK, DV)), jnp.float32) * 0.3
    n0 = jnp.asarray(rng.standard_normal((B, NH, DQK)), jnp.float32) * 0.3
    m0 = jnp.asarray(rng.standard_normal((B, NH)), jnp.float32)
    return (q, k, v, i, f), (c0, n0, m0)


def rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def loss_fn(cell, **kwargs):
    w = jnp.asarray(np.random.default_rng(9).standard_normal((B, NH, S, DV)), jnp.float32)

    def loss(q, k, v, i, f, c0, n0, m0):
        h, (c, n, m) = cell(q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0, return_last_states=True,
                            **kwargs)
        # normalise the states by exp(m) so the loss does not depend on the stabiliser's choice of m
        return jnp.sum(h * w) + jnp.sum(c * jnp.exp(m)[..., None, None]) + jnp.sum(n * jnp.exp(m)[..., None])

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))


@pytest.mark.parametrize("L", [16])
def test_custom_vjp_matches_recurrent_autodiff_with_states(L):
    (q, k, v, i, f), (c0, n0, m0) = inputs()
    val, grads = loss_fn(chunkwise, chunk_size=L)(q, k, v, i, f, c0, n0, m0)
    ref_val, ref_grads = loss_fn(recurrent)(q, k, v, i, f, c0, n0, m0)
    assert abs(float(val - ref_val)) <= 1e-4 * abs(float(ref_val))
    names = ("q", "k", "v", "i", "f", "c0", "n0")  # m0's gradient is the stabiliser's, which the two paths choose alike
    for name, g, r in zip(names, grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert rel(g, r) < 1e-3, f"d{name}: rel err {rel(g, r):.2e}"


def test_bfloat16_compute_with_float32_state():
    (q, k, v, i, f), _ = inputs(1)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))

    @jax.jit
    def run(q, k, v, i, f):
        def loss(q, k, v):
            h, states = chunkwise(q, k, v, i, f, chunk_size=16, return_last_states=True)
            return jnp.sum(h.astype(jnp.float32)), (h, states)
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    @jax.jit
    def reference(q, k, v, i, f):
        return parallel_stabilized(q, k, v, i, f), jax.grad(
            lambda *a: jnp.sum(parallel_stabilized(*a, i, f)), argnums=(0, 1, 2))(q, k, v)

    grads, (h, (c, n, m)) = run(qb, kb, vb, i, f)
    h32, g32 = reference(q, k, v, i, f)
    assert h.dtype == jnp.bfloat16 and c.dtype == n.dtype == m.dtype == jnp.float32
    assert rel(h.astype(jnp.float32), h32) < 2e-2
    for g, r in zip(grads, g32):
        assert g.dtype == jnp.bfloat16
        assert rel(g.astype(jnp.float32), r) < 5e-2


def test_auto_chunk_size():
    assert ChunkwiseKwargs().chunk_size == 64 and ChunkwiseKwargs(chunk_size="auto").chunk_size == "auto"
    with pytest.raises(ValueError):
        ChunkwiseKwargs(chunk_size=0)
    assert choose_chunk_size(4096, 256, 512) == 128  # the xLSTM-7B head shape
    assert choose_chunk_size(4096, 64, 64) == 64
    assert choose_chunk_size(10, 256, 512) == 10  # a short sequence is one chunk
    (q, k, v, i, f), _ = inputs(2)
    auto, explicit, ref = jax.jit(lambda *a: (chunkwise(*a, chunk_size="auto"),
                                              chunkwise(*a, chunk_size=choose_chunk_size(S, DQK, DV)),
                                              parallel_stabilized(*a)))(q, k, v, i, f)
    assert rel(auto, explicit) == 0.0
    assert rel(auto, ref) < 1e-4
