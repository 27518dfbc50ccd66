"""StableHLO artifacts: one serialized ``jax.export.Exported`` per entry point, the weights they share, a manifest.

Batch and sequence sizes are symbolic (``b``, ``s``). By default (``weights="file"``) every entry takes the
weights as its first argument, a flat dict keyed by parameter path, and the artifact stores them once, in
``weights.npz``, in the params' own dtypes. An artifact needs only ``jax`` (and NumPy) to run::

    manifest = json.load(open(f"{path}/manifest.json"))
    with np.load(f"{path}/weights.npz") as npz:
        weights = {p["name"]: npz[p["name"]].view(p["dtype"]) for p in manifest["weights_file"]["params"]}
    forward = jax.export.deserialize(open(f"{path}/forward.jax_exported", "rb").read())
    logits = forward.call(weights, tokens)               # int32 (B, S) -> float32 (B, S, V)
    lengths = np.full(len(tokens), tokens.shape[1], np.int32)  # int32 (B,): real tokens of each right-padded row
    logits, state = prefill.call(weights, tokens, lengths)  # state: dict c, n, m (+ conv)
    logits, state = step.call(weights, token, state)     # token (B,) -> logits (B, V)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

from zoo.config import ModelConfig
from zoo.export.entries import (ENTRIES, PLATFORMS, ExportError, abstract, check_request, common_manifest, leaf_specs,
                                make_entries, new_directory)
from zoo.registry import hookimpl
from zoo.staging import staged

STATIC_NOTE = ("static shapes, for runtimes without dynamic-shape support: IREE 3.13 refuses the symbolic "
               "embedding gather ('stablehlo.reshape' result must be statically shaped)")
WEIGHT_MODES = ("file", "baked")
WEIGHTS_FILE = "weights.npz"
WEIGHTS_FORMAT = ("NumPy .npz (numpy.savez, uncompressed, no pickles): one array per parameter, keyed by its "
                  "'/'-joined path in the param tree; NumPy keeps bfloat16 as raw 2-byte values ('|V2'), so view "
                  "each array as the dtype listed in 'params'. 'params' is in the order of the entries' first "
                  "argument (and of the StableHLO main's arguments, after the platform index when there is one)")


def flat_weights(params: Any) -> dict[str, Any]:
    """Each leaf of ``params`` keyed by its ``/``-joined path, e.g. ``token_embedding/embedding``."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _write_weights(out: Path, flat: dict[str, Any]) -> dict[str, Any]:
    """Save ``flat`` as ``weights.npz``; its manifest fields ``weights_file`` and ``weights_sha256``."""
    path = out / WEIGHTS_FILE
    np.savez(path, **flat)
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    params = [{"name": key[0].key, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
              for key, leaf in jax.tree_util.tree_flatten_with_path(flat)[0]]  # the order jax passes them in
    return {"weights_file": {"file": WEIGHTS_FILE, "format": WEIGHTS_FORMAT, "bytes": path.stat().st_size,
                             "params": params},
            "weights_sha256": digest}


def export_stablehlo(config: ModelConfig, params: Any, out_dir: str | os.PathLike, *,
                     platforms: Sequence[str] = PLATFORMS, entries: Sequence[str] = ENTRIES,
                     weights: str | None = None, static: tuple[int, int] | None = None, mlir: bool = False) -> Path:
    """Write ``{entry}.jax_exported`` per entry, ``weights.npz`` and ``manifest.json`` under ``out_dir``.

    ``weights="file"`` (the default) stores the params once, in their own dtypes, in ``weights.npz``;
    every entry takes them as its first argument (a flat dict keyed as in ``flat_weights``), so one
    artifact also serves every other checkpoint of the same config. ``weights="baked"`` inlines them
    as constants into each entry instead. ``static=(B, S)`` fixes batch and sequence sizes instead of
    leaving them symbolic. ``mlir=True`` also writes each entry's StableHLO text as ``{entry}.mlir``.
    The files are written into a staging folder beside ``out_dir``, renamed into place when complete: a failed
    or interrupted export leaves no ``out_dir``. Raises ``ExportError`` for an unknown weights mode, an unknown
    or repeated entry or platform, a backend that is not exportable, and an ``out_dir`` that is a file or not empty.
    """
    weights = weights or "file"
    if weights not in WEIGHT_MODES:
        renamed = " ('separate' is now 'file', which also writes the weights)" if weights == "separate" else ""
        raise ExportError(f"stablehlo weights must be 'file' or 'baked' (got {weights!r}){renamed}")
    check_request(config, entries, platforms, static)
    out = new_directory(out_dir)
    with staged(out) as staging:
        staging.mkdir()
        flat = flat_weights(params)
        names, treedef = list(flat), jax.tree_util.tree_structure(params)
        manifest_entries = {}
        for entry in make_entries(config, entries, static, platforms):
            if weights == "baked":
                fn = jax.jit(lambda *a, fn=entry.fn: fn(params, *a))
                exported = export.export(fn, platforms=tuple(platforms))(*entry.args)
                inputs = []
            else:
                fn = jax.jit(lambda w, *a, fn=entry.fn: fn(
                    jax.tree_util.tree_unflatten(treedef, [w[n] for n in names]), *a))
                exported = export.export(fn, platforms=tuple(platforms))(abstract(flat), *entry.args)
                inputs = leaf_specs(abstract(flat), "weights")
            inputs += [d for arg, name in zip(entry.args, entry.arg_names) for d in leaf_specs(arg, name)]
            (staging / f"{entry.name}.jax_exported").write_bytes(exported.serialize())
            outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
            manifest_entries[entry.name] = {
                "file": f"{entry.name}.jax_exported",
                "inputs": inputs,
                "outputs": (leaf_specs(outputs, "logits") if entry.name == "forward"
                            else leaf_specs(outputs[0], "logits") + leaf_specs(outputs[1], "state")),
                # With several platforms, the StableHLO main takes the platform index first (cpu, cuda, tpu order).
                "mlir_platform_index_argument": len(platforms) > 1,
            }
            if mlir:
                (staging / f"{entry.name}.mlir").write_text(exported.mlir_module())
                manifest_entries[entry.name]["mlir"] = f"{entry.name}.mlir"
        manifest = common_manifest(config, "stablehlo", platforms, entries, static)
        manifest.update({
            "entries": manifest_entries,
            "weights": weights,
            "calling_convention_version": exported.calling_convention_version,
        })
        if weights == "file":
            manifest.update(_write_weights(staging, flat))
        if static is None:
            manifest["symbolic_dims"] = {"b": "batch size", "s": "sequence length"}
        else:
            manifest["static_dims"] = {"b": static[0], "s": static[1], "why": STATIC_NOTE}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@hookimpl
def register_exporters(register):
    register("stablehlo", export_stablehlo, description="jax.export StableHLO, symbolic batch and sequence, "
             "one weights file shared by the entries", weights=WEIGHT_MODES)
