"""``zoo train``: options (and --config) reach the run, the run folder serves ``zoo generate``, Ctrl-C saves and the
same command resumes, bad input is one line and exit 2, and a converted PyTorch checkpoint fine-tunes.
In-process (Typer's runner), on a tiny model and a few hundred words of text."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import tokenizers

import zoo
from helpers import by_path, invoke_cli

V = 260  # 256 bytes, <|endoftext|> and 3 merges: --vocab-size sets the model's vocab_size
STEPS = 4
WORDS = ("the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun and birds sing "
         "songs of rain ").split()


def write_text(folder, files: int = 6, words: int = 120) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, words)) + "\n")


def refused(result, *texts: str) -> None:
    """Exit 2 with exactly one line on stderr that holds every one of ``texts``."""
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in texts:
        assert text in lines[0], result.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_text(root / "text")
    model = {**zoo.load_config("tiny").model_dump(mode="json", exclude_unset=True), "embedding_dim": 32,
             "num_blocks": 1, "context_length": 32}
    model["mlstm_block"]["mlstm"]["num_heads"] = 2
    # Without the gate soft cap: at the suite's XLA optimisation level 0 (conftest.py) a capped tiny model's gradients
    # turn NaN after 2-3 updates (not at XLA's default level, nor without the cap; the issue-14 step does the same)
    model["mlstm_block"]["mlstm"]["mlstm_cell"] = {**model["mlstm_block"]["mlstm"].get("mlstm_cell", {}),
                                                   "gate_soft_cap": None}
    (root / "model.json").write_text(json.dumps(model))
    # the file's steps and seq_len are overridden on the command line; its batch_size and eval_every are not
    (root / "train.json").write_text(json.dumps({"steps": 100, "seq_len": 64, "batch_size": 2, "eval_every": 2,
                                                 "warmup_steps": 1, "save_every": 100}))
    return root


@pytest.fixture(scope="module")
def run(setup):
    """A run interrupted by Ctrl-C after step 2, then the same command again, which resumes and finishes."""
    from zoo.cli import Interrupted
    from zoo.cli import train as train_cli

    args = ["train", setup / "model.json", "--data", setup / "text", "--out", setup / "run", "--config",
            setup / "train.json", "--steps", STEPS, "--seq-len", 16, "--vocab-size", V]
    real = train_cli.progress_bar

    @contextmanager
    def interrupting(total):
        with real(total) as show:
            def callback(line):
                show(line)
                if line["step"] == 2 and "loss" in line:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the loop saves step 2, then stops
            yield callback

    train_cli.progress_bar = interrupting
    try:
        with pytest.raises(Interrupted) as stopped:
            invoke_cli(*args)
    finally:
        train_cli.progress_bar = real
    return setup / "run", str(stopped.value), invoke_cli(*args)


@pytest.mark.slow  # tokenizer, compile, 4 updates, 2 evaluations, then a compiled generation: ~20 s on 2 cores
def test_a_run_writes_its_folder_resumes_after_ctrl_c_and_serves_generate(run):
    folder, interrupted, result = run
    assert interrupted == f"step 2 was saved to {folder / 'checkpoints'}; run the same command again to resume"
    assert result.exit_code == 0, result.output
    assert {"checkpoints", "metrics.jsonl", "loss.png"} <= {p.name for p in folder.iterdir()}
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # one line per update (1..4, none twice across the resume) and evaluations at steps 2 and 4 (from train.json)
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    evals = [line for line in lines if "eval_loss" in line]
    assert [line["step"] for line in evals] == [2, 4]
    assert all(math.isfinite(line["loss"]) for line in lines if "loss" in line)
    settings = json.loads((folder / "train_config.json").read_text())
    assert (settings["steps"], settings["seq_len"], settings["batch_size"], settings["vocab_size"]) == (STEPS, 16, 2, V)
    config, _ = zoo.load(folder)
    assert config.vocab_size == V
    # the resumed call printed its evaluation, then the summary with the held-out perplexity exp(eval_loss)
    last = evals[-1]
    assert f"step 4: held-out loss {last['eval_loss']:.4f}, perplexity {math.exp(last['eval_loss']):.2f}" in \
        result.stderr.splitlines()
    (summary,) = result.stdout.splitlines()
    assert summary.startswith(f"trained to step 4: loss {lines[-2]['loss']:.4f}, held-out loss "
                              f"{last['eval_loss']:.4f} (perplexity {math.exp(last['eval_loss']):.2f}), ")
    assert summary.endswith(f"run folder {folder} (try: zoo generate {folder} --prompt TEXT)")

    again = invoke_cli("train", folder.parent / "model.json", "--data", folder.parent / "text", "--out", folder,
                       "--config", folder.parent / "train.json", "--steps", STEPS, "--seq-len", 16, "--vocab-size", V)
    assert (again.exit_code, again.stdout) == (0, f"{folder} already finished at step 4: nothing to do\n")

    generated = invoke_cli("generate", folder, "--prompt", "the quick", "--max-new-tokens", 5, "--show-logits", 0)
    assert generated.exit_code == 0, generated.output
    ids = next(line for line in generated.stdout.splitlines() if line.startswith("generated:")).split()[1:]
    assert len(ids) == 5 and all(0 <= int(i) < V for i in ids), ids


def bad_tokenizer(path, entries: int) -> None:
    """A word-level tokenizer.json of ``entries`` tokens (more than the tiny preset's 256)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, entries)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.save(str(path))


@pytest.mark.parametrize("case", ["empty data", "not text", "tokenizer too big", "unknown schedule",
                                  "model field in the training config", "bad option value"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    write_text(tmp_path / "text", files=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp_path / "model.json").write_text(json.dumps({"embedding_dim": 64, "steps": 3}))
    bad_tokenizer(tmp_path / "tokenizer.json", 300)
    common = ["--out", tmp_path / "run"]
    args, texts = {
        "empty data": (["--data", tmp_path / "empty", "--vocab-size", 300], ["--data", "no text found", "empty"]),
        "not text": (["--data", tmp_path / "blob.txt", "--vocab-size", 300], ["--data", "blob.txt", "not a text file"]),
        "tokenizer too big": (["--data", tmp_path / "text", "--tokenizer", tmp_path / "tokenizer.json"],
                              ["tokenizer", "300 tokens", "vocab_size is 256"]),
        "unknown schedule": (["--data", tmp_path / "text", "--schedule", "bogus"],
                             ["--schedule", "'cosine' or 'constant'", "'bogus'"]),
        "model field in the training config": (["--data", tmp_path / "text", "--config", tmp_path / "model.json"],
                                               ["model.json", "embedding_dim", "unknown key"]),
        "bad option value": (["--data", tmp_path / "text", "--steps", 0], ["--steps", "greater than or equal to 1"]),
    }[case]
    refused(invoke_cli("train", "tiny", *args, *common), *texts)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # reuses the run of the test above
@pytest.mark.parametrize("case", ["--vocab-size", "vocab_size in --config", "changed --seq-len"])
def test_a_checkpoint_and_settings_that_disagree_are_one_line_and_exit_2(run, tmp_path, case):
    folder = run[0]
    (tmp_path / "vocab.json").write_text(json.dumps({"vocab_size": 512}))
    base = ["--data", folder.parent / "text"]
    args, texts = {
        "--vocab-size": ([folder, *base, "--out", tmp_path / "ft", "--vocab-size", 300],
                         ["vocab_size 300 with a checkpoint to fine-tune"]),
        "vocab_size in --config": ([folder, *base, "--out", tmp_path / "ft", "--config", tmp_path / "vocab.json"],
                                   ["vocab_size 512 with a checkpoint to fine-tune"]),
        # the run folder's own checkpoint was trained with --seq-len 16: resuming it with 32 is refused
        "changed --seq-len": ([folder.parent / "model.json", *base, "--out", folder, "--config",
                               folder.parent / "train.json", "--steps", STEPS, "--seq-len", 32, "--vocab-size", V],
                              ["seq_len was 16 when this run started, now 32"]),
    }[case]
    refused(invoke_cli("train", *args), *texts)


@pytest.mark.slow  # convert, compile and 3 updates of a 2-block mlstm_v1: ~10 s on 2 cores
def test_a_converted_pytorch_checkpoint_fine_tunes(tmp_path):
    from test_convert_torch import large_model, save_torch
    from zoo.convert.torch import from_torch
    from zoo.train.data import read_documents, train_tokenizer

    write_text(tmp_path / "text")
    model, cfg = large_model(vocab_size=300)
    from_torch(save_torch(tmp_path / "src", model, cfg), tmp_path / "ck")
    train_tokenizer(read_documents([tmp_path / "text"]), 300).tokenizer.save(str(tmp_path / "tokenizer.json"))
    # the real executable at XLA's default optimisation level: the converted model keeps xlstm_large's gate soft cap,
    # whose gradients turn NaN at the suite's level 0 (see the setup fixture)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "train", str(tmp_path / "ck"), "--data",
                             str(tmp_path / "text"), "--out", str(tmp_path / "run"), "--tokenizer",
                             str(tmp_path / "tokenizer.json"), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                             "--warmup-steps", "0", "--lr", "0.01", "--eval-every", "3"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    _, before = zoo.load(tmp_path / "ck")
    config, after = zoo.load(tmp_path / "run")
    assert config.layer.layer_type == "mlstm_v1"
    before, after = by_path(before), by_path(after)
    assert before.keys() == after.keys()
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert len(changed) > len(before) // 2, sorted(set(before) - changed)
    assert all(np.isfinite(np.asarray(v)).all() for v in after.values())
