"""The ``zoo`` command line: build, validate, plugins, presets, schema."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:  # typer >= 0.24 runs on its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

# Output that is not a terminal (a pipe, a file, CI logs) is never cut or wrapped: rich and click would
# otherwise fit it to 80 columns.
UNBOUNDED_WIDTH = 100_000


class _NoTrailingSpaces(io.TextIOBase):
    """The current ``sys.stdout`` (or ``sys.stderr``), less the spaces rich pads each table line with to the width
    of its widest row: through a pipe, lines end at their last character."""

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr

    @property
    def stream(self) -> Any:
        return sys.stderr if self.stderr else sys.stdout

    def write(self, text: str) -> int:
        self.stream.write(re.sub(r" +(?=\n)", "", text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console = Console(file=_NoTrailingSpaces(stderr), highlight=False, width=UNBOUNDED_WIDTH)
    return console


class OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (a bad option value, a missing argument, an unknown option or command, ``typer.BadParameter``)
    print one line naming the option, and exit 2, instead of click's usage block."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with usage_errors_in_one_line(info_name or "zoo"):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors_in_one_line(ctx.command_path):
            return super().invoke(ctx)


@contextmanager
def usage_errors_in_one_line(command_path: str) -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else command_path
        err.print(f"[bold red]error:[/] {escape(where)}: {escape(exc.format_message())} (see {escape(where)} --help)")
        raise typer.Exit(EXIT_BAD_INPUT) from None


app = typer.Typer(
    cls=OneLineUsageErrors,
    help="xlstm-zoo: build, inspect and save xLSTM mLSTM models from plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help text: no type placeholders such as <bool>, no boxes cut to the width
    context_settings={} if sys.stdout.isatty() else {"terminal_width": UNBOUNDED_WIDTH,
                                                     "max_content_width": UNBOUNDED_WIDTH},
)
out = _console()
err = _console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
MAX_ERRORS_SHOWN = 15


def _show_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def report_validation_error(source: str, exc: ValidationError) -> None:
    """Print one line per error: the dotted field path, the message and the offending input."""
    errors = exc.errors(include_url=False)
    err.print(f"[bold red]invalid config[/] {escape(source)}: {len(errors)} error(s)")
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(part) for part in e["loc"]) or "(top level)"
        err.print(f"  [bold]{escape(loc)}[/]: {escape(e['msg'])}  [dim](got {escape(_show_input(e.get('input')))})[/]")
    if len(errors) > MAX_ERRORS_SHOWN:
        err.print(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")


@contextmanager
def bad_input_exits(source: str) -> Iterator[None]:
    """Turn user-input errors (the ``ZooError`` family, config validation, OS errors) into a short message on
    stderr and exit code 2: the one place the CLI maps errors to exit codes."""
    from zoo.errors import ZooError
    from zoo.export.checkpoint import CheckpointError, CheckpointRefused

    try:
        yield
    except ValidationError as exc:
        report_validation_error(source, exc)
    except CheckpointError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        if not isinstance(exc, CheckpointRefused):  # refused before Orbax read anything: a normal exit is safe
            # Orbax's reader threads may still be failing in the background; leave before their
            # teardown prints tracebacks over the message above.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_BAD_INPUT)
    except (ZooError, OSError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
    else:
        return
    raise typer.Exit(EXIT_BAD_INPUT)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(EXIT_BAD_INPUT)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) while a command runs; ``args[0]``, when given, says what was kept on disk.

    Raised by the handler ``main`` installs instead of ``KeyboardInterrupt``, which typer would turn into
    "Aborted!" and an interpreter teardown that can crash while XLA and Orbax threads still run.
    """


