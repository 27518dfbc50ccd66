"""Parity, state passing, golden values, precision, stability and memory scaling of the registered mLSTM cell
backends (``parallel_stabilized``, ``chunkwise``, ``recurrent``).

Tolerances (see docs/numerics.md §4.5 and §9) -- all float32 unless stated:

* forward h:   max|a - b| <= 1e-4 * max|ref|                       (measured <= ~4e-6)
* final states C, n: max|a - b| <= 1e-4 * max|ref|;  m: max|a - b| <= 1e-4 * max(1, max|m_ref|)
* gradients of sum(h * w) w.r.t. each of q, k, v, i, f:
               max|a - b| <= 1e-3 * max|ref grad_x| + 1e-5 * G      (measured <= ~2e-5 relative)
  where G is the largest |ref grad| over all five arguments.  The floor matters only for an argument whose
  gradient is mathematically zero or eps-sized: at S=1 h does not depend on f except through eps*exp(m)
  (parallel_stabilized returns exactly 0, the state-carrying backends ~eps-sized values).
* golden values (docs/numerics.md §4.5): printed precision, 1.5e-6 abs for h, C, n and 1e-5 for m.
* bf16 q, k, v (gates float32): vs the backend's own float32 result on the same (bf16-representable) inputs,
  allclose(atol=1e-2 * max|h32|, rtol=1e-2) -- the upstream 1e-2/1e-2 with atol scaled by the output magnitude,
  because the random cases have max|h| ~ 30-60 (small normalizers), not O(1).

Every comparison prints its measured error (run with ``-s`` to see them).  Compiled functions and backend
results are cached at module level so that each (backend, shape) compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as R
from zoo.registry import entry, resolve

BACKENDS = ("parallel_stabilized", "chunkwise", "recurrent")
STATEFUL = ("chunkwise", "recurrent")
PAIRS = (("chunkwise", "parallel_stabilized"), ("recurrent", "parallel_stabilized"), ("chunkwise", "recurrent"))

B, NH, DQK, DV = 2, 2, 8, 12  # DQK != DV on purpose

# sequence length -> chunk size used by `chunkwise` in the cross-backend cases.  7 = 4 + 3, 130 = 8*16 + 2 and
# 1000 = 62*16 + 8 leave ragged tails; S=1 with chunk 64 is the degenerate single-step chunk.
SEQ_CHUNKS = {1: 64, 7: 4, 64: 16, 130: 16, 1000: 16}

FWD_RTOL = 1e-4
STATE_RTOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_FLOOR = 1e-5
ARG_NAMES = ("q", "k", "v", "i", "f")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def supports_state(name):
    return bool(entry("cell", name).metadata["supports_state"])


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_rel(tag, a, ref, rtol):
    assert np.shape(a) == np.shape(ref), (tag, np.shape(a), np.shape(ref))
    assert np.isfinite(a).all(), f"{tag}: non-finite values"
    err = rel_err(a, ref)
    print(f"[err] {tag}: {err:.2e} (tol {rtol:.0e})")
    assert err <= rtol, f"{tag}: max|a-b|/max|ref| = {err:.3e} > {rtol:.0e}"
    return err


def check_states(tag, st, st_ref):
    c, n, m = (np.asarray(x, np.float64) for x in st)
    c_ref, n_ref, m_ref = (np.asarray(x, np.float64) for x in st_ref)
    assert c.shape == c_ref.shape and n.shape == n_ref.shape and m.shape == m_ref.shape, tag
    check_rel(f"{tag} C", c, c_ref, STATE_RTOL)
    check_rel(f"{tag} n", n, n_ref, STATE_RTOL)
    err_m = float(np.abs(m - m_ref).max())
    tol_m = STATE_RTOL * max(1.0, float(np.abs(m_ref).max()))
    print(f"[err] {tag} m: {err_m:.2e} abs (tol {tol_m:.1e})")
    assert np.isfinite(m).all() and err_m <= tol_m, f"{tag} m: {err_m:.3e} > {tol_m:.1e}"


def check_grads(tag, grads, grads_ref):
    scale_all = max(float(np.abs(np.asarray(g)).max()) for g in grads_ref)
    assert scale_all > 0, tag
    worst = 0.0
    for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref):
        g, g_ref = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
        assert g.shape == g_ref.shape and np.isfinite(g).all(), (tag, name)
        err = float(np.abs(g - g_ref).max())
        ref_max = float(np.abs(g_ref).max())
        tol = GRAD_RTOL * ref_max + GRAD_FLOOR * scale_all
        rel = err / max(ref_max, 1e-30)
        print(f"[err] {tag} d/d{name}: {rel:.2e} rel to max|ref| ({err:.1e} abs, tol {tol:.1e})")
        assert err <= tol, f"{tag} d/d{name}: max abs err {err:.3e} > tol {tol:.3e} (max|ref| {ref_max:.3e})"
        if ref_max >= 1e-3 * scale_all:
            worst = max(worst, rel)
    return worst


def random_inputs(S, seed, b=B, nh=NH, dqk=DQK, dv=DV, i_scale=1.5, f_shift=2.5, f_scale=1.5):
    """float32 numpy q, k, v, i, f and loss weights w; gates mix short and long memory."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, nh, S, dqk))
    k = rng.standard_normal((b, nh, S, dqk))
    v = rng.standard_normal((b, nh, S, dv))
    i = i_scale * rng.standard_normal((b, nh, S))
    f = f_shift + f_scale * rng.standard_normal((b, nh, S))
    w = rng.standard_normal((b, nh, S, dv))
    return tuple(np.asarray(a, np.float32) for a in (q, k, v, i, f, w))


