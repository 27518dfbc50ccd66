"""StableHLO artifacts run in a process that cannot import zoo, and match the JAX model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import helpers
import zoo
from zoo.cli import app
from zoo.export.entries import ExportError
from zoo.export.runners import greedy, open_artifact
from zoo.export.stablehlo import export_stablehlo
from zoo.registry import PluginRegistry, hookimpl, resolve, use_registry

TOKENS = helpers.EXPORT_TOKENS
config = helpers.export_config
assert_rel_close = helpers.assert_rel_close
README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = Path("artifacts", "demo-stablehlo")  # where the README's loader looks

# Appended to the README's loader, which defines weights, forward, prefill and step, and ends on a step.
CHECKS = """
import sys
results = {"readme_step_logits": np.asarray(logits)}
results.update({f"readme_state_{name}": np.asarray(value) for name, value in state.items()})
data = dict(np.load(sys.argv[1]))
for key in ("small", "large"):
    tokens = data[key]
    results[f"forward_{key}"] = np.asarray(forward.call(weights, tokens))
    whole = np.full(tokens.shape[:1], tokens.shape[1], np.int32)  # every row's length: a rectangular batch
    logits, state = prefill.call(weights, tokens[:, :-2], whole - 2)
    for t in (-2, -1):
        logits, state = step.call(weights, tokens[:, t], state)
        results[f"step{t}_{key}"] = np.asarray(logits)
    results.update({f"final_{name}_{key}": np.asarray(value) for name, value in state.items()})
    results[f"prefill_{key}"] = np.asarray(prefill.call(weights, tokens, whole)[0])
np.savez(sys.argv[2], **results)
"""


def perturbed(params, seed=4, scale=0.3):
    return helpers.perturbed(params, seed, scale)


def readme_loader() -> str:
    """The README's StableHLO loader: its Python block that reads ``weights.npz``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    loaders = [b for b in blocks if "weights.npz" in b]
    assert len(loaders) == 1, "the README should show one loader of weights.npz"
    return loaders[0]


def path_keys(params) -> dict[str, np.ndarray]:
    """Each param by its '/'-joined dict keys, walked here by hand (not through the exporter's helper)."""
    if not isinstance(params, dict):
        return {"": np.asarray(params)}
    return {f"{k}/{sub}".rstrip("/"): leaf for k, v in params.items() for sub, leaf in path_keys(v).items()}


@pytest.fixture(scope="module", params=["mlstm", "mlstm_v1"])
def default_export(request, tmp_path_factory):
    """One default export (every entry and platform, the weights file) of a tiny model, shared by the tests."""
    cfg = config(request.param)
    params = perturbed(zoo.init_params(cfg))
    root = tmp_path_factory.mktemp(request.param)
    return cfg, params, export_stablehlo(cfg, params, root / DEMO), root


def test_readme_loader_runs_the_artifact_without_zoo(default_export):
    cfg, params, artifact, root = default_export
    assert sorted(p.name for p in artifact.iterdir()) == ["forward.jax_exported", "manifest.json",
                                                          "prefill.jax_exported", "step.jax_exported", "weights.npz"]
    np.savez(root / "inputs.npz", **TOKENS)
    helpers.run_without(("zoo",), root, readme_loader() + CHECKS, root / "inputs.npz", root / "out.npz")
    out = np.load(root / "out.npz")
    prompt = np.array([[1, 2, 3, 4, 5]], np.int32)  # the README's tokens
    logits, state = zoo.prefill(cfg, params, prompt)
    logits, state = zoo.step(cfg, params, jnp.argmax(logits[:, -1], -1), state)
    assert out["readme_step_logits"].shape == (1, cfg.vocab_size)
    assert_rel_close(out["readme_step_logits"], np.asarray(logits))
    for name, value in state.items():
        assert_rel_close(out[f"readme_state_{name}"], np.asarray(value))
    for key, tokens in TOKENS.items():
        full = np.asarray(zoo.forward(cfg, params, tokens))
        assert_rel_close(out[f"forward_{key}"], full)
        assert_rel_close(out[f"prefill_{key}"], np.asarray(zoo.prefill(cfg, params, tokens)[0]))
        logits, state = zoo.prefill(cfg, params, tokens[:, :-2])
        for t in (-2, -1):
            logits, state = zoo.step(cfg, params, tokens[:, t], state)
            assert out[f"step{t}_{key}"].shape == (tokens.shape[0], cfg.vocab_size)  # (B, V), like zoo.step
            assert_rel_close(out[f"step{t}_{key}"], np.asarray(logits))
            assert_rel_close(out[f"step{t}_{key}"], full[:, t], rtol=1e-4)
        for name, value in state.items():
            assert_rel_close(out[f"final_{name}_{key}"], np.asarray(value))


