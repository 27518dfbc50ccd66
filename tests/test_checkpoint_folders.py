"""Checkpoint folders: another model is not added silently, `--step` picks and names the step, and a folder of
the wrong kind is named for what it is (one line, exit 2) by every command that loads a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.checkpoint import CheckpointError

TINY = {"vocab_size": 40, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2}}}


def random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32),
                                  zoo.param_shapes(config))


def invoke(*args):
    """The CLI in this process; stdout and stderr apart, wide consoles so that a message is one line."""
    from typer.testing import CliRunner

    from zoo import cli

    widths = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = 1000
    try:
        result = CliRunner().invoke(cli.app, [str(a) for a in args])
    finally:
        cli.out.width, cli.err.width = widths
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def steps_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A TINY checkpoint whose steps 0 and 1 hold different random params."""
    root = tmp_path_factory.mktemp("folders") / "ck"
    config = zoo.load_config(TINY)
    params = [random_params(config, seed) for seed in (1, 2)]
    for p in params:
        zoo.save(root, config, p)
    return root, config, params


def bf16_head(params):
    changed = jax.tree_util.tree_map(lambda x: x, params)
    changed["lm_head"]["kernel"] = changed["lm_head"]["kernel"].astype(jnp.bfloat16)
    return changed


@pytest.mark.parametrize("other, difference", [
    ({**TINY, "vocab_size": 41}, "params['lm_head']['kernel'] has shape (32, 40) stored, (32, 41) new"),
    ({**TINY, "num_blocks": 3}, "params['blocks_2']['xlstm']['conv1d']['bias'] is new (not stored)"),
    ({**TINY, "num_blocks": 1}, "params['blocks_1']['xlstm']['conv1d']['bias'] is stored but not in the new params"),
    ("bf16_head", "params['lm_head']['kernel'] has dtype float32 stored, bfloat16 new"),
])
def test_save_refuses_another_parameter_tree_unless_forced(tmp_path, other, difference):
    config = zoo.load_config(TINY)
    zoo.save(tmp_path / "ck", config, random_params(config))
    other_config = config if other == "bf16_head" else zoo.load_config(other)
    other_params = (bf16_head(random_params(config, 5)) if other == "bf16_head"
                    else random_params(other_config, 5))
    with pytest.raises(CheckpointError) as refused:
        zoo.save(tmp_path / "ck", other_config, other_params)
    message = str(refused.value)
    assert message == (f"{tmp_path / 'ck'} holds another model: {difference} (step 0); save to a new folder, "
                       f"or force it (--force, force=True) to add step 1 anyway")
    assert steps_of(tmp_path / "ck") == ["0"] and not list((tmp_path / "ck").glob("*tmp*"))
    assert zoo.save(tmp_path / "ck", other_config, other_params, force=True) == tmp_path / "ck" / "1"
    if other != "bf16_head":
        return
    loaded_config, loaded = zoo.load(tmp_path / "ck")
    assert loaded_config == other_config
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(other_params)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    assert zoo.load(tmp_path / "ck", step=0)[0] == config  # the earlier step is kept


def test_build_refuses_another_model_before_initialising(tmp_path):
    config = zoo.load_config({**TINY, "vocab_size": 41})
    zoo.save(tmp_path / "ck", config, random_params(config))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    proc = invoke("build", path, "--out", tmp_path / "ck")
    assert proc.exit_code == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'ck'} holds another model: params['lm_head']['kernel'] has shape (32, 41) stored, "
        f"(32, 40) new (step 0); save to a new folder, or force it (--force, force=True) to add step 1 anyway"]
    assert "initialised" not in proc.stdout and steps_of(tmp_path / "ck") == ["0"]


@pytest.mark.slow
def test_build_force_adds_the_step(tmp_path):
    config = zoo.load_config({**TINY, "vocab_size": 41})
    zoo.save(tmp_path / "ck", config, random_params(config))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    proc = invoke("build", path, "--out", tmp_path / "ck", "--force", "--seed", "3")
    assert proc.exit_code == 0, proc.stderr
    assert steps_of(tmp_path / "ck") == ["0", "1"]
    loaded_config, params = zoo.load(tmp_path / "ck", step=1)
    assert loaded_config == zoo.load_config(TINY) and params["lm_head"]["kernel"].shape == (32, 40)


# (command, extra arguments, what it expects): every command that loads a checkpoint (generate and run take an
# export artifact too)
COMMANDS = {
    "generate": (["--prompt-ids", "1"], "expected a `zoo export` artifact folder or a zoo checkpoint folder (written "
                                        "by `zoo build` or zoo.save)"),
    "export": (["--out", "{tmp}/never"], "expected a zoo checkpoint folder (written by `zoo build` or zoo.save)"),
    "run": (["--prompt-ids", "1"], "expected a `zoo export` artifact folder or a zoo checkpoint folder (written by "
                                   "`zoo build` or zoo.save)"),
    "info": ([], "expected a zoo checkpoint folder, a `zoo export` artifact folder, a config file or a preset name"),
}


