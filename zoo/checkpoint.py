"""Orbax checkpoints holding params, the config JSON, a metadata JSON and optionally a tokenizer, one step per save.

A save never touches earlier steps: Orbax writes each step into a temporary folder and renames
it when complete, so a save killed midway leaves the last good step loadable; a save that fails
(a full disk) removes its temporary folder and raises ``CheckpointError``. The metadata records
SHA-256 hashes of the parameter bytes, of the config and of itself, all checked on every load, and of the
tokenizer (Hugging Face's tokenizer.json, stored as the step's ``tokenizer`` item; its special-token settings are
in the metadata under ``tokenizer``), checked whenever it is read (``read_tokenizer``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from pydantic import ValidationError

from zoo import registry, sharding
from zoo.checks import check_params
from zoo.config import ModelConfig, check_config
from zoo.model import param_shapes, quantized_weights
from zoo.version import __version__
from zoo.errors import ZooError

if TYPE_CHECKING:
    import tokenizers

    from zoo.tokenizers.codec import Codec


class CheckpointError(ZooError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or needs plugins that are not installed."""


class CheckpointRefused(CheckpointError):
    """The path, step or parameter tree is not one the call accepts; raised before any array is read or written."""


CHECKPOINT = "a zoo checkpoint folder (written by `zoo build` or zoo.save)"
"""What commands that load a checkpoint expect, in messages."""
RUN_CHECKPOINTS = "checkpoints"
"""The checkpoint folder inside a ``zoo train`` run folder; passing the run folder means this folder."""
BEST_FILE = "best.json"
"""``{"step": N, "eval_loss": x}`` in a checkpoint folder: the step with the lowest held-out loss (``zoo train``)."""
TRAINING_ITEMS = ("train_state", "train")
"""Items a ``zoo train`` step holds besides the checkpoint's own: the optimizer state, step and dropout key
(arrays), and the data-iterator state and metrics line count (JSON)."""


@dataclass(frozen=True)
class PathKind:
    """What a path holds, as far as the zoo is concerned.

    ``kind`` is one of ``checkpoint`` (a folder of Orbax steps), ``step`` (one step folder, ``ck/0``),
    ``artifact`` (a ``zoo export`` folder with ``manifest.json``; ``format`` names its format),
    ``torch`` (a PyTorch / Hugging Face folder: ``config.json``/``config.yaml`` and safetensors),
    A ``zoo train`` run folder is a ``checkpoint`` whose ``path`` is its ``checkpoints`` folder.
    ``file`` (any file, such as a config), ``empty`` (an empty folder), ``folder`` (any other folder)
    or ``missing``.
    """

    kind: str
    path: Path
    format: str | None = None
    entries: tuple[str, ...] = ()

    @property
    def found(self) -> str:
        """What is there, as a phrase for messages ("a `zoo export` artifact (format 'stablehlo')")."""
        if self.kind == "missing":
            return "nothing (no such file or folder)"
        if self.kind == "file":
            return "a file" + (" (a config? `zoo build` makes a checkpoint of it)" if self.path.suffix == ".json"
                               else "")
        if self.kind == "artifact":
            return f"a `zoo export` artifact (manifest.json, format {self.format!r})"
        if self.kind == "step":
            parent = self.path.parent
            return (f"step folder {self.path.name} of the checkpoint {parent}; pass {parent} with "
                    f"--step {self.path.name} (step={self.path.name} in Python) to read it, or build or save into "
                    f"{parent} to add a step")
        if self.kind == "checkpoint":
            return "a zoo checkpoint folder"
        if self.kind == "torch":
            return "a PyTorch / Hugging Face model folder (config and safetensors); `zoo convert torch` imports it"
        if self.kind == "empty":
            return "an empty folder"
        shown = ", ".join(self.entries[:5]) + (", ..." if len(self.entries) > 5 else "")
        return f"a folder of other things (it holds {shown})"

    def refuse(self, expected: str) -> CheckpointRefused:
        """The one-line error for a command that expected ``expected`` here."""
        return CheckpointRefused(f"{self.path}: expected {expected}; found {self.found}")