@functools.lru_cache(maxsize=None)
def forward_fn(name, with_states, **kwargs):
    """jit(cell) returning h, or (h, (c, n, m)) when with_states; also accepts initial states."""
    cell = resolve("cell", name)

    def fwd(q, k, v, i, f, states=None):
        c0, n0, m0 = states if states is not None else (None, None, None)
        return cell(q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0,
                    return_last_states=with_states, **kwargs)

    return jax.jit(fwd)


@functools.lru_cache(maxsize=None)
def grad_fn(name, with_states, **kwargs):
    """jit(grad(sum(h * w))) w.r.t. (q, k, v, i, f), with h and (optionally) the final states as aux."""
    cell = resolve("cell", name)

    def loss(q, k, v, i, f, w):
        out = cell(q, k, v, i, f, return_last_states=with_states, **kwargs)
        h, states = out if with_states else (out, None)
        return jnp.sum(h * w), (h, states)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def kwargs_for(name, S):
    return {"chunk_size": SEQ_CHUNKS[S]} if name == "chunkwise" else {}


@functools.lru_cache(maxsize=None)
def inputs_for(S):
    return random_inputs(S, seed=1000 + S)


@functools.lru_cache(maxsize=None)
def run_backend(name, S):
    """(h, states or None, grads) of backend `name` on the cross-backend case of length S, as numpy."""
    with_states = supports_state(name)
    grads, (h, states) = grad_fn(name, with_states, **kwargs_for(name, S))(*inputs_for(S))
    to_np = lambda t: None if t is None else tuple(np.asarray(x) for x in t)  # noqa: E731
    return np.asarray(h), to_np(states), to_np(grads)


def all_finite(tree):
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------------------
# registry metadata
# ---------------------------------------------------------------------------------------------------------


def test_backends_registered_with_expected_state_support():
    assert {n: supports_state(n) for n in BACKENDS} == {
        "parallel_stabilized": False, "chunkwise": True, "recurrent": True}
    kw = entry("cell", "chunkwise").metadata["kwargs_model"]
    assert kw().chunk_size == 64


