"""``zoo train``: train a preset or config from scratch, or fine-tune a checkpoint, on text files.

The options map one to one onto the fields of ``zoo.train.TrainConfig``; ``--config FILE`` reads a training config
JSON first and the options given on the command line override its fields. A rich progress bar on stderr shows the
loss and tokens/s of each logged step; each evaluation is one line; the last line sums the run up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from zoo.cli.common import Interrupted, bad_input_exits, err, fail, out, out_path


def _option(name: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(name, help=f"{help} (default: the --config file's, else TrainConfig's)", **kwargs)


def training_config(config_file: Path | None, given: dict[str, Any]) -> Any:
    """The ``TrainConfig`` of ``config_file`` (or the defaults) with the ``given`` command-line values (field ->
    value; None: not given) on top; one line naming each bad option or field of the file, and exit 2, when invalid."""
    from pydantic import ValidationError

    from zoo.train.config import TrainConfig

    given = {field: value for field, value in given.items() if value is not None}
    with bad_input_exits(str(config_file)):  # an unreadable file; invalid fields are one line below
        try:
            return TrainConfig.from_file(config_file, given) if config_file else TrainConfig.model_validate(given)
        except ValidationError as exc:
            fail("; ".join(f"{_origin(e['loc'], given, config_file)}: {e['msg']} (got {e.get('input')!r})"
                           for e in exc.errors(include_url=False)))


def _origin(loc: tuple, given: dict[str, Any], config_file: Path | None) -> str:
    """Where an invalid training setting came from: its option, or the config file's field."""
    if loc and loc[0] in given:
        return "--" + str(loc[0]).replace("_", "-")
    return f"{config_file}: field {'.'.join(map(str, loc)) or '(top level)'}"


def train_command(
    model: Annotated[str, typer.Argument(metavar="CONFIG_OR_CKPT", help="a preset name, a model config JSON, or a "
                                         "checkpoint (or run folder) to fine-tune")],
    out_dir: Annotated[Path, typer.Option("--out", parser=out_path, metavar="DIR", help="the run folder: "
                                          "checkpoints/, metrics.jsonl, TensorBoard events, loss.png; re-running "
                                          "the same command on it resumes")],
    data: Annotated[list[Path] | None, typer.Option("--data", metavar="PATH", help="a text file, a folder of them "
                                                    "or JSON lines with a `text` field (repeatable)")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", metavar="FILE", help="a training config JSON "
                                                     "(the fields of these options); the options override it")] = None,
    steps: Annotated[int | None, _option("--steps", "optimiser updates in all")] = None,
    seed: Annotated[int | None, _option("--seed", "seed of the initialisation, the data order and the split")] = None,
    batch_size: Annotated[int | None, _option("--batch-size", "sequences per update")] = None,
    seq_len: Annotated[int | None, _option("--seq-len", "tokens per sequence")] = None,
    lr: Annotated[float | None, _option("--lr", "peak learning rate")] = None,
    schedule: Annotated[str | None, _option("--schedule", "learning-rate schedule: cosine or constant")] = None,
    warmup_steps: Annotated[int | None, _option("--warmup-steps", "steps of linear warmup")] = None,
    grad_accum: Annotated[int | None, _option("--grad-accum", "micro-batches accumulated per update")] = None,
    vocab_size: Annotated[int | None, _option("--vocab-size", "train a byte-level BPE of exactly V entries on the "
                                              "data and set the model's vocab_size to V; not with a checkpoint",
                                              metavar="V")] = None,
    tokenizer: Annotated[Path | None, _option("--tokenizer", "a tokenizer.json to use instead of the checkpoint's",
                                              metavar="FILE")] = None,
    max_time: Annotated[float | None, _option("--max-time", "stop (and save) after this many seconds of training",
                                              metavar="SECONDS")] = None,
    eval_every: Annotated[int | None, _option("--eval-every", "evaluate the held-out loss every N steps and at the "
                                              "end", metavar="N")] = None,
    save_every: Annotated[int | None, _option("--save-every", "save a checkpoint every N steps and at the end",
                                              metavar="N")] = None,
) -> None:
    """Train CONFIG_OR_CKPT on the --data text and write the run folder --out; run again to resume.

    Exit 2 with one line on bad input (no text in the data, a tokenizer larger than the model's vocabulary, an
    invalid option); Ctrl-C saves a checkpoint first and exits 130.
    """
    from zoo.train.loop import train

    cfg = training_config(config_file, {
        "data": [str(p) for p in data] if data else None, "tokenizer": str(tokenizer) if tokenizer else None,
        "steps": steps, "seed": seed, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "schedule": schedule,
        "warmup_steps": warmup_steps, "grad_accum": grad_accum, "vocab_size": vocab_size, "max_time": max_time,
        "eval_every": eval_every, "save_every": save_every})
    start = time.perf_counter()
    try:
        with progress_bar(cfg.steps) as show, bad_input_exits(model):
            result = train(model, out_dir, cfg, callback=show)
    except (Interrupted, KeyboardInterrupt):  # the loop saves on the first Ctrl-C, then raises KeyboardInterrupt
        raise Interrupted(f"{_saved(out_dir)}; run the same command again to resume") from None
    if result.stopped == "finished":
        out.print(escape(f"{out_dir} already finished at step {result.step}: nothing to do"))
        return
    held_out = (f", held-out loss {result.eval_loss:.4f} (perplexity {math.exp(result.eval_loss):.2f})"
                if result.eval_loss is not None else "")
    out.print(escape(f"trained to step {result.step}{' (--max-time reached)' * (result.stopped == 'max_time')}: "
                     f"loss {result.loss:.4f}{held_out}, {time.perf_counter() - start:.1f} s; run folder {out_dir} "
                     f"(try: zoo generate {out_dir} --prompt TEXT)"))


@contextmanager
def progress_bar(total: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on stderr when it is a terminal, cleared at the end; yields the training callback that drives
    it with each metrics line and prints each evaluation line as one line (through a pipe: only those lines)."""
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("training", total=total, loss="", speed="")

        def show(line: dict[str, Any]) -> None:
            if "eval_loss" in line:
                bar.console.print(f"step {line['step']}: held-out loss {line['eval_loss']:.4f}, perplexity "
                                  f"{line['eval_perplexity']:.2f}")
            else:
                bar.update(task, completed=line["step"], loss=f"loss {line['loss']:.4f}",
                           speed=f"{line['tokens_per_s']:,.0f} tokens/s")

        yield show


def _saved(out_dir: Path) -> str:
    """What a Ctrl-C left in the run folder, as a phrase."""
    from zoo.checkpoint import find_step
    from zoo.errors import ZooError

    try:
        where = find_step(out_dir)
        return f"step {where.step} was saved to {where.root}"
    except ZooError:
        return f"no checkpoint was saved in {out_dir}"
