"""``train``: the training loop of ``zoo train``, as a function (data, optimizer, evaluation, run folder, resume).

A run folder ``out_dir`` holds ``checkpoints/`` (Orbax steps that are also zoo checkpoints: ``zoo.load(out_dir)``
reads the latest, ``checkpoints/best.json`` names the best), ``metrics.jsonl``, ``tensorboard/``, ``loss.png``,
``train_config.json`` and ``cache/`` (the tokenised data).

MFU: the model's FLOPs per token are taken as ``6 × parameters`` (forward and backward of the matmuls; attention
terms ignored) and compared with the rate of a jitted 1024³ matmul in the compute dtype measured at start-up in
the same process (``metrics.matmul_flops``).

Compute dtype (``TrainConfig.dtype``): ``auto`` is bfloat16 where the platform has native bfloat16 (GPU, TPU) and
float32 on CPUs; an explicit value is used as given. It becomes the model config's ``dtype`` (stored with the
checkpoints); parameters and optimizer state are float32 in every case.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo import checkpoint
from zoo.config import ModelConfig
from zoo.config_source import load_config
from zoo.errors import ZooError
from zoo.model import param_count
from zoo.runtime import init_params
from zoo.tokenizers import load_codec
from zoo.tokenizers.codec import Codec, check_fits, load_file
from zoo.train import data, optim
from zoo.train.config import TrainConfig
from zoo.train.metrics import MetricsLog, matmul_flops
from zoo.train.step import TrainState, eval_losses, init_train_state, update

TRAIN_CONFIG_FILE = "train_config.json"
CACHE_DIR = "cache"
RESUMABLE = frozenset({"steps", "max_time", "log_every", "eval_every", "eval_batches", "save_every", "keep"})
"""``TrainConfig`` fields a resumed run may change (``steps`` only under the constant schedule)."""


class TrainError(ZooError, ValueError):
    """A training run that cannot start or resume as asked (one line naming the setting)."""


@dataclass(frozen=True)
class TrainResult:
    """What a ``train`` call did."""

    step: int
    """Optimizer updates done in the run so far."""
    out_dir: Path
    checkpoint: Path
    """The checkpoint folder (``out_dir/checkpoints``); its latest step is ``step``."""
    loss: float | None
    """The last training loss of this call (None when it did no update)."""
    eval_loss: float | None
    """The last held-out loss of this call (None when it evaluated nothing)."""
    best_step: int | None
    """The step with the lowest held-out loss so far."""
    resumed_from: int | None
    """The step restored from the run folder, or None for a new run."""
    stopped: str
    """``steps`` (all done), ``max_time``, or ``finished`` (the run was already complete: nothing was done)."""


def compute_dtype(train_config: TrainConfig) -> str:
    """The compute dtype ``train`` uses (see the module docstring)."""
    if train_config.dtype != "auto":
        return train_config.dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "float32"


def train(model: ModelConfig | str | os.PathLike, out_dir: str | os.PathLike, train_config: TrainConfig, *,
          callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` (a ``ModelConfig``, a preset name or config file, or a checkpoint to fine-tune) on
    ``train_config.data``, writing the run folder ``out_dir``; resume it when it already holds checkpoints.

    The tokenizer is the checkpoint's, ``train_config.tokenizer``, or, with ``vocab_size`` V, a byte-level BPE of V
    tokens trained on the data (the model's ``vocab_size`` is then set to V). Each metrics line (a dict, also
    passed to ``callback``) has ``step`` (updates done), ``lr``, ``grad_norm``, ``tokens_per_s`` and ``mfu``, and
    either ``loss`` (that update's mean training loss) or ``eval_loss`` and ``eval_perplexity`` (held-out).

    Resuming restores params, optimizer state, step, data order and dropout key from the latest checkpoint and
    drops the metrics lines written after it: the run continues exactly as if uninterrupted. A complete run does
    nothing (``stopped == "finished"``). Ctrl-C (SIGINT) finishes the current update, saves a checkpoint and
    raises ``KeyboardInterrupt``.

    Raises ``TrainError`` for settings that cannot work (``vocab_size`` with a checkpoint, no tokenizer, a resumed
    run whose settings changed, an ``out_dir`` holding something else), ``zoo.train.data.DataError`` for unusable
    data, ``zoo.tokenizers.TokenizerError`` for a tokenizer that does not fit the model, ``TypeError`` for a
    ``train_config`` that is not a ``TrainConfig``, and the errors of ``zoo.load_config`` / ``zoo.load``.
    """
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a zoo.train.TrainConfig, got {type(train_config).__name__}")
    tc = train_config
    if tc.batch_size % tc.grad_accum:
        raise TrainError(f"grad_accum {tc.grad_accum} must divide batch_size {tc.batch_size}")
    out = Path(out_dir).expanduser().resolve()
    ck = out / checkpoint.RUN_CHECKPOINTS
    resuming = checkpoint.classify_path(ck).kind == "checkpoint"
    if resuming:
        _check_resume(out, tc)
        where = checkpoint.find_step(ck)
        if where.step >= tc.steps:
            return TrainResult(where.step, out, ck, None, None, where.best, where.step, "finished")
        config, params = checkpoint.load(ck, where.step)
        codec = load_codec(ck, where.step)
    else:
        if out.is_dir() and any(out.iterdir()) and not (out / TRAIN_CONFIG_FILE).exists():
            raise TrainError(f"{out}: expected a new or empty folder or a `zoo train` run folder for the run; it "
                             f"holds other things")
        config, params, codec = _start(model, tc)
        out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_CONFIG_FILE).write_text(tc.model_dump_json(indent=2) + "\n")

    train_rows, held_rows = data.prepare(tc.data, codec, tc.seq_len, holdout=tc.holdout, seed=tc.seed,
                                         cache_dir=out / CACHE_DIR)
    rows = data.batches(train_rows, tc.batch_size, seed=tc.seed)
    optimizer = optim.optimizer(config, tc)
    state = init_train_state(config, params if params is not None else init_params(config, tc.seed), optimizer,
                             seed=tc.seed)
    manager = checkpoint.manager(ck)
    lines, step = 0, 0
    if resuming:
        state, rows_state, lines = _restore(manager, where.step, state)
        rows.set_state(rows_state)
        step = where.step
    run = _Run(tc, config, optimizer, codec, manager, MetricsLog(out, lines, step + 1), held_rows, callback,
               checkpoint.best_step(ck))
    try:
        return run.loop(state, rows, step, where.step if resuming else None)
    finally:
        manager.wait_until_finished()
        manager.close()
        run.log.close()