def _raise_interrupted(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: the clean-up on the way out must not be cut short
    raise Interrupted


def out_path(value: str) -> Path:
    """``--out`` as a path; an empty one (which would mean the current folder) is one line and exit 2."""
    if not value.strip():
        fail("--out: expected a folder to write into; got an empty path (use '.' to mean the current folder)")
    return Path(value)


def _steps_in(folder: Path) -> set[int]:
    """The complete (renamed into place) step numbers of a checkpoint folder."""
    return {int(c.name) for c in folder.iterdir() if c.name.isdigit()} if folder.is_dir() else set()


def parse_ints(text: str, option: str, example: str) -> list[int]:
    """Comma-separated integers (at least one; ASCII digits) from ``option``; one line and exit 2 otherwise."""
    parts = [t.strip() for t in text.split(",")]
    if not all(re.fullmatch(r"[+-]?[0-9]+", t) for t in parts):  # int() would also take other scripts' digits
        fail(f"{option} needs comma-separated integers (ASCII digits), e.g. {example}; got {text!r}")
    return [int(t) for t in parts]


def parse_prompt(prompt_ids: str) -> list[int]:
    """Token ids from ``--prompt-ids``; the model or artifact checks them against its vocabulary and
    ``context_length`` (exit 2 with one line)."""
    ids = parse_ints(prompt_ids, "--prompt-ids", "1,2,3")
    too_big = next((i for i in ids if i >= 2**31), None)
    if too_big is not None:  # above int32: outside every vocabulary, and NumPy could not hold it as a token id
        fail(f"--prompt-ids: token id {too_big} is outside the vocabulary")
    return ids


PromptOption = Annotated[str, typer.Option("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3; at most "
                                           "context_length of them (generation may continue past it)")]
ShowLogitsOption = Annotated[int, typer.Option("--show-logits", min=0, metavar="N", help="print the N most likely "
                                               "next tokens after the prompt, with their logits (0: none)")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1, help="how many tokens to generate")]


def show_top_logits(logits: Any, count: int) -> None:
    """The ``count`` largest of the next-token ``logits (V,)``, most likely first."""
    import numpy as np

    logits = np.asarray(logits)
    if count:
        best = np.argsort(-logits, kind="stable")[:count]
        out.print(f"logits:    {'  '.join(f'{i}: {logits[i]:.4f}' for i in best)}")


ConfigArg = Annotated[str, typer.Argument(help="a config JSON file or a preset name (see `zoo presets`)")]
StepOption = Annotated[int | None, typer.Option("--step", min=0, help="the checkpoint step to load "
                                                "(default: the latest)")]


def load_checkpoint(checkpoint: Path, step: int | None) -> tuple[Any, Any]:
    """``(config, params)`` of a checkpoint step (default: the latest); says on stderr which step it loaded."""
    from zoo.export.checkpoint import find_step, load

    with bad_input_exits(str(checkpoint)):
        where = find_step(checkpoint, step)
        loaded = load(where.root, where.step)
    err.print(f"loaded {escape(str(where))}")
    return loaded


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config field (repeatable): KEY is its dotted path, VALUE a JSON "
    "value (a word that is not JSON is a string), validated like a config file; e.g. --set "
    "parallel.fsdp_axis_size=1, --set parallel=null, --set dtype=float32")]


def load_config_with(config: str, sets: list[str] | None) -> Any:
    """The validated CONFIG with each ``--set KEY=VALUE`` applied in order; exit 2 with the field named otherwise."""
    from zoo.api import load_config

    overrides: dict[str, Any] = {}
    for item in sets or []:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            fail(f"--set needs KEY=VALUE, e.g. parallel.fsdp_axis_size=1; got {item!r}")
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    with bad_input_exits(f"{config} with --set" if overrides else config):
        cfg = load_config(config)
        return cfg.with_overrides(overrides) if overrides else cfg


def layout_misfit(cfg: Any, devices: int | None = None) -> str | None:
    """Why the ``parallel`` layout of ``cfg`` does not fit ``devices`` (default: the devices here), and the ``--set``
    that makes it fit; None when it fits."""
    import jax

    from zoo.sharding import ShardingError, axis_sizes

    parallel = cfg.parallel
    try:
        if parallel is not None:
            axis_sizes(parallel, devices or jax.device_count())
    except ShardingError as exc:
        fixes = [f"--set parallel.{name}=1" for name in ("fsdp_axis_size", "model_axis_size")
                 if getattr(parallel, name) > 1] + ["--set parallel.data_axis_size=-1"] * (parallel.data_axis_size != -1)
        return f"{exc}; to run here, override the layout: {' '.join(fixes)}"
    return None


