"""Orbax checkpoints: bitwise round trips, new steps, interrupted saves, missing plugins, corruption."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from helpers import UnitNormPlugin as NormPlugin
from bitwise import assert_bitwise_equal
from zoo.checkpoint import CheckpointError, read_metadata
from zoo.registry import PluginRegistry, use_registry

TINY = {"vocab_size": 40, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2}}}


def random_params(config, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), dtype),
                                  zoo.param_shapes(config))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bitwise(tmp_path, dtype):
    config = zoo.load_config(TINY)
    params = random_params(config, dtype)
    zoo.save(tmp_path / "ck", config, params)
    loaded_config, loaded = zoo.load(tmp_path / "ck")
    assert loaded_config == config
    assert_bitwise_equal(loaded, params)
    meta = read_metadata(tmp_path / "ck")
    assert meta["content_sha256"] == sha256_of(params)
    assert meta["param_dtypes"] == [jnp.dtype(dtype).name]


def sha256_of(params) -> str:
    """The documented content hash, computed here with hashlib: SHA-256 over each leaf's ``path|dtype|shape|``
    and its bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode() + array.tobytes())
    return digest.hexdigest()


def test_load_casts_on_request(tmp_path):
    config = zoo.load_config(TINY)
    params = random_params(config)
    zoo.save(tmp_path / "ck", config, params)
    _, loaded = zoo.load(tmp_path / "ck", dtype="bfloat16")
    expected = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert_bitwise_equal(loaded, expected)


def test_relative_paths_and_new_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = zoo.load_config(TINY)
    first, second = random_params(config, seed=1), random_params(config, seed=2)
    assert zoo.save("ck", config, first) == tmp_path / "ck" / "0"
    assert zoo.save("ck", config, second) == tmp_path / "ck" / "1"
    assert_bitwise_equal(zoo.load("ck")[1], second)
    assert_bitwise_equal(zoo.load("ck", step=0)[1], first)
    with pytest.raises(CheckpointError, match=r"does not hold step 7 \(steps: \[0, 1\]\)"):
        zoo.load("ck", step=7)


def test_refuses_to_save_into_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = zoo.load_config(TINY)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        zoo.save(tmp_path, config, random_params(config))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_restore_needs_nothing_but_the_checkpoint(tmp_path):
    config = zoo.load_config(TINY)
    params = random_params(config)
    zoo.save(tmp_path / "ck", config, params)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        import zoo
        config, params = zoo.load({str(tmp_path / 'ck')!r})
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez({str(tmp_path / 'loaded.npz')!r}, **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "loaded.npz") as loaded:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        assert sorted(loaded.files) == sorted(paths)
        assert_bitwise_equal([loaded[p] for p in paths], jax.tree_util.tree_leaves(params))


# A save killed midway: tests/test_faults.py (20 SIGKILL trials during builds and saves).


def test_missing_plugin_is_named(tmp_path):
    reg = PluginRegistry(autoload=False)
    with use_registry(reg):
        assert reg.add_plugin(NormPlugin(), "unit-norms", dist="zoo-unit-norms", version="2.0").ok
        config = zoo.load_config({**TINY, "norm_type": "unitnorm"})
        zoo.save(tmp_path / "ck", config, random_params(config))
    with pytest.raises(CheckpointError, match=r"needs plugins that are not installed: norm 'unitnorm' "
                                              r"\(from zoo-unit-norms 2.0\)"):
        zoo.load(tmp_path / "ck")


def largest_file(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_params"])
def test_corruption_is_detected_with_a_clear_error(tmp_path, damage):
    config = zoo.load_config(TINY)
    zoo.save(tmp_path / "ck", config, random_params(config))
    params_dir = tmp_path / "ck" / "0" / "params"
    if damage == "delete_params":
        for p in sorted(params_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    else:
        victim = largest_file(params_dir)
        data = bytearray(victim.read_bytes())
        if damage == "flip":
            middle = len(data) // 2
            data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        else:
            data = data[: len(data) // 2]
        victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        zoo.load(tmp_path / "ck")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", str(tmp_path / "ck"), "--prompt-ids", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "corrupted" in proc.stderr and "Traceback" not in proc.stderr
