"""The training loop (zoo.train): exact resume after SIGKILL, the run folder, the loss mask, schedules, learning."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import zoo
from helpers import invoke_cli
from zoo.checkpoint import find_step
from zoo.train import TrainConfig, TrainError, loss_fn, schedule, train, update
from zoo.train.data import read_documents, train_tokenizer
from zoo.train.optim import optimizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 320
NO_CAP = {"mlstm_block.mlstm.mlstm_cell.gate_soft_cap": None}
"""The suite's XLA flags (conftest.py: optimisation level 0) make tiny's gradients NaN after a few updates with the
gate soft cap on (the same with the former zoo.training step; not at XLA's default level): the tests train without."""
CONFIG = zoo.load_config("tiny").with_overrides({"vocab_size": VOCAB, **NO_CAP})
TIMING_KEYS = {"tokens_per_s", "mfu"}  # measured, so not reproducible


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three standard-library files and a byte-level BPE of VOCAB tokens trained on them (a tokenizer.json)."""
    files = [str(STDLIB / name) for name in ("textwrap.py", "string.py", "bisect.py")]
    tokenizer = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.write_text(train_tokenizer(read_documents(files), VOCAB).tokenizer.to_str())
    return files, str(tokenizer)


@pytest.fixture(scope="module")
def settings(corpus):
    files, tokenizer = corpus
    return TrainConfig(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                       save_every=2, keep=2, data=files, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, settings):
    """An uninterrupted run: its folder and its metrics lines."""
    out = tmp_path_factory.mktemp("reference")
    result = train(CONFIG, out, settings)
    assert result.step == 8 and result.stopped == "steps" and result.resumed_from is None
    return out, _lines(out)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _reproducible(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


WORKER = """
import sys, time
import zoo
from zoo.train import TrainConfig, train
config = zoo.ModelConfig.model_validate_json(sys.argv[1])
train(config, sys.argv[3], TrainConfig.model_validate_json(sys.argv[2]), callback=lambda line: time.sleep(0.3))
"""


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_exactly(tmp_path, settings, reference):
    ref_out, ref_lines = reference
    assert [line["step"] for line in ref_lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # eval lines at 4 and the end
    assert all("loss" not in line for line in ref_lines if "eval_loss" in line)
    out = tmp_path / "run"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, CONFIG.model_dump_json(), settings.model_dump_json(),
                               str(out)], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 120
    while not ((out / "checkpoints" / "4").is_dir() and (out / "metrics.jsonl").exists()
               and any(line["step"] >= 5 for line in _lines(out))):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker ended before it was killed"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_lines = _lines(out)
    result = train(CONFIG, out, settings)
    print(f"killed after {len(killed_lines)} lines (step {killed_lines[-1]['step']}); resumed from step "
          f"{result.resumed_from}")
    assert result.resumed_from in (4, 6) and result.step == 8
    kept = sum(line["step"] <= result.resumed_from for line in ref_lines)
    assert len(killed_lines) > kept or result.resumed_from == 6  # lines past the checkpoint, to be dropped
    assert all(math.isfinite(line.get("loss", line.get("eval_loss"))) for line in ref_lines)
    assert _reproducible(_lines(out)) == _reproducible(ref_lines)  # bitwise: floats compared with ==
    _, resumed = zoo.load(out)
    _, uninterrupted = zoo.load(ref_out)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(resumed),
                                                   jax.tree_util.tree_leaves(uninterrupted)))


def test_a_finished_run_does_nothing_and_a_changed_cosine_length_is_refused(settings, reference):
    out, lines = reference
    before = (out / "metrics.jsonl").read_text()
    result = train(CONFIG, out, settings)
    assert (result.step, result.stopped, result.loss) == (8, "finished", None)
    assert (out / "metrics.jsonl").read_text() == before
    with pytest.raises(TrainError, match=r"steps was 8 when this run started, now 9") as caught:
        train(CONFIG, out, settings.with_overrides({"steps": 9}))
    assert "\n" not in str(caught.value)
    with pytest.raises(TrainError, match="lr was 0.003"):
        train(CONFIG, out, settings.with_overrides({"lr": 1e-2}))


def test_the_run_folder_is_a_checkpoint_with_its_best_step_marked(reference):
    out, lines = reference
    evals = {line["step"]: line["eval_loss"] for line in lines if "eval_loss" in line}
    best = min(evals, key=evals.get)
    where = find_step(out)
    assert where.root == out / "checkpoints" and where.step == 8 and where.best == best
    assert where.steps == sorted({6, 8, best})  # the last keep=2 and the best
    config, params = zoo.load(out)
    assert config.vocab_size == VOCAB and config.dtype == "float32"  # float32 compute on CPU by default
    assert zoo.load_tokenizer(out).get_vocab_size() == VOCAB
    shown = invoke_cli("info", out)
    assert shown.exit_code == 0, shown.output
    assert f"{out / 'checkpoints'}" in shown.output and "8 (steps" in shown.output
    assert ("the best" if best == 8 else f"best: step {best}") in shown.output
    assert (out / "loss.png").stat().st_size > 0 and any((out / "tensorboard").iterdir())
    for line in lines:
        assert {"step", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(line)
        assert ("loss" in line) != ("eval_loss" in line)
    assert all(math.isclose(line["eval_perplexity"], math.exp(line["eval_loss"])) for line in lines
               if "eval_loss" in line)


def test_masked_out_targets_change_nothing_and_accumulation_splits_the_batch():
    params = zoo.init_params(CONFIG, seed=0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False  # targets 6, 7, 8 of row 1 are padding
    logits = np.asarray(zoo.forward(CONFIG, params, tokens[:, :-1]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    expected = nll[mask[:, 1:]].mean()
    assert not math.isclose(expected, nll.mean(), rel_tol=1e-3)  # the mask matters here
    got = float(loss_fn(CONFIG, params, tokens, mask=mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    changed = tokens.copy()
    changed[1, 6:] = (changed[1, 6:] + 1) % VOCAB  # only masked targets (and inputs that predict them) change
    np.testing.assert_allclose(float(loss_fn(CONFIG, params, changed, mask=mask)), got, rtol=1e-6)

    opt = optimizer(CONFIG, TrainConfig(steps=4, warmup_steps=0))
    tokens = np.random.default_rng(1).integers(0, VOCAB, (4, 9)).astype(np.int32)
    mask = np.random.default_rng(2).random((4, 9)) < 0.7
    results = []
    for accum in (1, 2):
        state = zoo.train.init_train_state(CONFIG, zoo.init_params(CONFIG, seed=0), opt)
        state, loss, norm = update(CONFIG, opt, state, tokens, None, mask, grad_accum=accum)
        results.append((float(loss), float(norm), jax.tree_util.tree_leaves(state.params)))
    np.testing.assert_allclose(results[1][:2], results[0][:2], rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # Adam's first step is about lr · sign(g)


def test_schedules_against_hand_computed_values():
    cosine = schedule(TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1))
    # warmup 0 -> 1 over 2 updates, then 0.1 + 0.9 * (1 + cos(pi * (n - 2) / 8)) / 2
    for n, want in [(0, 0.0), (1, 0.5), (2, 1.0), (4, 0.1 + 0.45 * (1 + math.cos(math.pi / 4))), (6, 0.55),
                    (10, 0.1), (12, 0.1)]:
        assert math.isclose(float(cosine(n)), want, rel_tol=1e-6, abs_tol=1e-7), (n, float(cosine(n)), want)
    constant = schedule(TrainConfig(steps=10, lr=2.0, warmup_steps=4, schedule="constant"))
    assert [float(constant(n)) for n in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]
    assert float(schedule(TrainConfig(lr=2.0, warmup_steps=0, schedule="constant"))(0)) == 2.0


@pytest.mark.slow
def test_a_tiny_model_learns_standard_library_text(tmp_path):
    files, size = [], 0
    for file in sorted(STDLIB.glob("*.py")):
        files.append(str(file))
        size += file.stat().st_size
        if size > 200_000:
            break
    vocab = 512
    settings = TrainConfig(steps=200, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=20, eval_every=200,
                           eval_batches=8, save_every=200, vocab_size=vocab, data=files)
    start = time.perf_counter()
    result = train(zoo.load_config("tiny").with_overrides(NO_CAP), tmp_path / "run", settings)
    lines = _lines(tmp_path / "run")
    print(f"{len(files)} files, {size} bytes; first loss {lines[0]['loss']:.3f}, held-out loss {result.eval_loss:.3f} "
          f"(ln V = {math.log(vocab):.3f}, bound {0.75 * math.log(vocab):.3f}); {time.perf_counter() - start:.1f} s")
    assert result.step == 200 and zoo.load(tmp_path / "run")[0].vocab_size == vocab
    assert result.eval_loss <= 0.75 * math.log(vocab)