# ---------------------------------------------------------------------------------------------------------
# cross-backend parity: outputs, final states, gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", list(SEQ_CHUNKS))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def test_forward_parity(pair, S):
    a, b = pair
    h_a, h_b = run_backend(a, S)[0], run_backend(b, S)[0]
    assert h_a.shape == (B, NH, S, DV) and h_a.dtype == np.float32
    check_rel(f"fwd {a} vs {b} S={S}", h_a, h_b, FWD_RTOL)


@pytest.mark.parametrize("S", list(SEQ_CHUNKS))
def test_final_state_parity(S):
    st_c, st_r = run_backend("chunkwise", S)[1], run_backend("recurrent", S)[1]
    assert st_c[0].shape == (B, NH, DQK, DV) and st_c[1].shape == (B, NH, DQK) and st_c[2].shape == (B, NH)
    assert all(x.dtype == np.float32 for x in st_c + st_r)
    check_states(f"states chunkwise vs recurrent S={S}", st_c, st_r)


@pytest.mark.parametrize("S", list(SEQ_CHUNKS))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-vs-{p[1]}")
def test_gradient_parity(pair, S):
    a, b = pair
    check_grads(f"grad {a} vs {b} S={S}", run_backend(a, S)[2], run_backend(b, S)[2])


# ---------------------------------------------------------------------------------------------------------
# float64 NumPy reference (tests/reference.py)
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference_for(S):
    q, k, v, i, f, _ = inputs_for(S)
    h_par = R.parallel_stabilized_cell(q, k, v, i, f)
    h_rec, states = R.recurrent_stabilized_cell(q, k, v, i, f, return_state=True)
    return h_par, h_rec, states


@pytest.mark.parametrize("S", [7, 130, 1000])
@pytest.mark.parametrize("name", BACKENDS)
def test_vs_float64_reference(name, S):
    h_par, h_rec, states_ref = reference_for(S)
    h, states, _ = run_backend(name, S)
    check_rel(f"f64ref {name} S={S} vs parallel64", h, h_par, FWD_RTOL)
    check_rel(f"f64ref {name} S={S} vs recurrent64", h, h_rec, FWD_RTOL)
    if states is not None:
        # the float64 recurrence starts at m=0 like the state-carrying backends, so the states are comparable
        check_states(f"f64ref {name} S={S}", states, states_ref)


@pytest.mark.parametrize("name", BACKENDS)
def test_doc_random_case_vs_float64_reference(name):
    q, k, v, i, f = R.doc_random_case()
    h_ref = R.parallel_stabilized_cell(q, k, v, i, f)
    assert abs(np.abs(h_ref).mean() - 1.65) < 0.01  # "mean |h| = 1.65"
    kwargs = {"chunk_size": 32} if name == "chunkwise" else {}  # L=32 as in docs/numerics.md §4.5
    h = np.asarray(forward_fn(name, False, **kwargs)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, i, f))))
    print(f"[err] doc random case {name}: max abs {np.abs(h - h_ref).max():.2e} (doc: upstream float32 "
          f"parallel-recurrent 3.1e-5, parallel-chunkwise 6.3e-5)")
    check_rel(f"doc random case {name} vs f64", h, h_ref, FWD_RTOL)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-2)  # xlstm-jax's allclose (docs/numerics.md §9)


# ---------------------------------------------------------------------------------------------------------
# golden values (docs/numerics.md §4.5)
# ---------------------------------------------------------------------------------------------------------

GOLDEN_H = np.array([[-0.060398, 0.030199, 0.120795],
                     [-0.189776, 0.110224, 0.410224],
                     [-0.019916, -0.319914, -0.619913],
                     [0.012288, 0.312286, 0.612285]])
GOLDEN_C = np.array([[-0.0113, 0.026012, 0.063325], [-0.015794, -0.275398, -0.535003]])
GOLDEN_N = np.array([0.124376, -0.865347])
GOLDEN_M = 1.98185
GOLDEN_ATOL = 1.5e-6  # half a unit of the 6th decimal plus float32 slack
GOLDEN_M_ATOL = 1e-5  # m is printed with 5 decimals


