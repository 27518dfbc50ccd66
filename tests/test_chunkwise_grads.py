"""The chunkwise cell's hand-derived backward (docs/numerics.md §4.4) against JAX's autodiff of the same forward.

The custom VJP recomputes each chunk's gates and q·kᵀ and applies hand-written gradients, including the parts
that flow through the max stabilisers. Differentiating the forward scan with JAX's own autodiff gives the same
function's gradients by an independent route; they must agree to float rounding for every input and state,
with cotangents on h and on all three final states, for ragged lengths, saturated gates, tied maxima and the
padding values of ``zoo.nn.cell.mask_padding``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.nn.cell import mask_padding
from zoo.plugins.cells import chunkwise as cw

NAMES = ("c0", "n0", "m0", "q", "k", "v", "log_i", "log_f")


def _case(S: int, i_mean: float, i_std: float, f_mean: float, f_std: float, seed: int = 0, B: int = 1, NH: int = 2,
          DQK: int = 8, DV: int = 16):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, NH, S, DQK)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, NH, S, DV)), jnp.float32)
    i = jnp.asarray(rng.standard_normal((B, NH, S)) * i_std + i_mean, jnp.float32)
    f = jnp.asarray(rng.standard_normal((B, NH, S)) * f_std + f_mean, jnp.float32)
    state = (jnp.asarray(rng.standard_normal((B, NH, DQK, DV)) * 0.3, jnp.float32),
             jnp.asarray(rng.standard_normal((B, NH, DQK)) * 0.3, jnp.float32),
             jnp.asarray(rng.standard_normal((B, NH)), jnp.float32))
    return state, (q, k, v, i, f), rng


def _padded(inputs, L: int):
    """The cell's own preprocessing: log-sigmoid forget gates and a ragged tail padded to a multiple of L."""
    q, k, v, i, f = inputs
    S = q.shape[2]
    pad = -S % L
    log_f, log_i = jax.nn.log_sigmoid(f), i
    if pad:
        w = ((0, 0), (0, 0), (0, pad))
        q, k, v = (jnp.pad(x, (*w, (0, 0))) for x in (q, k, v))
        log_f, log_i = jnp.pad(log_f, w), jnp.pad(log_i, w, constant_values=-jnp.inf)
    return q, k, v, log_i, log_f


def _both_vjps(state, inputs, L: int, rng):
    """Gradients of the custom VJP and of JAX's autodiff of the forward, for one random cotangent."""
    padded = _padded(inputs, L)
    scale = 1.0 / math.sqrt(padded[0].shape[-1])

    def custom(s, x):
        return cw._chunked(s, x, L, scale, 1e-6, jnp.float32)

    def autodiff(s, x):
        h, final, _ = cw._forward(s, x, L, scale, 1e-6, jnp.float32, keep_states=False)
        return h, final

    out, vjp_custom = jax.jit(lambda s, x: jax.vjp(custom, s, x))(state, padded)
    out_ref, vjp_ref = jax.jit(lambda s, x: jax.vjp(autodiff, s, x))(state, padded)
    cot = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), out)
    valid = jnp.arange(out[0].shape[2]) < inputs[0].shape[2]  # the padded tail is cut off by the cell
    cot = (cot[0] * valid[:, None], cot[1])
    grads = jax.tree_util.tree_leaves(vjp_custom(cot))
    grads_ref = jax.tree_util.tree_leaves(vjp_ref(cot))
    return out, out_ref, grads, grads_ref, int(valid.sum())


