"""The decode layout (zoo.decode_layout, docs/decoding.md): decoding (prefill, then steps) from every layout a config
can have (scanned or per-block blocks, bfloat16 or float32 compute, both layer types) equals the forward pass, its
params are the original values (aliased, not copied, on a CPU), and its cache lives exactly as long as the params
it was built from.

The oracle of every decoding check is ``zoo.forward`` of the config with float32 compute and the config's own
block layout: the parallel form over the whole sequence, on the params as given (stacked when scanned), a
path that shares neither the recurrent step nor the per-block view with what is checked.
"""

from __future__ import annotations

import gc
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import helpers
import zoo
from zoo import decode_layout as dl
from zoo.export.entries import decode_entry_config
from zoo.inference import ModelRunner, SamplingParams, sampler_state
from zoo.inference.decode import step_fn

V, B, S, SPLIT = 61, 2, 6, 2
TOKENS = np.random.default_rng(11).integers(0, V, (B, S)).astype(np.int32)
STEP_VS_FORWARD = 1e-4  # docs/numerics.md §9: prefill + step vs one forward, logits atol
# docs/numerics.md §9, as the plugin parity kit: relative 2e-2 of max|logit|, or 1.5x the bfloat16 forward's own error
BFLOAT16_FLOOR, BFLOAT16_FACTOR = 2e-2, 1.5


def config(layer_type: str, scan: bool, dtype: str) -> zoo.ModelConfig:
    layer = {"layer_type": layer_type, "num_heads": 2, "mlstm_cell": {"gate_soft_cap": 15.0}}
    if layer_type == "mlstm_v1":
        layer["qk_dim_factor"] = 0.5
    return zoo.load_config({"vocab_size": V, "embedding_dim": 32, "num_blocks": 2, "dtype": dtype,
                            "lm_head_dtype": dtype, "scan_blocks": scan, "logits_soft_cap": 30.0,
                            "mlstm_block": {"mlstm": layer,
                                            "feedforward": {"act_fn": "swish"} if layer_type == "mlstm_v1" else None}})


def float32_twin(cfg: zoo.ModelConfig) -> zoo.ModelConfig:
    """``cfg`` with float32 compute and its own block layout: the oracle's config."""
    return cfg.with_overrides({"dtype": "float32", "lm_head_dtype": "float32"})


def params_of(cfg: zoo.ModelConfig, seed: int = 0):
    return helpers.perturbed(zoo.init_params(cfg, seed=seed), seed, 0.1)  # no zero-init leaf hides a bug


