"""The JAX mLSTM cell against the independent float64 reference (tests/reference.py) and the golden values of
docs/numerics.md §4.5."""


import jax.numpy as jnp
import numpy as np
import pytest
from zoo.registry import resolve

import reference as R

# ---------------------------------------------------------------------------------------------------------
# golden case (docs/numerics.md §4.5)
# ---------------------------------------------------------------------------------------------------------

GOLDEN_H = np.array(
    [
        [-0.060398, 0.030199, 0.120795],
        [-0.189776, 0.110224, 0.410224],
        [-0.019916, -0.319914, -0.619913],
        [0.012288, 0.312286, 0.612285],
    ]
)
GOLDEN_C = np.array([[-0.0113, 0.026012, 0.063325], [-0.015794, -0.275398, -0.535003]])
GOLDEN_N = np.array([0.124376, -0.865347])
GOLDEN_M_FINAL = 1.98185
GOLDEN_M_ROWS = np.array([0.5, 0.186738, 2.0, 1.98185])
GOLDEN_NORM = np.array([0.606531, 1.087267, 0.183226, 0.227053])

# printed with 6 decimals (5 for m): half a unit of the last printed digit plus float32 slack
GOLDEN_ATOL = 1.5e-6


def jax_cell(q, k, v, i, f, eps=1e-6):
    cell = resolve("cell", "parallel_stabilized")
    args = [jnp.asarray(np.asarray(a, np.float32)) for a in (q, k, v, i, f)]
    h = cell(*args, eps=eps)
    assert h.shape == np.shape(v), (h.shape, np.shape(v))
    h = np.asarray(h)
    assert h.dtype == np.float32
    return h.astype(np.float64)


def assert_close_rel(actual, ref, rtol=1e-5, atol_rel=1e-5):
    np.testing.assert_allclose(actual, ref, rtol=rtol, atol=atol_rel * np.abs(ref).max())


