"""Rich tables describing a config: resolved plugins, derived sizes, parameters per module."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import jax
from rich.console import Group
from rich.table import Table

from zoo import registry
from zoo.config import ModelConfig


def plugin_table(config: ModelConfig) -> Table:
    """Every plugin the config names, with the plugin and distribution it came from."""
    table = Table(title="Resolved plugins", title_justify="left")
    for column in ("kind", "name", "plugin", "distribution"):
        table.add_column(column, overflow="fold")
    for kind, names in config.plugins_used().items():
        for name in names:
            entry = registry.entry(kind, name)
            table.add_row(kind, name, entry.plugin, f"{entry.dist or '-'} {entry.version or ''}".strip())
    return table


def sizes_table(config: ModelConfig) -> Table:
    """Sizes derived from the config (never inputs)."""
    table = Table(title="Derived sizes", title_justify="left")
    table.add_column("size")
    table.add_column("value", justify="right")
    for name, value in config.derived_sizes().items():
        table.add_row(name, f"{value:,}")
    return table


def params_by_module(shapes: Any) -> dict[str, int]:
    """Parameter counts grouped by module, with all blocks folded into ``blocks/<sub-module>``."""
    counts: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        head = re.sub(r"^blocks_\d+$", "blocks", keys[0])
        group = f"{head}/{keys[1]}" if head == "blocks" and len(keys) > 2 else head
        counts[group] += math.prod(leaf.shape)
    order = ["token_embedding", "blocks", "xlstm_norm", "xlstm", "xlstm_post_norm", "ffn_norm", "ffn",
             "ffn_post_norm", "out_norm", "lm_head"]

    def rank(group: str) -> list[int]:
        return [order.index(part) if part in order else len(order) for part in group.split("/")]

    return dict(sorted(counts.items(), key=lambda item: rank(item[0])))


def params_table(config: ModelConfig, shapes: Any) -> Table:
    """Parameters per module (per block and over all blocks) and in total, with their bytes and dtypes."""
    counts = params_by_module(shapes)
    total = sum(counts.values())
    nb = config.num_blocks
    table = Table(title="Parameters", title_justify="left")
    table.add_column("module")
    table.add_column("per block", justify="right")
    table.add_column("params", justify="right")
    table.add_column("share", justify="right")
    for group, count in counts.items():
        per_block = f"{count // nb:,}" if group.startswith("blocks/") else ""
        label = f"{group} (×{nb})" if group.startswith("blocks/") else group
        table.add_row(label, per_block, f"{count:,}", f"{100 * count / total:.1f}%")
    table.add_section()
    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(shapes)})
    stored = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(shapes))
    table.add_row("total", "", f"{total:,}", f"{format_bytes(stored)} {' + '.join(dtypes)}")
    return table


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def sharding_table(config: ModelConfig, sizes: tuple[int, ...]) -> Table:
    """The mesh for ``sizes`` and what it does to the parameters: how many are split, bytes per device."""
    from zoo.sharding import Placement, axis_names, bytes_per_device, param_placements

    parallel = config.parallel
    names = axis_names(parallel)
    mesh = " × ".join(f"{n}={s}" for n, s in zip(names, sizes))
    placements = jax.tree_util.tree_flatten_with_path(param_placements(config, sizes),
                                                      is_leaf=lambda x: isinstance(x, Placement))[0]
    table = Table(title=f"Parallel layout ({mesh}, {math.prod(sizes)} devices)", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    for axis in (parallel.fsdp_axis_name, parallel.model_axis_name):
        split = sum(1 for _, p in placements if axis in str(p.spec))
        table.add_row(f"parameters split over {axis}", f"{split} of {len(placements)}")
    replicated = bytes_per_device(config, (1,) * len(sizes))
    table.add_row("float32 parameter bytes per device", format_bytes(bytes_per_device(config, sizes)))
    table.add_row("... if replicated", format_bytes(replicated))
    for path, placement in placements:
        if placement.note:
            table.add_row(f"[dim]{jax.tree_util.keystr(path)}[/]", f"[dim]{placement.note}[/]")
    return table


def summary(config: ModelConfig, shapes: Any) -> Group:
    """All summary tables for ``config`` and its abstract parameter tree."""
    layer = config.layer
    head = Table.grid(padding=(0, 2))
    head.add_row("layer_type", layer.layer_type, "num_blocks", str(config.num_blocks))
    head.add_row("embedding_dim", str(config.embedding_dim), "num_heads", str(layer.num_heads))
    head.add_row("vocab_size", str(config.vocab_size), "dtype", config.dtype)
    return Group(head, plugin_table(config), sizes_table(config), params_table(config, shapes))
