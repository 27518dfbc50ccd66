"""``zoo info``: what a checkpoint, an export artifact or a config holds, as one JSON-ready dict.

The dict's layout is documented in ``docs/info.md`` (``SCHEMA_VERSION``); scripts read it, so
fields are only ever added. Nothing here reads parameter arrays: checkpoint parameters are
described from Orbax's stored metadata, others from the config with ``jax.eval_shape``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SCHEMA_VERSION = 1
EXPECTED = "a zoo checkpoint folder, a `zoo export` artifact folder, a config file or a preset name"


def describe_path(source: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Describe a checkpoint folder (its latest step, or ``step``), an export artifact, a config file or a preset.

    Raises ``CheckpointRefused`` for a path of another kind (naming what it is), for ``step`` on
    anything but a checkpoint and for a step the checkpoint does not hold; ``CheckpointError`` for
    a damaged step; ``ExportError`` for an unreadable manifest or one without a config;
    ``ConfigSourceError`` / ``pydantic.ValidationError`` for an unreadable or invalid config file.
    The dict: docs/info.md.
    """
    from zoo import presets
    from zoo.checkpoint import CheckpointRefused, classify_path

    found = classify_path(source)
    if found.kind == "missing" and str(source) in presets.names():
        kind = "preset"
    elif found.kind in ("checkpoint", "artifact", "file"):
        kind = found.kind
    elif found.kind == "missing":
        raise CheckpointRefused(f"{found.refuse(EXPECTED)}; {presets.hint(str(source))}")
    else:
        raise found.refuse(EXPECTED)
    if step is not None and kind != "checkpoint":
        raise CheckpointRefused(f"{source}: --step selects a checkpoint step; this is not a checkpoint but "
                                f"{'a preset' if kind == 'preset' else found.found}")
    if kind == "checkpoint":
        return _checkpoint(found.path, step)
    if kind == "artifact":
        return _artifact(found.path)
    return _config(str(source), None if kind == "preset" else found.path)


def _base(kind: str, path: Path | None, config_json: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "path": None if path is None else str(path),
            "architecture": architecture(config_json)}


def architecture(config_json: dict[str, Any]) -> dict[str, Any]:
    """The headline sizes of a full config dump (``ModelConfig.model_dump(mode="json")``, or one a checkpoint or
    manifest stores), read from the JSON so that it works even when a plugin the config names is missing."""
    layer = config_json.get("mlstm_block", {}).get("mlstm", {})
    return {
        "layer_type": layer.get("layer_type"),
        "num_blocks": config_json.get("num_blocks"),
        "embedding_dim": config_json.get("embedding_dim"),
        "num_heads": layer.get("num_heads"),
        "vocab_size": config_json.get("vocab_size"),
        "context_length": config_json.get("context_length"),
        "dtype": config_json.get("dtype"),
        "lm_head_dtype": config_json.get("lm_head_dtype"),
        "tie_weights": config_json.get("tie_weights"),
        "scan_blocks": config_json.get("scan_blocks"),
        "quantization": config_json.get("quantization"),
    }


def parameters(layout: dict[str, tuple[tuple[int, ...], str]], source: str) -> dict[str, Any]:
    """Count and bytes in total and per dtype, from ``path -> (shape, dtype name)``."""
    by_dtype: dict[str, dict[str, int]] = {}
    for shape, dtype in layout.values():
        count = math.prod(shape)
        entry = by_dtype.setdefault(dtype, {"count": 0, "bytes": 0})
        entry["count"] += count
        entry["bytes"] += count * jnp.dtype(dtype).itemsize
    return {"source": source, "count": sum(e["count"] for e in by_dtype.values()),
            "bytes": sum(e["bytes"] for e in by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items()))}


