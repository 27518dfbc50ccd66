"""Full LM forward of the JAX zoo against the independent float64 reference (tests/reference.py).

Every parameter leaf is perturbed with seeded noise first: many leaves initialise to zeros or ones (gate kernels,
dense_o, norm scales, learnable_skip, biases), which would hide wrong wiring.
"""

import copy

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import zoo

import reference as R

B, S, V = 2, 12, 53


# ---------------------------------------------------------------------------------------------------------
# config builders
# ---------------------------------------------------------------------------------------------------------


def mlstm_layer(num_heads=2, qk=1.0, v=1.0, gate_input="qkv", vmap_qk=False, **cell):
    cell_cfg = {"norm_eps": 1e-6, "gate_linear_headwise": False}
    cell_cfg.update(cell)
    return {
        "layer_type": "mlstm",
        "num_heads": num_heads,
        "proj_factor": 2.0,
        "conv1d_kernel_size": 4,
        "qkv_proj_blocksize": 4,
        "qk_dim_factor": qk,
        "v_dim_factor": v,
        "gate_input": gate_input,
        "vmap_qk": vmap_qk,
        "mlstm_cell": cell_cfg,
    }


def v1_layer(num_heads=2, qk=1.0, v=1.0, **cell):
    cell_cfg = {"norm_eps": 1e-6, "norm_type_v1": "layernorm"}
    cell_cfg.update(cell)
    return {
        "layer_type": "mlstm_v1",
        "num_heads": num_heads,
        "qk_dim_factor": qk,
        "v_dim_factor": v,
        "mlstm_cell": cell_cfg,
    }


def model(layer, D=32, norm_type="layernorm", feedforward=None, add_post_norm=False, **kw):
    cfg = {
        "vocab_size": V,
        "embedding_dim": D,
        "num_blocks": 2,
        "dtype": "float32",
        "norm_type": norm_type,
        "norm_eps": 1e-6,
        "bias": False,
        "logits_soft_cap": None,
        "tie_weights": False,
        "add_post_blocks_norm": True,
        "lm_head_dtype": "float32",
        "mlstm_block": {"mlstm": layer, "feedforward": feedforward, "add_post_norm": add_post_norm},
    }
    cfg.update(kw)
    return cfg


def ffn(ff_type="ffn_gated", act_fn="swish", proj_factor=1.3, bias=False):
    return {"proj_factor": proj_factor, "act_fn": act_fn, "ff_type": ff_type, "bias": bias}


CASES = {}

# the grid: layer type x norm type x gate_input (mlstm only) x dim factors != 1
for _nt in ("layernorm", "rmsnorm"):
    for _gi in ("qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"):
        CASES[f"mlstm-{_nt}-{_gi}-qk0.5-v1.5"] = model(mlstm_layer(qk=0.5, v=1.5, gate_input=_gi), norm_type=_nt)
    for _qk, _v in ((1.0, 1.0), (0.5, 0.75)):
        CASES[f"v1-{_nt}-qk{_qk}-v{_v}"] = model(v1_layer(qk=_qk, v=_v), norm_type=_nt)
CASES["mlstm-layernorm-qkv-qk1.0-v1.0"] = model(mlstm_layer())

