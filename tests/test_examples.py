"""The example plugin packages, pip-installed into this environment (see the Makefile), used as a user would:
autoloaded through their entry points, named in a config.json, recorded in checkpoints."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import zoo
from helpers import assert_rel_close
from zoo.checkpoint import read_metadata
from zoo.testing import isolated_registry

DISTS = {"zoo-pallas-mlstm": "pallas-mlstm", "zoo-mlstm-sig": "mlstm-sig"}
BASE = {"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "context_length": 64}
PALLAS = {**BASE, "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
    "backend": {"name": "pallas_chunkwise", "kwargs": {"chunk_size": 16}},
    "prefill_backend": {"name": "pallas_chunkwise", "kwargs": {"chunk_size": 16}}}}}}
SIG = {**BASE, "norm_type": "rmsnorm_offset", "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
    "backend": {"name": "chunkwise_sig", "kwargs": {"chunk_size": 8}},
    "prefill_backend": {"name": "chunkwise_sig"}, "step_backend": {"name": "recurrent_sig"}}}}}


def zoo_cli(*args: str, autoload: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    if not autoload:
        env["ZOO_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**env, "COLUMNS": "160"})


@pytest.mark.parametrize("dist", sorted(DISTS))
def test_example_packages_are_installed_with_entry_points(dist):
    points = [ep for ep in importlib.metadata.distribution(dist).entry_points if ep.group == "zoo"]
    assert [ep.name for ep in points] == [DISTS[dist]]


def test_autoload_finds_both_packages():
    proc = zoo_cli("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    origin = {r["name"]: (r["kind"], r["dist"], r["version"]) for r in data["registered"]}
    assert origin["pallas_chunkwise"] == ("cell", "zoo-pallas-mlstm", "0.1.0")
    assert origin["chunkwise_sig"] == ("cell", "zoo-mlstm-sig", "0.1.0")
    assert origin["rmsnorm_offset"] == ("norm", "zoo-mlstm-sig", "0.1.0")
    assert not [p for p in data["plugins"] if p["error"]] and data["conflicts"] == []


def test_models_built_from_config_json_with_each_plugin(tmp_path):
    for name, config in (("pallas", PALLAS), ("sig", SIG)):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        proc = zoo_cli("build", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
    tokens = np.random.default_rng(0).integers(0, 61, (2, 11)).astype(np.int32)
    with isolated_registry(*DISTS):
        cfg, params = zoo.load(tmp_path / "pallas")
        assert cfg.cell.backend.name == "pallas_chunkwise"
        builtin = zoo.load_config({**PALLAS, "mlstm_block": {"mlstm": {"num_heads": 2}}})
        logits = np.asarray(zoo.forward(cfg, params, tokens))
        assert_rel_close(logits, np.asarray(zoo.forward(builtin, params, tokens)))
        assert_rel_close(np.asarray(zoo.prefill(cfg, params, tokens)[0]), logits)

        cfg, params = zoo.load(tmp_path / "sig")
        logits = np.asarray(zoo.forward(cfg, params, tokens))
        step_logits, state = zoo.prefill(cfg, params, tokens[:, :-1])
        step_logits, _ = zoo.step(cfg, params, tokens[:, -1], state)
        assert_rel_close(np.asarray(step_logits), logits[:, -1], rtol=1e-4)
    for name, dist, cell in (("pallas", "zoo-pallas-mlstm", "pallas_chunkwise"),
                             ("sig", "zoo-mlstm-sig", "chunkwise_sig")):
        recorded = read_metadata(tmp_path / name)["plugins"]["cell"][cell]
        assert recorded == {"plugin": DISTS[dist], "dist": dist, "version": "0.1.0"}
    missing = zoo_cli("run", str(tmp_path / "sig"), "--prompt-ids", "1,2", autoload=False)
    assert missing.returncode == 2
    assert ("needs plugins that are not installed: cell 'chunkwise_sig' (from zoo-mlstm-sig 0.1.0)"
            in " ".join(missing.stderr.split()))
