"""Orbax checkpoints holding params, the config JSON and a metadata JSON, one step per save.

A save never touches earlier steps: Orbax writes each step into a temporary folder and renames
it when complete, so a save killed midway leaves the last good step loadable; a save that fails
(a full disk) removes its temporary folder and raises ``CheckpointError``. The metadata records
SHA-256 hashes of the parameter bytes, of the config and of itself, all checked on every load.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import io
import json
import logging
import math
import os
import shutil
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

from zoo import registry, sharding
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
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order.

    Arrays spread over several processes are gathered first (every process must call this).
    """
    from jax.experimental import multihost_utils

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def json_hash(value: Any) -> str:
    """SHA-256 of a JSON value, serialised with sorted keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        "config_sha256": json_hash(config.model_dump(mode="json")),
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
        metadata = {**_metadata(config, params), **(extra_metadata or {})}
        metadata["metadata_sha256"] = json_hash(metadata)  # covers every other field
        try:
            with _failed_reads_silenced():
                manager.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    config=ocp.args.JsonSave(config.model_dump(mode="json")),
                    metadata=ocp.args.JsonSave(metadata),
                ))
                manager.wait_until_finished()
        except Exception as exc:  # disk full, permissions, I/O errors: the earlier steps are untouched
            shutil.rmtree(root / f"{step}.orbax-checkpoint-tmp", ignore_errors=True)
            raise CheckpointError(f"saving step {step} to {root} failed, earlier steps are untouched: "
                                  f"{_save_failure(exc)}") from None
    return root / str(step)


def _save_failure(exc: BaseException) -> str:
    """The reason a save failed, leading with "the disk is full" when it is."""
    reason = _short(exc)
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) for e in chain):
        return f"the disk is full (No space left on device); {reason}"
    return reason


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
    """Keep the tracebacks of Orbax's background reads and writes off stderr when a restore or save fails.

    When one array fails to read (or write), Orbax closes its event loop while the other reads are in
    flight; their threads then print tracebacks, and Orbax logs each failed thread to the ``absl``
    logger. On failure this waits briefly for them and drops what they printed and logged; on
    success anything written to stderr or logged is passed through.
    """
    captured, original = io.StringIO(), sys.stderr
    asyncio_log, absl_log = logging.getLogger("asyncio"), logging.getLogger("absl")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    sys.stderr = captured
    absl_log.addFilter(hold)
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
            absl_log.removeFilter(hold)
        raise
    sys.stderr = original
    absl_log.removeFilter(hold)
    original.write(captured.getvalue())
    for record in held:
        absl_log.handle(record)


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
    config, metadata = restored["config"], restored["metadata"]
    if not (isinstance(config, dict) and isinstance(metadata, dict)):
        raise CheckpointError(f"step {step} of {root} is corrupted: its config or metadata is not a JSON object")
    recorded = metadata.get("metadata_sha256")
    if recorded is not None and recorded != json_hash({k: v for k, v in metadata.items() if k != "metadata_sha256"}):
        raise CheckpointError(f"step {step} of {root} is corrupted: its metadata does not match the hash "
                              f"recorded when it was saved")
    if metadata.get("config_sha256") not in (None, json_hash(config)):
        raise CheckpointError(f"step {step} of {root} is corrupted: its config does not match the config hash "
                              f"recorded when it was saved")
    return step, config, metadata


def load(directory: str | os.PathLike, step: int | None = None, *, dtype: Any = None,
         mesh: jax.sharding.Mesh | None = None,
         parallel: dict[str, Any] | None = None) -> tuple[ModelConfig, Any]:
    """Restore ``(config, params)`` from the latest (or the given) step of a checkpoint directory.

    Params are restored into abstract targets built from the stored config (``jax.eval_shape``),
    in their saved dtypes, checked against the recorded content hash, then cast to ``dtype``
    when given. With a ``mesh`` each device reads only its own shards, laid out as the stored
    ``parallel`` section (updated with ``parallel``, and with the mesh's axis sizes) asks; the
    returned config carries that section. Any mesh works, whatever the checkpoint was saved on.
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
    if mesh is None:  # one device, whatever the checkpoint was saved on
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                                           param_shapes(config))
    else:
        mesh = sharding.auto_mesh(mesh)
        config = sharding.with_mesh(config, mesh, parallel)
        shardings = sharding.param_shardings(config, mesh)
    shapes = jax.tree_util.tree_map(lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                                                              sharding=where),
                                    param_shapes(config), shardings)
    with _manager(root) as manager:
        try:
            with _failed_reads_silenced():
                saved = manager.item_metadata(step)["params"].tree
                target = jax.tree_util.tree_map(
                    lambda shape, meta: jax.ShapeDtypeStruct(shape.shape, meta.dtype, sharding=shape.sharding),
                    shapes, saved)
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
