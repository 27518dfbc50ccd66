"""StableHLO artifacts: one serialized ``jax.export.Exported`` per entry point, plus ``.mlir`` and a manifest.

Batch and sequence sizes are symbolic (``b``, ``s``). An artifact needs only ``jax`` to run::

    exported = jax.export.deserialize(open("forward.jax_exported", "rb").read())
    logits = exported.call(tokens)                       # int32 (B, S) -> float32 (B, S, V)
    logits, state = prefill.call(tokens)                 # state: dict c, n, m (+ conv)
    logits, state = step.call(token, state)              # token (B,) -> logits (B, 1, V)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from zoo import registry
from zoo.config import ModelConfig
from zoo.registry import hookimpl

ENTRIES = ("forward", "prefill", "step")
PLATFORMS = ("cpu", "cuda", "tpu")
BACKEND_OF_ENTRY = {"forward": "backend", "prefill": "prefill_backend", "step": "step_backend"}


class ExportError(ValueError):
    """A model cannot be exported as asked (for example, a backend that does not lower cleanly)."""


def check_exportable(config: ModelConfig, entries: Sequence[str]) -> None:
    """Refuse backends not registered as ``exportable``, naming them and the exportable ones."""
    exportable = [n for n in registry.available("cell") if registry.entry("cell", n).metadata.get("exportable")]
    for name in entries:
        field = BACKEND_OF_ENTRY[name]
        backend = getattr(config.cell, field).name
        if backend not in exportable:
            raise ExportError(f"entry {name!r} runs cell {backend!r} (mlstm_cell.{field}), which is not registered "
                              f"as exportable; use one of: {', '.join(exportable)}")


def _describe(tree: Any, prefix: str) -> list[dict[str, Any]]:
    return [{"name": prefix + jax.tree_util.keystr(path), "shape": [str(d) for d in leaf.shape],
             "dtype": str(leaf.dtype)} for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def export_stablehlo(config: ModelConfig, params: Any, out_dir: str | os.PathLike, *,
                     platforms: Sequence[str] = PLATFORMS, entries: Sequence[str] = ENTRIES,
                     weights: str = "baked") -> Path:
    """Write ``{entry}.jax_exported``, ``{entry}.mlir`` and ``manifest.json`` under ``out_dir``.

    ``weights="baked"`` inlines the params as constants; ``"separate"`` makes them the first
    argument, so one artifact serves every checkpoint of the same config.
    """
    from zoo.api import build, init_state

    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown or weights not in ("baked", "separate"):
        raise ExportError(f"entries must be among {ENTRIES} (got {unknown}) and weights 'baked' or 'separate'")
    check_exportable(config, entries)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new directory")
    out.mkdir(parents=True, exist_ok=True)

    model = build(config)
    b, s = export.symbolic_shape("b, s")
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((a.shape[0], b, *a.shape[2:]), a.dtype),
                                   init_state(config, 1))
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)
    signatures = {  # entry: (function of (params, *args), args, argument names)
        "forward": (lambda p, t: model.apply({"params": p}, t), (tokens,), ("tokens",)),
        "prefill": (lambda p, t: model.apply({"params": p}, t, mode="prefill"), (tokens,), ("tokens",)),
        "step": (lambda p, t, st: model.apply({"params": p}, t[:, None], mode="step", state=st),
                 (jax.ShapeDtypeStruct((b,), jnp.int32), state), ("token", "state")),
    }
    param_avals = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    manifest_entries = {}
    for name in entries:
        fn, args, arg_names = signatures[name]
        if weights == "baked":
            exported = export.export(jax.jit(lambda *a, fn=fn: fn(params, *a)), platforms=tuple(platforms))(*args)
            inputs = [d for arg, an in zip(args, arg_names) for d in _describe(arg, an)]
        else:
            exported = export.export(jax.jit(fn), platforms=tuple(platforms))(param_avals, *args)
            inputs = _describe(param_avals, "params") + [d for a, n in zip(args, arg_names) for d in _describe(a, n)]
        (out / f"{name}.jax_exported").write_bytes(exported.serialize())
        (out / f"{name}.mlir").write_text(exported.mlir_module())
        outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
        manifest_entries[name] = {
            "file": f"{name}.jax_exported",
            "mlir": f"{name}.mlir",
            "inputs": inputs,
            "outputs": (_describe(outputs, "logits") if name == "forward"
                        else _describe(outputs[0], "logits") + _describe(outputs[1], "state")),
        }
    config_json = config.model_dump_json()
    manifest = {
        "format": "stablehlo",
        "entries": manifest_entries,
        "platforms": list(platforms),
        "weights": weights,
        "symbolic_dims": {"b": "batch size", "s": "sequence length"},
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "config": json.loads(config_json),
        "vocab_size": config.vocab_size,
        "state_structure": _describe(state, "state") if "step" in entries or "prefill" in entries else [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def greedy_continuation(artifact_dir: str | os.PathLike, prompt: Sequence[int], max_new_tokens: int,
                        params: Any = None) -> list[int]:
    """Greedy decoding with an artifact's ``prefill`` and ``step`` entries (``params`` if weights are separate)."""
    root = Path(artifact_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    missing = {"prefill", "step"} - set(manifest["entries"])
    if missing:
        raise ExportError(f"{root} has no {', '.join(sorted(missing))} entry; export with --entry forward,prefill,step")
    prefill, step = (export.deserialize((root / manifest["entries"][n]["file"]).read_bytes()) for n in ("prefill", "step"))
    extra = () if manifest["weights"] == "baked" else (params,)
    logits, state = prefill.call(*extra, np.asarray([prompt], np.int32))
    token = np.argmax(np.asarray(logits)[:, -1], axis=-1).astype(np.int32)
    out = [int(token[0])]
    for _ in range(max_new_tokens - 1):
        logits, state = step.call(*extra, token, state)
        token = np.argmax(np.asarray(logits)[:, -1], axis=-1).astype(np.int32)
        out.append(int(token[0]))
    return out


@hookimpl
def register_exporters(register):
    register("stablehlo", export_stablehlo, description="jax.export StableHLO, symbolic batch and sequence")