def golden_inputs():
    return tuple(jnp.asarray(np.asarray(a, np.float32)[None, None]) for a in R.golden_inputs())


GOLDEN_CASES = [("parallel_stabilized", {}), ("recurrent", {})] + [
    ("chunkwise", {"chunk_size": L}) for L in (1, 2, 3, 64)]  # L=2 as in docs/numerics.md §4.5; 3 leaves a ragged tail


@pytest.mark.parametrize("name,kwargs", GOLDEN_CASES, ids=lambda x: str(x) if isinstance(x, str) else
                         "-".join(f"{k}{v}" for k, v in x.items()) or "default")
def test_golden_values(name, kwargs):
    stateful = supports_state(name)
    out = forward_fn(name, stateful, **kwargs)(*golden_inputs())
    h, states = out if stateful else (out, None)
    h = np.asarray(h)[0, 0]
    print(f"[err] golden {name} {kwargs} h: {np.abs(h - GOLDEN_H).max():.1e}")
    np.testing.assert_allclose(h, GOLDEN_H, rtol=0, atol=GOLDEN_ATOL)
    if stateful:
        c, n, m = (np.asarray(x)[0, 0] for x in states)
        print(f"[err] golden {name} {kwargs} C {np.abs(c - GOLDEN_C).max():.1e} n {np.abs(n - GOLDEN_N).max():.1e} "
              f"m {abs(float(m) - GOLDEN_M):.1e}")
        np.testing.assert_allclose(c, GOLDEN_C, rtol=0, atol=GOLDEN_ATOL)
        np.testing.assert_allclose(n, GOLDEN_N, rtol=0, atol=GOLDEN_ATOL)
        np.testing.assert_allclose(float(m), GOLDEN_M, rtol=0, atol=GOLDEN_M_ATOL)


# ---------------------------------------------------------------------------------------------------------
# chunk size invariance
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [7, 130])
def test_chunkwise_chunk_size_invariance(S):
    q, k, v, i, f, _ = inputs_for(S)
    outs = {}
    for L in (1, 4, 16, 64, S):
        outs[L] = forward_fn("chunkwise", True, chunk_size=L)(q, k, v, i, f)
    h_ref, st_ref = outs[S]  # one chunk: the whole sequence in parallel
    for L, (h, st) in outs.items():
        if L == S:
            continue
        check_rel(f"chunk {L} vs chunk {S} (S={S}) h", h, h_ref, FWD_RTOL)
        check_states(f"chunk {L} vs chunk {S} (S={S})", st, st_ref)


# ---------------------------------------------------------------------------------------------------------
# state passing
# ---------------------------------------------------------------------------------------------------------

SPLIT_S = 130  # the cross-backend case of S=130 is the single-call reference


def run_in_pieces(name, lengths, kwargs, states=None, S_total=SPLIT_S):
    q, k, v, i, f, _ = inputs_for(S_total)
    assert sum(lengths) <= S_total
    hs, start = [], 0
    for L in lengths:
        sl = slice(start, start + L)
        h, states = forward_fn(name, True, **kwargs)(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl],
                                                      f[:, :, sl], states)
        hs.append(np.asarray(h))
        start += L
    return np.concatenate(hs, axis=2), states


@pytest.mark.parametrize("name,lengths", [("chunkwise", (40, 40, 50)), ("recurrent", (40, 40, 50))])
def test_state_passing_split_equals_one_call(name, lengths):
    kwargs = {"chunk_size": 16} if name == "chunkwise" else {}
    h, states = run_in_pieces(name, lengths, kwargs)
    h_full, st_full, _ = run_backend(name, SPLIT_S)
    check_rel(f"split {name} {lengths} h", h, h_full, FWD_RTOL)
    check_states(f"split {name} {lengths}", states, st_full)
    # the split result also matches the stateless quadratic form (so passing states is not a no-op on both sides)
    check_rel(f"split {name} {lengths} h vs parallel", h, run_backend("parallel_stabilized", SPLIT_S)[0], FWD_RTOL)


