"""Commands about a model's config and parameters: ``validate``, ``build``, ``info``, ``presets``, ``schema``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from zoo.cli.common import (ConfigArg, Interrupted, SetOption, bad_input_exits, err, fail, load_config_with, out,
                            out_path)


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


def validate_command(config: ConfigArg, sets: SetOption = None) -> None:
    """Validate a config: exit 0 when valid, 2 (with the field paths) when not.

    A note on stderr says when its parallel layout needs more devices than are here, and how to override it.
    """
    cfg = load_config_with(config, sets)
    out.print(f"[green]valid[/] {escape(config)}: {cfg.layer.layer_type}, {cfg.num_blocks} blocks, "
              f"embedding_dim {cfg.embedding_dim}")
    misfit = layout_misfit(cfg)
    if misfit:
        err.print(f"[yellow]note:[/] {escape(config)}: {escape(misfit)}")


def _steps_in(folder: Path) -> set[int]:
    """The complete (renamed into place) step numbers of a checkpoint folder."""
    return {int(c.name) for c in folder.iterdir() if c.name.isdigit()} if folder.is_dir() else set()


def build_command(
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
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", metavar="FILE", help="a Hugging Face "
                                                   "tokenizer.json to store with the step (at most vocab_size "
                                                   "tokens); its special tokens are found by name (<s>, </s>, "
                                                   "<|endoftext|>, <pad>, ...)")] = None,
    sets: SetOption = None,
) -> None:
    """Validate CONFIG, resolve its plugins, initialise the model, print a summary and save a checkpoint.

    With a "parallel" section the model is initialised directly into its sharded layout on all devices
    (of all processes, when launched as several), and each process writes its own shards.
    """
    import jax

    from zoo.checkpoint import check_save_target, save
    from zoo.model import param_shapes
    from zoo.runtime import init_params
    from zoo.sharding import axis_sizes, make_mesh
    from zoo.summary import sharding_table, summary
    from zoo.tokenizers import Codec, check_fits, load_file

    if devices is not None and not abstract:
        raise typer.BadParameter("--devices plans a layout; it needs --abstract")
    cfg = load_config_with(config, sets)
    misfit = layout_misfit(cfg, devices) if not abstract or devices is not None else None
    if misfit:
        fail(f"{config}: {misfit}")
    codec = None
    if tokenizer is not None:
        with bad_input_exits(str(tokenizer)):
            codec = Codec.from_tokenizer(load_file(tokenizer))
            check_fits(codec.tokenizer, cfg, f"--tokenizer {tokenizer}")
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
            step_dir = save(target, cfg, params, tokenizer=codec, force=force)
            save_s = time.perf_counter() - start
    except Interrupted:  # Orbax renames a step into place only when complete: the folder says what was kept
        saved = sorted(_steps_in(target) - before)
        raise Interrupted(f"step {saved[-1]} was saved to {target}" if saved else
                          f"nothing was saved; earlier steps in {target} are untouched") from None
    stored = f" with the tokenizer {escape(str(tokenizer))}" if tokenizer is not None else ""
    out.print(f"initialised in {init_s:.2f} s; saved Orbax checkpoint {escape(str(step_dir))}{stored} in "
              f"{save_s:.2f} s")


def info_command(
    path: Annotated[str, typer.Argument(help="a checkpoint folder, a `zoo export` folder, a config file or a preset")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (schema: docs/info.md)")] = False,
    step: Annotated[int | None, typer.Option("--step", min=0, help="with a checkpoint: the step to describe "
                                             "(default: the latest)")] = None,
) -> None:
    """Describe a checkpoint, an export artifact or a config: architecture, parameters, steps, plugins, versions,
    hashes."""
    from zoo.info import describe_path, rows

    with bad_input_exits(path):
        described = describe_path(path, step)
    if as_json:
        print(json.dumps(described, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, text in rows(described):
        table.add_row(label, text)
    out.print(table)


def presets_command(
    show: Annotated[str | None, typer.Option("--show", metavar="NAME", help="print the JSON file of preset NAME "
                                             "(to copy and edit) instead of the table")] = None,
) -> None:
    """List the shipped presets with their sizes and parameter counts, or print one preset's JSON."""
    from zoo import presets as preset_files
    from zoo.config_source import load_config
    from zoo.model import param_count

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


def schema_command() -> None:
    """Print the JSON Schema of config files (plugin-name fields list the registered names)."""
    from zoo.config import ModelConfig

    print(json.dumps(ModelConfig.model_json_schema(), indent=2))