CASES.update(
    {
        # v1 out-norm type is norm_type_v1, independent of the model norm_type (docs/numerics.md §2.3)
        "v1-outnorm-rms-model-ln": model(v1_layer(norm_type_v1="rmsnorm"), norm_type="layernorm"),
        # headwise gates (qkv regrouped per head with unequal q/k/v widths; single-tensor input with 4 heads)
        "mlstm-headwise-qkv-qk0.5-v1.5": model(
            mlstm_layer(qk=0.5, v=1.5, gate_linear_headwise=True), norm_type="rmsnorm"
        ),
        "mlstm-headwise-x_mlstm-nh4": model(mlstm_layer(num_heads=4, gate_input="x_mlstm", gate_linear_headwise=True)),
        # stacked qk projection (with biases, to check the (2, Dqk_tot) bias indexing)
        "mlstm-vmap_qk-bias": model(mlstm_layer(vmap_qk=True, qk=0.5), bias=True),
        # q/k norms
        "mlstm-qknorm-rms": model(mlstm_layer(add_qk_norm=True, qk=0.5), norm_type="rmsnorm"),
        "v1-qknorm-ln": model(v1_layer(add_qk_norm=True, qk=0.5, v=0.75), norm_type="layernorm"),
        # gate soft cap (small cap so that it is active on the forget-gate biases 3..6)
        "mlstm-gate_soft_cap": model(mlstm_layer(gate_soft_cap=2.0)),
        "v1-gate_soft_cap": model(v1_layer(gate_soft_cap=2.0), norm_type="rmsnorm"),
        # logits soft cap (small so that it is active)
        "mlstm-logits_soft_cap": model(mlstm_layer(), logits_soft_cap=0.7),
        # projection biases
        "mlstm-bias": model(mlstm_layer(qk=0.5, v=1.5, gate_linear_headwise=True), bias=True),
        "v1-bias": model(v1_layer(qk=0.5, v=0.75), bias=True),
        # weight tying
        "v1-tie": model(v1_layer(), tie_weights=True, norm_type="rmsnorm"),
        # post norms (with an FFN so that both xlstm_post_norm and ffn_post_norm are exercised)
        "mlstm-post_norm-ffn": model(mlstm_layer(), add_post_norm=True, feedforward=ffn("ffn_gated", "swish")),
        "v1-post_norm-ffn": model(
            v1_layer(qk=0.5), add_post_norm=True, feedforward=ffn("ffn", "gelu"), norm_type="rmsnorm"
        ),
        # FFNs
        "v1-ffn-gelu-bias": model(v1_layer(), feedforward=ffn("ffn", "gelu", proj_factor=2.667, bias=True)),
        # no final norm
        "mlstm-no_final_norm": model(mlstm_layer(), add_post_blocks_norm=False),
        # eps sites: block/out/qk norms use the cell norm_eps, the final norm uses the model norm_eps
        "mlstm-eps-sites": model(mlstm_layer(norm_eps=3e-2, add_qk_norm=True), norm_eps=0.5),
        "v1-eps-sites": model(v1_layer(norm_eps=3e-2, add_qk_norm=True), norm_eps=0.5, norm_type="rmsnorm"),
    }
)

# configs whose forward test starts from zoo.init_params (the others start from an init-like synthetic tree,
# because zoo.init_params costs several seconds per config on CPU)
INIT_CASES = {
    "init-mlstm-all": model(
        mlstm_layer(qk=0.5, v=1.5, add_qk_norm=True, gate_soft_cap=5.0, gate_linear_headwise=True),
        D=48,
        bias=True,
        add_post_norm=True,
        feedforward=ffn("ffn_gated", "gelu", bias=True),
        logits_soft_cap=3.0,
    ),
    "init-v1-all": model(
        v1_layer(num_heads=4, qk=0.5, add_qk_norm=True, gate_soft_cap=5.0),
        D=48,
        norm_type="rmsnorm",
        feedforward=ffn("ffn_gated", "swish", proj_factor=2.667),
        logits_soft_cap=3.0,
    ),
}

# document-border reset cases: (config, pass borders?)
RESET_CASES = {
    "mlstm-reset": (model(mlstm_layer(reset_at_document_boundaries=True)), True),
    "v1-reset": (model(v1_layer(reset_at_document_boundaries=True, qk=0.5)), True),
    # the reset is applied AFTER the gate soft cap: -25 is not capped
    "mlstm-reset-after-softcap": (
        model(mlstm_layer(reset_at_document_boundaries=True, gate_soft_cap=2.0), norm_type="rmsnorm"),
        True,
    ),
    # a non-default reset value must be used as given
    "v1-reset-value": (model(v1_layer(reset_at_document_boundaries=True, reset_fgate_value=-3.0)), True),
    # borders given but reset disabled: the borders are ignored
    "mlstm-borders-reset-off": (model(mlstm_layer(reset_at_document_boundaries=False)), True),
}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def flatten(tree, prefix=""):
    out = {}
    for key in tree:
        val = tree[key]
        path = f"{prefix}/{key}" if prefix else str(key)
        if hasattr(val, "keys"):
            out.update(flatten(val, path))
        else:
            out[path] = val
    return out