def test_weights_are_stored_once_in_a_file_the_entries_share(default_export):
    cfg, params, artifact, _ = default_export
    flat = path_keys(params)
    manifest = json.loads((artifact / "manifest.json").read_text())
    spec = manifest["weights_file"]
    assert manifest["weights"] == "file" and spec["file"] == "weights.npz"
    assert {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in spec["params"]} == {
        name: (leaf.shape, "float32") for name, leaf in flat.items()}
    with np.load(artifact / spec["file"]) as npz:
        assert sorted(npz.files) == sorted(flat)
        for name, leaf in flat.items():
            np.testing.assert_array_equal(npz[name], leaf)
    assert spec["bytes"] == (artifact / "weights.npz").stat().st_size
    assert manifest["weights_sha256"] == hashlib.sha256((artifact / "weights.npz").read_bytes()).hexdigest()
    # No entry carries a copy of the weights: the embedding's bytes are in weights.npz alone.
    embedding = flat["token_embedding/embedding"].tobytes()
    assert (artifact / "weights.npz").read_bytes().count(embedding) == 1
    for entry in ("forward", "prefill", "step"):
        assert (artifact / f"{entry}.jax_exported").read_bytes().count(embedding) == 0
    assert not list(artifact.glob("*.mlir"))  # StableHLO text only on request (--mlir)


