"""The ``zoo`` command line: exit codes, messages, no tracebacks.

Most commands run as real subprocesses; ``validate`` cases run in-process through the same app
(Typer's test runner) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import zoo
from zoo import presets
from zoo.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.json"


def run_zoo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**env, "COLUMNS": "120", "ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"})


def invoke_zoo(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI app in this process; the result looks like a finished subprocess."""
    from typer.testing import CliRunner

    from zoo import cli

    widths = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = 160  # the consoles were sized when zoo.cli was first imported
    try:
        result = CliRunner().invoke(cli.app, list(args))
    finally:
        cli.out.width, cli.err.width = widths
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_validate_accepts_the_demo_config():
    proc = run_zoo("validate", str(DEMO))
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout


BAD_CONFIGS = {
    "unknown_key": ({"vocab_size": 10, "mlstm_block": {"mlstm": {"num_head": 4}}},
                    ["mlstm_block.mlstm.num_head", "did you mean 'num_heads'"]),
    "wrong_type": ({"vocab_size": "many"}, ["vocab_size", "valid integer"]),
    "bad_literal": ({"vocab_size": 10, "dtype": "float64"}, ["dtype", "'float32', 'bfloat16' or 'float16'"]),
    "unknown_plugin": ({"vocab_size": 10, "mlstm_block": {"mlstm": {"mlstm_cell": {"backend": {"name": "triton"}}}}},
                       ["mlstm_block.mlstm.mlstm_cell.backend.name", "registered: chunkwise, parallel_stabilized, recurrent"]),
    "heads": ({"vocab_size": 10, "embedding_dim": 64, "mlstm_block": {"mlstm": {"num_heads": 5}}},
              ["mlstm_block.mlstm.num_heads", "must divide"]),
    "qk_factor": ({"vocab_size": 10, "mlstm_block": {"mlstm": {"qk_dim_factor": 0.3}}},
                  ["mlstm_block.mlstm.qk_dim_factor", "must be an integer"]),
    "norm_conflict": ({"vocab_size": 10, "norm_type": "rmsnorm", "mlstm_block": {"mlstm": {"norm_type": "layernorm"}}},
                      ["mlstm_block.mlstm.norm_type", "conflicts with the model-level norm_type='rmsnorm'"]),
    "missing_vocab": ({}, ["vocab_size", "must be set"]),
    "nan": ({"vocab_size": 10, "norm_eps": float("nan")}, ["norm_eps", "finite number"]),
    "backend_kwargs": ({"vocab_size": 10, "mlstm_block": {"mlstm": {"mlstm_cell": {"backend": {
        "name": "parallel_stabilized", "kwargs": {"chunk_size": 8}}}}}},
                       ["mlstm_block.mlstm.mlstm_cell.backend.kwargs.chunk_size"]),
}


# every case through `validate`; a few through `build`, which shares the same error path
CASES = [(case, "validate") for case in sorted(BAD_CONFIGS)] + [
    (case, "build") for case in ("unknown_key", "heads", "nan", "backend_kwargs")]


@pytest.mark.parametrize("case, command", CASES)
def test_bad_configs_exit_2_with_the_field_path(case, command, tmp_path):
    data, expected = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.json"
    path.write_text(json.dumps(data))  # NaN is written as the JSON extension literal NaN
    proc = run_zoo(command, str(path), "--out", str(tmp_path / "ck")) if command == "build" else invoke_zoo(
        command, str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    flat = " ".join(proc.stderr.split())
    for text in expected:
        assert text in flat, proc.stderr
    assert len(proc.stderr.splitlines()) <= 25
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("content, message", [
    ('{"vocab_size": 10,,}', "malformed JSON at line 1"),
    ("[1, 2]", "top level must be a JSON object"),
    ('{"vocab_size": "\xff"}', "not UTF-8 text"),
])
def test_unreadable_config_files_exit_2(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_bytes(content.encode("latin-1"))
    proc = invoke_zoo("validate", str(path))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_preset_lists_presets():
    proc = run_zoo("build", "mlstm-3b", "--abstract")
    assert proc.returncode == 2
    assert "neither a config file nor a preset" in proc.stderr and "mlstm_v1-7b" in proc.stderr


def test_build_saves_a_loadable_checkpoint_and_adds_steps(tmp_path):
    proc = run_zoo("build", "tiny", "--out", "ck", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("Resolved plugins", "parallel_stabilized", "Derived sizes", "inner_dim", "Parameters",
                 "93,136"):  # tiny's parameter count, worked out by hand in tests/test_presets.py
        assert text in proc.stdout
    config, params = zoo.load(tmp_path / "ck")
    assert config == zoo.load_config("tiny")
    meta = read_metadata(tmp_path / "ck")
    assert meta["param_count"] == sum(np.size(x) for x in jax.tree_util.tree_leaves(params)) == 93_136
    assert meta["plugins"]["cell"]["parallel_stabilized"] == {
        "plugin": "zoo.plugins.cells.parallel", "dist": "xlstm-zoo", "version": zoo.__version__}
    assert meta["plugins"]["layer"].keys() == {"mlstm"} and meta["jax_version"] == jax.__version__
    expected = zoo.init_params(config, seed=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    again = run_zoo("build", "tiny", "--out", "ck", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["0", "1"]
    zoo.load(tmp_path / "ck", step=0)


def test_abstract_build_of_7b_allocates_nothing():
    proc = run_zoo("build", "mlstm_v1-7b", "--abstract")
    assert proc.returncode == 0, proc.stderr
    assert "6,865,424,896" in proc.stdout and "ffn_proj_up_dim" in proc.stdout


def test_multi_device_preset_is_refused_clearly():
    proc = run_zoo("build", "mlstm-7b", "--out", "unused")
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "fsdp × model sizes = 8 must divide the 1 device(s)" in message and "Traceback" not in message


def test_presets_schema_and_plugins_commands():
    listing = invoke_zoo("presets")
    assert listing.returncode == 0
    for name in presets.names():
        assert name in listing.stdout
    assert "1,422,559,616" in listing.stdout
    schema = json.loads(invoke_zoo("schema").stdout)
    assert schema["title"] == "ModelConfig" and "mlstm_block" in schema["properties"]
    plugins = invoke_zoo("plugins")
    assert plugins.returncode == 0 and "layernorm" in plugins.stdout and "zoo.plugins.norms" in plugins.stdout