def unflatten(flat):
    out = {}
    for path, val in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def perturb(flat, seed=0):
    """Every leaf += 0.5 * N(0,1) * max(std(leaf), 0.2), seeded, in sorted path order; float32."""
    rng = np.random.default_rng(1234 + seed)
    new = {}
    for path in sorted(flat):
        leaf = np.asarray(flat[path])
        assert leaf.dtype == np.float32, (path, leaf.dtype)
        scale = max(float(np.std(leaf)), 0.2)
        new[path] = (leaf + 0.5 * scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    return new


def perturbed_init_params(cfg, seed=0):
    """zoo.init_params, then perturb every leaf."""
    params = zoo.init_params(zoo.load_config(copy.deepcopy(cfg)), seed=seed)
    return perturb(flatten(params), seed)


def synthetic_params(cfg, seed=0):
    """An init-like tree built from the init table (docs/numerics.md §6) on the REFERENCE's expected shapes,
    then perturbed: ones for norm scales and learnable_skip, linspace(3, 6) for forget-gate biases, zeros for
    the other biases and the gate kernels, U(+-1/sqrt(K)) for the conv, N(0, 2/(5D)) for other kernels."""
    D = cfg["embedding_dim"]
    rng = np.random.default_rng(777 + seed)
    flat = {}
    for path, shape in sorted(R.expected_param_shapes(cfg).items()):
        if path.endswith("/scale") or path.endswith("learnable_skip"):
            leaf = np.ones(shape)
        elif path.endswith("fgate/bias"):
            leaf = np.linspace(3.0, 6.0, shape[0])
        elif "conv1d/" in path:
            lim = 1.0 / np.sqrt(R.layer_dims(cfg)["K"])
            leaf = rng.uniform(-lim, lim, shape)
        elif path.endswith("/bias") or "gate/kernel" in path:
            leaf = np.zeros(shape)
        else:
            leaf = np.sqrt(2.0 / (5.0 * D)) * rng.standard_normal(shape)
        flat[path] = leaf.astype(np.float32)
    return perturb(flat, seed)


def inputs(seed=0, borders=False):
    rng = np.random.default_rng(99 + seed)
    tokens = rng.integers(0, V, size=(B, S)).astype(np.int32)
    if not borders:
        return tokens, None
    db = np.zeros((B, S), bool)
    db[:, 0] = True
    db[0, 4] = True
    db[0, 9] = True
    db[1, 6] = True
    return tokens, db


def run_zoo(cfg, flat_params, tokens, borders):
    zcfg = zoo.load_config(copy.deepcopy(cfg))
    params = jax.tree_util.tree_map(jnp.asarray, unflatten(flat_params))
    db = None if borders is None else jnp.asarray(borders)
    out = zoo.forward(zcfg, params, jnp.asarray(tokens), document_borders=db)
    out = np.asarray(out)
    assert out.dtype == np.float32
    assert out.shape == (B, S, V)
    return out.astype(np.float64)


def run_ref(cfg, flat_params, tokens, borders):
    p64 = unflatten({k: np.asarray(v, np.float64) for k, v in flat_params.items()})
    return R.lm_forward(cfg, p64, tokens, borders)


def assert_logits_close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_lm_forward_matches_reference(name):
    cfg = CASES[name]
    flat = synthetic_params(cfg)
    tokens, _ = inputs()
    assert_logits_close(run_zoo(cfg, flat, tokens, None), run_ref(cfg, flat, tokens, None))


@pytest.mark.parametrize("name", sorted(INIT_CASES))
def test_lm_forward_from_zoo_init_matches_reference(name):
    cfg = INIT_CASES[name]
    flat = perturbed_init_params(cfg)
    tokens, _ = inputs(seed=1)
    assert_logits_close(run_zoo(cfg, flat, tokens, None), run_ref(cfg, flat, tokens, None))


@pytest.mark.parametrize("name", sorted(RESET_CASES))
def test_lm_forward_document_borders(name):
    cfg, with_borders = RESET_CASES[name]
    flat = synthetic_params(cfg)
    tokens, borders = inputs(borders=True)
    passed = borders if with_borders else None
    ref = run_ref(cfg, flat, tokens, passed)
    assert_logits_close(run_zoo(cfg, flat, tokens, passed), ref)
    # the case is sensitive to the reset (where the reset is supposed to act)
    cc = cfg["mlstm_block"]["mlstm"]["mlstm_cell"]
    if with_borders and cc.get("reset_at_document_boundaries"):
        ref_no_reset = run_ref(cfg, flat, tokens, None)
        assert np.abs(ref - ref_no_reset).max() > 1e-3 * np.abs(ref).max()


ALL_CFGS = {**CASES, **INIT_CASES, **{k: c for k, (c, _) in RESET_CASES.items()}}


def shapes_of(tree):
    return {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}


def assert_tree_matches(got, want):
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"missing={missing} extra={extra}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"shape mismatches (got, want): {wrong}"


@pytest.mark.parametrize("name", sorted(ALL_CFGS))
def test_param_tree_matches_contract(name):
    cfg = ALL_CFGS[name]
    assert_tree_matches(shapes_of(zoo.param_shapes(zoo.load_config(copy.deepcopy(cfg)))), R.expected_param_shapes(cfg))


@pytest.mark.parametrize("name", sorted(INIT_CASES))
def test_init_params_tree_matches_contract(name):
    cfg = INIT_CASES[name]
    params = zoo.init_params(zoo.load_config(copy.deepcopy(cfg)), seed=0)
    assert_tree_matches(shapes_of(params), R.expected_param_shapes(cfg))
    for path, leaf in flatten(params).items():
        assert np.asarray(leaf).dtype == np.float32, path


def test_reference_recurrent_cell_gives_same_lm_logits():
    """Self-check of the reference: the LM forward with the recurrent cell equals the parallel one (eps=0 aside,
    the two differ only through where eps enters, so compare at a tolerance far below the JAX one)."""
    cfg = RESET_CASES["mlstm-reset-after-softcap"][0]
    flat = synthetic_params(cfg)
    tokens, borders = inputs(borders=True)
    p64 = unflatten({k: np.asarray(v, np.float64) for k, v in flat.items()})
    a = R.lm_forward(cfg, p64, tokens, borders, cell_fn=R.parallel_stabilized_cell)
    b = R.lm_forward(cfg, p64, tokens, borders, cell_fn=R.recurrent_stabilized_cell)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_forward_is_causal_and_perturbation_matters():
    """Sanity on the harness: a future token does not change past logits; the perturbation changes the logits."""
    cfg = CASES["mlstm-layernorm-qkv-qk1.0-v1.0"]
    flat = synthetic_params(cfg)
    tokens, _ = inputs()
    out = run_zoo(cfg, flat, tokens, None)
    tokens2 = tokens.copy()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % V
    out2 = run_zoo(cfg, flat, tokens2, None)
    np.testing.assert_allclose(out[:, :-1], out2[:, :-1], rtol=0, atol=1e-6 * np.abs(out).max())
    assert np.abs(out[:, -1] - out2[:, -1]).max() > 1e-4
    flat2 = synthetic_params(cfg, seed=1)
    assert np.abs(run_ref(cfg, flat2, tokens, None) - run_ref(cfg, flat, tokens, None)).max() > 1e-2