@app.command()
def validate(config: ConfigArg, sets: SetOption = None) -> None:
    """Validate a config: exit 0 when valid, 2 (with the field paths) when not.

    A note on stderr says when its parallel layout needs more devices than are here, and how to override it.
    """
    cfg = load_config_with(config, sets)
    out.print(f"[green]valid[/] {escape(config)}: {cfg.layer.layer_type}, {cfg.num_blocks} blocks, "
              f"embedding_dim {cfg.embedding_dim}")
    misfit = layout_misfit(cfg)
    if misfit:
        err.print(f"[yellow]note:[/] {escape(config)}: {escape(misfit)}")


@app.command()
def build(
    config: ConfigArg,
    out_dir: Annotated[Path | None, typer.Option("--out", parser=out_path, help="checkpoint directory "
                                                  "(default: checkpoints/<config name>)")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="PRNG seed of the initialisation")] = 0,
    abstract: Annotated[bool, typer.Option("--abstract", help="only compute shapes and sizes; "
                                           "allocate and save nothing")] = False,
    devices: Annotated[int | None, typer.Option(min=1, help="with --abstract: plan the parallel layout for this "
                                                "many devices (default: the devices present)")] = None,
    force: Annotated[bool, typer.Option("--force", help="add a step even when the folder's latest step holds "
                                        "another parameter tree (paths, shapes or dtypes); earlier steps stay")] = False,
    sets: SetOption = None,
) -> None:
    """Validate CONFIG, resolve its plugins, initialise the model, print a summary and save a checkpoint.

    With a "parallel" section the model is initialised directly into its sharded layout on all devices
    (of all processes, when launched as several), and each process writes its own shards.
    """
    import jax

    from zoo.api import init_params, param_shapes
    from zoo.export.checkpoint import check_save_target, save
    from zoo.sharding import axis_sizes, make_mesh
    from zoo.summary import sharding_table, summary

    if devices is not None and not abstract:
        raise typer.BadParameter("--devices plans a layout; it needs --abstract")
    cfg = load_config_with(config, sets)
    misfit = layout_misfit(cfg, devices) if not abstract or devices is not None else None
    if misfit:
        fail(f"{config}: {misfit}")
    target = out_dir or Path("checkpoints") / Path(config).stem
    with bad_input_exits(config):
        shapes = param_shapes(cfg)
    if not abstract:
        with bad_input_exits(str(target)):
            check_save_target(target, shapes, force=force)  # before the summary and the work of initialising
    with bad_input_exits(config):
        out.print(summary(cfg, shapes))
        if cfg.parallel is not None:
            count = devices or jax.device_count()
            if abstract and devices is None and count % cfg.parallel.product_of_fixed_sizes:
                count = cfg.parallel.product_of_fixed_sizes  # too few devices here: plan for the fewest that fit
            out.print(sharding_table(cfg, axis_sizes(cfg.parallel, count)))
        if abstract:
            return
        mesh = make_mesh(cfg)
    where = f"{jax.device_count()} {jax.devices()[0].platform} devices" if mesh else jax.devices()[0].platform
    before = _steps_in(target)
    try:
        with out.status(f"initialising with seed {seed} on {where}"):
            start = time.perf_counter()
            params = jax.block_until_ready(init_params(cfg, seed))
            init_s = time.perf_counter() - start
        with out.status(f"saving to {target}"), bad_input_exits(str(target)):
            start = time.perf_counter()
            step_dir = save(target, cfg, params, force=force)
            save_s = time.perf_counter() - start
    except Interrupted:  # Orbax renames a step into place only when complete: the folder says what was kept
        saved = sorted(_steps_in(target) - before)
        raise Interrupted(f"step {saved[-1]} was saved to {target}" if saved else
                          f"nothing was saved; earlier steps in {target} are untouched") from None
    out.print(f"initialised in {init_s:.2f} s; saved Orbax checkpoint {escape(str(step_dir))} in {save_s:.2f} s")


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory written by `zoo build` or zoo.save")],
    prompt_ids: PromptOption,
    max_new_tokens: MaxNewTokensOption = 16,
    temperature: Annotated[float, typer.Option(help="sampling temperature, a finite number >= 0; 0 is greedy")
                           ] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="sample among the k most likely tokens "
                                       "(0: all)")] = 0,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="PRNG seed of the sampling")] = 0,
    show_logits: ShowLogitsOption = 5,
    step: StepOption = None,
) -> None:
    """Continue a prompt with a saved model: prefill once, then one jitted step per token."""
    from zoo.generate import check_sampling
    from zoo.generate import generate as run

    try:
        check_sampling(max_new_tokens, temperature, top_k, seed)
    except ValueError as exc:
        fail(str(exc))
    prompt = parse_prompt(prompt_ids)
    config, params = load_checkpoint(checkpoint, step)
    with bad_input_exits(str(checkpoint)):
        result = run(config, params, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    show_top_logits(result.prompt_logits[0], show_logits)
    out.print(f"generated: {' '.join(str(int(t)) for t in result.tokens[0])}")
    timings = [f"prefill {len(prompt)} tokens: {1000 * result.prefill_s:.1f} ms"]
    if max_new_tokens > 1:  # the first token comes from the prefill; each later one from a step
        timings.append(f"first step (with compile) {1000 * result.first_step_s:.1f} ms")
    if max_new_tokens > 2:
        timings.append(f"then {result.tokens_per_s:.1f} tokens/s")
    out.print("; ".join(timings))


def parse_static(static: str | None) -> tuple[int, int] | None:
    """``--static B,S`` as two positive integers; a usage error (exit 2) otherwise."""
    if static is None:
        return None
    parts = static.split(",")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", p.strip()) and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"--static needs two positive integers B,S (got {static!r})")
    return int(parts[0]), int(parts[1])


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory")],
    out_dir: Annotated[Path, typer.Option("--out", parser=out_path, help="a new directory for the artifact")],
    fmt: Annotated[str, typer.Option("--format", help="a registered exporter: stablehlo, savedmodel, "
                                     "or one a plugin adds (see `zoo plugins`)")] = "stablehlo",
    platforms: Annotated[str, typer.Option(help="comma-separated lowering platforms")] = "cpu,cuda,tpu",
    entry: Annotated[str, typer.Option("--entry", help="comma-separated entry points")] = "forward,prefill,step",
    weights: Annotated[str | None, typer.Option(help="stablehlo: 'file' (default: one weights.npz that every "
                                                "entry takes as its first argument) or 'baked' (constants in each "
                                                "entry); savedmodel: 'variables'")] = None,
    mlir: Annotated[bool, typer.Option("--mlir", help="stablehlo: also write each entry's StableHLO text "
                                       "(NAME.mlir, e.g. for IREE)")] = False,
    static: Annotated[str | None, typer.Option("--static", metavar="B,S", help="fixed batch and sequence sizes "
                                               "instead of symbolic ones (for IREE)")] = None,
    step: StepOption = None,
) -> None:
    """Export a saved model as a serving artifact (StableHLO by default, or a TF SavedModel)."""
    from zoo.export.entries import new_directory
    from zoo.registry import resolve

    static_dims = parse_static(static)
    with bad_input_exits(str(checkpoint)):
        exporter = resolve("exporter", fmt)
    with bad_input_exits(str(out_dir)):
        new_directory(out_dir)  # before the work of loading the checkpoint
    config, params = load_checkpoint(checkpoint, step)
    options: dict[str, Any] = {"weights": weights} if weights else {}
    if static_dims:
        options["static"] = static_dims
    if mlir:
        options["mlir"] = True
    try:
        with bad_input_exits(str(out_dir)), out.status(f"exporting {fmt}"):
            start = time.perf_counter()
            path = exporter(config, params, out_dir, platforms=platforms.split(","), entries=entry.split(","),
                            **options)
    except Interrupted:  # the exporters write under a staging name, removed on the way out
        raise Interrupted(f"nothing was exported; {out_dir} was not created") from None
    out.print(f"exported {fmt} ({entry}; {platforms}) to {escape(str(path))} in {time.perf_counter() - start:.1f} s")


