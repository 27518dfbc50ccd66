"""``zoo quantize``: write a quantised copy of a checkpoint step (int8 weights by default)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from zoo.cli.common import StepOption, bad_input_exits, key_values, load_checkpoint, out, out_path

OptionsOption = Annotated[list[str] | None, typer.Option(
    "--option", metavar="KEY=VALUE", help="an option of the method (repeatable), VALUE a JSON value; int8: "
    "lm_head=false keeps the head in float32, embedding=true also quantises the embedding table, "
    "exclude='[\"blocks_*/ffn/*\"]' lists module paths to keep in float32")]


def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="a float checkpoint folder (or a `zoo train` run folder)")],
    out_dir: Annotated[Path, typer.Option("--out", parser=out_path, help="a new folder for the quantised "
                                          "checkpoint")],
    method: Annotated[str, typer.Option("--method", help="a registered quantizer (see `zoo plugins`)")] = "int8",
    options: OptionsOption = None,
    step: StepOption = None,
) -> None:
    """Quantise a checkpoint's weights into a new checkpoint (int8: weight-only, grouped scales).

    generate, run, export, serve and info take the result as they take the original; its tokenizer comes along.
    An already quantised checkpoint, an unknown method or option, or a model in which the method finds nothing
    to quantise is refused with one line (exit 2).
    """
    from pydantic import ValidationError

    from zoo.checkpoint import CheckpointRefused, classify_path, find_step, read_stored, save
    from zoo.config import ModelConfig
    from zoo.model import quantized_weights
    from zoo.quantization import QuantizationError, quantize, quantized_config, stored_bytes
    from zoo.summary import format_bytes
    from zoo.tokenizers import load_codec

    kwargs = key_values(options, "--option", "lm_head=false")
    with bad_input_exits(str(out_dir)):
        target = classify_path(out_dir)
        if target.kind not in ("missing", "empty"):
            raise CheckpointRefused(f"{target.path}: --out expected a new or empty folder; found {target.found}")
    with bad_input_exits(str(checkpoint)):
        where = find_step(checkpoint, step)
        stored = read_stored(where.root, where.step)[1]
        if isinstance(stored.get("quantization"), dict):  # refusals come before any array is read
            raise QuantizationError(f"{where} is already quantised (quantization.method="
                                    f"{stored['quantization'].get('method')!r}); quantise its float original instead")
        with contextlib.suppress(ValidationError):  # an invalid stored config is load's to report
            quantized_config(ModelConfig.model_validate(stored), method, kwargs)
    config, params = load_checkpoint(where.root, where.step)
    start = time.perf_counter()
    with bad_input_exits(str(checkpoint)), out.status(f"quantising with {method}"):
        qconfig, qparams = quantize(config, params, method, kwargs)
        codec = load_codec(where.root, where.step)
    origin = {"path": str(where.root), "step": where.step, "method": method}
    with bad_input_exits(str(out_dir)), out.status(f"saving to {out_dir}"):
        step_dir = save(out_dir, qconfig, qparams, {"quantized_from": origin}, tokenizer=codec)
    before, after = stored_bytes(params), stored_bytes(qparams)
    out.print(f"quantised {len(quantized_weights(qconfig))} weights with {escape(method)} (parameters "
              f"{format_bytes(before)} -> {format_bytes(after)}, {after / before:.2f}x); saved "
              f"{escape(str(step_dir))} in {time.perf_counter() - start:.1f} s")