def _start(model: Any, tc: TrainConfig) -> tuple[ModelConfig, Any, Codec]:
    """The config, params (None: initialise) and tokenizer of a new run."""
    if tc.tokenizer is not None and tc.vocab_size is not None:
        raise TrainError("tokenizer and vocab_size: give one (a tokenizer to use, or the size of one to train)")
    params, codec = None, None
    found = None if isinstance(model, ModelConfig) else checkpoint.classify_path(model)
    if found is not None and found.kind == "checkpoint":
        if tc.vocab_size is not None:
            raise TrainError(f"vocab_size {tc.vocab_size} with a checkpoint to fine-tune ({model}): the model's "
                             f"vocabulary is fixed; leave out vocab_size (its tokenizer is used) or give a tokenizer")
        config, params = checkpoint.load(model)
        codec = load_codec(model, file=tc.tokenizer)
    elif found is not None and found.kind == "step":
        raise found.refuse("a preset, a config file or a checkpoint folder to fine-tune")
    else:
        config = model if isinstance(model, ModelConfig) else load_config(model)
        if tc.tokenizer is not None:
            codec = Codec.from_tokenizer(load_file(tc.tokenizer))
        elif tc.vocab_size is not None:
            codec = data.train_tokenizer(data.read_documents(tc.data), tc.vocab_size)
            config = config.with_overrides({"vocab_size": tc.vocab_size})
    if config.quantization is not None:
        raise TrainError(f"{model if found else 'the model'} is quantised ({config.quantization.method}); training "
                         f"needs float weights: train the float model, then quantise it (zoo quantize)")
    if codec is None:
        raise TrainError(f"no tokenizer for {model if found else 'the model'}: give vocab_size (train one on the "
                         f"data) or tokenizer (a tokenizer.json)")
    check_fits(codec.tokenizer, config, f"--tokenizer {tc.tokenizer}" if tc.tokenizer else "the tokenizer")
    dtype = compute_dtype(tc)
    return (config if config.dtype == dtype else config.with_overrides({"dtype": dtype})), params, codec


