"""zoo-mlstm-sig against the xlstm-zoo test kit and an independent float64 NumPy recurrence."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.checkpoint import read_metadata
from zoo.nn.cell import run_cell
from zoo.testing import assert_cell_matches_reference, isolated_registry, random_cell_inputs, random_states

DIST = "zoo-mlstm-sig"
STATES = ("c_initial", "n_initial", "m_initial")


@pytest.fixture(autouse=True)
def registry():
    with isolated_registry(DIST) as reg:
        yield reg


def numpy_sig(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6):
    """mLSTMsig in float64, step by step: C = σ(f)C + σ(i)kvᵀ, h = Cᵀq̂ / (max(|nᵀq̂|, 1) + eps)."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    B, NH, S, D = q.shape
    c = np.zeros((B, NH, D, v.shape[-1])) if c0 is None else np.asarray(c0, np.float64) * np.exp(m0)[..., None, None]
    n = np.zeros((B, NH, D)) if n0 is None else np.asarray(n0, np.float64) * np.exp(m0)[..., None]
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    hs = []
    for t in range(S):
        fg, ig = sigmoid(f[:, :, t]), sigmoid(i[:, :, t])
        c = fg[..., None, None] * c + ig[..., None, None] * np.einsum("bhd,bhv->bhdv", k[:, :, t], v[:, :, t])
        n = fg[..., None] * n + ig[..., None] * k[:, :, t]
        qt = q[:, :, t] / np.sqrt(D)
        den = np.maximum(np.abs(np.einsum("bhd,bhd->bh", qt, n)), 1.0) + eps
        hs.append(np.einsum("bhd,bhdv->bhv", qt, c) / den[..., None])
    return np.stack(hs, axis=2), c, n


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_the_plugin_registers_through_its_entry_point(registry):
    info = registry.plugins[(DIST, "mlstm-sig")]
    assert info.ok and info.dist == DIST and info.version == "0.1.0"
    assert info.registered == {"norm": ["rmsnorm_offset"], "cell": ["parallel_sig", "chunkwise_sig", "recurrent_sig"]}


@pytest.mark.parametrize("name", ["parallel_sig", "chunkwise_sig", "recurrent_sig"])
@pytest.mark.parametrize("S", [1, 37])
def test_cells_match_a_float64_numpy_recurrence(name, S):
    q, k, v, i, f = random_cell_inputs(S, 2, 2, S, 8, 12)
    expected, c, n = numpy_sig(q, k, v, i, f)
    cell = zoo.registry.resolve("cell", name)
    if name == "parallel_sig":
        assert rel(jax.jit(cell)(q, k, v, i, f), expected) < 1e-5
        return
    kwargs = {"chunk_size": 16} if name == "chunkwise_sig" else {}
    run = jax.jit(lambda *a: cell(*a[:5], return_last_states=True, **dict(zip(STATES, a[5:])), **kwargs))
    h, (c_out, n_out, m_out) = run(q, k, v, i, f)
    assert rel(h, expected) < 1e-5 and rel(c_out, c) < 1e-5 and rel(n_out, n) < 1e-5
    assert not np.any(np.asarray(m_out))
    initial = random_states(3, 2, 2, 8, 12)
    expected, c, n = numpy_sig(q, k, v, i, f, *initial)
    h, (c_out, n_out, _) = run(q, k, v, i, f, *initial)
    assert rel(h, expected) < 1e-5 and rel(c_out, c) < 1e-5 and rel(n_out, n) < 1e-5


