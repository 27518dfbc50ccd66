"""``zoo info``: checkpoints (two steps), a StableHLO artifact, a preset and a config file, against the files.

Expected values come from outside ``zoo.info``: the parameter count worked out by hand from the
mLSTM layer's structure, byte sizes from the restored arrays with NumPy, hashes and versions from
the metadata and manifest files read as JSON, the published size of a preset, and the documented
schema in docs/info.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import zoo
from helpers import invoke_cli as invoke
from helpers import UnitNormPlugin as NormPlugin
from zoo.checkpoint import CheckpointError
from zoo.registry import PluginRegistry, hookimpl, resolve, use_registry

ROOT = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 40, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2}}}

# By hand, from the mLSTM layer of xLSTM (NX-AI's mLSTMLayer) with D=32, proj_factor 2 (inner 64),
# 2 heads, blocksize-4 q/k/v projections, a kernel-4 causal conv, layernorms without bias:
#   proj_up 32·128 = 4096, proj_down 64·32 = 2048, conv 4·64 + 64 = 320, q/k/v 3·(16 blocks·4·4) = 768,
#   learnable skip 64, input and forget gates 2·(192·2 + 2) = 772, multi-head out norm 64, block norm 32
#   -> 8164 per block; embedding 40·32 = 1280, untied head 32·40 = 1280, final norm 32.
HAND_COUNT = 2 * 8164 + 1280 + 1280 + 32
assert HAND_COUNT == 18920
EMBEDDING = 40 * 32  # stored as bfloat16 below: a checkpoint with two dtypes


def params_for(config, seed):
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32),
                                    zoo.param_shapes(config))
    params["token_embedding"]["embedding"] = params["token_embedding"]["embedding"].astype(jnp.bfloat16)
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("info") / "ck"
    config = zoo.load_config(TINY)
    for seed in (1, 2):
        zoo.save(root, config, params_for(config, seed))
    return root


def describe(*args, **kwargs):
    from zoo.info import describe_path

    return describe_path(*args, **kwargs)




def test_info_on_a_checkpoint_matches_its_files(checkpoint):
    latest, first = describe(checkpoint), describe(checkpoint, step=0)
    assert latest["kind"] == "checkpoint" and latest["schema_version"] == 1 and latest["path"] == str(checkpoint)
    assert latest["steps"] == [0, 1] and latest["step"] == 1 and first["step"] == 0
    assert latest["architecture"] == {"layer_type": "mlstm", "num_blocks": 2, "embedding_dim": 32, "num_heads": 2,
                                      "vocab_size": 40, "context_length": -1, "dtype": "float32",
                                      "lm_head_dtype": "float32", "tie_weights": False, "scan_blocks": False,
                                      "quantization": None}
    _, restored = zoo.load(checkpoint)
    arrays = [np.asarray(x) for x in jax.tree_util.tree_leaves(restored)]
    params = latest["parameters"]
    assert params["source"] == "stored"
    assert params["count"] == HAND_COUNT == sum(a.size for a in arrays)
    assert params["bytes"] == sum(a.nbytes for a in arrays) == 4 * (HAND_COUNT - EMBEDDING) + 2 * EMBEDDING
    assert params["by_dtype"] == {"bfloat16": {"count": EMBEDDING, "bytes": 2 * EMBEDDING},
                                  "float32": {"count": HAND_COUNT - EMBEDDING, "bytes": 4 * (HAND_COUNT - EMBEDDING)}}
    for info, step in ((latest, 1), (first, 0)):
        recorded = json.loads((checkpoint / str(step) / "metadata" / "metadata").read_text())
        assert info["hashes"] == {"content": recorded["content_sha256"], "config": recorded["config_sha256"],
                                  "metadata": recorded["metadata_sha256"]}
    assert latest["hashes"]["content"] != first["hashes"]["content"]  # two different models
    assert latest["versions"] == {"zoo": zoo.__version__, "jax": jax.__version__, "flax": flax.__version__,
                                  "orbax": ocp.__version__}
    plugins = {(p["kind"], p["name"]): p for p in latest["plugins"]}
    assert {("layer", "mlstm"), ("norm", "layernorm"), ("cell", "parallel_stabilized")} <= set(plugins)
    assert plugins[("layer", "mlstm")]["dist"] == "xlstm-zoo" and all(p["installed"] for p in plugins.values())
    files = [p for p in (checkpoint / "1").rglob("*") if p.is_file()]
    assert latest["disk_bytes"] == sum(os.path.getsize(p) for p in files) and latest["config_error"] is None


def test_info_names_a_plugin_that_is_not_installed(tmp_path):
    reg = PluginRegistry(autoload=False)
    with use_registry(reg):
        assert reg.add_plugin(NormPlugin(), "unit-norms", dist="zoo-unit-norms", version="2.0").ok
        config = zoo.load_config({**TINY, "norm_type": "unitnorm"})
        zoo.save(tmp_path / "ck", config, params_for(config, 0))
    info = describe(tmp_path / "ck")
    missing = [p for p in info["plugins"] if not p["installed"]]
    assert missing == [{"kind": "norm", "name": "unitnorm", "plugin": "unit-norms", "dist": "zoo-unit-norms",
                        "version": "2.0", "installed": False, "installed_version": None, "installed_as": None}]
    assert "unitnorm" in info["config_error"]
    assert info["architecture"]["num_blocks"] == 2 and info["parameters"]["count"] == HAND_COUNT


class OverridingNorm:
    """Registers the built-in name "rmsnorm" for another function, taking the bare name."""

    @hookimpl
    def register_norms(self, register):
        register("rmsnorm", resolve("norm", "layernorm"), override=True)


def test_a_plugin_name_that_now_means_another_plugin_is_refused_on_load(tmp_path):
    config = zoo.load_config({**TINY, "norm_type": "rmsnorm"})
    zoo.save(tmp_path / "ck", config, params_for(config, 0))
    reg = PluginRegistry(autoload=False)
    assert reg.add_plugin(OverridingNorm(), "overrider", dist="zoo-overrider", version="3.0").ok
    with use_registry(reg):
        with pytest.raises(CheckpointError) as caught:
            zoo.load(tmp_path / "ck")
        info = describe(tmp_path / "ck")
    message = str(caught.value)
    assert "\n" not in message
    assert "norm 'rmsnorm' (from xlstm-zoo" in message and "overrider (zoo-overrider 3.0)" in message
    [row] = [p for p in info["plugins"] if p["name"] == "rmsnorm"]
    assert (row["installed"], row["installed_as"]) == (False, "overrider (zoo-overrider 3.0)")
    zoo.load(tmp_path / "ck")  # with the built-in registry again, it loads


@pytest.mark.slow
def test_info_on_a_stablehlo_artifact(tmp_path):
    from zoo.export.stablehlo import export_stablehlo

    config = zoo.load_config(TINY)
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.bfloat16), zoo.param_shapes(config))
    artifact = export_stablehlo(config, params, tmp_path / "art", platforms=["cpu"], entries=["forward"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    info = describe(artifact)
    assert info["kind"] == "artifact" and info["path"] == str(artifact)
    assert info["artifact"] == {"format": "stablehlo", "entries": ["forward"], "platforms": ["cpu"],
                                "weights": manifest.get("weights")}
    assert info["architecture"]["vocab_size"] == 40 and info["architecture"]["num_heads"] == 2
    assert info["parameters"] == {"source": "stored", "count": HAND_COUNT, "bytes": 2 * HAND_COUNT,  # bfloat16
                                  "by_dtype": {"bfloat16": {"count": HAND_COUNT, "bytes": 2 * HAND_COUNT}}}
    assert info["hashes"]["config"] == manifest["config_sha256"] and info["versions"]["jax"] == jax.__version__
    assert info["disk_bytes"] == sum(os.path.getsize(p) for p in artifact.rglob("*") if p.is_file())
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        describe(artifact, step=0)
    assert info["problems"] == []
    damaged_artifacts_are_reported(artifact, tmp_path)


def damaged_artifacts_are_reported(artifact: Path, tmp_path: Path) -> None:
    """An edited config, a missing weights file and a truncated entry: `zoo info` lists each as a problem (exit 0)
    and `zoo run` refuses each with one line naming the file."""
    import shutil

    from test_cli_bad_input import invoke, refused

    edited, unweighted, cut = (Path(shutil.copytree(artifact, tmp_path / name)) for name in ("ed", "nw", "cut"))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["config"]["context_length"] = 4  # the exported model was traced for 256
    (edited / "manifest.json").write_text(json.dumps(manifest))
    (unweighted / "weights.npz").unlink()
    entry = (cut / "forward.jax_exported").read_bytes()
    (cut / "forward.jax_exported").write_bytes(entry[:500])
    assert describe(edited)["problems"] == [f"{edited / 'manifest.json'}: its config does not match the "
                                            "config_sha256 recorded at export (edited or corrupted); export the "
                                            "model again"]
    assert describe(unweighted)["problems"] == ["missing file weights.npz (named by manifest.json)"]
    shown = invoke("info", unweighted)
    assert shown.exit_code == 0 and "problem" in shown.stdout and "missing file weights.npz" in shown.stdout
    refused(invoke("run", edited, "--prompt-ids", "1"), "its config does not match the config_sha256")
    refused(invoke("run", unweighted, "--prompt-ids", "1"), "weights.npz")
    refused(invoke("run", cut, "--prompt-ids", "1"), f"{cut / 'forward.jax_exported'} is not a whole jax.export "
                                                      "entry (500 bytes")


def test_info_on_a_preset_and_a_config_file(tmp_path, checkpoint):
    preset = describe("mlstm-1.3b")
    assert preset["kind"] == "config" and preset["preset"] == "mlstm-1.3b" and preset["path"] is None
    assert preset["parameters"]["count"] == 1_422_559_616  # the published size (docs/numerics.md §7.3)
    assert preset["parameters"]["by_dtype"] == {"float32": {"count": 1_422_559_616, "bytes": 4 * 1_422_559_616}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    info = describe(path)
    assert info["kind"] == "config" and info["path"] == str(path) and info["preset"] is None
    assert info["parameters"]["count"] == HAND_COUNT and info["architecture"]["embedding_dim"] == 32
    # the hash a checkpoint of this config records, read from the saved metadata file
    recorded = json.loads((checkpoint / "0" / "metadata" / "metadata").read_text())
    assert info["hashes"] == {"config": recorded["config_sha256"]}


def documented_fields() -> set[str]:
    return set(re.findall(r"^\| `([a-z_.]+)` \|", (ROOT / "docs" / "info.md").read_text(), re.MULTILINE))


def test_info_cli_json_follows_the_documented_schema(checkpoint):
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "info", str(checkpoint), "--json"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert info["kind"] == "checkpoint" and info["steps"] == [0, 1] and info["parameters"]["count"] == HAND_COUNT
    documented = documented_fields()
    assert {"schema_version", "kind", "steps", "artifact", "parameters.source"} <= documented
    assert set(info) <= documented and set(describe("tiny")) <= documented


def test_info_cli_text_steps_and_refusals(checkpoint, tmp_path):
    text = invoke("info", checkpoint)
    assert text.exit_code == 0, text.stderr
    assert "1 (steps 0-1)" in text.stdout and f"{HAND_COUNT:,}" in text.stdout
    assert any(line.split()[0] == "arrays" and "not read by zoo info; loading (zoo run, zoo generate, zoo.load) "
               "verifies the content sha256" in line for line in text.stdout.splitlines())
    assert json.loads(invoke("info", checkpoint, "--step", "0", "--json").stdout)["step"] == 0
    for args, message in [
        ((checkpoint, "--step", "7"), f"{checkpoint} does not hold step 7 (steps: [0, 1])"),
        (("tiny", "--step", "0"), "--step selects a checkpoint step; this is not a checkpoint but a preset"),
        ((checkpoint / "1",), f"found step folder 1 of the checkpoint {checkpoint}; pass {checkpoint} with --step 1"),
        ((tmp_path / "nothing",), "expected a zoo checkpoint folder, a `zoo export` artifact folder, a config file "
                                  "or a preset name; found nothing"),
        (("tiny_v1",), "found nothing (no such file or folder); did you mean 'tiny-v1'?"),
    ]:
        proc = invoke("info", *args)
        assert proc.exit_code == 2 and proc.stdout == "", (args, proc.stdout)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
