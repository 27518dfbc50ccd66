"""Checkpoint faults: SIGKILL during `zoo build` and during save, damaged files, a full disk.

The kill trials run in one driver process that imports zoo once (without starting JAX) and forks
one child per trial; each child is a real process that writes a real Orbax checkpoint (through
``zoo build`` or ``zoo.save``) and is killed with SIGKILL at a random moment. Forking saves the
~3 s interpreter start per trial, so 20 trials fit in the time of a few.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from bitwise import assert_bitwise_equal
from zoo.checkpoint import CheckpointError

# ~0.4M params (1.6 MB): a save takes a few hundred ms, long enough to be cut at random points
KILL_CONFIG = {"vocab_size": 6000, "embedding_dim": 64, "num_blocks": 1, "dtype": "float32",
               "mlstm_block": {"mlstm": {"num_heads": 2, "proj_factor": 1.0, "round_proj_up_to_multiple_of": 16}}}
KILL_TRIALS = 20


def random_params(config, seed: int):
    """Seeded standard-normal params in the tree order of ``zoo.param_shapes`` (the recipe of the driver)."""
    gen = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(gen.standard_normal(s.shape), s.dtype),
                                  zoo.param_shapes(config))


DRIVER = r'''
import json, os, random, select, signal, sys, time
from pathlib import Path

import numpy as np

import zoo
from zoo import cli

work, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config_path, root = work / "config.json", work / "ck"
rng = random.Random(seed)


def child(kind, trial, w):
    try:
        if kind == "save":
            import jax
            import jax.numpy as jnp
            config = zoo.load_config(str(config_path))
            gen = np.random.default_rng(trial)
            params = jax.tree_util.tree_map(lambda s: jnp.asarray(gen.standard_normal(s.shape), s.dtype),
                                            zoo.param_shapes(config))
            jax.block_until_ready(params)
            os.write(w, b"s")
            zoo.save(root, config, params)
        else:
            os.write(w, b"s")
            try:
                cli.main(["build", str(config_path), "--out", str(root), "--seed", str(trial)])
            except SystemExit as exc:
                if exc.code:
                    os._exit(3)
        os.write(w, b"d")
        os._exit(0)
    except BaseException:
        os._exit(4)


def listing():
    names = sorted(p.name for p in root.iterdir()) if root.exists() else []
    return [n for n in names if n.isdigit()], [n for n in names if not n.isdigit()]


def run(kind, trial, delay):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(kind, trial, w)
    os.close(w)
    assert os.read(r, 1) == b"s"
    start = time.perf_counter()
    ready, _, _ = select.select([r], [], [], delay) if delay is not None else ([r], [], [])
    done = bool(ready) and os.read(r, 1) == b"d"
    elapsed = time.perf_counter() - start
    if not done:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(r)
    steps, other = listing()
    return {"kind": kind, "trial": trial, "delay": delay, "completed": done, "elapsed": elapsed,
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "steps": steps, "other": other}


# two uncut runs first: the baseline good checkpoint, and the duration of each kind of run
results = [run("build", 0, None), run("build", 1, None), run("save", 2, None)]
duration = {"build": results[1]["elapsed"], "save": results[2]["elapsed"]}
for trial in range(3, 3 + trials):
    kind = "build" if trial % 2 else "save"
    results.append(run(kind, trial, rng.uniform(0.0, 1.1 * duration[kind])))
print(json.dumps({"results": results, "duration": duration}))
'''


@pytest.mark.slow
def test_sigkill_during_build_and_save_never_loses_or_fakes_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KILL_CONFIG))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ZOO_DISABLE_PLUGIN_AUTOLOAD="1", COLUMNS="120",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),  # later builds reuse the first compile
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(KILL_TRIALS), "9"],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert len(results) == KILL_TRIALS + 3
    assert all(r["completed"] and r["exit"] == 0 for r in results[:3]), results[:3]

    config = zoo.load_config(KILL_CONFIG)
    expected = {}  # step -> the params that the trial that created it was writing
    seen: list[str] = []
    interrupted = []  # killed before their step was complete: they must have left no step
    for r in results:
        new = [s for s in r["steps"] if s not in seen]
        assert len(new) <= 1 and set(seen) <= set(r["steps"]), (r, seen)  # earlier steps never disappear
        if r["completed"]:
            assert new and r["exit"] == 0, f"trial {r['trial']} finished but left no step: {r}"
        else:
            assert r["killed"], r
            if not new:
                interrupted.append(r)
        if new:
            params = (zoo.init_params(config, r["trial"]) if r["kind"] == "build"
                      else random_params(config, r["trial"]))
            expected[int(new[0])] = params
        seen = r["steps"]
    killed = [r for r in results[3:] if not r["completed"]]
    assert {r["kind"] for r in interrupted} == {"build", "save"}, "no kill landed mid-build or mid-save"
    assert len(interrupted) >= 5, f"only {len(interrupted)} of {KILL_TRIALS} kills cut a run short"

    root = tmp_path / "ck"
    for step, written in sorted(expected.items()):  # every step that exists is complete and is what was written
        loaded_config, params = zoo.load(root, step=step)
        assert loaded_config == config
        assert_bitwise_equal(params, written)
    _, latest = zoo.load(root)
    assert_bitwise_equal(latest, expected[max(expected)])
    again = zoo.save(root, config, random_params(config, 99))  # leftovers of killed saves do not block the next
    assert int(again.name) == max(expected) + 1
    assert_bitwise_equal(zoo.load(root)[1], random_params(config, 99))
    print(f"kill trials: {len(killed)} killed ({len(interrupted)} mid-run), "
          f"{KILL_TRIALS - len(killed)} finished first; {len(expected)} steps verified")


CORRUPTION_CONFIG = {"vocab_size": 40, "embedding_dim": 16, "num_blocks": 1, "dtype": "float32",
                     "mlstm_block": {"mlstm": {"num_heads": 2, "proj_factor": 2.0,
                                               "round_proj_up_to_multiple_of": 8}}}
# Files whose every damage must be detected: the config and metadata JSON (the hashes live in the
# latter). Damage to other files may be harmless (Orbax bookkeeping, or array data that the restore
# does not need), and then the load must return exactly what was saved.
ALWAYS_DETECTED = {"0/config/metadata", "0/metadata/metadata"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "ck"
    config = zoo.load_config(CORRUPTION_CONFIG)
    params = random_params(config, 3)
    zoo.save(root, config, params)
    return root, config, params


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bitflip":
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
def test_every_damaged_file_is_detected_or_harmless(pristine, tmp_path, capfd, how):
    """Each file of a checkpoint step, damaged: load raises a clear CheckpointError or loads exactly what was saved.

    Never a silently different model: the params and the config are checked against their hashes.
    """
    root, config, saved = pristine
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) >= 10
    rng = random.Random(how)
    detected, harmless = [], []
    for index, relative in enumerate(files):
        for attempt in range(1):
            copy = tmp_path / f"{index}-{attempt}"
            shutil.copytree(root, copy)
            damage(copy / relative, how, rng)
            try:
                loaded_config, params = zoo.load(copy)
            except CheckpointError as exc:
                message = str(exc)
                assert str(copy) in message and "step 0" in message or "does not hold" in message, message
                assert any(w in message for w in ("corrupted", "cannot read", "does not hold", "invalid config"))
                detected.append(str(relative))
                continue
            assert loaded_config == config, f"{how} {relative} loaded another config"
            assert_bitwise_equal(params, saved, f"{how} {relative} loaded wrong data")
            harmless.append(str(relative))
    assert not ALWAYS_DETECTED & set(harmless), harmless
    assert len(detected) >= 5, (detected, harmless)
    assert "Traceback" not in capfd.readouterr().err
    print(f"{how}: {len(detected)} detected, {len(harmless)} harmless (loaded exactly what was saved)")


def test_a_flipped_config_value_is_detected(pristine, tmp_path):
    """A bit flip that keeps the config valid JSON and a valid config (norm_eps 1e-06 -> 1e-07) is caught by its hash."""
    root, _, _ = pristine
    copy = tmp_path / "ck"
    shutil.copytree(root, copy)
    stored = copy / "0" / "config" / "metadata"
    text = stored.read_text()
    assert text.count('"norm_eps": 1e-06') == 2
    stored.write_text(text.replace('"norm_eps": 1e-06', '"norm_eps": 1e-07', 1))
    with pytest.raises(CheckpointError, match="corrupted: its config does not match"):
        zoo.load(copy)


FULL_DISK = r'''
import json, os, subprocess, sys
from pathlib import Path

import jax, jax.numpy as jnp, numpy as np
import zoo
from zoo.checkpoint import CheckpointError

disk, config_json = Path(sys.argv[1]), json.loads(sys.argv[2])
root = disk / "ck"
config = zoo.load_config(config_json)
gen = np.random.default_rng(0)
params = jax.tree_util.tree_map(lambda s: jnp.asarray(gen.standard_normal(s.shape), s.dtype), zoo.param_shapes(config))
zoo.save(root, config, params)


def is_saved(loaded):
    """Bitwise: the same tree, and each leaf the same dtype, shape and bytes as ``params``."""
    pairs = zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params))
    return jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params) and all(
        a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in pairs)


big = zoo.load_config({**config_json, "vocab_size": 20000})
big_params = jax.tree_util.tree_map(lambda s: jnp.asarray(gen.standard_normal(s.shape), s.dtype), zoo.param_shapes(big))
out = {}
try:
    zoo.save(root, big, big_params, force=True)  # another model in the folder: forced, to fill the disk
    out["api"] = "saved"
except CheckpointError as exc:
    out["api"] = str(exc)
out["left"] = sorted(p.name for p in root.iterdir())
out["loads"] = is_saved(zoo.load(root)[1])
(disk / "big.json").write_text(json.dumps({**config_json, "vocab_size": 20000}))
proc = subprocess.run([sys.executable, "-m", "zoo.cli", "build", str(disk / "big.json"), "--out", str(root), "--force"],
                      capture_output=True, text=True)
out.update(cli_rc=proc.returncode, cli_err=proc.stderr)
out["left_after_cli"] = sorted(p.name for p in root.iterdir())
out["loads_after_cli"] = is_saved(zoo.load(root)[1])
print(json.dumps(out))
'''


def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs \"$TMPDIR\""], capture_output=True, timeout=30,
                           env={**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")})
    return probe.returncode == 0


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """A real 1 MiB tmpfs (in a user+mount namespace) where possible; else a 1 MiB per-file size limit."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ZOO_DISABLE_PLUGIN_AUTOLOAD="1", COLUMNS="200")
    args = [sys.executable, str(script), str(disk), json.dumps(CORRUPTION_CONFIG)]
    if _tmpfs_available():
        mount = f"mount -t tmpfs -o size=1m tmpfs {disk} && exec \"$@\""
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh", *args],
                              capture_output=True, text=True, timeout=300, env=env)
        reason = "No space left on device"
    else:
        import resource
        import signal

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit)
        reason = "File too large"
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["api"].startswith("saving step 1 to ") and "earlier steps are untouched" in out["api"], out["api"]
    assert reason in out["api"]
    assert out["left"] == ["0"] and out["loads"]  # the partial step was removed, the good one still loads
    assert out["cli_rc"] == 2 and reason in out["cli_err"] and "Traceback" not in out["cli_err"], out["cli_err"]
    assert out["left_after_cli"] == ["0"] and out["loads_after_cli"]
