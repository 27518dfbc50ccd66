"""StableHLO artifacts run in a process that cannot import zoo, and match the JAX model."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
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

RUNNER = """
import numpy as np
from jax import export
artifact, inputs, output = sys.argv[1:4]
load = lambda name: export.deserialize(open(f"{artifact}/{name}.jax_exported", "rb").read())
forward, prefill, step = load("forward"), load("prefill"), load("step")
data = dict(np.load(inputs))
results = {}
for key in ("small", "large"):
    tokens = data[key]
    results[f"forward_{key}"] = np.asarray(forward.call(tokens))
    logits, state = prefill.call(tokens[:, :-2])
    for t in (-2, -1):
        logits, state = step.call(tokens[:, t], state)
        results[f"step{t}_{key}"] = np.asarray(logits)[:, 0]
    results.update({f"final_{name}_{key}": np.asarray(value) for name, value in state.items()})
    results[f"prefill_{key}"] = np.asarray(prefill.call(tokens)[0])
np.savez(output, **results)
"""


def perturbed(params, seed=4, scale=0.3):
    return helpers.perturbed(params, seed, scale)


@pytest.mark.parametrize("layer_type", ["mlstm", "mlstm_v1"])
def test_artifact_runs_without_zoo_and_matches(tmp_path, layer_type):
    cfg = config(layer_type)
    params = perturbed(zoo.init_params(cfg))
    artifact = export_stablehlo(cfg, params, tmp_path / "artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["entries"]["forward"]["inputs"] == [{"name": "tokens", "shape": ["b", "s"], "dtype": "int32"}]
    assert {d["name"] for d in manifest["state_structure"]} >= {"state['c']", "state['n']", "state['m']"}
    mlir = (artifact / "forward.mlir").read_text()
    assert "module @jit" in mlir and "stablehlo.dot_general" in mlir and "tensor<?x?xi32>" in mlir
    np.savez(tmp_path / "inputs.npz", **TOKENS)
    helpers.run_without(("zoo",), tmp_path, RUNNER, artifact, tmp_path / "inputs.npz", tmp_path / "out.npz")
    out = np.load(tmp_path / "out.npz")
    for key, tokens in TOKENS.items():
        full = np.asarray(zoo.forward(cfg, params, tokens))
        assert_rel_close(out[f"forward_{key}"], full)
        assert_rel_close(out[f"prefill_{key}"], np.asarray(zoo.prefill(cfg, params, tokens)[0]))
        logits, state = zoo.prefill(cfg, params, tokens[:, :-2])
        for t in (-2, -1):
            logits, state = zoo.step(cfg, params, tokens[:, t], state)
            assert_rel_close(out[f"step{t}_{key}"], np.asarray(logits))
            assert_rel_close(out[f"step{t}_{key}"], full[:, t], rtol=1e-4)
        for name, value in state.items():
            assert_rel_close(out[f"final_{name}_{key}"], np.asarray(value))


def test_separate_weights_serve_other_checkpoints(tmp_path):
    cfg = config("mlstm_v1")
    first, second = zoo.init_params(cfg, seed=0), perturbed(zoo.init_params(cfg, seed=1))
    artifact = export_stablehlo(cfg, first, tmp_path / "a", entries=["forward"], weights="separate")
    exported = jax.export.deserialize((artifact / "forward.jax_exported").read_bytes())
    tokens = TOKENS["large"]
    assert_rel_close(np.asarray(exported.call(second, tokens)), np.asarray(zoo.forward(cfg, second, tokens)))
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["weights"] == "separate"
    assert manifest["entries"]["forward"]["inputs"][0]["name"].startswith("params")


def test_static_artifact_fixes_shapes_and_says_why(tmp_path):
    cfg = config("mlstm")
    params = perturbed(zoo.init_params(cfg))
    artifact = export_stablehlo(cfg, params, tmp_path / "static", static=(3, 9), platforms=["cpu"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "symbolic_dims" not in manifest
    assert manifest["static_dims"]["b"] == 3 and "IREE" in manifest["static_dims"]["why"]
    assert manifest["entries"]["forward"]["inputs"] == [{"name": "tokens", "shape": ["3", "9"], "dtype": "int32"}]
    assert "tensor<3x9xi32>" in (artifact / "forward.mlir").read_text()
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


def test_export_and_run_cli_match_the_checkpoint(tmp_path):
    def zoo_cli(*args):
        proc = subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

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
