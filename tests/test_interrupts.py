"""Interrupted builds and exports never leave a half-written result, say what was kept, and exit 130 with one
line; ``--out`` and repeated entries or platforms are refused before any work. The guide's rule: "Interrupted
saves and training runs never destroy the last good state"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import zoo
import zoo.export.stablehlo
from test_cli_bad_input import invoke, refused
from zoo import cli
from zoo.checkpoint import load, save
from zoo.export.entries import ExportError, check_request


@pytest.fixture(scope="module")
def tiny():
    config = zoo.load_config("tiny")
    return config, zoo.init_params(config)


@pytest.mark.slow
def test_ctrl_c_during_build_exits_130_with_one_line_and_leaves_a_usable_folder(tmp_path, tiny):
    target = tmp_path / "ck"
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "build", "tiny", "--out", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    # The summary's last table ends with the total; initialising starts right after it.
    while "float32" not in proc.stdout.readline() and time.monotonic() < deadline:
        pass
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # 139 (segfault) or 1 ("Aborted!") before
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted; "), stderr
    steps = sorted(int(p.name) for p in target.glob("[0-9]*")) if target.exists() else []
    if "nothing was saved" in lines[0]:
        assert steps == []
    else:  # too late to stop the save: the message names the step, which is complete
        assert lines[0] == f"interrupted; step 0 was saved to {target}" and steps == [0]
        assert load(target)[0] == tiny[0]
    config, params = tiny
    assert save(target, config, params) == target / str(len(steps))  # the folder still takes a new step


@pytest.mark.parametrize("saved", [False, True])
def test_an_interrupted_build_says_whether_its_step_was_saved(tmp_path, tiny, monkeypatch, saved):
    import orbax.checkpoint as ocp

    # Ctrl-C inside Orbax's save: before it writes anything, or once the step is renamed into place.
    method = "wait_until_finished" if saved else "save"
    real = getattr(ocp.CheckpointManager, method)

    target = tmp_path / "ck"

    def interrupted(self, *args, **kwargs):
        if saved:
            real(self, *args, **kwargs)  # Orbax's save also calls it first, before writing anything
            if not (target / "0").exists():
                return
        raise cli.Interrupted

    monkeypatch.setattr(ocp.CheckpointManager, method, interrupted)
    stderr = sys.stderr
    expected = f"step 0 was saved to {target}" if saved else f"nothing was saved; earlier steps in {target}"
    with pytest.raises(cli.Interrupted, match=expected):
        cli.build_command("tiny", out_dir=target)
    assert sys.stderr is stderr  # the message about it must not go into a silenced buffer
    assert sorted(p.name for p in target.glob("*")) == (["0"] if saved else [])


def test_a_save_interrupted_before_its_rename_does_not_block_the_next(tmp_path, tiny):
    config, params = tiny
    target = tmp_path / "ck"
    (target / "0.orbax-checkpoint-tmp" / "params").mkdir(parents=True)  # what os._exit mid-save leaves
    (target / "0.orbax-checkpoint-tmp" / "params" / "half").write_bytes(b"\0" * 10)
    assert save(target, config, params) == target / "0"
    assert sorted(p.name for p in target.iterdir()) == ["0"]
    loaded = load(target)[1]
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("failure", [RuntimeError("disk gone"), KeyboardInterrupt()])
def test_an_export_that_fails_after_its_first_entry_leaves_no_target_and_can_be_retried(tmp_path, tiny,
                                                                                        monkeypatch, failure):
    config, params = tiny
    target = tmp_path / "ex"

    def fail(*args, **kwargs):  # called once every entry file has been written
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(zoo.export.stablehlo, "common_manifest", fail)
        with pytest.raises(type(failure)):
            zoo.export.stablehlo.export_stablehlo(config, params, target, platforms=["cpu"], entries=["forward"])
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging folder
    path = zoo.export.stablehlo.export_stablehlo(config, params, target, platforms=["cpu"], entries=["forward"])
    assert path == target and sorted(p.name for p in target.iterdir()) == ["forward.jax_exported", "manifest.json",
                                                                          "weights.npz"]


@pytest.mark.parametrize(("entries", "platforms", "repeated"), [
    (["forward", "forward"], ["cpu"], "entries must each be named once (repeated: forward)"),
    (["forward"], ["cpu", "tpu", "cpu"], "platforms must each be named once (repeated: cpu)"),
])
def test_repeated_entries_or_platforms_are_refused(tiny, entries, platforms, repeated):
    with pytest.raises(ExportError, match=repeated.replace("(", r"\(").replace(")", r"\)")):
        check_request(tiny[0], entries, platforms)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("interrupts") / "ck"
    save(path, *tiny)
    return path


@pytest.mark.parametrize("command", [("build", "tiny"), ("export", "CK"), ("convert", "to-torch", "CK")])
def test_an_empty_out_is_refused_rather_than_taken_as_the_current_folder(checkpoint, command):
    args = [str(checkpoint) if a == "CK" else a for a in command]
    refused(invoke(*args, "--out", ""), "--out", "empty path")


def test_export_checks_out_before_loading_and_names_a_file(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    missing = tmp_path / "no-such-checkpoint"  # would be refused first if the checkpoint were loaded first
    result = invoke("export", missing, "--out", afile, "--platforms", "cpu")
    refused(result, str(afile), "expected a new or empty folder", "found a file")


def test_build_checks_out_before_printing_its_summary(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    result = invoke("build", "tiny", "--out", afile)
    refused(result, str(afile), "found a file")
    assert "Parameters" not in result.stdout