CASES = {
    # name: (S, L, i_mean, i_std, f_mean, f_std)
    "typical gates, ragged tail": (45, 16, 0.0, 1.0, 3.0, 1.0),
    "wide gates": (48, 16, 0.0, 3.0, 1.0, 2.0),
    "negative input gates (the exp(-m) floor is active)": (40, 8, -6.0, 2.0, 0.0, 2.0),
    "forgetting gates": (32, 16, 2.0, 3.0, -4.0, 1.0),
    "one-step chunks": (7, 1, 0.0, 1.0, 2.0, 1.0),
    "a chunk of 3 and a tail of 2": (11, 3, 0.5, 1.5, 2.0, 1.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_vjp_equals_autodiff(name):
    S, L, *gates = CASES[name]
    state, inputs, rng = _case(S, *gates)
    out, out_ref, grads, grads_ref, _ = _both_vjps(state, inputs, L, rng)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out_ref)):  # the same forward
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * float(jnp.max(jnp.abs(b))), name
    for label, g, r in zip(NAMES, grads, grads_ref):
        assert bool(jnp.all(jnp.isfinite(g))), f"{name}: d{label} not finite"
        err = float(jnp.max(jnp.abs(g - r)))
        assert err <= 1e-5 * float(jnp.max(jnp.abs(r))) + 1e-7, f"{name}: d{label} max err {err:.2e}"


def test_floor_branch_is_exercised():
    """The 'negative input gates' case reaches the exp(-m_t) bound of the normaliser at some steps, so the
    branch of the hand-written backward that routes the cotangent there is tested above."""
    S, L, *gates = CASES["negative input gates (the exp(-m) floor is active)"]
    state, inputs, _ = _case(S, *gates)
    q, k, v, log_i, log_f = _padded(inputs, L)
    c, n, m = state
    hits = 0
    for idx in range(q.shape[2] // L):
        sl = slice(idx * L, (idx + 1) * L)
        gates_k = cw._chunk_gates(log_i[..., sl], log_f[..., sl], m)
        scores = jnp.einsum("bhtd,bhsd->bhts", q[:, :, sl], k[:, :, sl]) / math.sqrt(q.shape[-1])
        q_bar = q[:, :, sl] * (gates_k["alpha"] / math.sqrt(q.shape[-1]))[..., None]
        den = jnp.einsum("bhtd,bhd->bht", q_bar, n) + (scores * gates_k["D"]).sum(-1)
        hits += int(jnp.sum(jnp.abs(den) < gates_k["floor"]))
        h, (c, n, m), _ = cw._forward((c, n, m), tuple(x[:, :, sl] for x in (q, k, v, log_i, log_f)), L,
                                      1 / math.sqrt(q.shape[-1]), 1e-6, jnp.float32, keep_states=False)
    assert hits > 0


def test_ties_and_mask_padding_values():
    """Saturated forget gates (log σ(f) == 0 exactly) and equal input gates tie the maxima; the padding values of
    ``mask_padding`` (i = -1e30, f = +1e30) join them. Gradients stay finite and equal autodiff's, which splits
    the cotangent of a tied maximum evenly, as the hand-written backward does."""
    S, L = 24, 8
    state, (q, k, v, _, _), rng = _case(S, 0.0, 1.0, 0.0, 1.0, seed=3)
    i = jnp.full((1, 2, S), 1.0, jnp.float32)
    f = jnp.full((1, 2, S), 200.0, jnp.float32)  # log σ(200) == 0 in float32
    i, f = (jnp.swapaxes(x, 1, 2) for x in mask_padding(jnp.swapaxes(i, 1, 2), jnp.swapaxes(f, 1, 2),
                                                         jnp.asarray([19])))  # it takes the layer's (B, S, NH)
    state = (state[0], state[1], jnp.ones((1, 2), jnp.float32))  # m0 = 1 = i: the first max is a tie too
    _, _, grads, grads_ref, _ = _both_vjps(state, (q, k, v, i, f), L, rng)
    for label, g, r in zip(NAMES, grads, grads_ref):
        assert bool(jnp.all(jnp.isfinite(g))), f"d{label} not finite"
        err = float(jnp.max(jnp.abs(g - r)))
        assert err <= 1e-5 * float(jnp.max(jnp.abs(r))) + 1e-7, f"d{label} max err {err:.2e}"
