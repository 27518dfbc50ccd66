"""Commands that write or convert artifacts: ``export`` (StableHLO, SavedModel, a plugin's format) and
``convert torch`` / ``convert to-torch`` (NX-AI's PyTorch xlstm checkpoints)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zoo.cli.common import Interrupted, StepOption, bad_input_exits, err, load_checkpoint, out, out_path


def parse_static(static: str | None) -> tuple[int, int] | None:
    """``--static B,S`` as two positive integers; a usage error (exit 2) otherwise."""
    if static is None:
        return None
    parts = static.split(",")
    if len(parts) != 2 or not all(re.fullmatch(r"[0-9]+", p.strip()) and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"--static needs two positive integers B,S (got {static!r})")
    return int(parts[0]), int(parts[1])


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
    """Export a saved model as a serving artifact (StableHLO by default, or a TF SavedModel).

    The step's tokenizer, when it has one, goes into the artifact as tokenizer.json and zoo_tokenizer.json.
    """
    from zoo.export.entries import new_directory
    from zoo.registry import resolve
    from zoo.staging import staged
    from zoo.tokenizers import load_codec, write_files

    static_dims = parse_static(static)
    with bad_input_exits(str(checkpoint)):
        exporter = resolve("exporter", fmt)
    with bad_input_exits(str(out_dir)):
        out_dir = new_directory(out_dir)  # before the work of loading the checkpoint
    config, params = load_checkpoint(checkpoint, step)
    with bad_input_exits(str(checkpoint)):
        codec = load_codec(checkpoint, step)
    options: dict[str, Any] = {"weights": weights} if weights else {}
    if static_dims:
        options["static"] = static_dims
    if mlir:
        options["mlir"] = True
    try:
        with bad_input_exits(str(out_dir)), out.status(f"exporting {fmt}"), staged(out_dir) as staging:
            start = time.perf_counter()
            exporter(config, params, staging, platforms=platforms.split(","), entries=entry.split(","), **options)
            if codec is not None:  # renamed into place with the rest
                write_files(codec, staging)
    except Interrupted:  # written under staging names, removed on the way out
        raise Interrupted(f"nothing was exported; {out_dir} was not created") from None
    with_tokenizer = " with its tokenizer" if codec is not None else ""
    out.print(f"exported {fmt} ({entry}; {platforms}){with_tokenizer} to {escape(str(out_dir))} in "
              f"{time.perf_counter() - start:.1f} s")


def convert_torch_command(
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


def convert_to_torch_command(
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
