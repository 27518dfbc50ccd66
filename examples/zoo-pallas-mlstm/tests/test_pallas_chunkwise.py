"""zoo-pallas-mlstm's own tests: the installed distribution, loaded through its ``zoo`` entry point.

Run from the repo root (interpret mode on CPU):
``ZOO_DISABLE_PLUGIN_AUTOLOAD=1 python -m pytest -q examples/zoo-pallas-mlstm/tests``
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import zoo
from zoo.registry import entry, resolve
from zoo.testing import (assert_cell_matches_reference, isolated_registry, random_cell_inputs, random_states,
                         relative_error)
from zoo_pallas_mlstm import kernel

DIST = "zoo-pallas-mlstm"
SMALL = {"batch": 2, "heads": 2, "dqk": 16, "dv": 24}


@pytest.fixture
def registry():
    with isolated_registry(DIST) as reg:  # built-ins plus only this distribution, through its entry point
        yield reg


def test_registration_metadata(registry):
    reg = entry("cell", "pallas_chunkwise")
    assert (reg.dist, reg.version, reg.plugin) == (DIST, "0.1.0", "pallas-mlstm")
    meta = reg.metadata
    assert meta["supports_state"] is True
    assert meta["exportable"] is False
    assert meta["platforms"] == ("cpu", "cuda", "tpu")
    assert set(meta["kwargs_model"].model_fields) == {"chunk_size", "interpret"}
    assert meta["kwargs_model"]().model_dump() == {"chunk_size": 64, "interpret": None}


def test_parity_matrix_of_the_zoo_test_kit(registry):
    # S=1, and a ragged multi-chunk sequence (2 chunks of 16 and 5 left over)
    assert_cell_matches_reference("pallas_chunkwise", seq_lens=(1, 37), kwargs={"chunk_size": 16}, **SMALL)


def _numpy_recurrent(q, k, v, i, f, c, n, m, eps=1e-6):
    """The stabilised mLSTM recurrence step by step in float64 NumPy (written from the equations)."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    c, n, m = (np.array(x, np.float64) for x in (c, n, m))
    S, dqk = q.shape[2], q.shape[3]
    h = np.zeros(v.shape)
    for t in range(S):
        log_f = -np.logaddexp(0.0, -f[:, :, t])  # log sigmoid
        m_new = np.maximum(log_f + m, i[:, :, t])
        decay, inp = np.exp(log_f + m - m_new), np.exp(i[:, :, t] - m_new)
        kt, vt = k[:, :, t], v[:, :, t]
        c = decay[..., None, None] * c + inp[..., None, None] * kt[..., :, None] * vt[..., None, :]
        n = decay[..., None] * n + inp[..., None] * kt
        qt = q[:, :, t] / math.sqrt(dqk)
        den = np.maximum(np.abs(np.einsum("bhd,bhd->bh", qt, n)), np.exp(-m_new))
        h[:, :, t] = np.einsum("bhd,bhdv->bhv", qt, c) / (den[..., None] + eps)
        m = m_new
    return h, (c, n, m)


@pytest.mark.parametrize("S,chunk_size", [(1, 16), (37, 8)])
def test_matches_a_float64_numpy_recurrence_with_states_in_and_out(registry, S, chunk_size):
    inputs = random_cell_inputs(S, 2, 2, S, 8, 12)
    states = random_states(S + 1, 2, 2, 8, 12)
    cell = resolve("cell", "pallas_chunkwise")
    h, out_states = jax.jit(lambda *a: cell(*a[:5], c_initial=a[5], n_initial=a[6], m_initial=a[7],
                                            return_last_states=True, chunk_size=chunk_size))(*inputs, *states)
    ref_h, ref_states = _numpy_recurrent(*inputs, *states)
    assert h.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in out_states)
    assert relative_error(h, jnp.asarray(ref_h, jnp.float32)) < 1e-5
    for got, want in zip(out_states, ref_states):
        assert relative_error(got, jnp.asarray(want, jnp.float32)) < 1e-5