def classify_path(path: str | os.PathLike) -> PathKind:
    """What ``path`` holds: a checkpoint, one of its step folders, an export artifact, a PyTorch folder, ...

    Reads only folder listings and ``manifest.json``; see ``PathKind`` for the kinds.
    """
    root = _resolve(path)
    if not root.exists():
        return PathKind("missing", root)
    if not root.is_dir():
        return PathKind("file", root)
    names = tuple(sorted(child.name for child in root.iterdir()))
    if "manifest.json" in names:
        try:
            fmt = json.loads((root / "manifest.json").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = "unreadable manifest.json"
        return PathKind("artifact", root, format=str(fmt))
    if _holds_steps(root):
        return PathKind("checkpoint", root)
    if RUN_CHECKPOINTS in names and (root / RUN_CHECKPOINTS).is_dir() and _holds_steps(root / RUN_CHECKPOINTS):
        return PathKind("checkpoint", root / RUN_CHECKPOINTS)  # a `zoo train` run folder: its checkpoints
    if root.name.isdigit() and _holds_steps(root.parent) and ("_CHECKPOINT_METADATA" in names or "params" in names):
        return PathKind("step", root)
    if any(n.startswith("config.") for n in names) and any(n.endswith((".safetensors", ".safetensors.index.json"))
                                                          for n in names):
        return PathKind("torch", root)
    return PathKind("folder" if names else "empty", root, entries=names)


def checkpoint_root(directory: str | os.PathLike, expected: str = CHECKPOINT) -> Path:
    """The resolved checkpoint folder; ``CheckpointRefused`` saying what was expected and found when it is not one."""
    found = classify_path(directory)
    if found.kind != "checkpoint":
        raise found.refuse(expected)
    return found.path


def steps_text(steps: list[int]) -> str:
    """``[0, 1, 2, 3] -> 'steps 0-3'``, ``[0, 2] -> 'steps 0, 2'``, ``[5] -> 'step 5 only'``."""
    if len(steps) == 1:
        return f"step {steps[0]} only"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    return "steps " + ", ".join(map(str, steps))


@dataclass(frozen=True)
class StepRef:
    """One step of a checkpoint: its folder, its number and every step the folder holds."""

    root: Path
    step: int
    steps: list[int]
    best: int | None = None
    """The step with the lowest held-out loss, when a training run recorded one (``BEST_FILE``)."""

    def __str__(self) -> str:
        best = "" if self.best is None else (", the best" if self.best == self.step else f"; best: step {self.best}")
        return f"step {self.step} of {self.root} ({steps_text(self.steps)}{best})"


def best_step(root: str | os.PathLike) -> int | None:
    """The best step recorded in checkpoint folder ``root`` (``BEST_FILE``), or None."""
    try:
        step = json.loads((Path(root) / BEST_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if type(step) is int else None


def find_step(directory: str | os.PathLike, step: int | None = None, expected: str = CHECKPOINT) -> StepRef:
    """The given (default: latest) step of a checkpoint folder, read from its listing only.

    Raises ``CheckpointRefused`` when ``directory`` is not a checkpoint folder (saying what it is) or
    does not hold the step (naming the steps it does hold).
    """
    root = checkpoint_root(directory, expected)
    with _manager(root) as manager:
        picked = _pick_step(manager, root, step)
        steps, best = sorted(manager.all_steps()), best_step(root)
        return StepRef(root, picked, steps, best if best in steps else None)


def _manager(root: Path, create: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        root,
        options=ocp.CheckpointManagerOptions(create=create, max_to_keep=None),
        item_handlers={"params": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler(), "tokenizer": ocp.JsonCheckpointHandler(),
                       "train_state": ocp.StandardCheckpointHandler(), "train": ocp.JsonCheckpointHandler()},
    )


def manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` on ``directory`` (created if missing) that reads and writes every item of a
    zoo step (``step_items``) and of a training step (``TRAINING_ITEMS``), saving asynchronously; it keeps every
    step (delete with ``manager.delete``)."""
    return _manager(_resolve(directory), create=True)


def step_items(config: ModelConfig, params: Any, tokenizer: Codec | tokenizers.Tokenizer | None = None,
               extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Orbax save arguments of a zoo checkpoint step (params, config, metadata with its hashes, tokenizer), to
    pass to ``ocp.args.Composite`` with any further items. Checks as ``save`` does (``check_params``; a tokenizer
    that does not fit: ``TokenizerError``)."""
    from zoo.tokenizers.codec import as_codec, check_fits  # not at the top: zoo.tokenizers imports this module

    check_params(check_config(config), params)
    items: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if tokenizer is not None:
        codec = as_codec(tokenizer)
        check_fits(codec.tokenizer, config)
        stored = json.loads(codec.tokenizer.to_str())
        items["tokenizer"] = ocp.args.JsonSave(stored)
        recorded = {"tokenizer": codec.describe(), "tokenizer_sha256": json_hash(stored)}
    metadata = {**_metadata(config, params), **recorded, **(extra_metadata or {})}
    metadata["metadata_sha256"] = json_hash(metadata)  # covers every other field
    return {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config.model_dump(mode="json")),
            "metadata": ocp.args.JsonSave(metadata), **items}


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


def _check_directory(directory: Any) -> None:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")


def save(directory: str | os.PathLike, config: ModelConfig, params: Any,
         extra_metadata: dict[str, Any] | None = None, *, tokenizer: Codec | tokenizers.Tokenizer | None = None,
         force: bool = False) -> Path:
    """Save ``params`` and ``config`` (and ``tokenizer``) as a new step under ``directory``; returns the step's folder.

    An existing checkpoint folder gets the next step number and keeps its earlier steps. Raises
    ``CheckpointRefused`` for a non-empty folder that is not a checkpoint, and for a checkpoint whose
    latest step holds another parameter tree (other paths, shapes or dtypes; the message names the
    first difference) unless ``force``, which adds the step anyway. ``extra_metadata`` (JSON) is
    stored with the metadata, e.g. where a converted model came from. ``tokenizer`` (a
    ``zoo.tokenizers.Codec``, or a ``tokenizers.Tokenizer`` whose special tokens are then found by name,
    ``Codec.from_tokenizer``) is stored with the step, its SHA-256 and special-token settings in the
    metadata; ``zoo.tokenizers.load_codec`` reads it back. Raises ``TypeError`` for a ``config`` that is not a
    ``ModelConfig`` or a ``tokenizer`` of another type, ``TypeError``/``ValueError`` naming the first path of
    ``params`` that does not fit ``config`` (``zoo.checks.check_params``), and ``TokenizerError`` for a
    tokenizer with more tokens than ``config.vocab_size``, before anything is written.
    """
    _check_directory(directory)
    items = step_items(config, params, tokenizer, extra_metadata)
    root = check_save_target(directory, params, force=force)
    with _manager(root, create=True) as manager:
        latest = manager.latest_step()
        step = 0 if latest is None else latest + 1
        if jax.process_count() == 1:  # left by an interrupted save (Orbax would remove it too, with a warning)
            shutil.rmtree(root / f"{step}.orbax-checkpoint-tmp", ignore_errors=True)
        try:
            with _failed_reads_silenced():
                manager.save(step, args=ocp.args.Composite(**items))
                manager.wait_until_finished()
        except Exception as exc:  # disk full, permissions, I/O errors: the earlier steps are untouched
            shutil.rmtree(root / f"{step}.orbax-checkpoint-tmp", ignore_errors=True)
            raise CheckpointError(f"saving step {step} to {root} failed, earlier steps are untouched: "
                                  f"{_save_failure(exc)}") from None
    return root / str(step)


def tree_layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path (``['blocks_0']['xlstm']...``) -> ``(shape, dtype name)`` of each leaf of ``tree`` (arrays,
    ``jax.ShapeDtypeStruct``s or Orbax's array metadata)."""
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), jnp.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_layout(manager: ocp.CheckpointManager, root: Path, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    try:
        return tree_layout(manager.item_metadata(step)["params"].tree)
    except Exception as exc:  # a damaged or foreign step
        raise CheckpointError(f"step {step} of {root}: cannot read its parameter layout ({_short(exc)})") from None


def param_layout(directory: str | os.PathLike, step: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> ``(shape, dtype name)`` of every parameter a step stores, from Orbax's metadata (no array is read)."""
    where = find_step(directory, step)
    with _manager(where.root) as manager:
        return _stored_layout(manager, where.root, where.step)


def tree_difference(stored: dict[str, tuple[tuple[int, ...], str]],
                    new: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """The first difference between two ``param_layout``-style layouts, in words, or None when they are equal."""
    for path in [*stored, *(p for p in new if p not in stored)]:
        if path not in new:
            return f"params{path} is stored but not in the new params"
        if path not in stored:
            return f"params{path} is new (not stored)"
        (old_shape, old_dtype), (new_shape, new_dtype) = stored[path], new[path]
        if old_shape != new_shape:
            return f"params{path} has shape {old_shape} stored, {new_shape} new"
        if old_dtype != new_dtype:
            return f"params{path} has dtype {old_dtype} stored, {new_dtype} new"
    return None


def _check_tree(manager: ocp.CheckpointManager, root: Path, latest: int, params: Any) -> None:
    try:
        stored = _stored_layout(manager, root, latest)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; cannot compare it with the new params (--force, force=True saves "
                              f"anyway)") from None
    difference = tree_difference(stored, tree_layout(params))
    if difference is not None:
        raise CheckpointRefused(f"{root} holds another model: {difference} (step {latest}); save to a new folder, "
                                f"or force it (--force, force=True) to add step {latest + 1} anyway")


def check_save_target(directory: str | os.PathLike, params: Any, *, force: bool = False) -> Path:
    """The resolved folder ``save`` would write to; raises ``CheckpointRefused`` as ``save`` would, before any work.

    ``params`` may be arrays or ``jax.ShapeDtypeStruct``s (``zoo.param_shapes``).
    """
    found = classify_path(directory)
    if found.kind not in ("missing", "empty", "checkpoint"):
        raise CheckpointRefused(f"{found.path} is not a checkpoint directory: expected a new or empty folder or "
                                f"{CHECKPOINT}; found {found.found}")
    if found.kind == "checkpoint" and not force:
        with _manager(found.path) as manager:
            latest = manager.latest_step()
            if latest is not None:
                _check_tree(manager, found.path, latest, params)
    return found.path


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
    raise CheckpointRefused(f"{root} does not hold {wanted}{detail}")


@dataclass(frozen=True)
class PluginStatus:
    """A plugin a checkpoint was saved with, and what its name resolves to here.

    ``status`` is ``"ok"`` (the same distribution, or the same plugin when it had none), ``"missing"``
    (no plugin here registers the name) or ``"other"`` (the name now means another distribution's
    plugin, e.g. one registered with ``override=True``, or it is ambiguous).
    """

    kind: str
    name: str
    recorded: dict[str, Any]
    status: str
    here: registry.Registration | None

    def __str__(self) -> str:
        saved = f"{self.recorded.get('dist') or self.recorded.get('plugin')} {self.recorded.get('version') or ''}"
        what = f"{self.kind} {self.name!r} (from {saved.strip()}"
        if self.status == "missing":
            return f"{what})"
        return f"{what}; here it means {self.here.origin if self.here else 'several plugins (ambiguous)'})"


def plugin_status(metadata: dict[str, Any]) -> list[PluginStatus]:
    """Each plugin recorded in a checkpoint's metadata, checked against the registry of this process."""
    rows = []
    for kind, names in sorted(metadata.get("plugins", {}).items()):
        for name, recorded in sorted(names.items()):
            try:
                here = registry.entry(kind, name)
            except registry.AmbiguousPluginError:
                rows.append(PluginStatus(kind, name, recorded, "other", None))
                continue
            except registry.UnknownPluginError:
                rows.append(PluginStatus(kind, name, recorded, "missing", None))
                continue
            same = (here.dist == recorded.get("dist") if recorded.get("dist") else
                    here.dist is None and here.plugin == recorded.get("plugin"))
            rows.append(PluginStatus(kind, name, recorded, "ok" if same else "other", here))
    return rows


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
    except BaseException:  # Ctrl-C (zoo.cli.Interrupted): the CLI's message must reach the real stderr
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


def read_stored(directory: str | os.PathLike, step: int | None = None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, config JSON, metadata JSON)`` of the given (default: latest) step, their hashes verified.

    Raises ``CheckpointRefused`` for a path that is not a checkpoint folder or a step it does not
    hold, ``CheckpointError`` for a damaged step.
    """
    return _read_json(_resolve(directory), step)


def _read_json(root: Path, step: int | None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    root = checkpoint_root(root)
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


def read_tokenizer(directory: str | os.PathLike, step: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tokenizer.json object, recorded settings)`` stored with the given (default: latest) step, or None when the
    step has no tokenizer. The settings are the metadata's ``tokenizer`` entry (``Codec.describe()``).

    Raises ``CheckpointRefused`` as ``read_stored`` does, and ``CheckpointError`` for a tokenizer that cannot be
    read or does not match the ``tokenizer_sha256`` recorded when it was saved.
    """
    root = _resolve(directory)
    step, _, metadata = _read_json(root, step)
    recorded = metadata.get("tokenizer_sha256")
    if recorded is None:
        return None
    root = checkpoint_root(root)
    with _manager(root) as manager:
        try:
            stored = manager.restore(step, args=ocp.args.Composite(tokenizer=ocp.args.JsonRestore()))["tokenizer"]
        except Exception as exc:  # a missing or unreadable item means the step is damaged
            raise CheckpointError(f"step {step} of {root}: cannot read its tokenizer ({_short(exc)})") from None
    if json_hash(stored) != recorded:
        raise CheckpointError(f"step {step} of {root} is corrupted: its tokenizer does not match the tokenizer "
                              f"hash recorded when it was saved")
    return stored, metadata.get("tokenizer", {})


def load(directory: str | os.PathLike, step: int | None = None, *, dtype: Any = None,
         mesh: jax.sharding.Mesh | None = None,
         parallel: dict[str, Any] | None = None) -> tuple[ModelConfig, Any]:
    """Restore ``(config, params)`` from the latest (or the given) step of a checkpoint directory.

    Params are restored into abstract targets built from the stored config (``jax.eval_shape``),
    in their saved dtypes, checked against the recorded content hash, then cast to ``dtype``
    when given (the arrays of quantised weights keep their dtypes, ``cast_params``). With a ``mesh``
    each device reads only its own shards, laid out as the stored
    ``parallel`` section (updated with ``parallel``, and with the mesh's axis sizes) asks; the
    returned config carries that section. Any mesh works, whatever the checkpoint was saved on.
    ``TypeError``, before anything is read, for a ``directory`` that is not a path, a ``step`` that is not an
    integer, or a ``dtype`` that does not name a float dtype.
    """
    _check_directory(directory)
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
        raise TypeError(f"step must be an integer or None, got {type(step).__name__} {step!r}")
    if dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise TypeError(f"dtype must be a float dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    root = checkpoint_root(directory)  # a run folder means its checkpoints folder
    step, config_json, metadata = _read_json(root, step)
    plugins = plugin_status(metadata)
    missing = [str(p) for p in plugins if p.status == "missing"]
    other = [str(p) for p in plugins if p.status == "other"]
    if missing:
        raise CheckpointError(f"{root} (step {step}) needs plugins that are not installed: {'; '.join(missing)}")
    if other:
        raise CheckpointError(f"{root} (step {step}) was saved with plugins whose names now mean other plugins: "
                              f"{'; '.join(other)}; uninstall the other one or select plugins with ZOO_PLUGINS")
    try:
        config = ModelConfig.model_validate(config_json)
    except ValidationError as exc:
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
        params = cast_params(config, params, dtype)
    return config, params


def cast_params(config: ModelConfig, params: Any, dtype: Any) -> Any:
    """``params`` with every float parameter cast to ``dtype``, except the arrays of the weights that
    ``config.quantization`` stores quantised (``zoo.model.quantized_weights``): those keep their dtypes."""
    kept = quantized_weights(config)

    def cast(path: tuple, x: Any) -> Any:
        keys = tuple(getattr(k, "key", k) for k in path)
        return x if any(keys[:len(w)] == w for w in kept) else x.astype(jnp.dtype(dtype))

    return jax.tree_util.tree_map_with_path(cast, params)
