"""Orbax checkpoints holding params, the config JSON and a metadata JSON, one step per save.

A save never touches earlier steps: Orbax writes each step into a temporary folder and renames
it when complete, so a save killed midway leaves the last good step loadable. The metadata records
a SHA-256 of the parameter bytes, checked on every load.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from pydantic import ValidationError

from zoo import registry
from zoo.config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or needs plugins that are not installed."""


def _manager(root: Path, create: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(create=create, max_to_keep=None),
        item_handlers={"params": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()},
    )


def content_hash(params: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _metadata(config: ModelConfig, params: Any) -> dict[str, Any]:
    import flax

    from zoo import __version__

    plugins = {
        kind: {name: {"plugin": e.plugin, "dist": e.dist, "version": e.version}
               for name in names for e in [registry.entry(kind, name)]}
        for kind, names in config.plugins_used().items()
    }
    leaves = jax.tree_util.tree_leaves(params)
    return {
        "zoo_version": __version__,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "orbax_version": ocp.__version__,
        "plugins": plugins,
        "param_count": int(sum(math.prod(x.shape) for x in leaves)),
        "param_dtypes": sorted({str(x.dtype) for x in leaves}),
        "dtype": config.dtype,
        "content_sha256": content_hash(params),
    }


def _resolve(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().resolve()


def _holds_steps(root: Path) -> bool:
    return any(child.name.isdigit() or "orbax-checkpoint-tmp" in child.name for child in root.iterdir())


def save(directory: str | os.PathLike, config: ModelConfig, params: Any,
         extra_metadata: dict[str, Any] | None = None) -> Path:
    """Save ``params`` and ``config`` as a new step under ``directory``; returns the step's folder.

    An existing checkpoint directory gets the next step number and keeps its earlier steps; a
    non-empty directory that is not a checkpoint is refused. ``extra_metadata`` (JSON) is stored
    with the metadata, e.g. where a converted model came from.
    """
    root = _resolve(directory)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not _holds_steps(root))):
        raise CheckpointError(f"{root} exists and is not a checkpoint directory; choose a new or empty one")
    with _manager(root, create=True) as manager:
        latest = manager.latest_step()
        step = 0 if latest is None else latest + 1
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            config=ocp.args.JsonSave(config.model_dump(mode="json")),
            metadata=ocp.args.JsonSave({**_metadata(config, params), **(extra_metadata or {})}),
        ))
        manager.wait_until_finished()
    return root / str(step)


def _pick_step(manager: ocp.CheckpointManager, root: Path, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None and steps:
        return max(steps)
    if step is not None and step in steps:
        return step
    interrupted = [c.name for c in root.iterdir() if "orbax-checkpoint-tmp" in c.name]
    detail = f"; interrupted saves left: {', '.join(interrupted)}" if interrupted else ""
    wanted = "any complete step" if step is None else f"step {step} (steps: {sorted(steps) or 'none'})"
    raise CheckpointError(f"{root} does not hold {wanted}{detail}")


def _missing_plugins(metadata: dict[str, Any]) -> list[str]:
    missing = []
    for kind, names in metadata.get("plugins", {}).items():
        for name, origin in names.items():
            if name not in registry.available(kind):
                source = f"{origin.get('dist') or origin.get('plugin')} {origin.get('version') or ''}".strip()
                missing.append(f"{kind} {name!r} (from {source})")
    return missing


@contextlib.contextmanager
def _failed_reads_silenced() -> Iterator[None]:
    """Keep the tracebacks of Orbax's background reads off stderr when a restore fails.

    When one array fails to read, Orbax closes its event loop while the other reads are in
    flight; their threads then print tracebacks. On failure this waits briefly for them and drops
    what they printed; on success anything written to stderr is passed through.
    """
    captured, original = io.StringIO(), sys.stderr
    asyncio_log = logging.getLogger("asyncio")
    sys.stderr = captured
    try:
        yield
    except Exception:
        level, hook = asyncio_log.level, sys.unraisablehook
        asyncio_log.setLevel(logging.CRITICAL)
        sys.unraisablehook = lambda unraisable: None
        try:
            time.sleep(0.3)
            gc.collect()
        finally:
            asyncio_log.setLevel(level)
            sys.unraisablehook = hook
            sys.stderr = original
        raise
    sys.stderr = original
    original.write(captured.getvalue())


def _short(exc: BaseException) -> str:
    """The root cause's type and first line (Orbax wraps TensorStore errors in long reprs)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata JSON of a checkpoint step (versions, plugins used, param count, content hash)."""
    return _read_json(_resolve(directory), step)[2]


def _read_json(root: Path, step: int | None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    if not root.is_dir():
        raise CheckpointError(f"no checkpoint directory at {root}")
    with _manager(root) as manager:
        step = _pick_step(manager, root, step)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
        except Exception as exc:  # any read failure means the step is damaged
            raise CheckpointError(f"step {step} of {root}: cannot read its config or metadata ({_short(exc)})") from None
    return step, restored["config"], restored["metadata"]


def load(directory: str | os.PathLike, step: int | None = None, *, dtype: Any = None,
         sharding: jax.sharding.Sharding | None = None) -> tuple[ModelConfig, Any]:
    """Restore ``(config, params)`` from the latest (or the given) step of a checkpoint directory.

    Params are restored into abstract targets built from the stored config (``jax.eval_shape``),
    in their saved dtypes, checked against the recorded content hash, then cast to ``dtype``
    when given and placed on ``sharding`` when given.
    """
    from zoo.api import param_shapes

    root = _resolve(directory)
    step, config_json, metadata = _read_json(root, step)
    try:
        config = ModelConfig.model_validate(config_json)
    except ValidationError as exc:
        missing = _missing_plugins(metadata)
        if missing:
            raise CheckpointError(f"{root} (step {step}) needs plugins that are not installed: "
                                  f"{'; '.join(missing)}") from None
        raise CheckpointError(f"{root} (step {step}) holds an invalid config: {exc}") from None
    with _manager(root) as manager:
        try:
            with _failed_reads_silenced():
                saved = manager.item_metadata(step)["params"].tree
                target = jax.tree_util.tree_map(
                    lambda shape, meta: jax.ShapeDtypeStruct(shape.shape, meta.dtype, sharding=sharding),
                    param_shapes(config), saved)
                params = manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(target)))["params"]
        except Exception as exc:  # structure mismatch, missing or unreadable array files
            raise CheckpointError(f"step {step} of {root} is corrupted or incomplete ({_short(exc)})") from None
    expected = metadata.get("content_sha256")
    if expected is not None and content_hash(params) != expected:
        raise CheckpointError(f"step {step} of {root} is corrupted: its parameters do not match the content hash "
                              f"recorded when it was saved")
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return config, params