def test_gradients_including_initial_states_match_the_builtin_chunkwise(registry):
    inputs = random_cell_inputs(3, 2, 2, 23, 8, 12)
    states = random_states(4, 2, 2, 8, 12)
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    weights = [jax.random.normal(kk, shape) for kk, shape in
               zip(keys, [(2, 2, 23, 12), (2, 2, 8, 12), (2, 2, 8), (2, 2)])]

    def loss(cell, *args):
        h, (c, n, m) = cell(*args[:5], c_initial=args[5], n_initial=args[6], m_initial=args[7],
                            return_last_states=True, chunk_size=8)
        return sum(jnp.sum(x * w) for x, w in zip((h, c, n, m), weights))

    argnums = tuple(range(8))
    got = jax.jit(jax.grad(lambda *a: loss(resolve("cell", "pallas_chunkwise"), *a), argnums))(*inputs, *states)
    want = jax.jit(jax.grad(lambda *a: loss(resolve("cell", "chunkwise"), *a), argnums))(*inputs, *states)
    for name, g, w in zip(("q", "k", "v", "i", "f", "c0", "n0", "m0"), got, want):
        assert float(jnp.abs(w).max()) > 0, name
        assert relative_error(g, w) < 1e-5, name


def test_forward_goes_through_pallas_call(registry):
    cell = resolve("cell", "pallas_chunkwise")
    inputs = random_cell_inputs(0, 1, 2, 9, 8, 8)
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: cell(*a, chunk_size=4))(*inputs))
    assert "pallas_call" in str(jax.make_jaxpr(jax.grad(lambda *a: cell(*a, chunk_size=4).sum()))(*inputs))
    chunkwise = resolve("cell", "chunkwise")
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: chunkwise(*a, chunk_size=4))(*inputs))


def test_the_compiled_kernels_layout_in_interpret_mode():
    """Power-of-two chunk and feature padding (what Triton gets) changes nothing, bfloat16 included."""
    inputs = random_cell_inputs(7, 1, 2, 21, 12, 20)
    states = random_states(8, 1, 2, 12, 20)
    assert kernel._layout(21, 12, 20, 8, hardware_shapes=True) == (16, 32, 16, 32)
    chunkwise = resolve("cell", "chunkwise")
    want = jax.jit(lambda *a: chunkwise(*a[:5], c_initial=a[5], n_initial=a[6], m_initial=a[7],
                                        return_last_states=True, chunk_size=8))(*inputs, *states)
    low = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
    run = jax.jit(lambda *a: kernel.pallas_forward(*a, chunk_size=8, eps=1e-6, target="interpret",
                                                   hardware_shapes=True))
    assert relative_error(run(*inputs, *states), want) < 1e-5
    h, _ = run(*low, *states)
    assert h.dtype == jnp.bfloat16 and relative_error(h, want[0]) < 2e-2


@pytest.mark.parametrize("platform,target", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_the_declared_accelerators(registry, platform, target):
    """Cross-lowering from the CPU: Mosaic for TPU, Triton for CUDA (jax.export refuses to serialize the latter)."""
    cell = resolve("cell", "pallas_chunkwise")
    inputs = random_cell_inputs(0, 1, 2, 19, 16, 16)
    fn = jax.jit(lambda *a: cell(*a, chunk_size=16))
    checks = [export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
    exported = export.export(fn, platforms=(platform,), disabled_checks=checks)(*inputs)
    assert f"custom_call @{target}" in exported.mlir_module()
    if platform == "cuda":
        with pytest.raises(ValueError, match="no compatibility guarantees"):
            export.export(fn, platforms=(platform,))(*inputs)


def test_zoo_export_refuses_it(registry):
    from zoo.export.entries import ExportError, check_request

    cfg = zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 1, "dtype": "float32",
                           "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
                               "backend": {"name": "pallas_chunkwise"}}}}})
    with pytest.raises(ExportError, match="pallas_chunkwise"):
        check_request(cfg, ["forward"], ["cpu"])


def test_a_model_built_from_config_uses_it_end_to_end(registry):
    pallas = {"name": "pallas_chunkwise", "kwargs": {"chunk_size": 16}}
    base = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32"}
    cfg = zoo.load_config({**base, "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
        "backend": pallas, "prefill_backend": pallas}}}})
    builtin = zoo.load_config({**base, "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
        "backend": {"name": "chunkwise", "kwargs": {"chunk_size": 16}},
        "prefill_backend": {"name": "chunkwise", "kwargs": {"chunk_size": 16}}}}}})
    assert cfg.cell.backend.kwargs == {"chunk_size": 16, "interpret": None}
    params = zoo.init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 61, (2, 37)).astype(np.int32)
    logits = zoo.forward(cfg, params, tokens)
    assert relative_error(logits, zoo.forward(builtin, params, tokens)) < 1e-5
    prefill_logits, state = zoo.prefill(cfg, params, tokens)
    ref_logits, ref_state = zoo.prefill(builtin, params, tokens)
    assert relative_error(prefill_logits, ref_logits) < 1e-5
    assert relative_error(prefill_logits, logits) < 1e-5
    for key in ("c", "n", "m"):
        assert relative_error(state[key], ref_state[key]) < 1e-5, key