def test_a_damaged_or_escaping_weights_file_is_refused(default_export, tmp_path):
    artifact = shutil.copytree(default_export[2], tmp_path / "copy")
    whole = (artifact / "weights.npz").read_bytes()
    (artifact / "weights.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ExportError, match="weights.npz does not hold the weights its manifest lists"):
        open_artifact(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["weights_file"]["file"] = "../weights.npz"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "weights.npz").write_bytes(whole)
    with pytest.raises(ExportError, match="outside the artifact directory"):
        open_artifact(artifact)


def test_manifest_lists_inputs_and_outputs_in_the_exported_order(default_export):
    cfg, params, artifact, _ = default_export
    manifest = json.loads((artifact / "manifest.json").read_text())
    vocab = str(cfg.vocab_size)
    state = {f"state['{k}']": ["b" if i == 1 else str(d) for i, d in enumerate(v.shape)]
             for k, v in zoo.init_decode_state(cfg, 1).items()}  # batch is the second axis, after the blocks
    expected = {"forward": {"logits": ["b", "s", vocab]}, "prefill": {"logits": ["b", "s", vocab], **state},
                "step": {"logits": ["b", vocab], **state}}
    weight_shapes = {f"weights['{k}']": [str(d) for d in v.shape] for k, v in path_keys(params).items()}
    for name, entry in manifest["entries"].items():
        exported = jax.export.deserialize((artifact / entry["file"]).read_bytes())
        rows = entry["outputs"]
        assert [r["name"] for r in rows][0] == "logits" and {r["name"] for r in rows} == set(expected[name])
        assert len(rows) == len(exported.out_avals)
        for row, aval in zip(rows, exported.out_avals):  # the i-th row describes the i-th output
            assert row["shape"] == expected[name][row["name"]], (name, row)
            assert row["shape"] == [str(d) for d in aval.shape] and row["dtype"] == str(aval.dtype), (name, row)
        given = {"tokens": ["b", "s"], "lengths": ["b"], "token": ["b"], **state, **weight_shapes}
        arguments = {"forward": ["tokens"], "prefill": ["tokens", "lengths"], "step": ["token", *state]}[name]
        assert [r["name"] for r in entry["inputs"][len(weight_shapes):]] == arguments
        assert len(entry["inputs"]) == len(exported.in_avals) == len(weight_shapes) + len(arguments)
        for row, aval in zip(entry["inputs"], exported.in_avals):
            assert row["shape"] == given[row["name"]], (name, row)
            assert row["shape"] == [str(d) for d in aval.shape] and row["dtype"] == str(aval.dtype), (name, row)
        weights = [p["name"] for p in manifest["weights_file"]["params"]]
        assert [r["name"] for r in entry["inputs"][:len(weights)]] == [f"weights['{w}']" for w in weights]


def test_weights_keep_their_dtype_and_serve_other_checkpoints(tmp_path):
    cfg = config("mlstm_v1")
    first, second = (jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p)
                     for p in (zoo.init_params(cfg, seed=0), perturbed(zoo.init_params(cfg, seed=1))))
    artifact = export_stablehlo(cfg, first, tmp_path / "a", entries=["forward"], platforms=["cpu"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert {p["dtype"] for p in manifest["weights_file"]["params"]} == {"bfloat16"}
    with np.load(artifact / "weights.npz") as npz:  # stored as 2 bytes per element, not widened to float32
        assert {npz[k].dtype.itemsize for k in npz.files} == {2}
    tokens = TOKENS["large"]
    exported = jax.export.deserialize((artifact / "forward.jax_exported").read_bytes())
    other = {k: jnp.asarray(v) for k, v in path_keys(second).items()}
    assert_rel_close(np.asarray(exported.call(other, tokens)), np.asarray(zoo.forward(cfg, second, tokens)))
    assert_rel_close(open_artifact(artifact).forward(tokens), np.asarray(zoo.forward(cfg, first, tokens)))
    with pytest.raises(ExportError, match="'separate' is now 'file'"):
        export_stablehlo(cfg, first, tmp_path / "b", weights="separate")


def test_static_baked_artifact_fixes_shapes_and_says_why(tmp_path):
    cfg = config("mlstm")
    params = perturbed(zoo.init_params(cfg))
    artifact = export_stablehlo(cfg, params, tmp_path / "static", static=(3, 9), platforms=["cpu"], weights="baked",
                                mlir=True)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "symbolic_dims" not in manifest and "weights_file" not in manifest
    assert manifest["static_dims"]["b"] == 3 and "IREE" in manifest["static_dims"]["why"]
    assert manifest["entries"]["forward"]["inputs"] == [{"name": "tokens", "shape": ["3", "9"], "dtype": "int32"}]
    assert "tensor<3x9xi32>" in (artifact / manifest["entries"]["forward"]["mlir"]).read_text()
    embedding = np.asarray(params["token_embedding"]["embedding"]).tobytes()
    assert (artifact / "forward.jax_exported").read_bytes().count(embedding) == 1  # baked: inside the entry
    forward = jax.export.deserialize((artifact / "forward.jax_exported").read_bytes())
    tokens = TOKENS["large"]
    assert_rel_close(np.asarray(forward.call(tokens)), np.asarray(zoo.forward(cfg, params, tokens)))
    with pytest.raises(ValueError, match="shape"):
        forward.call(tokens[:, :5])


def test_run_paths_agree_with_a_forward_rerun(tmp_path):
    cfg = config("mlstm_v1")
    params = perturbed(zoo.init_params(cfg))
    prompt = [int(t) for t in TOKENS["small"][0]]
    expected, tokens = [], list(prompt)  # independent greedy decoding: rerun zoo.forward on the whole sequence
    for _ in range(4):
        logits = np.asarray(zoo.forward(cfg, params, np.asarray([tokens], np.int32)))[0, -1]
        expected.append(int(np.argmax(logits)))
        tokens.append(expected[-1])
    first = np.asarray(zoo.forward(cfg, params, np.asarray([prompt], np.int32)))[0, -1]
    zoo.save(tmp_path / "ck", cfg, params)
    export_stablehlo(cfg, params, tmp_path / "forward-only", entries=["forward"], platforms=["cpu"])
    export_stablehlo(cfg, params, tmp_path / "static", static=(1, len(prompt)), platforms=["cpu"])
    for name in ("ck", "forward-only", "static"):
        artifact = open_artifact(tmp_path / name)
        logits, generated = greedy(artifact, prompt, 4)
        assert generated == expected, name
        assert_rel_close(logits, first)
    with pytest.raises(ExportError, match="exactly 5 prompt ids"):
        greedy(open_artifact(tmp_path / "static"), prompt[:3], 2)
    # context_length (64 in export_config) bounds the prompt of every kind; only step may decode past it.
    forward_only = open_artifact(tmp_path / "forward-only")
    with pytest.raises(ExportError, match=r"context_length=64 bounds each forward or prefill call.* 65 tokens"):
        greedy(forward_only, [1] * 65, 1)
    with pytest.raises(ExportError, match="forward reruns on up to 65"):
        greedy(forward_only, [1] * 60, 6)
    assert len(greedy(forward_only, [1] * 60, 5)[1]) == 5
    with pytest.raises(ExportError, match="prompt id 61 is outside the vocabulary.*0 to 60"):
        greedy(forward_only, [3, 61], 1)


class SlowKernel:
    @hookimpl
    def register_cells(self, register):
        register("custom_call_kernel", resolve("cell", "parallel_stabilized"), supports_state=False, exportable=False,
                 platforms=("cuda",))
        register("cpu_only", resolve("cell", "parallel_stabilized"), supports_state=False, exportable=True,
                 platforms=("cpu",))


def test_non_exportable_backend_is_refused_by_name(tmp_path):
    reg = PluginRegistry(autoload=False)
    with use_registry(reg):
        assert reg.add_plugin(SlowKernel(), "slow").ok
        cfg = zoo.load_config({"vocab_size": 11, "embedding_dim": 32, "dtype": "float32", "mlstm_block": {"mlstm": {
            "num_heads": 2, "mlstm_cell": {"backend": {"name": "custom_call_kernel"}}}}})
        with pytest.raises(ExportError, match=r"cell 'custom_call_kernel' \(mlstm_cell.backend\).*use one of: "
                                              r"chunkwise, cpu_only, parallel_stabilized, recurrent"):
            export_stablehlo(cfg, zoo.init_params(cfg), tmp_path / "a")
        cpu_only = zoo.load_config({"vocab_size": 11, "embedding_dim": 32, "dtype": "float32", "mlstm_block": {
            "mlstm": {"num_heads": 2, "mlstm_cell": {"backend": {"name": "cpu_only"}}}}})
        with pytest.raises(ExportError, match="runs cell 'cpu_only', which declares platforms cpu; it cannot be "
                                              "lowered for cuda, tpu"):
            export_stablehlo(cpu_only, zoo.init_params(cpu_only), tmp_path / "b", entries=["forward"])


# TensorFlow's start-up lines: absl's pre-init notice, glog-style "I0000 00:00:..." lines, oneDNN, CPU features.
TF_LOG_LINE = re.compile(r"absl|oneDNN|cpu_feature_guard|rebuild TensorFlow|^[IWEF]\d{4} \d\d:\d\d", re.M)


def test_export_and_run_cli_match_the_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}

    def zoo_cli(*args):
        proc = subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, timeout=300,
                              env=env)  # a new user's environment: no TF log settings
        assert proc.returncode == 0, proc.stderr
        assert not TF_LOG_LINE.search(proc.stderr), proc.stderr
        return proc.stdout

    assert TF_LOG_LINE.search("I0000 00:00:1795948800.230186 9373 port.cc:153] oneDNN custom operations are on")
    zoo_cli("build", "tiny-v1", "--out", str(tmp_path / "ck"))
    zoo_cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "hlo"), "--platforms", "cpu")
    zoo_cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "tf"), "--format", "savedmodel")
    _, tokens = greedy(open_artifact(tmp_path / "ck"), [3, 1, 4, 1, 5], 5)
    for artifact, kind in (("hlo", "stablehlo"), ("tf", "savedmodel")):
        ran = zoo_cli("run", str(tmp_path / artifact), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5")
        assert f"artifact:  {kind} (forward, prefill, step)" in ran
        assert f"generated: {' '.join(map(str, tokens))}" in ran
    again = CliRunner().invoke(app, ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "hlo")])
    assert again.exit_code == 2 and "is not empty" in " ".join(again.stderr.split())
    too_long = CliRunner().invoke(app, ["run", str(tmp_path / "hlo"), "--prompt-ids", ",".join(["1"] * 257)])
    assert too_long.exit_code == 2 and "Traceback" not in too_long.stderr, too_long.stderr
    assert "context_length=256 bounds each forward or prefill call" in " ".join(too_long.stderr.split())
