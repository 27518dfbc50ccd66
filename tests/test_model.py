"""Model assembly: shapes, dtypes, causality, scan/remat equivalence, document resets, initialisers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import zoo


def config(**overrides):
    base = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
            "mlstm_block": {"mlstm": {"num_heads": 2}}}
    return zoo.load_config({**base, **overrides})


def v1_config(**overrides):
    block = {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2, "qk_dim_factor": 0.5},
             "feedforward": {"proj_factor": 2.0, "act_fn": "swish"}}
    return config(mlstm_block=block, **overrides)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 9)), jnp.int32)


def perturbed(params, seed=1, scale=0.2):
    return helpers.perturbed(params, seed, scale)


@pytest.mark.parametrize("make", [config, v1_config])
def test_forward_shape_dtype_finite(make):
    cfg = make()
    logits = zoo.forward(cfg, zoo.init_params(cfg), TOKENS)
    assert logits.shape == (2, 9, 61) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("make", [config, v1_config])
def test_bfloat16_compute_stays_close_to_float32(make):
    cfg32 = make()
    cfg16 = make(dtype="bfloat16", lm_head_dtype="bfloat16")
    params = perturbed(zoo.init_params(cfg32))
    l32 = zoo.forward(cfg32, params, TOKENS)
    l16 = zoo.forward(cfg16, params, TOKENS)
    assert l16.dtype == jnp.float32
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, params))
    rel = float(jnp.abs(l16 - l32).max() / jnp.abs(l32).max())
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("make", [config, v1_config])
def test_causal_and_batch_independent(make):
    cfg = make()
    params = perturbed(zoo.init_params(cfg))
    base = zoo.forward(cfg, params, TOKENS)
    changed = TOKENS.at[0, 5].set((TOKENS[0, 5] + 1) % 61)
    out = zoo.forward(cfg, params, changed)
    np.testing.assert_array_equal(out[0, :5], base[0, :5])
    assert float(jnp.abs(out[0, 5:] - base[0, 5:]).max()) > 1e-4
    np.testing.assert_array_equal(out[1], base[1])


def stack_blocks(params, num_blocks):
    blocks = [params.pop(f"blocks_{i}") for i in range(num_blocks)]
    params["blocks"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
    return params


@pytest.mark.parametrize("make", [config, v1_config])
def test_scan_blocks_matches_unrolled(make):
    cfg = make()
    params = perturbed(zoo.init_params(cfg))
    scanned_cfg = make(scan_blocks=True)
    scanned = stack_blocks(dict(params), cfg.num_blocks)
    assert jax.tree_util.tree_structure(scanned) == jax.tree_util.tree_structure(zoo.init_params(scanned_cfg))
    np.testing.assert_allclose(zoo.forward(scanned_cfg, scanned, TOKENS), zoo.forward(cfg, params, TOKENS),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("remat, scan", [(["mLSTMBlock"], True), (["xLSTMResBlock", "FFNResBlock"], False)])
def test_remat_changes_nothing_but_memory(remat, scan):
    cfg = v1_config(scan_blocks=scan)
    rcfg = v1_config(scan_blocks=scan, parallel={"remat": remat})
    params = perturbed(zoo.init_params(cfg))
    assert jax.tree_util.tree_structure(zoo.init_params(rcfg)) == jax.tree_util.tree_structure(params)

    def loss(c):
        model = zoo.build(c)
        return lambda p: model.apply({"params": p}, TOKENS).mean()

    g_plain = jax.jit(jax.grad(loss(cfg)))(params)
    g_remat = jax.jit(jax.grad(loss(rcfg)))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_plain, g_remat)


def test_tie_weights_uses_the_embedding_as_head():
    cfg = config(tie_weights=True)
    params = zoo.init_params(cfg)
    assert "lm_head" not in params
    assert zoo.param_count(cfg) == zoo.param_count(config()) - 32 * 61


def test_document_reset_isolates_documents_for_mlstm_v1():
    cfg = config(mlstm_block={"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2,
                                        "mlstm_cell": {"reset_at_document_boundaries": True}}})
    params = perturbed(zoo.init_params(cfg))
    borders = jnp.zeros(TOKENS.shape, bool).at[:, 0].set(True).at[:, 4].set(True)
    joined = zoo.forward(cfg, params, TOKENS, document_borders=borders)
    alone = zoo.forward(cfg, params, TOKENS[:, 4:])
    np.testing.assert_allclose(joined[:, 4:], alone, rtol=1e-4, atol=1e-4)
    no_reset = zoo.forward(cfg, params, TOKENS)
    assert float(jnp.abs(no_reset[:, 4:] - alone).max()) > 1e-3


def test_context_length_is_enforced():
    cfg = config(context_length=8)
    with pytest.raises(ValueError, match="exceeds context_length=8"):
        zoo.forward(cfg, zoo.init_params(cfg), TOKENS)


def test_parallel_configs_that_need_more_devices_are_refused_not_ignored():
    from zoo.sharding import ShardingError

    with pytest.raises(ShardingError, match="= 8 must divide the 1 device"):
        zoo.init_params(config(parallel={"fsdp_axis_size": 8}))


# --- initialisers follow the init table (docs/numerics.md §6) ---------------------------------

def std_of(x):
    return float(np.asarray(x).std())


def test_initialisers_follow_reference_table():
    D, NB = 256, 4
    cfg = zoo.load_config({"vocab_size": 500, "embedding_dim": D, "num_blocks": NB, "dtype": "float32",
                           "mlstm_block": {"mlstm": {"num_heads": 4, "mlstm_cell": {"igate_bias_init_range": -10.0}}}})
    p = zoo.init_params(cfg, seed=3)
    layer = p["blocks_0"]["xlstm"]
    small = math.sqrt(2 / (5 * D))
    assert std_of(p["token_embedding"]["embedding"]) == pytest.approx(small, rel=0.03)
    assert std_of(p["lm_head"]["kernel"]) == pytest.approx(small, rel=0.03)
    assert std_of(layer["proj_up_mlstm"]["kernel"]) == pytest.approx(small, rel=0.03)
    assert std_of(layer["q_proj"]["kernel"]) == pytest.approx(small, rel=0.05)  # small(D), not small(b)
    assert std_of(layer["proj_down"]["kernel"]) == pytest.approx(2 / (NB * math.sqrt(D)), rel=0.03)
    bound = 1 / math.sqrt(4)
    conv = np.asarray(layer["conv1d"]["kernel"])
    assert conv.min() >= -bound and conv.max() <= bound and conv.max() > 0.9 * bound
    np.testing.assert_array_equal(layer["mlstm_cell"]["igate"]["kernel"], 0)
    np.testing.assert_allclose(layer["mlstm_cell"]["fgate"]["bias"], [3, 4, 5, 6])
    np.testing.assert_allclose(layer["mlstm_cell"]["igate"]["bias"], -10.0)
    np.testing.assert_array_equal(layer["learnable_skip"], 1)
    np.testing.assert_array_equal(layer["mlstm_cell"]["outnorm"]["scale"], 1)


@pytest.mark.parametrize("fn, dist, std, check", [
    ("wang", "truncated_normal", 2 / (2 * math.sqrt(256)), "truncated"),
    ("wang2", "uniform", 1 / (2 * math.sqrt(256)), "uniform"),
    ("small", "normal", math.sqrt(2 / (5 * 256)), "normal"),
    ("zeros", "normal", 0.0, "zeros"),
])
def test_output_init_functions_and_distributions(fn, dist, std, check):
    cfg = zoo.load_config({"vocab_size": 10, "embedding_dim": 256, "num_blocks": 2, "dtype": "float32",
                           "mlstm_block": {"mlstm": {"layer_type": "mlstm_v1", "output_init_fn": fn,
                                                     "init_distribution": dist}}})
    w = np.asarray(zoo.init_params(cfg)["blocks_0"]["xlstm"]["proj_down"]["kernel"])
    if check == "zeros":
        np.testing.assert_array_equal(w, 0)
    elif check == "truncated":  # not rescaled: realised std ≈ 0.88 σ, support [-2σ, 2σ]
        assert w.std() == pytest.approx(0.8796 * std, rel=0.03)
        assert np.abs(w).max() <= 2 * std
    elif check == "uniform":
        assert w.std() == pytest.approx(std, rel=0.03)
        assert np.abs(w).max() <= math.sqrt(3) * std
    else:
        assert w.std() == pytest.approx(std, rel=0.03)