@pytest.mark.parametrize("name, kwargs", [("chunkwise_sig", {"chunk_size": 4}), ("recurrent_sig", {})])
def test_cells_keep_the_state_through_the_padding_of_a_ragged_batch(name, kwargs):
    """zoo.nn.cell.run_cell masks padded steps with i = -1e30 and f = +1e30: σ gates of exactly 0 and 1 here,
    so each row ends in the state of its prompt alone (the float64 recurrence on the unpadded row)."""
    lengths = np.array([3, 9, 17, 24], np.int32)  # with chunks of 4, row 0 ends on five chunks of padding only
    q, k, v, i, f = random_cell_inputs(4, 4, 2, 24, 8, 12)
    cell = zoo.load_config(SIG_CONFIG).mlstm_block.mlstm.mlstm_cell
    cell = cell.model_copy(update={"prefill_backend": cell.prefill_backend.model_copy(
        update={"name": name, "kwargs": kwargs})})
    seq_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v, i, f)]  # run_cell takes (B, S, NH, ...)
    h, state = jax.jit(lambda *a: run_cell(cell, *a, None, "prefill", None, jnp.asarray(lengths)))(*seq_first)
    assert np.isfinite(np.asarray(h)).all()
    for b, n in enumerate(lengths):
        expected, c, n_state = numpy_sig(*(x[b:b + 1, :, :n] for x in (q, k, v, i, f)))
        assert rel(jnp.swapaxes(h[b:b + 1, :n], 1, 2), expected) < 1e-5
        assert rel(state["c"][b:b + 1], c) < 1e-5 and rel(state["n"][b:b + 1], n_state) < 1e-5


def test_sig_differs_from_the_exponential_gate_mlstm():
    inputs = random_cell_inputs(0, 1, 2, 9, 8, 8)
    sig = zoo.registry.resolve("cell", "parallel_sig")(*inputs)
    exp = zoo.registry.resolve("cell", "parallel_stabilized")(*inputs)
    assert rel(sig, np.asarray(exp, np.float64)) > 1e-2


@pytest.mark.parametrize("name", ["chunkwise_sig", "recurrent_sig"])
def test_kit_parity_matrix(name):
    kwargs = {"chunk_size": 16} if name == "chunkwise_sig" else None
    assert_cell_matches_reference(name, seq_lens=(1, 37), kwargs=kwargs)


def test_offset_rmsnorm_matches_numpy():
    norm = zoo.registry.resolve("norm", "rmsnorm_offset")(eps=1e-5, scale_ndim=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 8))
    params = norm.init(jax.random.PRNGKey(1), x)["params"]
    params = {"scale": params["scale"] + 0.5, "offset": params["offset"] + jnp.arange(32.0).reshape(4, 8) / 10}
    xs = np.asarray(x, np.float64)
    expected = xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(params["scale"]) \
        + np.asarray(params["offset"])
    assert rel(norm.apply({"params": params}, x), expected) < 1e-6


SIG_CONFIG = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "norm_type": "rmsnorm_offset",
              "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
                  "backend": {"name": "chunkwise_sig", "kwargs": {"chunk_size": 4}},
                  "prefill_backend": {"name": "chunkwise_sig", "kwargs": {"chunk_size": 4}},
                  "step_backend": {"name": "recurrent_sig"}}}}}


def test_a_model_from_config_json_runs_decodes_and_records_the_plugin(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SIG_CONFIG))
    cfg = zoo.load_config(str(path))
    params = zoo.init_params(cfg)
    assert "offset" in params["blocks_0"]["xlstm"]["mlstm_cell"]["outnorm"]
    tokens = np.random.default_rng(0).integers(0, 61, (2, 9)).astype(np.int32)
    logits = np.asarray(zoo.forward(cfg, params, tokens))
    parallel = zoo.load_config({**SIG_CONFIG, "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
        "backend": {"name": "parallel_sig"}}}}})
    assert rel(logits, np.asarray(zoo.forward(parallel, params, tokens), np.float64)) < 1e-5
    step_logits, state = zoo.prefill(cfg, params, tokens[:, :5])
    for t in range(5, 9):
        step_logits, state = zoo.step(cfg, params, tokens[:, t], state)
        assert rel(step_logits, logits[:, t].astype(np.float64)) < 1e-4
    zoo.save(tmp_path / "ck", cfg, params)
    plugins = read_metadata(tmp_path / "ck")["plugins"]
    origin = {"plugin": "mlstm-sig", "dist": DIST, "version": "0.1.0"}
    assert plugins["cell"]["chunkwise_sig"] == origin and plugins["cell"]["recurrent_sig"] == origin
    assert plugins["norm"]["rmsnorm_offset"] == origin