def test_golden_reference_parallel():
    q, k, v, i, f = R.golden_inputs()
    h, m, norm = R.parallel_stabilized_cell(q, k, v, i, f, eps=1e-6, return_aux=True)
    np.testing.assert_allclose(h, GOLDEN_H, rtol=0, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(m, GOLDEN_M_ROWS, rtol=0, atol=1e-5)
    np.testing.assert_allclose(norm, GOLDEN_NORM, rtol=0, atol=GOLDEN_ATOL)


def test_golden_reference_recurrent():
    q, k, v, i, f = R.golden_inputs()
    h, (C, n, m) = R.recurrent_stabilized_cell(q, k, v, i, f, eps=1e-6, return_state=True)
    np.testing.assert_allclose(h, GOLDEN_H, rtol=0, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(C, GOLDEN_C, rtol=0, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(n, GOLDEN_N, rtol=0, atol=GOLDEN_ATOL)
    np.testing.assert_allclose(m, GOLDEN_M_FINAL, rtol=0, atol=1e-5)


def test_golden_jax_cell():
    q, k, v, i, f = R.golden_inputs()
    # contract layout: q, k (B,NH,S,DQK), v (B,NH,S,DV), gates (B,NH,S)
    h = jax_cell(q[None, None], k[None, None], v[None, None], i[None, None], f[None, None], eps=1e-6)
    np.testing.assert_allclose(h[0, 0], GOLDEN_H, rtol=0, atol=GOLDEN_ATOL)


# ---------------------------------------------------------------------------------------------------------
# random case (docs/numerics.md §4.5): numpy default_rng(2), B=1, S=128, DH=64
# ---------------------------------------------------------------------------------------------------------


def test_random_case_reference_self_consistency():
    q, k, v, i, f = R.doc_random_case()
    hp = R.parallel_stabilized_cell(q, k, v, i, f)
    hr = R.recurrent_stabilized_cell(q, k, v, i, f)
    # float64: the two formulations agree far below the float32 figures of docs/numerics.md §4.5
    np.testing.assert_allclose(hp, hr, rtol=1e-9, atol=1e-9)
    assert abs(np.abs(hp).mean() - 1.65) < 0.01  # "mean |h| = 1.65"


def test_random_case_jax_vs_reference_parallel():
    q, k, v, i, f = R.doc_random_case()
    h_ref = R.parallel_stabilized_cell(q, k, v, i, f)
    assert_close_rel(jax_cell(q, k, v, i, f), h_ref)


def test_random_case_jax_vs_reference_recurrent():
    q, k, v, i, f = R.doc_random_case()
    h_ref = R.recurrent_stabilized_cell(q, k, v, i, f)
    assert_close_rel(jax_cell(q, k, v, i, f), h_ref)


# ---------------------------------------------------------------------------------------------------------
# multi-batch, multi-head, DQK != DV, and harder gate regimes
# ---------------------------------------------------------------------------------------------------------


def multihead_inputs(seed, B=2, NH=3, S=24, DQK=8, DV=12, i_scale=1.0, f_shift=2.0, f_scale=2.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, NH, S, DQK))
    k = rng.standard_normal((B, NH, S, DQK))
    v = rng.standard_normal((B, NH, S, DV))
    i = i_scale * rng.standard_normal((B, NH, S))
    f = f_shift + f_scale * rng.standard_normal((B, NH, S))
    return q, k, v, i, f


def test_multihead_dqk_ne_dv_jax_vs_reference():
    q, k, v, i, f = multihead_inputs(11)
    # self-check at eps=0: the recurrent m path (m_0 = 0) may differ from the row max, which only moves eps
    np.testing.assert_allclose(
        R.parallel_stabilized_cell(q, k, v, i, f, eps=0.0),
        R.recurrent_stabilized_cell(q, k, v, i, f, eps=0.0),
        rtol=1e-9,
        atol=1e-9,
    )
    h_par = R.parallel_stabilized_cell(q, k, v, i, f)
    h_rec = R.recurrent_stabilized_cell(q, k, v, i, f)
    h = jax_cell(q, k, v, i, f)
    assert h.shape == (2, 3, 24, 12)
    assert_close_rel(h, h_par)
    assert_close_rel(h, h_rec)


def test_multihead_heads_and_batches_are_independent():
    """Each (batch, head) slice equals the single-head reference on that slice (catches head/batch mixing)."""
    q, k, v, i, f = multihead_inputs(12, B=2, NH=2, S=10, DQK=4, DV=6)
    h = jax_cell(q, k, v, i, f)
    for b in range(2):
        for hh in range(2):
            ref = R.parallel_stabilized_cell(q[b, hh], k[b, hh], v[b, hh], i[b, hh], f[b, hh])
            assert_close_rel(h[b, hh], ref)


def test_extreme_gates_jax_vs_reference():
    """Large input gates (|i| up to ~15, the soft-cap range) and reset-like forget gates (-25)."""
    q, k, v, i, f = multihead_inputs(13, B=2, NH=2, S=32, DQK=16, DV=8, i_scale=6.0, f_shift=0.0, f_scale=4.0)
    i = np.clip(i, -15.0, 15.0)
    f[:, :, 7] = -25.0
    f[:, 1, 20] = -25.0
    np.testing.assert_allclose(
        R.parallel_stabilized_cell(q, k, v, i, f, eps=0.0),
        R.recurrent_stabilized_cell(q, k, v, i, f, eps=0.0),
        rtol=1e-9,
        atol=1e-9,
    )
    h_par = R.parallel_stabilized_cell(q, k, v, i, f)
    h = jax_cell(q, k, v, i, f)
    assert_close_rel(h, h_par)
    assert_close_rel(h, R.recurrent_stabilized_cell(q, k, v, i, f))


def test_negative_input_gates_lower_bound_active():
    """Very negative input gates: exp(-m) dominates the normalizer, h ~ exp(i) scale; eps must be added after."""
    q, k, v, i, f = multihead_inputs(14, B=1, NH=2, S=12, DQK=8, DV=8, i_scale=1.0, f_shift=3.0, f_scale=1.0)
    i = i - 8.0
    h_ref = R.parallel_stabilized_cell(q, k, v, i, f)
    assert_close_rel(jax_cell(q, k, v, i, f), h_ref)


@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_eps_is_honoured(eps):
    """eps is added after the max in the normalizer; with small normalizers a wrong eps changes h visibly."""
    q, k, v, i, f = multihead_inputs(15, B=1, NH=2, S=12, DQK=8, DV=4)
    q = 0.05 * q
    i = i + 6.0  # exp(-m) ~ e^-6, so the normalizer is small and eps matters
    h_ref = R.parallel_stabilized_cell(q, k, v, i, f, eps=eps)
    h_other = R.parallel_stabilized_cell(q, k, v, i, f, eps=eps * 3)
    assert np.abs(h_ref - h_other).max() > 1e-3 * np.abs(h_ref).max()  # the case is eps-sensitive
    assert_close_rel(jax_cell(q, k, v, i, f, eps=eps), h_ref)
