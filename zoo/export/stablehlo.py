"""StableHLO artifacts: one serialized ``jax.export.Exported`` per entry point, plus ``.mlir`` and a manifest.

Batch and sequence sizes are symbolic (``b``, ``s``). An artifact needs only ``jax`` to run::

    exported = jax.export.deserialize(open("forward.jax_exported", "rb").read())
    logits = exported.call(tokens)                       # int32 (B, S) -> float32 (B, S, V)
    logits, state = prefill.call(tokens)                 # state: dict c, n, m (+ conv)
    logits, state = step.call(token, state)              # token (B,) -> logits (B, 1, V)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax import export

from zoo.config import ModelConfig
from zoo.export.entries import (ENTRIES, PLATFORMS, ExportError, abstract, check_request, common_manifest, describe,
                                make_entries, new_directory)
from zoo.registry import hookimpl

STATIC_NOTE = ("static shapes, for runtimes without dynamic-shape support: IREE 3.13 refuses the symbolic "
               "embedding gather ('stablehlo.reshape' result must be statically shaped)")


def export_stablehlo(config: ModelConfig, params: Any, out_dir: str | os.PathLike, *,
                     platforms: Sequence[str] = PLATFORMS, entries: Sequence[str] = ENTRIES,
                     weights: str | None = None, static: tuple[int, int] | None = None) -> Path:
    """Write ``{entry}.jax_exported``, ``{entry}.mlir`` and ``manifest.json`` under ``out_dir``.

    ``weights="baked"`` (the default) inlines the params as constants; ``"separate"`` makes them the
    first argument, so one artifact serves every checkpoint of the same config. ``static=(B, S)``
    fixes batch and sequence sizes instead of leaving them symbolic.
    """
    weights = weights or "baked"
    if weights not in ("baked", "separate"):
        raise ExportError(f"stablehlo weights must be 'baked' or 'separate' (got {weights!r})")
    check_request(config, entries, platforms)
    out = new_directory(out_dir)
    param_avals = abstract(params)
    manifest_entries = {}
    for entry in make_entries(config, entries, static):
        if weights == "baked":
            fn = jax.jit(lambda *a, fn=entry.fn: fn(params, *a))
            exported = export.export(fn, platforms=tuple(platforms))(*entry.args)
            inputs = []
        else:
            exported = export.export(jax.jit(entry.fn), platforms=tuple(platforms))(param_avals, *entry.args)
            inputs = describe(param_avals, "params")
        inputs += [d for arg, name in zip(entry.args, entry.arg_names) for d in describe(arg, name)]
        (out / f"{entry.name}.jax_exported").write_bytes(exported.serialize())
        (out / f"{entry.name}.mlir").write_text(exported.mlir_module())
        outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
        manifest_entries[entry.name] = {
            "file": f"{entry.name}.jax_exported",
            "mlir": f"{entry.name}.mlir",
            "inputs": inputs,
            "outputs": (describe(outputs, "logits") if entry.name == "forward"
                        else describe(outputs[0], "logits") + describe(outputs[1], "state")),
            # With several platforms, the StableHLO main takes the platform index first (cpu, cuda, tpu order).
            "mlir_platform_index_argument": len(platforms) > 1,
        }
    manifest = common_manifest(config, "stablehlo", platforms, entries, static)
    manifest.update({
        "entries": manifest_entries,
        "weights": weights,
        "calling_convention_version": exported.calling_convention_version,
    })
    if static is None:
        manifest["symbolic_dims"] = {"b": "batch size", "s": "sequence length"}
    else:
        manifest["static_dims"] = {"b": static[0], "s": static[1], "why": STATIC_NOTE}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@hookimpl
def register_exporters(register):
    register("stablehlo", export_stablehlo, description="jax.export StableHLO, symbolic batch and sequence",
             weights=("baked", "separate"))
