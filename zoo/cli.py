"""The ``zoo`` command line: build, validate, plugins, presets, schema."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="xlstm-zoo: build, inspect and save xLSTM mLSTM models from plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_BAD_INPUT = 2
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
    """Turn user-input errors into a short message on stderr and exit code 2."""
    from zoo.api import BuildError, ConfigSourceError
    from zoo.export.checkpoint import CheckpointError
    from zoo.export.stablehlo import ExportError
    from zoo.registry import UnknownPluginError

    try:
        yield
    except ValidationError as exc:
        report_validation_error(source, exc)
    except CheckpointError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        # Orbax's reader threads may still be failing in the background; leave before their
        # teardown prints tracebacks over the message above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BAD_INPUT)
    except (ConfigSourceError, BuildError, ExportError, UnknownPluginError, OSError) as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
    else:
        return
    raise typer.Exit(EXIT_BAD_INPUT)


def parse_prompt(prompt_ids: str, vocab_size: int) -> list[int]:
    """Token ids from ``--prompt-ids``; a usage error (exit 2) unless each is an integer in [0, vocab_size)."""
    try:
        prompt = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
        prompt = []
    if not prompt or not all(0 <= t < vocab_size for t in prompt):
        raise typer.BadParameter(f"--prompt-ids needs comma-separated ids, at least one, each in [0, {vocab_size}); "
                                 f"got {prompt_ids!r}")
    return prompt


ConfigArg = Annotated[str, typer.Argument(help="a config JSON file or a preset name (see `zoo presets`)")]


@app.command()
def validate(config: ConfigArg) -> None:
    """Validate a config: exit 0 when valid, 2 (with the field paths) when not."""
    from zoo.api import load_config

    with bad_input_exits(config):
        cfg = load_config(config)
    out.print(f"[green]valid[/] {escape(config)}: {cfg.layer.layer_type}, {cfg.num_blocks} blocks, "
              f"embedding_dim {cfg.embedding_dim}")


@app.command()
def build(
    config: ConfigArg,
    out_dir: Annotated[Path | None, typer.Option("--out", help="checkpoint directory "
                                                  "(default: checkpoints/<config name>)")] = None,
    seed: Annotated[int, typer.Option(help="PRNG seed of the initialisation")] = 0,
    abstract: Annotated[bool, typer.Option("--abstract", help="only compute shapes and sizes; "
                                           "allocate and save nothing")] = False,
) -> None:
    """Validate CONFIG, resolve its plugins, initialise the model, print a summary and save a checkpoint."""
    import jax

    from zoo.api import check_devices, init_params, load_config, param_shapes
    from zoo.export.checkpoint import save
    from zoo.summary import summary

    with bad_input_exits(config):
        cfg = load_config(config)
        shapes = param_shapes(cfg)
        out.print(summary(cfg, shapes))
        if abstract:
            return
        check_devices(cfg)
    target = out_dir or Path("checkpoints") / Path(config).stem
    with out.status(f"initialising with seed {seed} on {jax.devices()[0].platform}"):
        start = time.perf_counter()
        params = jax.block_until_ready(init_params(cfg, seed))
        init_s = time.perf_counter() - start
    with out.status(f"saving to {target}"), bad_input_exits(str(target)):
        start = time.perf_counter()
        step_dir = save(target, cfg, params)
        save_s = time.perf_counter() - start
    out.print(f"initialised in {init_s:.2f} s; saved Orbax checkpoint {escape(str(step_dir))} in {save_s:.2f} s")


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory written by `zoo build` or zoo.save")],
    prompt_ids: Annotated[str, typer.Option("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="sample among the k most likely (0: all)")] = 0,
    seed: Annotated[int, typer.Option(help="PRNG seed of the sampling")] = 0,
) -> None:
    """Continue a prompt with a saved model: prefill once, then one jitted step per token."""
    from zoo.export.checkpoint import load
    from zoo.generate import generate as run

    with bad_input_exits(str(checkpoint)):
        config, params = load(checkpoint)
    prompt = parse_prompt(prompt_ids, config.vocab_size)
    result = run(config, params, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    out.print(f"generated: {' '.join(str(int(t)) for t in result.tokens[0])}")
    out.print(f"prefill {len(prompt)} tokens: {1000 * result.prefill_s:.1f} ms; first step (with compile) "
              f"{1000 * result.first_step_s:.1f} ms; then {result.tokens_per_s:.1f} tokens/s")


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="a new directory for the artifact")],
    fmt: Annotated[str, typer.Option("--format", help="a registered exporter (see `zoo plugins`)")] = "stablehlo",
    platforms: Annotated[str, typer.Option(help="comma-separated lowering platforms")] = "cpu,cuda,tpu",
    entry: Annotated[str, typer.Option("--entry", help="comma-separated entry points")] = "forward,prefill,step",
    weights: Annotated[str, typer.Option(help="'baked' (constants) or 'separate' (params as arguments)")] = "baked",
) -> None:
    """Export a saved model as a serving artifact (StableHLO by default)."""
    from zoo.export.checkpoint import load
    from zoo.registry import resolve

    with bad_input_exits(str(checkpoint)):
        exporter = resolve("exporter", fmt)
        config, params = load(checkpoint)
    with bad_input_exits(str(out_dir)), out.status(f"exporting {fmt}"):
        start = time.perf_counter()
        path = exporter(config, params, out_dir, platforms=platforms.split(","), entries=entry.split(","),
                        weights=weights)
    out.print(f"exported {fmt} ({entry}; {platforms}; weights {weights}) to {escape(str(path))} "
              f"in {time.perf_counter() - start:.1f} s")


@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help="an artifact directory written by `zoo export`")],
    prompt_ids: Annotated[str, typer.Option("--prompt-ids", help="comma-separated token ids")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 8,
) -> None:
    """Smoke-test an exported artifact: a greedy continuation through its prefill and step entries."""
    from zoo.export.stablehlo import greedy_continuation

    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        err.print(f"[bold red]error:[/] {escape(str(artifact))} has no manifest.json; is it a `zoo export` directory?")
        raise typer.Exit(EXIT_BAD_INPUT)
    manifest = json.loads(manifest_path.read_text())
    if manifest["weights"] != "baked":
        raise typer.BadParameter("zoo run needs an artifact exported with --weights baked")
    prompt = parse_prompt(prompt_ids, manifest["vocab_size"])
    with bad_input_exits(str(artifact)):
        tokens = greedy_continuation(artifact, prompt, max_new_tokens)
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    out.print(f"generated: {' '.join(map(str, tokens))}")


@app.command("check-backends")
def check_backends(
    config: Annotated[str | None, typer.Option(help="take head sizes and backend options from this config")] = None,
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="comma-separated sequence lengths")] = "1,7,64,130",
) -> None:
    """Run every registered cell backend against parallel_stabilized: outputs, final states and gradients."""
    from zoo.api import load_config
    from zoo.registry import available
    from zoo.testing import cell_parity

    options: dict[str, Any] = {}
    kwargs: dict[str, dict[str, Any]] = {}
    if config is not None:
        with bad_input_exits(config):
            cfg = load_config(config)
        sizes = cfg.derived_sizes()
        options = {"heads": cfg.layer.num_heads, "dqk": sizes["qk_head_dim"], "dv": sizes["v_head_dim"]}
        for backend in (cfg.cell.backend, cfg.cell.prefill_backend, cfg.cell.step_backend):
            kwargs[backend.name] = backend.kwargs
    lengths = [int(s) for s in seq_lens.split(",")]
    table = Table(title="Cell backends vs parallel_stabilized", title_justify="left")
    for column in ("backend", "check", "S", "dtype", "max rel. error", "tolerance", "ok"):
        table.add_column(column, justify="right" if column in ("S", "max rel. error", "tolerance") else "left")
    failed = 0
    for name in available("cell"):
        if name == "parallel_stabilized":
            continue
        with out.status(f"checking {name}"):
            results = cell_parity(name, seq_lens=lengths, kwargs=kwargs.get(name), **options)
        for r in results:
            failed += not r.passed
            table.add_row(r.backend, r.check, str(r.seq_len), r.dtype, f"{r.error:.2e}", f"{r.tolerance:.0e}",
                          "[green]pass[/]" if r.passed else "[red]FAIL[/]")
        table.add_section()
    out.print(table)
    if failed:
        err.print(f"[red]{failed} check(s) failed[/]")
        raise typer.Exit(1)


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List every registered name per kind with its origin and version, and plugins that failed to load."""
    from zoo.registry import describe, get_registry

    reg = get_registry()
    if as_json:
        print(json.dumps({
            "registered": [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "dist": e.dist, "version": e.version,
                            "description": e.metadata.get("description")} for e in describe()],
            "plugins": [p.as_dict() for p in reg.plugins.values()],
        }, indent=2))
        return
    table = Table(title="Registered plugins", title_justify="left")
    for column in ("kind", "name", "plugin", "distribution", "description"):
        table.add_column(column)
    for e in describe():
        table.add_row(e.kind, e.name, e.plugin, f"{e.dist or '-'} {e.version or ''}".strip(),
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


@app.command()
def presets() -> None:
    """List the shipped presets with their sizes and parameter counts."""
    from zoo import presets as preset_files
    from zoo.api import load_config, param_count

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


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return app(args=argv if argv is not None else sys.argv[1:], prog_name="zoo")


if __name__ == "__main__":
    main()
