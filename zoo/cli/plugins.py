"""Commands about the plugin registry: ``plugins`` (what is registered, from where, what failed) and
``check-backends`` (every cell backend against its reference)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from zoo.cli.common import bad_input_exits, err, fail, out, parse_ints

MAX_CHECK_SEQ_LEN = 4096


def check_backends_command(
    config: Annotated[str | None, typer.Option(help="take head sizes and backend options from this config")] = None,
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="comma-separated sequence lengths, each from 1 to 4096")
                        ] = "1,7,64,130",
) -> None:
    """Check every registered cell backend against its reference.

    The reference is parallel_stabilized unless the plugin names another; the checks cover outputs,
    gradients, bfloat16, and states out and in against the stateful reference.
    """
    from zoo.config_source import load_config
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


def plugins_command(
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