def test_state_passing_chunkwise_prefill_then_recurrent_steps():
    prefill = 100
    h_pre, states = run_in_pieces("chunkwise", (prefill,), {"chunk_size": 16})
    q, k, v, i, f, _ = inputs_for(SPLIT_S)
    step = forward_fn("recurrent", True)
    hs = [h_pre]
    for t in range(prefill, SPLIT_S):
        sl = slice(t, t + 1)
        h_t, states = step(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], states)
        hs.append(np.asarray(h_t))
    h = np.concatenate(hs, axis=2)
    h_full, st_full, _ = run_backend("chunkwise", SPLIT_S)
    check_rel("chunkwise prefill + recurrent steps h", h, h_full, FWD_RTOL)
    check_rel("chunkwise prefill + recurrent steps h vs parallel", h, run_backend("parallel_stabilized", SPLIT_S)[0],
              FWD_RTOL)
    check_states("chunkwise prefill + recurrent steps", states, st_full)


def test_state_passing_recurrent_prefill_then_chunkwise():
    q, k, v, i, f, _ = inputs_for(SPLIT_S)
    h1, st = forward_fn("recurrent", True)(q[:, :, :40], k[:, :, :40], v[:, :, :40], i[:, :, :40], f[:, :, :40])
    h2, st = forward_fn("chunkwise", True, chunk_size=16)(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], i[:, :, 40:],
                                                          f[:, :, 40:], st)
    h = np.concatenate([np.asarray(h1), np.asarray(h2)], axis=2)
    h_full, st_full, _ = run_backend("recurrent", SPLIT_S)
    check_rel("recurrent prefill + chunkwise h", h, h_full, FWD_RTOL)
    check_states("recurrent prefill + chunkwise", st, st_full)


def test_parallel_raises_when_asked_for_states():
    cell = resolve("cell", "parallel_stabilized")
    q, k, v, i, f, _ = (jnp.asarray(x) for x in inputs_for(7))
    with pytest.raises(ValueError):
        cell(q, k, v, i, f, return_last_states=True)
    c0 = jnp.zeros((B, NH, DQK, DV))
    n0 = jnp.zeros((B, NH, DQK))
    m0 = jnp.zeros((B, NH))
    with pytest.raises(ValueError):
        cell(q, k, v, i, f, c_initial=c0, n_initial=n0, m_initial=m0)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 inputs
# ---------------------------------------------------------------------------------------------------------

BF16_RTOL = 1e-2
BF16_ATOL_REL = 1e-2  # atol = 1e-2 * max|h32|


def bf16_check(tag, h_bf16, h32):
    assert h_bf16.dtype == jnp.bfloat16, (tag, h_bf16.dtype)
    hb = np.asarray(h_bf16.astype(jnp.float32), np.float64)
    h32 = np.asarray(h32, np.float64)
    assert np.isfinite(hb).all(), tag
    scale = float(np.abs(h32).max())
    err = np.abs(hb - h32)
    excess = float((err / (BF16_ATOL_REL * scale + BF16_RTOL * np.abs(h32))).max())
    print(f"[err] {tag}: max abs {err.max():.2e}, rel to max|h32| {err.max() / scale:.2e} (max|h32| {scale:.1f}), "
          f"fraction of allowed {excess:.2f}")
    np.testing.assert_allclose(hb, h32, atol=BF16_ATOL_REL * scale, rtol=BF16_RTOL, err_msg=tag)


@pytest.mark.parametrize("name", BACKENDS)
def test_bfloat16_qkv_matches_float32(name):
    S = 130
    kwargs = kwargs_for(name, S)
    q, k, v, i, f, _ = inputs_for(S)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    fn = forward_fn(name, False, **kwargs)
    h_bf16 = fn(qb, kb, vb, i, f)
    # float32 on the same bf16-representable values: isolates the backend's own bf16 arithmetic
    h32_same = fn(*(x.astype(jnp.float32) for x in (qb, kb, vb)), i, f)
    bf16_check(f"bf16 {name} S={S} vs f32 on rounded inputs", h_bf16, h32_same)


