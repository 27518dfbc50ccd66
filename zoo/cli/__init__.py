"""The ``zoo`` command line (the console script ``zoo``, or ``python -m zoo.cli``); ``zoo COMMAND --help`` for options.

- ``zoo validate CONFIG``: check a config file or preset; exit 2 naming each invalid field.
- ``zoo build CONFIG``: initialise a model and save an Orbax checkpoint (``--abstract``: only shapes and sizes).
- ``zoo train CONFIG_OR_CKPT``: train a preset or config, or fine-tune a checkpoint, on text (``--data``); resumable.
- ``zoo generate CHECKPOINT``: continue ``--prompt-ids`` with a saved model, greedy or sampled.
- ``zoo run ARTIFACT``: smoke-test an export artifact or a checkpoint: next-token logits and a greedy continuation.
- ``zoo serve PATH``: serve a checkpoint or a StableHLO artifact over HTTP with OpenAI's completions API.
- ``zoo export CHECKPOINT``: write a serving artifact (StableHLO, a TF SavedModel, or a format a plugin adds).
- ``zoo quantize CHECKPOINT``: write a quantised copy of a checkpoint (int8 weights) that every command takes.
- ``zoo info PATH``: describe a checkpoint, an export artifact or a config (``--json``: docs/info.md).
- ``zoo plugins``: list the registered names per kind with their origins, conflicts and plugins that failed.
- ``zoo presets``: list the shipped presets with their sizes, or print one preset's JSON (``--show``).
- ``zoo schema``: print the JSON Schema of config files.
- ``zoo check-backends``: check every registered cell backend against its reference.
- ``zoo convert torch SRC``: convert an NX-AI xlstm_large, Hugging Face xlstm or NeurIPS checkpoint into a zoo one.
- ``zoo convert to-torch CHECKPOINT``: write an mlstm_v1 zoo checkpoint in xlstm_large format.

One module per command group: ``model`` (validate, build, info, presets, schema), ``train`` (train),
``inference`` (generate, run), ``serve`` (serve), ``artifacts`` (export, convert), ``quantization`` (quantize),
``plugins`` (plugins, check-backends), and ``common`` (the consoles, one-line usage and input errors, Ctrl-C, shared
options). Exit codes: 0 done, 1 a failed check (check-backends), 2 bad input (one line on stderr, from
``bad_input_exits`` or a usage error), 130 Ctrl-C.
Their functions are named ``*_command``: none shadows a library name such as ``zoo.build`` or ``zoo.generate``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape

from zoo.cli.artifacts import convert_to_torch_command, convert_torch_command, export_command
from zoo.cli.common import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, UNBOUNDED_WIDTH, Interrupted, OneLineUsageErrors,
                            bad_input_exits, err, fail, out, raise_interrupted)
from zoo.cli.inference import generate_command, run_command
from zoo.cli.model import build_command, info_command, presets_command, schema_command, validate_command
from zoo.cli.plugins import check_backends_command, plugins_command
from zoo.cli.quantization import quantize_command
from zoo.cli.serve import serve_command
from zoo.cli.train import train_command

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "UNBOUNDED_WIDTH", "Interrupted", "app", "bad_input_exits",
           "build_command", "check_backends_command", "convert_to_torch_command", "convert_torch_command", "err",
           "export_command", "fail", "generate_command", "info_command", "main", "out", "plugins_command",
           "presets_command", "quantize_command", "run_command", "schema_command", "serve_command", "train_command",
           "validate_command"]

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
# The commands in the order `zoo --help` lists them (the convert group comes after the plain commands).
app.command("validate")(validate_command)
app.command("build")(build_command)
app.command("train")(train_command)
app.command("generate")(generate_command)
app.command("export")(export_command)
app.command("quantize")(quantize_command)
app.command("run")(run_command)
app.command("serve")(serve_command)
app.command("check-backends")(check_backends_command)
app.command("plugins")(plugins_command)
app.command("presets")(presets_command)
app.command("schema")(schema_command)
app.command("info")(info_command)

convert_app = typer.Typer(help="Convert checkpoints from and to NX-AI's PyTorch xlstm.", no_args_is_help=True)
convert_app.command("torch")(convert_torch_command)
convert_app.command("to-torch")(convert_to_torch_command)
app.add_typer(convert_app, name="convert")


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """Console-script entry point; joins JAX's distributed runtime when launched as several processes."""
    from zoo.compiled import enable_persistent_cache
    from zoo.distributed import initialize_from_env

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    initialize_from_env()
    enable_persistent_cache()
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        return app(args=argv if argv is not None else sys.argv[1:], prog_name="zoo")
    except Interrupted as exc:
        err.print(f"[bold yellow]interrupted[/]{'; ' + escape(exc.args[0]) if exc.args else ''}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # no interpreter teardown while XLA and Orbax threads still run
    finally:  # the command's work is done (or failed cleanly): Ctrl-C no longer cuts the teardown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
