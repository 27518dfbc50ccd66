"""Every command's code path against every parameter layout the zoo produces (issue 14, section 3).

A layout is scanned or per-block params (``scan_blocks``), a tied or separate head (``tie_weights``), the
layer type (``mlstm``, ``mlstm_v1``), the params' stored dtype and the compute ``dtype``. The six rows of
``LAYOUTS`` cover every pair of values of those five factors. Each row runs, in-process, through what
``generate``, ``export`` (StableHLO; SavedModel on one row), ``run``, ``info`` and a sharded load call, and is
checked against its float32 twin: the same values, per block (unstacked here with NumPy indexing), with a
float32 compute dtype, run through ``zoo.forward``. One real-CLI run per command uses the scanned, tied,
bfloat16 mlstm_v1 row. ``convert`` has its own matrix in test_convert_torch.py.
"""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

import zoo
from zoo.export.runners import greedy, open_artifact
from zoo.export.stablehlo import export_stablehlo
from zoo.generate import generate
from zoo.info import describe

LAYERS = {
    "mlstm": {"mlstm": {"layer_type": "mlstm", "num_heads": 2, "mlstm_cell": {"gate_soft_cap": 15.0}}},
    "mlstm_v1": {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2, "qk_dim_factor": 0.5,
                           "mlstm_cell": {"gate_soft_cap": 15.0}},
                 "feedforward": {"act_fn": "swish", "proj_factor": 2.0}},
}
# name: (scan_blocks, tie_weights, layer type, stored param dtype, compute dtype). The first two rows are all
# one value; in the last four, each factor's column is a different 2-of-4 pattern, so every pair of factors
# takes all four value pairs.
LAYOUTS = {
    "plain": (False, False, "mlstm", "float32", "float32"),
    "scan-tied-v1-bf16": (True, True, "mlstm_v1", "bfloat16", "bfloat16"),
    "scan-tied-v1": (True, True, "mlstm_v1", "float32", "float32"),
    "scan-bf16params": (True, False, "mlstm", "bfloat16", "float32"),
    "tied-bf16": (False, True, "mlstm", "bfloat16", "bfloat16"),
    "v1-bf16compute": (False, False, "mlstm_v1", "float32", "bfloat16"),
}
CLI_LAYOUT = "scan-tied-v1-bf16"
PROMPTS = np.random.default_rng(0).integers(0, 61, (2, 5)).astype(np.int32)
NEW_TOKENS = 6
# max |logits - twin| / max |twin|: float32 compute only reorders sums; bfloat16 rounds every activation
TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-2}


def config_of(scan: bool, tie: bool, layer: str, dtype: str) -> zoo.ModelConfig:
    return zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "context_length": 16,
                            "dtype": dtype, "scan_blocks": scan, "tie_weights": tie, "mlstm_block": LAYERS[layer]})


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nested(items: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in items.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def reference(layer: str) -> dict[tuple[str, ...], np.ndarray]:
    """Per-block float32 params of an untied model whose values bfloat16 holds exactly (norm scales near 1)."""
    rng = np.random.default_rng(7)
    shapes = flat(zoo.param_shapes(config_of(False, False, layer, "float32")))
    values = {p: (float(p[-1] == "scale") + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
              for p, s in shapes.items()}
    return {p: x.astype(ml_dtypes.bfloat16).astype(np.float32) for p, x in values.items()}


def in_layout(per_block: dict, scan: bool, tie: bool, num_blocks: int, dtype: str) -> dict:
    """The reference as the zoo lays it out: blocks stacked on a leading axis when scanned, no head when tied."""
    out = {p: x for p, x in per_block.items() if not (tie and p[0] == "lm_head")}
    if scan:
        inner = {p[1:] for p in out if p[0].startswith("blocks_")}
        out = {p: x for p, x in out.items() if not p[0].startswith("blocks_")} | {
            ("blocks", *p): np.stack([per_block[(f"blocks_{i}", *p)] for i in range(num_blocks)]) for p in inner}
    return nested({p: x.astype(getattr(ml_dtypes, dtype, np.float32)) for p, x in out.items()})


def float32_twin(config: zoo.ModelConfig, params) -> tuple[zoo.ModelConfig, dict]:
    """The same model unscanned, in float32: block ``i`` of a stacked leaf is its row ``i``."""
    out = {}
    for path, leaf in flat(params).items():
        leaf = np.asarray(leaf, np.float32)
        if path[0] == "blocks":
            out |= {(f"blocks_{i}", *path[1:]): leaf[i] for i in range(config.num_blocks)}
        else:
            out[path] = leaf
    return config.with_overrides({"scan_blocks": False, "dtype": "float32"}), nested(out)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / np.abs(expected).max())


class Layout:
    """One row of ``LAYOUTS``: its config, the params as saved, a checkpoint of them, and the float32 twin."""

    def __init__(self, name: str, folder):
        self.name = name
        self.scan, self.tie, self.layer, self.param_dtype, self.dtype = LAYOUTS[name]
        self.config = config_of(self.scan, self.tie, self.layer, self.dtype)
        self.params = in_layout(reference(self.layer), self.scan, self.tie, 2, self.param_dtype)
        self.checkpoint = folder / "ck"
        zoo.save(self.checkpoint, self.config, self.params)
        self.twin_config, self.twin_params = float32_twin(self.config, self.params)
        tokens = np.concatenate([PROMPTS, PROMPTS[:, :NEW_TOKENS]], axis=1)  # 11 positions: prompts and more
        self.twin_logits = np.asarray(zoo.forward(self.twin_config, self.twin_params, tokens))
        self.tolerance = TOLERANCE[self.dtype]

    def assert_close(self, actual, expected, what: str):
        error = relative_error(actual, expected)
        assert error <= self.tolerance, f"{self.name}: {what} differ by {error:.2e} > {self.tolerance:.0e}"

    def assert_greedy(self, prompts, prompt_logits, tokens):
        """``tokens (B, N)`` continue ``prompts (B, S)`` greedily, as the twin does (teacher-forced): in float32
        each is the twin's argmax; in bfloat16 its twin logit is the largest, or within rounding of it."""
        tokens = np.asarray(tokens)
        twin = np.asarray(zoo.forward(self.twin_config, self.twin_params, np.concatenate([prompts, tokens], 1)))
        after = twin[:, prompts.shape[1] - 1:-1]  # the logits each generated token was chosen from
        self.assert_close(prompt_logits, after[:, 0], "next-token logits after the prompt")
        if self.dtype == "float32":
            np.testing.assert_array_equal(tokens, after.argmax(-1))
        chosen = np.take_along_axis(after, tokens[..., None], -1)[..., 0]
        assert (after.max(-1) - chosen <= self.tolerance * np.abs(twin).max()).all(), (self.name, after, tokens)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory) -> Layout:
    return Layout(request.param, tmp_path_factory.mktemp(request.param))