@pytest.mark.parametrize("name", BACKENDS)
def test_bfloat16_doc_case_matches_float32(name):
    """Upstream-style: fp32 inputs vs the same inputs cast to bf16 (includes input rounding), random case of
    docs/numerics.md §4.5."""
    q, k, v, i, f = (np.asarray(x, np.float32) for x in R.doc_random_case())
    kwargs = {"chunk_size": 32} if name == "chunkwise" else {}
    fn = forward_fn(name, False, **kwargs)
    h32 = fn(q, k, v, i, f)
    h_bf16 = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), i, f)
    bf16_check(f"bf16 {name} doc case vs f32 on unrounded inputs", h_bf16, h32)


# ---------------------------------------------------------------------------------------------------------
# stability with extreme gates
# ---------------------------------------------------------------------------------------------------------


def extreme_inputs(S, seed=7):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 2, S, DQK))
    k = rng.standard_normal((1, 2, S, DQK))
    v = rng.standard_normal((1, 2, S, DV))
    i = rng.uniform(-30.0, 30.0, (1, 2, S))
    f = rng.uniform(-30.0, 30.0, (1, 2, S))
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, i, f))


# parallel_stabilized is run at S=1024 instead of 8192: at 8192 its S^2 matrices take ~15 s forward and ~36 s
# forward+backward on 2 CPU cores (measured; ~6 s at 2048), too slow for this file.
@pytest.mark.parametrize("name,S", [("chunkwise", 8192), ("recurrent", 8192), ("parallel_stabilized", 1024)])
def test_extreme_gates_no_nan_or_inf(name, S):
    args = extreme_inputs(S)
    kwargs = {"chunk_size": 64} if name == "chunkwise" else {}
    stateful = supports_state(name)
    grads, (h, states) = grad_fn(name, stateful, **kwargs)(*args, jnp.ones((1, 2, S, DV), jnp.float32) / S)
    assert all_finite(h), f"{name}: non-finite h"
    if stateful:
        assert all_finite(states), f"{name}: non-finite final states"
    for nm, g in zip(ARG_NAMES, grads):
        assert all_finite(g), f"{name}: non-finite gradient d/d{nm}"
    print(f"[info] extreme gates {name} S={S}: max|h| {float(jnp.abs(h).max()):.1f}, "
          f"max|grad| {max(float(jnp.abs(g).max()) for g in grads):.2e}")


# ---------------------------------------------------------------------------------------------------------
# memory scaling (XLA's planned temporary buffers for forward + backward; deterministic)
# ---------------------------------------------------------------------------------------------------------


def planned_grad_temp_bytes(name, S, **kwargs):
    cell = resolve("cell", name)

    def loss(q, k, v, i, f):
        return jnp.sum(cell(q, k, v, i, f, **kwargs))

    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
        sds(B, NH, S, DQK), sds(B, NH, S, DQK), sds(B, NH, S, DV), sds(B, NH, S), sds(B, NH, S)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_chunkwise_linear_parallel_quadratic():
    chunk = [planned_grad_temp_bytes("chunkwise", S, chunk_size=64) for S in (1024, 4096)]
    par = [planned_grad_temp_bytes("parallel_stabilized", S) for S in (1024, 4096)]
    r_chunk, r_par = chunk[1] / chunk[0], par[1] / par[0]
    print(f"[info] fwd+bwd temp bytes S=1024 -> 4096: chunkwise {chunk} ratio {r_chunk:.2f}; "
          f"parallel {par} ratio {r_par:.2f}")
    assert r_chunk < 6.0, f"chunkwise memory grows faster than linear: x{r_chunk:.2f} for 4x S"
    assert r_par >= 10.0, f"parallel memory should grow ~quadratically: x{r_par:.2f} for 4x S"
    assert chunk[1] < par[1] / 10
