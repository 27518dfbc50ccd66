"""The entry points every exporter serves (``forward``, ``prefill``, ``step``) and what they share.

An entry is a function of ``(params, *args)``; its arguments are abstract values whose batch and
sequence sizes are either symbolic (``b``, ``s``) or fixed integers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export

from zoo import registry
from zoo.config import ModelConfig
from zoo.decode_layout import decode_config
from zoo.errors import ZooError
from zoo.model import decode_state_shapes
from zoo.runtime import apply
from zoo.version import __version__

ENTRIES = ("forward", "prefill", "step")
PLATFORMS = ("cpu", "cuda", "tpu")
BACKEND_OF_ENTRY = {"forward": "backend", "prefill": "prefill_backend", "step": "step_backend"}


class ExportError(ZooError, ValueError):
    """A model cannot be exported as asked (for example, a backend that does not lower cleanly)."""


@dataclass(frozen=True)
class Entry:
    """One entry point: ``fn(params, *args)``, its abstract arguments and their names."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    arg_names: tuple[str, ...]


def check_request(config: ModelConfig, entries: Sequence[str], platforms: Sequence[str],
                  static: tuple[int, int] | None = None) -> None:
    """Refuse unknown or repeated entries or platforms, backends not registered as ``exportable`` (naming both),
    platforms a backend does not declare, and a static sequence size over ``context_length``."""
    if static is not None and 0 < config.context_length < static[1]:
        raise ExportError(f"static sequence size {static[1]} exceeds context_length={config.context_length}, "
                          f"which bounds each forward or prefill call")
    for kind, names in (("entries", entries), ("platforms", platforms)):
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ExportError(f"{kind} must each be named once (repeated: {', '.join(repeated)})")
    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown or not entries:
        raise ExportError(f"entries must be among {', '.join(ENTRIES)} (got {', '.join(entries) or 'none'})")
    bad_platforms = sorted(set(platforms) - set(PLATFORMS))
    if bad_platforms or not platforms:
        raise ExportError(f"platforms must be among {', '.join(PLATFORMS)} (got {', '.join(platforms) or 'none'})")
    exportable = [n for n in registry.available("cell") if registry.entry("cell", n).metadata.get("exportable")]
    for name in entries:
        field = BACKEND_OF_ENTRY[name]
        backend = getattr(config.cell, field).name
        if backend not in exportable:
            raise ExportError(f"entry {name!r} runs cell {backend!r} (mlstm_cell.{field}), which is not registered "
                              f"as exportable; use one of: {', '.join(exportable)}")
        declared = registry.entry("cell", backend).metadata["platforms"]
        if not set(platforms) <= set(declared):
            missing = ", ".join(sorted(set(platforms) - set(declared)))
            raise ExportError(f"entry {name!r} runs cell {backend!r}, which declares platforms "
                              f"{', '.join(declared)}; it cannot be lowered for {missing}")


def make_entries(config: ModelConfig, names: Sequence[str], static: tuple[int, int] | None = None,
                 platforms: Sequence[str] = ()) -> list[Entry]:
    """The requested entries, with symbolic batch ``b`` and sequence ``s`` unless ``static=(B, S)``.

    ``forward(params, tokens (B, S))`` returns logits ``(B, S, V)``; ``prefill(params, tokens (B, S), lengths (B,))``
    logits ``(B, S, V)`` and the state, for right-padded rows of ``lengths`` real tokens (pass ``S`` for every
    row of a rectangular batch); ``step(params, token (B,), state)`` logits ``(B, V)`` and the new state, the
    contract of ``zoo.forward``, ``zoo.prefill(..., lengths=...)`` and ``zoo.step``. Prefill and step compute in
    ``decode_entry_config(config, platforms)``'s dtypes.
    """
    decoding = decode_entry_config(config, platforms)
    b, s = batch_and_sequence(static)
    state = abstract_state(config, b)
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)

    every = {
        "forward": Entry("forward", lambda p, t: apply(config, p, t), (tokens,), ("tokens",)),
        "prefill": Entry("prefill", lambda p, t, n: apply(decoding, p, t, mode="prefill", lengths=n), (tokens, lengths),
                         ("tokens", "lengths")),
        "step": Entry("step", lambda p, t, st: apply(decoding, p, t, mode="step", state=st),
                      (jax.ShapeDtypeStruct((b,), jnp.int32), state), ("token", "state")),
    }
    return [every[name] for name in names]


def decode_entry_config(config: ModelConfig, platforms: Sequence[str]) -> ModelConfig:
    """The config the exported ``prefill`` and ``step`` entries run: for an artifact lowered for ``cpu`` alone, in
    float32 where the config computes in bfloat16 or float16, as ``zoo.prefill`` and ``zoo.step`` decode on a CPU
    (docs/decoding.md); otherwise the config itself. The blocks keep the config's layout (``scan_blocks``), since
    the entries of an artifact share one parameter tree; ``forward`` always computes as the config says."""
    if tuple(platforms) != ("cpu",):
        return config
    return decode_config(config, "cpu", unscanned=False)


def batch_and_sequence(static: tuple[int, int] | None) -> tuple[Any, Any]:
    """The batch and sequence sizes: ``static`` or the symbols ``b`` and ``s``."""
    return tuple(static) if static is not None else export.symbolic_shape("b, s")


def abstract_state(config: ModelConfig, batch: Any) -> Any:
    """Shapes and dtypes of the decoding state for ``batch`` sequences (leading axis: blocks)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((a.shape[0], batch, *a.shape[2:]), a.dtype),
                                  decode_state_shapes(config, 1))


def new_directory(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` made absolute, checked to be new or an empty folder; creates nothing.

    Exporters write into ``zoo.staging.staged(path)`` so that a failed or interrupted export leaves no
    target folder behind. Raises ``ExportError`` for an empty path, a file, or a folder that holds files.
    """
    if not str(out_dir).strip():
        raise ExportError("--out: expected a new folder for the artifact; got an empty path")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: expected a new or empty folder for the artifact; found a file")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new directory")
    return out


def leaf_specs(tree: Any, prefix: str) -> list[dict[str, Any]]:
    """Name, shape and dtype of each leaf, named by its path under ``prefix`` (``state['c']``)."""
    return [{"name": prefix + jax.tree_util.keystr(path), "shape": [str(d) for d in leaf.shape],
             "dtype": str(leaf.dtype)} for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract(tree: Any) -> Any:
    """Shape and dtype of each leaf of ``tree``."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def common_manifest(config: ModelConfig, fmt: str, platforms: Sequence[str], entries: Sequence[str],
                    static: tuple[int, int] | None = None) -> dict[str, Any]:
    """Manifest fields shared by every format: config and its hash, versions, platforms, state layout."""
    config_json = config.model_dump_json()
    stateful = {"prefill", "step"} & set(entries)
    return {
        "format": fmt,
        "platforms": list(platforms),
        "zoo_version": __version__,
        "jax_version": jax.__version__,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "config": json.loads(config_json),
        "vocab_size": config.vocab_size,
        "state_structure": leaf_specs(abstract_state(config, batch_and_sequence(static)[0]), "state")
        if stateful else [],
        **({"decode_compute": _compute_dtypes(decode_entry_config(config, platforms))} if stateful else {}),
    }


def _compute_dtypes(config: ModelConfig) -> dict[str, str]:
    """The compute dtypes of ``config`` (manifest field ``decode_compute``: how ``prefill`` and ``step`` compute)."""
    return {"dtype": config.dtype, "lm_head_dtype": config.lm_head_dtype, "gate_dtype": config.cell.gate_dtype}