@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help="a `zoo export` directory (stablehlo or savedmodel) "
                                             "or a `zoo build` checkpoint")],
    prompt_ids: PromptOption,
    max_new_tokens: MaxNewTokensOption = 8,
    show_logits: ShowLogitsOption = 5,
    step: Annotated[int | None, typer.Option("--step", min=0, help="with a checkpoint: the step to load "
                                             "(default: the latest)")] = None,
) -> None:
    """Smoke-test an artifact: its next-token logits for the prompt and a greedy continuation."""
    from zoo.export.checkpoint import find_step
    from zoo.export.runners import greedy, open_artifact

    prompt = parse_prompt(prompt_ids)
    with bad_input_exits(str(artifact)):
        loaded = open_artifact(artifact, step)
        if loaded.kind == "checkpoint":
            err.print(f"loaded {escape(str(find_step(artifact, step)))}")
    with bad_input_exits(str(artifact)):
        logits, tokens = greedy(loaded, prompt, max_new_tokens)
    out.print(f"artifact:  {loaded.kind} ({', '.join(sorted(loaded.entries))})")
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    show_top_logits(logits, show_logits)
    out.print(f"generated: {' '.join(map(str, tokens))}")


convert_app = typer.Typer(help="Convert checkpoints from and to NX-AI's PyTorch xlstm.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("torch")
def convert_torch(
    src: Annotated[Path, typer.Argument(help="a folder with model.safetensors (or shards) and config.yaml/json")],
    out_dir: Annotated[Path, typer.Option("--out", parser=out_path, help="a new zoo checkpoint directory")],
    dtype: Annotated[str | None, typer.Option(help="compute dtype of the zoo config (default: zoo_config.json's, "
                                              "else the tensors' dtype, bfloat16 or float32); params keep the "
                                              "tensors' dtype")] = None,
    scan_blocks: Annotated[bool | None, typer.Option("--scan-blocks/--no-scan-blocks", help="stack the blocks' "
                                                     "params on a leading axis (scan_blocks: true, as the mlstm_v1 "
                                                     "presets; default: zoo_config.json's, else not)")] = None,
) -> None:
    """Convert an xlstm_large (xLSTM-7B), Hugging Face xlstm or NeurIPS xLSTMLMModel checkpoint into a zoo
    checkpoint; a zoo_config.json written by `zoo convert to-torch` restores every zoo setting."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from zoo.convert.torch import from_torch

    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"--dtype must be float32, bfloat16 or float16 (got {dtype!r})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[size]}"))
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar, \
            bad_input_exits(str(src)):
        task = bar.add_task("converting", total=None, size="")
        done = 0

        def advance(name: str, nbytes: int, total: int, total_bytes: int) -> None:
            nonlocal done
            done += nbytes
            bar.update(task, description=f"tensors ({name})", advance=1, total=total,
                       size=f"{done / 2**20:.1f}/{total_bytes / 2**20:.1f} MiB")

        start = time.perf_counter()
        report = from_torch(src, out_dir, dtype=dtype, scan_blocks=scan_blocks, progress=advance)
    out.print(f"converted {report.source_format} ({report.tensors} tensors, {report.source_bytes / 2**20:.1f} MiB)"
              f"{' with zoo_config.json' if report.zoo_config else ''} into {escape(str(report.checkpoint))} in "
              f"{time.perf_counter() - start:.1f} s")


@convert_app.command("to-torch")
def convert_to_torch(
    checkpoint: Annotated[Path, typer.Argument(help="an mlstm_v1 zoo checkpoint")],
    out_dir: Annotated[Path, typer.Option("--out", parser=out_path, help="a new folder for model.safetensors, "
                                          "config.yaml and zoo_config.json")],
    step: Annotated[int | None, typer.Option("--step", min=0, help="the step to convert (default: the latest)")]
    = None,
) -> None:
    """Write an mlstm_v1 zoo checkpoint in xlstm_large format (loads with xlstm's load_from_pretrained)."""
    from zoo.convert.torch import to_torch

    with bad_input_exits(str(checkpoint)):
        report = to_torch(checkpoint, out_dir, step=step)
    out.print(f"wrote xlstm_large model.safetensors ({report.tensors} tensors, {report.nbytes / 2**20:.1f} MiB), "
              f"config.yaml and zoo_config.json to {escape(str(report.folder))} from {escape(report.source)}")


MAX_CHECK_SEQ_LEN = 4096


@app.command("check-backends")
def check_backends(
    config: Annotated[str | None, typer.Option(help="take head sizes and backend options from this config")] = None,
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="comma-separated sequence lengths, each from 1 to 4096")
                        ] = "1,7,64,130",
) -> None:
    """Check every registered cell backend against its reference.

    The reference is parallel_stabilized unless the plugin names another; the checks cover outputs,
    gradients, bfloat16, and states out and in against the stateful reference.
    """
    from zoo.api import load_config
    from zoo.registry import available
    from zoo.testing import cell_parity, references

    lengths = parse_ints(seq_lens, "--seq-lens", "1,7,64")
    if not all(1 <= n <= MAX_CHECK_SEQ_LEN for n in lengths):  # the references hold (S, S) matrices
        fail(f"--seq-lens: every sequence length must be between 1 and {MAX_CHECK_SEQ_LEN}, "
             f"got {next(n for n in lengths if not 1 <= n <= MAX_CHECK_SEQ_LEN)}")
    options: dict[str, Any] = {}
    kwargs: dict[str, dict[str, Any]] = {}
    if config is not None:
        with bad_input_exits(config):
            cfg = load_config(config)
        sizes = cfg.derived_sizes()
        options = {"heads": cfg.layer.num_heads, "dqk": sizes["qk_head_dim"], "dv": sizes["v_head_dim"]}
        for backend in (cfg.cell.backend, cfg.cell.prefill_backend, cfg.cell.step_backend):
            kwargs[backend.name] = backend.kwargs
    table = Table(title="Cell backends vs their references", title_justify="left")
    for column in ("backend", "check", "reference", "S", "dtype", "max rel. error", "tolerance", "ok"):
        table.add_column(column, justify="right" if column in ("S", "max rel. error", "tolerance") else "left")
    failed = 0
    for name in available("cell"):
        if references(name)[0] == name:  # a reference itself, e.g. parallel_stabilized
            continue
        with out.status(f"checking {name}"):
            results = cell_parity(name, seq_lens=lengths, kwargs=kwargs.get(name), **options)
        for r in results:
            failed += not r.passed
            table.add_row(r.backend, r.check, r.reference, str(r.seq_len), r.dtype, f"{r.error:.2e}",
                          f"{r.tolerance:.0e}",
                          "[green]pass[/]" if r.passed else "[red]FAIL[/]")
        table.add_section()
    out.print(table)
    if failed:
        err.print(f"[red]{failed} check(s) failed[/]")
        raise typer.Exit(1)


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="per plugin: distribution, entry point, "
                                          "what it registered, and the traceback of a failure")] = False,
) -> None:
    """List every registered name per kind with its origin and version, conflicts, and plugins that failed."""
    from zoo.registry import describe, get_registry

    reg = get_registry()
    conflicts = reg.conflicts()
    if as_json:
        print(json.dumps({
            "registered": [{"kind": e.kind, "name": e.name, "qualified_name": e.qualified_name, "plugin": e.plugin,
                            "dist": e.dist, "version": e.version, "override": e.override,
                            "description": e.metadata.get("description")} for e in describe()],
            "plugins": [p.as_dict() for p in reg.plugins.values()],
            "conflicts": [str(c) for c in conflicts],
            "shared_entry_points": reg.shared_entry_points(),
        }, indent=2))
        return
    if verbose:
        out.print(plugin_tree(reg))
    else:
        table = Table(title="Registered plugins", title_justify="left")
        for column in ("kind", "name", "plugin", "distribution", "description"):
            table.add_column(column)
        clashing = {(c.kind, c.name) for c in conflicts}
        for e in describe():
            name = e.qualified_name if (e.kind, e.name) in clashing else e.name
            table.add_row(e.kind, name, e.plugin, f"{e.dist or '-'} {e.version or ''}".strip(),
                          escape(str(e.metadata.get("description", ""))))
        out.print(table)
        failures = reg.failures()
        if failures:
            failed = Table(title="Plugins that failed to load", title_justify="left", style="red")
            failed.add_column("plugin")
            failed.add_column("distribution")
            failed.add_column("error")
            for p in failures:
                failed.add_row(p.name, f"{p.dist or '-'} {p.version or ''}".strip(), escape(p.error or ""))
            out.print(failed)
    for conflict in conflicts:
        out.print(f"[yellow]conflict:[/] {escape(str(conflict))}")
    for shared in reg.shared_entry_points():
        out.print(f"[yellow]shared entry point:[/] {escape(shared)}")