def decoding(config_json: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], str]] | None,
             platform: str | None = None) -> dict[str, Any]:
    """How ``zoo.generate``, ``zoo.step`` and the engine decode this model on ``platform`` (default: JAX's default
    backend here): the compute dtypes and block layout of the decode layout, and the bytes it adds to the params of
    ``layout`` (docs/decoding.md), read from the config JSON."""
    import jax

    from zoo.decode_layout import EMULATED_DTYPES, decode_extra_bytes

    platform = platform or jax.default_backend()
    cell = config_json.get("mlstm_block", {}).get("mlstm", {}).get("mlstm_cell", {})

    def run_as(dtype: Any) -> Any:
        return "float32" if dtype in EMULATED_DTYPES.get(platform, ()) else dtype

    return {"platform": platform, "dtype": run_as(config_json.get("dtype")),
            "lm_head_dtype": run_as(config_json.get("lm_head_dtype")),
            "gate_dtype": run_as(cell.get("gate_dtype", "float32")),
            "scan_blocks": bool(config_json.get("scan_blocks")) and platform != "cpu",
            "extra_bytes": None if layout is None else decode_extra_bytes(layout, platform)}


def _config_layout(config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    from zoo.model import param_shapes
    from zoo.checkpoint import tree_layout

    return tree_layout(param_shapes(config))


def _plugins_of(config: Any) -> list[dict[str, Any]]:
    from zoo import registry

    rows = []
    for kind, names in config.plugins_used().items():
        for name in names:
            e = registry.entry(kind, name)
            rows.append({"kind": kind, "name": name, "plugin": e.plugin, "dist": e.dist, "version": e.version,
                         "installed": True, "installed_version": e.version, "installed_as": None})
    return rows


def _recorded_plugins(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    from zoo.checkpoint import plugin_status

    return [{"kind": p.kind, "name": p.name, "plugin": p.recorded.get("plugin"), "dist": p.recorded.get("dist"),
             "version": p.recorded.get("version"), "installed": p.status == "ok",
             "installed_version": p.here.version if p.status == "ok" else None,
             "installed_as": None if p.status == "ok" else p.here.origin if p.here else None}
            for p in plugin_status(metadata)]


def _suffixed(record: dict[str, Any], suffix: str) -> dict[str, Any]:
    """``{"jax_version": "0.10"} -> {"jax": "0.10"}`` for string fields ending in ``suffix``."""
    return {k.removesuffix(suffix): v for k, v in sorted(record.items())
            if k.endswith(suffix) and isinstance(v, str)}


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _validated(config_json: dict[str, Any]) -> tuple[Any, str | None]:
    """The validated config, or None and the first error (a plugin that is not installed, say)."""
    from pydantic import ValidationError

    from zoo.config import ModelConfig

    try:
        return ModelConfig.model_validate(config_json), None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        return None, f"{'.'.join(map(str, first['loc'])) or '(top level)'}: {first['msg']}"


def _checkpoint(root: Path, step: int | None) -> dict[str, Any]:
    from zoo.checkpoint import find_step, param_layout, read_stored

    where = find_step(root, step)
    _, config_json, metadata = read_stored(root, where.step)
    config, error = _validated(config_json)
    info = _base("checkpoint", root, config_json)
    layout = param_layout(root, where.step)
    info.update({
        "steps": where.steps,
        "step": where.step,
        "best_step": where.best,
        "parameters": parameters(layout, "stored"),
        "decoding": decoding(config_json, layout),
        "plugins": _recorded_plugins(metadata) if "plugins" in metadata
        else _plugins_of(config) if config is not None else [],
        "config_error": error,
        "versions": _suffixed(metadata, "_version"),
        "hashes": _suffixed(metadata, "_sha256"),
        "disk_bytes": _disk_bytes(where.root / str(where.step)),
        "problems": [],  # config and metadata hashes were verified by read_stored; arrays are verified by load
        "tokenizer": {**metadata["tokenizer"], "sha256": metadata.get("tokenizer_sha256")}
        if isinstance(metadata.get("tokenizer"), dict) else None,
    })
    return info


def _artifact_tokenizer(root: Path, problems: list[str]) -> dict[str, Any] | None:
    """``Codec.describe()`` and ``sha256`` of an artifact's tokenizer files; None (and a problem) when unreadable."""
    from zoo.checkpoint import json_hash
    from zoo.tokenizers import TokenizerError, read_folder

    try:
        codec = read_folder(root)
    except TokenizerError as exc:
        problems.append(str(exc))
        return None
    if codec is None:
        return None
    return {**codec.describe(), "sha256": json_hash(json.loads(codec.tokenizer.to_str()))}


def _artifact_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """One line per thing that keeps ``zoo run`` from using the artifact, found without reading arrays: a config
    that does not match its hash, files the manifest names that are missing."""
    from zoo.export.runners import config_hash_mismatch

    problems = [config_hash_mismatch(root, manifest)]
    entries = manifest.get("entries")
    named = [(manifest.get("weights_file") or {}).get("file")]
    named += [e.get("file") for e in entries.values() if isinstance(e, dict)] if isinstance(entries, dict) else []
    problems += [f"missing file {name} (named by manifest.json)" for name in named
                 if isinstance(name, str) and not (root / name).is_file()]
    if manifest.get("format") == "savedmodel" and not (root / "variables").is_dir():
        problems.append("missing folder variables/ (a SavedModel's weights)")
    return [p for p in problems if p]


def _artifact(root: Path) -> dict[str, Any]:
    from zoo.export.entries import ExportError
    from zoo.export.runners import read_manifest

    manifest = read_manifest(root)
    config_json = manifest.get("config")
    if not isinstance(config_json, dict):
        raise ExportError(f"{root / 'manifest.json'}: no 'config' object; not a manifest that `zoo export` writes")
    config, error = _validated(config_json)
    entries = manifest.get("entries", {})
    info = _base("artifact", root, config_json)
    problems = _artifact_problems(root, manifest)
    tokenizer = _artifact_tokenizer(root, problems)
    stored = (manifest.get("weights_file") or {}).get("params")
    if isinstance(stored, list):  # the shared weights file lists each array with its stored dtype
        params = parameters({p["name"]: (tuple(p["shape"]), p["dtype"]) for p in stored}, "stored")
    else:
        params = parameters(_config_layout(config), "config") if config is not None else None
    info.update({
        "parameters": params,
        "decoding": None,  # an artifact's prefill and step compute as its manifest's decode_compute says
        "plugins": _plugins_of(config) if config is not None else [],
        "config_error": error,
        "versions": _suffixed(manifest, "_version"),
        "hashes": _suffixed(manifest, "_sha256"),
        "disk_bytes": _disk_bytes(root),
        "problems": problems,
        "tokenizer": tokenizer,
        "artifact": {
            "format": manifest.get("format"),
            "entries": [e if isinstance(e, str) else e.get("name") for e in entries],
            "platforms": manifest.get("platforms"),
            "weights": manifest.get("weights"),
        },
    })
    return info


def _config(source: str, path: Path | None) -> dict[str, Any]:
    from zoo.config_source import load_config
    from zoo.checkpoint import json_hash

    config = load_config(source)
    config_json = config.model_dump(mode="json")
    layout = _config_layout(config)
    info = _base("config", path, config_json)
    info.update({
        "preset": source if path is None else None,
        "parameters": parameters(layout, "config"),
        "decoding": decoding(config_json, layout),
        "plugins": _plugins_of(config),
        "config_error": None,
        "versions": {},
        "hashes": {"config": json_hash(config_json)},
        "disk_bytes": None,
        "problems": [],
        "tokenizer": None,
    })
    return info


def rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """``describe_path``'s dict as (label, text) rows for a terminal."""
    from rich.markup import escape

    from zoo.checkpoint import steps_text
    from zoo.summary import format_bytes

    arch = info["architecture"]
    out = [(info["kind"], info["path"] or f"preset {info.get('preset')}")]
    if info["kind"] == "checkpoint":
        best = info.get("best_step")
        best = "" if best is None else ", the best" if best == info["step"] else f"; best: step {best}"
        out.append(("step", f"{info['step']} ({steps_text(info['steps'])}{best})"))
    out.append(("architecture", f"{arch['layer_type']}, {arch['num_blocks']} blocks, embedding_dim "
                                f"{arch['embedding_dim']}, {arch['num_heads']} heads, vocab_size {arch['vocab_size']}, "
                                f"context_length {arch['context_length']}, dtype {arch['dtype']}"))
    if arch.get("quantization"):
        quantization = arch["quantization"]
        out.append(("quantization", f"{quantization.get('method')} {json.dumps(quantization.get('kwargs', {}))}"))
    params = info.get("parameters")
    if params:
        split = ", ".join(f"{d} {v['count']:,}" for d, v in params["by_dtype"].items())
        out.append(("parameters", f"{params['count']:,} ({split}); {format_bytes(params['bytes'])}"
                                  f"{'' if params['source'] == 'stored' else ' as zoo.init_params makes them'}"))
    if info.get("decoding"):
        out.append(("decoding", decoding_text(info["decoding"])))
    if info.get("config_error"):
        out.append(("config error", info["config_error"]))
    groups: dict[tuple[str, str, bool], list[str]] = {}
    for p in info["plugins"]:
        origin = f"{p['dist'] or p['plugin']} {p['version'] or ''}".strip()
        groups.setdefault((p["kind"], origin, p["installed"]), []).append(p["name"])
    for (kind, origin, installed), names in groups.items():
        state = "" if installed else " [red]NOT INSTALLED[/]"
        out.append((f"plugins {kind}", f"{', '.join(names)} (from {origin}){state}"))
    if info["kind"] == "artifact":
        art = info["artifact"]
        out.append(("format", f"{art['format']}, weights {art['weights']}"))
        out.append(("entries", ", ".join(art["entries"])))
        out.append(("platforms", ", ".join(art["platforms"] or [])))
    if info.get("tokenizer"):
        out.append(("tokenizer", escape(tokenizer_text(info["tokenizer"]))))
    if info["versions"]:
        out.append(("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())))
    for name, digest in info["hashes"].items():
        out.append((f"{name} sha256", digest))
    if info.get("disk_bytes") is not None:
        out.append(("on disk", format_bytes(info["disk_bytes"])))
    if info["kind"] == "checkpoint":
        out.append(("arrays", "not read by zoo info; loading (zoo run, zoo generate, zoo.load) verifies the "
                              "content sha256"))
    out += [("[yellow]problem[/]", escape(problem)) for problem in info.get("problems", [])]
    return out


def decoding_text(decoding: dict[str, Any]) -> str:
    """The ``decoding`` field of ``describe_path``'s dict in one line."""
    from zoo.summary import format_bytes

    extra = decoding.get("extra_bytes")
    memory = "" if extra is None else (
        f"; {format_bytes(extra)} more memory (float32 copies of the low-precision params)" if extra
        else "; no memory beyond the params")
    return (f"on {decoding['platform']}: {decoding['dtype']} compute, "
            f"{'scanned' if decoding['scan_blocks'] else 'per block'}{memory} (docs/decoding.md)")


def tokenizer_text(tokenizer: dict[str, Any]) -> str:
    """The ``tokenizer`` field of ``describe_path``'s dict in one line."""
    names = {token_id: name for name, token_id in tokenizer.get("special_tokens", {}).items()}

    def token(token_id: int | None) -> str:
        return "none" if token_id is None else f"{names.get(token_id, 'id')} {token_id}"

    eos = ", ".join(map(token, tokenizer.get("eos_ids", []))) or "none"
    return (f"{tokenizer.get('vocab_size')} tokens; bos {token(tokenizer.get('bos_id'))}"
            f"{' (put before each prompt)' if tokenizer.get('add_bos') else ''}, eos {eos}, pad "
            f"{token(tokenizer.get('pad_id'))}; special tokens: "
            f"{', '.join(tokenizer.get('special_tokens', {})) or 'none'}")