def relative(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


LAYOUTS = [pytest.param(layer, scan, dtype, marks=[pytest.mark.slow] if dtype == "bfloat16" else [])
           for layer in ("mlstm", "mlstm_v1") for scan in (True, False) for dtype in ("bfloat16", "float32")]


@pytest.mark.parametrize("layer,scan,dtype", LAYOUTS)
def test_steps_from_every_layout_equal_the_forward_pass(layer, scan, dtype):
    cfg = config(layer, scan, dtype)
    params = params_of(cfg)
    target, view = dl.decode_layout(cfg, params)
    assert (target.dtype, target.lm_head_dtype, target.scan_blocks) == ("float32", "float32", False)  # on a CPU
    oracle = np.asarray(zoo.forward(float32_twin(cfg), params, TOKENS))
    logits, state = zoo.prefill(cfg, params, TOKENS[:, :SPLIT])  # chunkwise, in the config's block layout
    steps = [np.asarray(logits)]
    for t in range(SPLIT, S):  # then the recurrent step, per block
        logits, state = zoo.step(cfg, params, TOKENS[:, t], state)
        steps.append(np.asarray(logits)[:, None])
    steps = np.concatenate(steps, 1)
    assert float(np.abs(steps - oracle).max()) <= STEP_VS_FORWARD
    if dtype == "bfloat16":  # against the forward pass as the config computes it, within bfloat16's tolerance
        as_configured = zoo.forward(cfg, params, TOKENS)
        own_error = relative(as_configured, oracle)
        assert relative(steps, as_configured) <= max(BFLOAT16_FLOOR, BFLOAT16_FACTOR * own_error)
    # the runner generate and the engine use: its steps run on the same cached layout
    runner = ModelRunner(cfg, params)
    assert runner.decode[0] is target and runner.decode[1] is (view if scan else params)


@pytest.mark.slow
@pytest.mark.parametrize("layer,scan", [("mlstm", True), ("mlstm_v1", True), ("mlstm_v1", False)])
def test_generate_from_a_float32_layout_takes_the_forward_argmax(layer, scan):
    cfg = config(layer, scan, "float32")
    params = params_of(cfg, seed=1)
    out = zoo.generate(cfg, params, TOKENS[:, :3], 4)
    fed = np.concatenate([TOKENS[:, :3], np.asarray(out.tokens)], 1)
    oracle = np.asarray(zoo.forward(cfg, params, fed))[:, 2:-1]
    top2 = np.sort(oracle, -1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-3  # positions whose argmax rounding cannot flip
    assert decided.mean() > 0.5
    np.testing.assert_array_equal(np.asarray(out.tokens)[decided], oracle.argmax(-1)[decided])


def test_the_per_block_view_holds_the_original_values_without_a_copy():
    cfg = config("mlstm_v1", True, "float32")
    params = params_of(cfg)
    view = dl.per_block(cfg, params)
    assert "blocks" not in view and jax.tree_util.tree_structure(view) == jax.tree_util.tree_structure(
        zoo.param_shapes(cfg.with_overrides({"scan_blocks": False})))
    aliased_bytes = 0
    for path, stacked in helpers.by_path(params["blocks"]).items():
        rows = np.asarray(stacked)
        for i in range(cfg.num_blocks):
            leaf = helpers.by_path(view[f"blocks_{i}"])[path]
            np.testing.assert_array_equal(np.asarray(leaf), rows[i])
            # row i of the stacked buffer itself (no memory added), wherever rows keep XLA's 64-byte alignment
            aliased = leaf.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * rows[i].nbytes
            assert aliased or rows[i].nbytes % 64, path
            aliased_bytes += rows[i].nbytes * aliased
    assert aliased_bytes > 0.99 * sum(x.nbytes for x in jax.tree_util.tree_leaves(params["blocks"]))
    assert view["lm_head"]["kernel"] is params["lm_head"]["kernel"]


@pytest.mark.parametrize("layer", ["mlstm", "mlstm_v1"])
def test_the_runner_steps_a_per_block_state_in_place(layer):
    """The runner's state is one state per block, each step writes it into the donated buffers (a stacked state
    made XLA:CPU allocate and page-fault in a new one at every step), and it decodes as the stacked state does."""
    cfg = config(layer, True, "float32")
    params = params_of(cfg, seed=2)
    runner = ModelRunner(cfg, params)
    sampler = sampler_state([SamplingParams()] * B, TOKENS.tolist(), V)
    _, first, state, sampler = runner.prefill(TOKENS[:, :SPLIT], np.full(B, SPLIT, np.int32), sampler, 0)
    stacked = zoo.prefill(cfg, params, TOKENS[:, :SPLIT])[1]
    assert isinstance(state, list) and len(state) == cfg.num_blocks and dl.state_batch_axis(state) == 0
    for i, block in enumerate(state):  # block i's rows of the stacked state
        for key, value in block.items():
            np.testing.assert_allclose(np.asarray(value), np.asarray(stacked[key][i]), rtol=1e-6, atol=1e-6)
    if layer == "mlstm":  # its state dominates a step's buffers: the step holds no copy of it
        config_, view = runner.decode
        step = step_fn(config_, view, 0).lower(view, first.tokens, state, sampler).compile()
        assert step.memory_analysis().temp_size_in_bytes < 0.5 * sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    for t in range(SPLIT, S):
        pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(state)]
        sampled, state, sampler = runner.step(jnp.asarray(TOKENS[:, t]), state, sampler, 0)
        assert [leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(state)] == pointers
        logits, stacked = zoo.step(cfg, params, TOKENS[:, t], stacked)  # the public step, on the stacked state
        np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(logits).argmax(-1))
    for i, block in enumerate(state):
        for key, value in block.items():
            np.testing.assert_allclose(np.asarray(value), np.asarray(stacked[key][i]), rtol=1e-5, atol=1e-6)
    assert dl.state_batch_axis(stacked) == 1


@pytest.mark.parametrize("scan", [True, False])
def test_bfloat16_params_are_converted_to_float32_once(scan):
    cfg = config("mlstm", scan, "float32")
    stored = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params_of(cfg))
    target, view = dl.decode_layout(cfg, stored)
    assert {x.dtype for x in jax.tree_util.tree_leaves(view)} == {jnp.dtype(jnp.float32)}
    expected = dl.per_block(cfg, stored) if scan else stored  # per block, still bfloat16
    for path, leaf in helpers.by_path(view).items():
        original = np.asarray(helpers.by_path(expected)[path])
        assert original.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf), original.astype(np.float32))  # bfloat16 -> float32 is exact
    assert dl.decode_layout(cfg, stored)[1] is view  # converted once, then taken from the cache
    assert dl.decode_extra_bytes({"a": ((3, 4), "bfloat16"), "b": ((5,), "float32")}) == 48
    assert dl.decode_extra_bytes({"a": ((3, 4), "bfloat16")}, "gpu") == 0


