"""What every command group shares: the consoles, exit codes, one-line usage and input errors, Ctrl-C, and the
options and parsers several commands take."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

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


out = _console()
err = _console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
MAX_ERRORS_SHOWN = 15


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
    from zoo.checkpoint import CheckpointError, CheckpointRefused
    from zoo.errors import ZooError

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


def raise_interrupted(signum: int, frame: Any) -> None:
    """The SIGINT handler ``main`` installs: raises ``Interrupted``, once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: the clean-up on the way out must not be cut short
    raise Interrupted


def out_path(value: str) -> Path:
    """``--out`` as a path; an empty one (which would mean the current folder) is one line and exit 2."""
    if not value.strip():
        fail("--out: expected a folder to write into; got an empty path (use '.' to mean the current folder)")
    return Path(value)


def parse_ints(text: str, option: str, example: str) -> list[int]:
    """Comma-separated integers (at least one; ASCII digits) from ``option``; one line and exit 2 otherwise."""
    parts = [t.strip() for t in text.split(",")]
    if not all(re.fullmatch(r"[+-]?[0-9]+", t) for t in parts):  # int() would also take other scripts' digits
        fail(f"{option} needs comma-separated integers (ASCII digits), e.g. {example}; got {text!r}")
    return [int(t) for t in parts]


ConfigArg = Annotated[str, typer.Argument(help="a config JSON file or a preset name (see `zoo presets`)")]
StepOption = Annotated[int | None, typer.Option("--step", min=0, help="the checkpoint step to load "
                                                "(default: the latest)")]


def load_checkpoint(checkpoint: Path, step: int | None) -> tuple[Any, Any]:
    """``(config, params)`` of a checkpoint step (default: the latest); says on stderr which step it loaded."""
    from zoo.checkpoint import find_step, load

    with bad_input_exits(str(checkpoint)):
        where = find_step(checkpoint, step)
        loaded = load(where.root, where.step)
    err.print(f"loaded {escape(str(where))}")
    return loaded


SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="override a config field (repeatable): KEY is its dotted path, VALUE a JSON "
    "value (a word that is not JSON is a string), validated like a config file; e.g. --set "
    "parallel.fsdp_axis_size=1, --set parallel=null, --set dtype=float32")]


def key_values(items: list[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` items of option ``flag`` as a dict in order (VALUE as JSON, else a string); one line naming
    ``flag`` with ``example`` and exit 2 for an item without a key or ``=``."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            fail(f"{flag} needs KEY=VALUE, e.g. {example}; got {item!r}")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


def load_config_with(config: str, sets: list[str] | None) -> Any:
    """The validated CONFIG with each ``--set KEY=VALUE`` applied in order; exit 2 with the field named otherwise."""
    from zoo.config_source import load_config

    overrides = key_values(sets, "--set", "parallel.fsdp_axis_size=1")
    with bad_input_exits(f"{config} with --set" if overrides else config):
        cfg = load_config(config)
        return cfg.with_overrides(overrides) if overrides else cfg