def wrong_kind(kind: str, tmp_path: Path, checkpoint: Path) -> tuple[Path, str]:
    """A path of ``kind`` and what the message must say it found there."""
    path = tmp_path / kind
    if kind == "step folder":
        return checkpoint / "0", f"found step folder 0 of the checkpoint {checkpoint}; pass {checkpoint} with --step 0"
    if kind == "missing":
        return path, "found nothing (no such file or folder)"
    path.mkdir()
    if kind == "artifact":
        (path / "manifest.json").write_text(json.dumps({"format": "stablehlo"}))
        return path, "found a `zoo export` artifact (manifest.json, format 'stablehlo')"
    if kind == "torch":
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"")
        return path, "found a PyTorch / Hugging Face model folder (config and safetensors); `zoo convert torch`"
    if kind == "other folder":
        (path / "notes.txt").write_text("mine")
        return path, "found a folder of other things (it holds notes.txt)"
    return path, "found an empty folder"


KINDS = ["step folder", "missing", "artifact", "torch", "other folder", "empty"]
CASES = [(c, k) for c in COMMANDS for k in KINDS if not (c in ("generate", "run", "info") and k == "artifact")]


@pytest.mark.parametrize("command, kind", CASES)
def test_a_folder_of_the_wrong_kind_is_named(two_steps, tmp_path, command, kind):
    root = two_steps[0]
    path, found = wrong_kind(kind, tmp_path, root)
    extra, expected = COMMANDS[command]
    proc = invoke(command, path, *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {expected}; ") and found in lines[0], lines
    assert not (tmp_path / "never").exists()


def test_the_library_names_the_kind_too(two_steps, tmp_path):
    from zoo.checkpoint import CheckpointRefused, classify_path

    root = two_steps[0]
    with pytest.raises(CheckpointRefused, match=rf"pass {root} with --step 1 \(step=1 in Python\)"):
        zoo.load(root / "1")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text('{"format": "savedmodel"}')
    with pytest.raises(CheckpointRefused, match="found a `zoo export` artifact .*format 'savedmodel'"):
        zoo.save(tmp_path / "art", two_steps[1], two_steps[2][0])
    assert isinstance(CheckpointRefused("x"), CheckpointError)  # callers catching CheckpointError still do
    assert [classify_path(p).kind for p in (root, root / "0", tmp_path / "art", tmp_path / "none")] == [
        "checkpoint", "step", "artifact", "missing"]


@pytest.mark.parametrize("command, extra", [("generate", ["--prompt-ids", "1"]), ("run", ["--prompt-ids", "1"]),
                                            ("export", ["--out", "{tmp}/never"])])
def test_a_missing_step_names_the_steps_there(two_steps, tmp_path, command, extra):
    root = two_steps[0]
    proc = invoke(command, root, "--step", "5", *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert proc.exit_code == 2
    assert proc.stderr.strip().splitlines() == [f"error: {root} does not hold step 5 (steps: [0, 1])"]


@pytest.mark.slow
def test_step_picks_the_model_and_is_named(two_steps, tmp_path):
    root, config, params = two_steps
    prompt = [3, 1, 4]
    greedy = [int(np.argmax(np.asarray(zoo.prefill(config, p, [prompt])[0])[0, -1])) for p in params]
    assert greedy[0] != greedy[1]  # the two steps tell apart
    for step in (0, None):  # generate loads through the same helper as export (its --step: the test above)
        args = ["run", root, "--prompt-ids", "3,1,4", "--max-new-tokens", "1"]
        proc = invoke(*args, *([] if step is None else ["--step", str(step)]))
        assert proc.exit_code == 0, proc.stderr
        shown = 1 if step is None else step
        assert f"loaded step {shown} of {root} (steps 0-1)" in proc.stderr
        generated = [line for line in proc.stdout.splitlines() if line.startswith("generated:")]
        assert generated == [f"generated: {greedy[shown]}"], proc.stdout
    proc = invoke("export", root, "--step", "0", "--out", tmp_path / "art", "--entry", "forward",
                  "--platforms", "cpu")
    assert proc.exit_code == 0 and f"loaded step 0 of {root} (steps 0-1)" in proc.stderr, proc.stderr
    ran = invoke("run", tmp_path / "art", "--prompt-ids", "3,1,4", "--max-new-tokens", "1")
    assert ran.exit_code == 0 and f"generated: {greedy[0]}" in ran.stdout, ran.stdout + ran.stderr