def test_the_rows_cover_every_pair_of_factor_values():
    columns = list(zip(*LAYOUTS.values()))
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            pairs = set(zip(columns[i], columns[j]))
            assert len(pairs) == 4, (i, j, pairs)


def test_sharded_load_restores_the_saved_arrays_bitwise(layout):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("dp", "fsdp", "pp", "tp"))
    config, params = zoo.load(layout.checkpoint, mesh=mesh)
    assert config.parallel is not None and config.scan_blocks == layout.scan and config.tie_weights == layout.tie
    loaded, saved = flat(params), flat(layout.params)
    assert loaded.keys() == saved.keys()
    for path, value in saved.items():
        assert loaded[path].dtype == value.dtype, path
        assert isinstance(loaded[path].sharding, NamedSharding) and loaded[path].sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(loaded[path]), value, err_msg=str(path))
    # a cast on load (how a float32 checkpoint is read into bfloat16) gives the rounded values
    _, cast = zoo.load(layout.checkpoint, mesh=mesh, dtype="bfloat16")
    for path, value in flat(cast).items():
        np.testing.assert_array_equal(np.asarray(value), saved[path].astype(ml_dtypes.bfloat16), err_msg=str(path))
    layout.assert_close(zoo.forward(config, params, PROMPTS), layout.twin_logits[:, :5], "sharded-load logits")


def test_generate_continues_as_the_float32_twin(layout):
    config, params = zoo.load(layout.checkpoint)
    result = generate(config, params, PROMPTS, NEW_TOKENS)
    assert result.tokens.shape == (2, NEW_TOKENS) and result.prompt_logits.shape == (2, 61)
    layout.assert_greedy(PROMPTS, result.prompt_logits, result.tokens)


def test_stablehlo_artifact_matches_the_checkpoint_and_the_twin(layout, tmp_path):
    config, params = zoo.load(layout.checkpoint)
    export_stablehlo(config, params, tmp_path / "hlo", platforms=["cpu"])
    manifest = json.loads((tmp_path / "hlo" / "manifest.json").read_text())
    assert {p["dtype"] for p in manifest["weights_file"]["params"]} == {layout.param_dtype}
    artifact = open_artifact(tmp_path / "hlo")
    logits = artifact.forward(PROMPTS)
    layout.assert_close(logits, layout.twin_logits[:, :5], "artifact forward and twin logits")
    np.testing.assert_allclose(logits, zoo.forward(config, params, PROMPTS), rtol=0, atol=1e-5 * np.abs(logits).max())
    _, state = artifact.prefill(PROMPTS)
    _, zoo_state = zoo.prefill(config, params, PROMPTS)
    step_logits, _ = artifact.step(PROMPTS[:, 0], state)
    expected, _ = zoo.step(config, params, PROMPTS[:, 0], zoo_state)
    assert step_logits.shape == (2, 61)
    np.testing.assert_allclose(step_logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    first, tokens = greedy(artifact, [int(t) for t in PROMPTS[1]], NEW_TOKENS)  # what `zoo run` prints
    layout.assert_greedy(PROMPTS[1:], first[None], [tokens])


def test_info_describes_the_layout_as_stored(layout):
    info = describe(layout.checkpoint)
    saved = flat(layout.params)
    count = sum(x.size for x in saved.values())
    assert info["parameters"] == {"source": "stored", "count": count, "bytes": sum(x.nbytes for x in saved.values()),
                                  "by_dtype": {layout.param_dtype: {"count": count, "bytes": count * (
                                      2 if layout.param_dtype == "bfloat16" else 4)}}}
    arch = info["architecture"]
    assert (arch["scan_blocks"], arch["tie_weights"], arch["layer_type"], arch["dtype"]) == (
        layout.scan, layout.tie, layout.layer, layout.dtype)
