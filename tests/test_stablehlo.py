"""StableHLO artifacts run in a process that cannot import zoo, and match the JAX model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import zoo
from zoo.export.stablehlo import ExportError, export_stablehlo
from zoo.registry import PluginRegistry, hookimpl, resolve, use_registry

TOKENS = {"small": np.random.default_rng(1).integers(0, 61, size=(1, 5)).astype(np.int32),
          "large": np.random.default_rng(2).integers(0, 61, size=(3, 9)).astype(np.int32)}

RUNNER = """
import sys, json
import numpy as np

class BlockZoo:
    def find_spec(self, name, path=None, target=None):
        if name == "zoo" or name.startswith("zoo."):
            raise ImportError("zoo must not be importable here")
sys.meta_path.insert(0, BlockZoo())

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
    results[f"prefill_{key}"] = np.asarray(prefill.call(tokens)[0])
assert "zoo" not in sys.modules
np.savez(output, **results)
"""


def perturbed(params, seed=4, scale=0.3):
    return helpers.perturbed(params, seed, scale)


def config(layer_type):
    layer = {"layer_type": layer_type, "num_heads": 2, "mlstm_cell": {"gate_soft_cap": 15.0}}
    if layer_type == "mlstm_v1":
        layer["qk_dim_factor"] = 0.5
    return zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
                            "context_length": 64, "mlstm_block": {"mlstm": layer}})


def assert_rel_close(actual, expected, rtol=1e-5):
    assert float(np.abs(actual - expected).max()) <= rtol * float(np.abs(expected).max())


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
    (tmp_path / "runner.py").write_text(textwrap.dedent(RUNNER))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(artifact), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npz")
    for key, tokens in TOKENS.items():
        full = np.asarray(zoo.forward(cfg, params, tokens))
        assert_rel_close(out[f"forward_{key}"], full)
        assert_rel_close(out[f"prefill_{key}"], np.asarray(zoo.prefill(cfg, params, tokens)[0]))
        assert_rel_close(out[f"step-2_{key}"], full[:, -2], rtol=1e-4)
        assert_rel_close(out[f"step-1_{key}"], full[:, -1], rtol=1e-4)


def test_separate_weights_serve_other_checkpoints(tmp_path):
    cfg = config("mlstm_v1")
    first, second = zoo.init_params(cfg, seed=0), perturbed(zoo.init_params(cfg, seed=1))
    artifact = export_stablehlo(cfg, first, tmp_path / "a", entries=["forward"], weights="separate")
    exported = jax.export.deserialize((artifact / "forward.jax_exported").read_bytes())
    tokens = TOKENS["large"]
    assert_rel_close(np.asarray(exported.call(second, tokens)), np.asarray(zoo.forward(cfg, second, tokens)))
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["weights"] == "separate" and manifest["entries"]["forward"]["inputs"][0]["name"].startswith("params")


class SlowKernel:
    @hookimpl
    def register_cells(self, register):
        register("custom_call_kernel", resolve("cell", "parallel_stabilized"), supports_state=False, exportable=False)


def test_non_exportable_backend_is_refused_by_name(tmp_path):
    reg = PluginRegistry(autoload=False)
    with use_registry(reg):
        assert reg.add_plugin(SlowKernel(), "slow").ok
        cfg = zoo.load_config({"vocab_size": 11, "embedding_dim": 32, "dtype": "float32", "mlstm_block": {"mlstm": {
            "num_heads": 2, "mlstm_cell": {"backend": {"name": "custom_call_kernel"}}}}})
        with pytest.raises(ExportError, match=r"cell 'custom_call_kernel' \(mlstm_cell.backend\).*use one of: "
                                              r"chunkwise, parallel_stabilized, recurrent"):
            export_stablehlo(cfg, zoo.init_params(cfg), tmp_path / "a")


def test_export_and_run_cli_match_generate(tmp_path):
    def zoo_cli(*args):
        proc = subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    zoo_cli("build", "tiny-v1", "--out", str(tmp_path / "ck"))
    zoo_cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "hlo"), "--platforms", "cpu")
    ran = zoo_cli("run", str(tmp_path / "hlo"), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5")
    generated = zoo_cli("generate", str(tmp_path / "ck"), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "5")
    pick = [line for line in ran.splitlines() if line.startswith("generated:")]
    assert pick and pick == [line for line in generated.splitlines() if line.startswith("generated:")]
    again = subprocess.run([sys.executable, "-m", "zoo.cli", "export", str(tmp_path / "ck"), "--out",
                            str(tmp_path / "hlo")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "is not empty" in " ".join(again.stderr.split())