def test_the_cache_lives_as_long_as_the_params():
    cfg = config("mlstm", True, "bfloat16")
    params = params_of(cfg)
    before = dl.cached_layouts()
    _, view = dl.decode_layout(cfg, params)
    assert dl.cached_layouts() == before + 1
    assert dl.decode_layout(cfg, params)[1] is view  # the same arrays: the cached view
    copy = jax.tree_util.tree_map(jnp.copy, params)
    assert dl.decode_layout(cfg, copy)[1] is not view  # other arrays: their own view
    assert dl.cached_layouts() == before + 2
    del copy
    gc.collect()
    assert dl.cached_layouts() == before + 1
    kept = view  # as a runner built earlier holds it
    expected = np.asarray(params["blocks"]["xlstm"]["proj_up_mlstm"]["kernel"])[1].copy()
    del params
    gc.collect()
    assert dl.cached_layouts() == before  # the caller freed its params: the entry went with them
    jax.block_until_ready([jnp.full((1 << 16,), 7.0) for _ in range(8)])  # reuse freed memory, if it was freed
    # the view outlives the cache entry, and keeps the memory it aliases
    np.testing.assert_array_equal(np.asarray(kept["blocks_1"]["xlstm"]["proj_up_mlstm"]["kernel"]), expected)


def test_the_layout_rules():
    scanned = config("mlstm_v1", True, "bfloat16")
    cpu = dl.decode_config(scanned, "cpu")
    assert (cpu.dtype, cpu.lm_head_dtype, cpu.cell.gate_dtype, cpu.scan_blocks) == ("float32",) * 3 + (False,)
    assert cpu.layer.dtype == cpu.cell.dtype == cpu.mlstm_block.feedforward.dtype == "float32"  # inherited below
    assert dl.decode_config(scanned, "gpu") is scanned  # accelerators compute bfloat16 natively
    plain = config("mlstm", False, "float32")
    assert dl.decode_config(plain, "cpu") is plain
    params = params_of(plain)
    assert dl.decode_layout(plain, params) == (plain, params)  # nothing to view, convert or cache
    # exported prefill and step: float32 compute only for cpu-only artifacts; the blocks keep the artifact's layout
    exported = decode_entry_config(scanned, ["cpu"])
    assert (exported.dtype, exported.lm_head_dtype, exported.scan_blocks) == ("float32", "float32", True)
    assert decode_entry_config(scanned, ["cpu", "cuda"]) is scanned
    prefill = dl.prefill_config(scanned, params_of(scanned))
    assert (prefill.dtype, prefill.lm_head_dtype, prefill.scan_blocks) == ("float32", "float32", True)


@pytest.mark.slow
def test_a_cpu_only_artifact_decodes_in_float32(tmp_path):
    from zoo.export.runners import open_artifact
    from zoo.export.stablehlo import export_stablehlo

    cfg = config("mlstm", True, "bfloat16")
    params = params_of(cfg)
    folder = export_stablehlo(cfg, params, tmp_path / "art", platforms=("cpu",), entries=("prefill", "step"))
    artifact = open_artifact(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["decode_compute"] == {"dtype": "float32", "lm_head_dtype": "float32", "gate_dtype": "float32"}
    oracle = np.asarray(zoo.forward(float32_twin(cfg), params, TOKENS))
    logits, state = artifact.prefill(TOKENS[:, :SPLIT])
    assert float(np.abs(np.asarray(logits) - oracle[:, :SPLIT]).max()) <= STEP_VS_FORWARD
    for t in range(SPLIT, S):
        logits, state = artifact.step(TOKENS[:, t], state)
        assert float(np.abs(np.asarray(logits) - oracle[:, t]).max()) <= STEP_VS_FORWARD, t


def test_zoo_info_states_the_decode_layout_and_its_memory():
    from zoo.info import decoding, decoding_text

    cfg = config("mlstm_v1", True, "bfloat16")
    stored = {"['blocks']['w']": ((2, 8, 8), "bfloat16"), "['lm_head']['kernel']": ((32, 61), "float32")}
    cpu = decoding(cfg.model_dump(mode="json"), stored, "cpu")
    assert cpu == {"platform": "cpu", "dtype": "float32", "lm_head_dtype": "float32", "gate_dtype": "float32",
                   "scan_blocks": False, "extra_bytes": 4 * 2 * 8 * 8}  # a float32 copy of the bfloat16 array
    assert "512.0 B more memory" in decoding_text(cpu)
    gpu = decoding(cfg.model_dump(mode="json"), stored, "gpu")
    assert (gpu["dtype"], gpu["scan_blocks"], gpu["extra_bytes"]) == ("bfloat16", True, 0)
    # the rule zoo info states is the one decode_layout applies
    target = dl.decode_config(cfg, "cpu")
    assert (cpu["dtype"], cpu["lm_head_dtype"], cpu["gate_dtype"], cpu["scan_blocks"]) == (
        target.dtype, target.lm_head_dtype, target.cell.gate_dtype, target.scan_blocks)