def _check_resume(out: Path, tc: TrainConfig) -> None:
    try:
        stored = TrainConfig.model_validate_json((out / TRAIN_CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{out}: cannot read {TRAIN_CONFIG_FILE} to resume the run ({str(exc).splitlines()[0]})"
                         ) from None
    before, now = stored.model_dump(), tc.model_dump()
    changed = [k for k in now if before[k] != now[k] and k not in RESUMABLE]
    if changed:
        k = changed[0]
        raise TrainError(f"{out}: {k} was {before[k]!r} when this run started, now {now[k]!r}; resume with the same "
                         f"{k} or start a new run in another folder")
    if before["steps"] != now["steps"] and tc.schedule == "cosine":
        raise TrainError(f"{out}: steps was {before['steps']} when this run started, now {now['steps']}: the cosine "
                         f"schedule decays over steps, so it cannot change; resume with steps {before['steps']} or "
                         f"start a new run in another folder")


def _train_state_item(state: TrainState) -> dict[str, Any]:
    return {"opt_state": jax.tree_util.tree_leaves(state.opt_state), "step": state.step, "rng": state.rng}


def _restore(manager: ocp.CheckpointManager, step: int, state: TrainState) -> tuple[TrainState, Any, int]:
    """The state with the optimizer state, step and key of checkpoint ``step``; the data state; the line count."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            train_state=ocp.args.StandardRestore(_train_state_item(state)), train=ocp.args.JsonRestore()))
    except Exception as exc:  # a step without training items, or damaged
        raise checkpoint.CheckpointError(f"step {step} of {manager.directory}: cannot read its training state to "
                                         f"resume ({checkpoint._short(exc)})") from None
    item, extra = restored["train_state"], restored["train"]
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state), item["opt_state"])
    state = state.replace(opt_state=opt_state, step=item["step"], rng=item["rng"])
    return state, extra["data"], extra["metrics_lines"]


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[list[bool]]:
    """While inside, a first Ctrl-C only appends to the yielded list (the loop saves, then raises); a second one
    interrupts at once."""
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    previous = signal.default_int_handler if previous is None else previous

    def handler(signum: int, frame: Any) -> None:
        flag.append(True)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _Run:
    """The loop's fixed parts: settings, model, checkpoint manager, metrics, held-out rows."""

    def __init__(self, tc: TrainConfig, config: ModelConfig, optimizer: Any, codec: Codec,
                 manager: ocp.CheckpointManager,
                 log: MetricsLog, held: data.Packed, callback: Callable[[dict[str, Any]], None] | None,
                 best: int | None):
        self.tc, self.config, self.optimizer, self.codec = tc, config, optimizer, codec
        self.manager, self.log, self.held = manager, log, held
        self.callback, self.best = callback, best
        self.best_loss = math.inf
        if best is not None:
            self.best_loss = json.loads((manager.directory / checkpoint.BEST_FILE).read_text())["eval_loss"]
        self.schedule = optim.schedule(tc)
        self.tokens = tc.batch_size * tc.seq_len
        self.flops_per_token = 6 * param_count(config)
        self.peak = matmul_flops(config.dtype)

    def emit(self, line: dict[str, Any]) -> None:
        self.log.write(line)
        if self.callback is not None:
            self.callback(line)

    def evaluate(self, params: Any) -> float:
        """Mean held-out loss over the first ``eval_batches`` batches (in order) of the held-out rows."""
        size = min(self.tc.batch_size, len(self.held))
        total, count = 0.0, 0.0
        for _, batch in zip(range(self.tc.eval_batches), data.batches(self.held, size, seed=0, shuffle=False,
                                                                     num_epochs=1)):
            s, c = eval_losses(self.config, params, batch["tokens"], batch["borders"], batch["mask"])
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def save(self, state: TrainState, rows_state: Any, step: int, eval_loss: float | None) -> None:
        """Save ``step`` asynchronously; keep the last ``keep`` steps and the best."""
        if eval_loss is not None and eval_loss < self.best_loss:
            self.best, self.best_loss = step, eval_loss
        # Orbax writes in the background: it gets host copies, as the next update donates (reuses) the state's buffers
        state = jax.tree_util.tree_map(np.array, state)
        extra = {"training_step": step, "eval_loss": eval_loss}
        items = checkpoint.step_items(self.config, state.params, self.codec, extra)
        self.manager.save(step, args=ocp.args.Composite(
            **items, train_state=ocp.args.StandardSave(_train_state_item(state)),
            train=ocp.args.JsonSave({"data": rows_state, "metrics_lines": len(self.log.lines)})))
        if self.best == step:
            best_file = self.manager.directory / checkpoint.BEST_FILE
            best_file.with_suffix(".tmp").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
            best_file.with_suffix(".tmp").replace(best_file)
        kept = set(sorted({*self.manager.all_steps(), step})[-self.tc.keep:]) | {self.best}
        for old in self.manager.all_steps():
            if old not in kept:
                self.manager.delete(old)
        self.log.plot()

    def loop(self, state: TrainState, rows: data.BatchIterator, step: int, resumed_from: int | None) -> TrainResult:
        tc = self.tc
        loss = eval_loss = None
        start = last = time.perf_counter()
        with _sigint_deferred() as interrupted:
            while step < tc.steps:
                batch = next(rows)
                state, loss, grad_norm = update(self.config, self.optimizer, state, batch["tokens"],
                                                batch["borders"], batch["mask"], grad_accum=tc.grad_accum)
                loss, grad_norm, step = float(loss), float(grad_norm), step + 1
                now = time.perf_counter()
                rate = self.tokens / (now - last)
                common = {"lr": float(self.schedule(step - 1)), "grad_norm": grad_norm, "tokens_per_s": rate,
                          "mfu": rate * self.flops_per_token / self.peak}
                timed_out = tc.max_time is not None and now - start >= tc.max_time
                final = step == tc.steps or timed_out or bool(interrupted)
                if step % tc.log_every == 0 or final:
                    self.emit({"step": step, "loss": loss, **common})
                step_eval = None
                if step % tc.eval_every == 0 or (final and not interrupted):
                    step_eval = eval_loss = self.evaluate(state.params)
                    self.emit({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss),
                               **common})
                if step % tc.save_every == 0 or final or interrupted:  # a Ctrl-C during logging or eval too
                    self.save(state, rows.get_state(), step, step_eval)
                if interrupted:
                    self.manager.wait_until_finished()
                    raise KeyboardInterrupt(f"interrupted: saved step {step} in {self.manager.directory}")
                if timed_out:
                    break
                last = time.perf_counter()
        stopped = "steps" if step >= tc.steps else "max_time"
        return TrainResult(step, self.log.folder, Path(self.manager.directory), loss, eval_loss, self.best,
                           resumed_from, stopped)