def plugin_tree(reg: Any) -> Any:
    """Plugins grouped by distribution: version, entry point, what each registered, and why one failed."""
    from rich.tree import Tree

    tree = Tree("[bold]Plugins by distribution[/]")
    by_dist: dict[str, list[Any]] = {}
    for p in reg.plugins.values():
        by_dist.setdefault(f"{p.dist or '(no distribution)'} {p.version or ''}".strip(), []).append(p)
    for dist, members in by_dist.items():
        dist_node = tree.add(f"[bold]{escape(dist)}[/]")
        for p in members:
            status = "[green]ok[/]" if p.ok else "[red]FAILED[/]"
            where = "built-in module" if p.builtin else f"entry point {escape(p.entry_point or '(added in code)')}"
            branch = dist_node.add(f"{status} {escape(p.name)} ({where})")
            for kind, names in p.registered.items():
                branch.add(f"{kind}: {escape(', '.join(names))}")
            if not p.ok:
                branch.add(f"[red]error:[/] {escape(p.error or '')}")
                if p.traceback:
                    branch.add(f"[dim]{escape(p.traceback)}[/]")
    return tree


@app.command()
def presets(
    show: Annotated[str | None, typer.Option("--show", metavar="NAME", help="print the JSON file of preset NAME "
                                             "(to copy and edit) instead of the table")] = None,
) -> None:
    """List the shipped presets with their sizes and parameter counts, or print one preset's JSON."""
    from zoo import presets as preset_files
    from zoo.api import load_config, param_count

    if show is not None:
        if show not in preset_files.names():
            fail(f"{show!r} is not a preset; {preset_files.hint(show)}")
        sys.stdout.write(preset_files.path(show).read_text(encoding="utf-8"))
        return

    table = Table(title="Presets", title_justify="left")
    for column in ("name", "layer_type", "embedding_dim", "num_blocks", "num_heads", "dtype", "params"):
        table.add_column(column, justify="left" if column in ("name", "layer_type", "dtype") else "right")
    for name in preset_files.names():
        cfg = load_config(name)
        table.add_row(name, cfg.layer.layer_type, str(cfg.embedding_dim), str(cfg.num_blocks),
                      str(cfg.layer.num_heads), cfg.dtype, f"{param_count(cfg):,}")
    out.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of config files (plugin-name fields list the registered names)."""
    from zoo.config import ModelConfig

    print(json.dumps(ModelConfig.model_json_schema(), indent=2))


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="a checkpoint folder, a `zoo export` folder, a config file or a preset")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (schema: docs/info.md)")] = False,
    step: Annotated[int | None, typer.Option("--step", min=0, help="with a checkpoint: the step to describe "
                                             "(default: the latest)")] = None,
) -> None:
    """Describe a checkpoint, an export artifact or a config: architecture, parameters, steps, plugins, versions,
    hashes."""
    from zoo.info import describe, rows

    with bad_input_exits(path):
        described = describe(path, step)
    if as_json:
        print(json.dumps(described, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, text in rows(described):
        table.add_row(label, text)
    out.print(table)


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """Console-script entry point; joins JAX's distributed runtime when launched as several processes."""
    from zoo.distributed import initialize_from_env

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    initialize_from_env()
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        return app(args=argv if argv is not None else sys.argv[1:], prog_name="zoo")
    except Interrupted as exc:
        err.print(f"[bold yellow]interrupted[/]{'; ' + escape(exc.args[0]) if exc.args else ''}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # no interpreter teardown while XLA and Orbax threads still run
    finally:  # the command's work is done (or failed cleanly): Ctrl-C no longer cuts the teardown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
