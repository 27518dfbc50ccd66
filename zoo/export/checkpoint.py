"""Orbax checkpoints holding params, the config JSON and a metadata JSON, one step per save."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from zoo import registry
from zoo.config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or cannot be restored."""


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
    }


def save(directory: str | os.PathLike, config: ModelConfig, params: Any) -> Path:
    """Save ``params`` and ``config`` as a new step under ``directory``; returns the step's folder.

    An existing checkpoint directory gets the next step number; earlier steps are kept.
    """
    root = Path(directory).expanduser().resolve()
    options = ocp.CheckpointManagerOptions(create=True, max_to_keep=None)
    with ocp.CheckpointManager(root, options=options) as manager:
        latest = manager.latest_step()
        step = 0 if latest is None else latest + 1
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            config=ocp.args.JsonSave(config.model_dump(mode="json")),
            metadata=ocp.args.JsonSave(_metadata(config, params)),
        ))
        manager.wait_until_finished()
    return root / str(step)


def load(directory: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Any]:
    """Restore ``(config, params)`` from the latest (or the given) step of a checkpoint directory."""
    from zoo.api import param_shapes

    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"no checkpoint directory at {root}")
    with ocp.CheckpointManager(root) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{root} holds no complete checkpoint step")
        config_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        config = ModelConfig.model_validate(config_json)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(param_shapes(config))))
    return config, restored["params"]


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The metadata JSON of a checkpoint step."""
    root = Path(directory).expanduser().resolve()
    with ocp.CheckpointManager(root) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{root} holds no complete checkpoint step")
        return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
