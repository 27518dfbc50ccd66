"""Load any artifact (Orbax checkpoint, StableHLO, SavedModel) behind one NumPy interface, for ``zoo run``."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.export.entries import ExportError


@dataclass
class Artifact:
    """A loaded model of any kind: ``forward``, and ``prefill``/``step`` where it has them, on NumPy arrays."""

    path: Path
    kind: str
    vocab_size: int
    entries: frozenset[str]
    static: tuple[int, int] | None = None
    context_length: int = -1  # the longest prompt (forward or prefill call); <= 0: no limit
    _calls: dict[str, Any] = field(default_factory=dict, repr=False)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``(B, S, V)`` for int32 tokens ``(B, S)``."""
        return np.asarray(self._calls["forward"](tokens))

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """Logits ``(B, S, V)`` and the state after int32 ``tokens (B, S)``.

        With ``lengths`` int32 ``(B,)`` the rows are right-padded: row b's state is the one after its first
        ``lengths[b]`` tokens, as ``zoo.prefill(..., lengths=...)`` gives it. An artifact exported before
        prefill took lengths refuses a ragged batch (``ExportError``)."""
        return self._calls["prefill"](tokens, lengths)

    def step(self, token: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """Logits ``(B, V)`` for one more token per sequence, and the new state."""
        return self._calls["step"](token, state)


def _checkpoint(path: Path, step: int | None) -> Artifact:
    from zoo import runtime
    from zoo.checkpoint import load

    config, params = load(path, step)
    calls = {
        "forward": lambda t: runtime.forward(config, params, t),
        "prefill": lambda t, n: _as_numpy(runtime.prefill(config, params, t, lengths=n)),
        "step": lambda t, s: _as_numpy(runtime.step(config, params, t, s)),
    }
    return Artifact(path, "checkpoint", config.vocab_size, frozenset(calls), context_length=config.context_length,
                    _calls=calls)


def _as_numpy(result: tuple[Any, Any]) -> tuple[np.ndarray, Any]:
    return np.asarray(result[0]), result[1]


def _exported_prefill(path: Path, entry: dict[str, Any], call: Any) -> Any:
    """An exported prefill as ``(tokens, lengths or None) -> (logits, state)``: ``call(tokens, lengths)``, with
    every row whole when ``lengths`` is None; for an artifact exported before prefill took ``lengths`` (no such
    input in its manifest), ``call(tokens)`` on rectangular batches only."""
    ragged = any(row["name"] == "lengths" for row in entry["inputs"])

    def prefill(tokens: np.ndarray, lengths: np.ndarray | None) -> tuple[np.ndarray, Any]:
        tokens = np.asarray(tokens, np.int32)
        if ragged:
            whole = np.full(tokens.shape[:1], tokens.shape[1], np.int32)
            return _as_numpy(call(tokens, whole if lengths is None else np.asarray(lengths, np.int32)))
        if lengths is not None and np.any(np.asarray(lengths) != tokens.shape[1]):
            raise ExportError(f"{path} was exported before prefill took lengths, so it cannot prefill a ragged "
                              f"batch; export it again")
        return _as_numpy(call(tokens))

    return prefill


def inside(root: Path, name: str) -> Path:
    """``root / name`` when it stays inside ``root`` (no ``..``, absolute paths or links out); else ExportError."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ExportError(f"{root / 'manifest.json'} names {name!r}, outside the artifact directory; refusing it")
    return target


def _weights(path: Path, spec: dict[str, Any]) -> Any:
    """The arrays of a StableHLO artifact's ``weights_file``, in the dtypes and shapes its manifest lists."""
    import jax

    file = inside(path, spec["file"])
    try:
        with np.load(file) as npz:  # never unpickles
            weights = {p["name"]: npz[p["name"]].view(p["dtype"]) for p in spec["params"]}
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{file} does not hold the weights its manifest lists ({type(exc).__name__}: {exc})") from exc
    for p in spec["params"]:
        if list(weights[p["name"]].shape) != p["shape"]:
            raise ExportError(f"{file}: weight {p['name']!r} has shape {list(weights[p['name']].shape)}, "
                              f"the manifest says {p['shape']}")
    return jax.device_put(weights)


def _stablehlo(path: Path, manifest: dict[str, Any]) -> Artifact:
    import jax
    from jax import export

    if manifest["weights"] not in ("file", "baked"):
        raise ExportError(f"{path} was exported with weights {manifest['weights']!r}; zoo run needs 'file' (the "
                          "default) or 'baked': export it again")
    first = (_weights(path, manifest["weights_file"]),) if manifest["weights"] == "file" else ()
    exported = {name: jax.jit(_deserialize(inside(path, e["file"])).call) for name, e in manifest["entries"].items()}
    calls: dict[str, Any] = {}
    if "forward" in exported:
        calls["forward"] = lambda t: exported["forward"](*first, t)
    if "prefill" in exported:
        calls["prefill"] = _exported_prefill(path, manifest["entries"]["prefill"],
                                             lambda *args: exported["prefill"](*first, *args))
    if "step" in exported:
        calls["step"] = lambda t, s: _as_numpy(exported["step"](*first, t, s))
    static = manifest.get("static_dims")
    return Artifact(path, "stablehlo", manifest["vocab_size"], frozenset(exported),
                    (static["b"], static["s"]) if static else None, _context_length(manifest), calls)


def _deserialize(file: Path) -> Any:
    """The ``jax.export.Exported`` in ``file``; ExportError naming the file when it cannot be read back."""
    from jax import export

    try:
        data = file.read_bytes()
        return export.deserialize(data)
    except OSError as exc:
        raise ExportError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign flatbuffer fails with struct/Index/Value errors
        raise ExportError(f"{file} is not a whole jax.export entry ({len(data)} bytes: cut short or of another "
                          f"kind; {type(exc).__name__}); export the model again") from None


def config_hash_mismatch(root: Path, manifest: dict[str, Any]) -> str | None:
    """Why ``manifest["config"]`` does not match its ``config_sha256`` (SHA-256 of the config JSON as written at
    export); None when it matches or the manifest records no hash."""
    import hashlib

    from pydantic_core import to_json  # writes the JSON exactly as pydantic's model_dump_json did at export

    recorded = manifest.get("config_sha256")
    if recorded is None:
        return None
    if hashlib.sha256(to_json(manifest.get("config"))).hexdigest() != recorded:
        return (f"{root / 'manifest.json'}: its config does not match the config_sha256 recorded at export "
                "(edited or corrupted); export the model again")
    return None


def _context_length(manifest: dict[str, Any]) -> int:
    return int(manifest.get("config", {}).get("context_length", -1))


def _savedmodel(path: Path, manifest: dict[str, Any]) -> Artifact:
    from zoo.export.savedmodel import import_tensorflow

    tf = import_tensorflow("running a SavedModel")
    if (path / "saved_model.pb").is_file() and not (path / "variables").is_dir():
        raise ExportError(f"{path}: a SavedModel needs its variables/ folder, which is missing; export the model again")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:  # TensorFlow's advice follows on further lines
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: TensorFlow cannot load this SavedModel ({first})") from None
    signatures = {name: loaded.signatures[e["signature"]] for name, e in manifest["entries"].items()}

    def split(result: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        state = {k: v for k, v in result.items() if k.startswith("state_")}
        return _as_numpy((result["logits"].numpy(), state))

    calls: dict[str, Any] = {}
    if "forward" in signatures:
        calls["forward"] = lambda t: signatures["forward"](tokens=tf.constant(t))["logits"].numpy()
    if "prefill" in signatures:
        calls["prefill"] = _exported_prefill(path, manifest["entries"]["prefill"], lambda t, *n: split(
            signatures["prefill"](tokens=tf.constant(t), **({"lengths": tf.constant(n[0])} if n else {}))))
    if "step" in signatures:
        calls["step"] = lambda t, state: split(signatures["step"](token=tf.constant(t), **state))
    return Artifact(path, "savedmodel", manifest["vocab_size"], frozenset(signatures),
                    context_length=_context_length(manifest), _calls=calls)


def read_manifest(root: Path) -> dict[str, Any]:
    """The JSON object in ``root/manifest.json``; ``ExportError`` (one line) when it is unreadable or not an object."""
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: malformed JSON or not UTF-8
        raise ExportError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: the top level must be a JSON object, got {type(manifest).__name__}")
    return manifest


def open_artifact(path: str | os.PathLike, step: int | None = None) -> Artifact:
    """Load an export directory (by its ``manifest.json``) or the given (default: latest) step of a checkpoint.

    Raises ``CheckpointRefused`` for a path of another kind (saying what it is) and for ``step`` on an
    export directory, and ``ExportError`` (one line) for an export directory whose config does not match its
    ``config_sha256`` or whose files cannot be read back.
    """
    from zoo.checkpoint import CHECKPOINT, CheckpointRefused, classify_path

    root = Path(path).expanduser().resolve()
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        if step is not None:
            raise CheckpointRefused(f"{root}: --step selects a step of a checkpoint; this is a `zoo export` artifact")
        manifest = read_manifest(root)
        mismatch = config_hash_mismatch(root, manifest)
        if mismatch:
            raise ExportError(mismatch)
        loaders = {"stablehlo": _stablehlo, "savedmodel": _savedmodel}
        if manifest.get("format") not in loaders:
            raise ExportError(f"{manifest_path} names format {manifest.get('format')!r}; zoo run knows "
                              f"{', '.join(loaders)} and Orbax checkpoints")
        try:
            return loaders[manifest["format"]](root, manifest)
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of the wrong type
            raise ExportError(f"{manifest_path}: a field is missing or malformed ({type(exc).__name__}: {exc}); "
                              f"export the model again") from None
    found = classify_path(root)
    if found.kind != "checkpoint":
        raise found.refuse(f"a `zoo export` artifact folder or {CHECKPOINT}")
    return _checkpoint(root, step)


def greedy(artifact: Artifact, prompt: Sequence[int], max_new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """The next-token logits after ``prompt`` and a greedy continuation of up to ``max_new_tokens``.

    Uses ``prefill`` then ``step`` where the artifact has them, else reruns ``forward`` on the
    growing sequence. A static-shape artifact needs a prompt of exactly its sequence length and,
    without ``step``, continues by one token. Raises ``ExportError`` (one line) for a prompt id outside
    ``[0, vocab_size)`` and for a prompt longer than the config's ``context_length``, which bounds each
    forward or prefill call (decoding with ``step`` may go past it; a forward rerun may not).
    """
    outside = [t for t in prompt if not 0 <= t < artifact.vocab_size]
    if outside:
        raise ExportError(f"prompt id {outside[0]} is outside the vocabulary of {artifact.path}: valid ids are 0 "
                          f"to {artifact.vocab_size - 1}")
    limit = artifact.context_length
    stateful = {"prefill", "step"} <= artifact.entries
    longest = len(prompt) + (0 if stateful or artifact.static else max_new_tokens - 1)
    if 0 < limit < longest:
        raise ExportError(f"{artifact.path}: context_length={limit} bounds each forward or prefill call (decoding "
                          f"with step may go past it); the prompt has {len(prompt)} tokens"
                          + ("" if longest == len(prompt) else
                             f", and without a step entry forward reruns on up to {longest}"))
    batch = 1
    if artifact.static is not None:
        batch, length = artifact.static
        if len(prompt) != length:
            raise ExportError(f"{artifact.path} has static shapes (batch {batch}, sequence {length}); "
                              f"give exactly {length} prompt ids (got {len(prompt)})")
    tokens = np.tile(np.asarray([prompt], np.int32), (batch, 1))
    if stateful:
        logits, state = artifact.prefill(tokens, np.full((batch,), len(prompt), np.int32))
    elif "forward" in artifact.entries:
        logits = artifact.forward(tokens)
    else:
        raise ExportError(f"{artifact.path} has neither a forward entry nor prefill and step")
    from zoo.inference import decode_loop

    first = logits[0, -1]

    def next_token(last: np.ndarray) -> np.ndarray:
        return np.full((batch,), np.argmax(last), np.int32)

    def step(token: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        step_logits, state = artifact.step(token, state)
        return next_token(step_logits[0]), state

    def rerun(token: np.ndarray, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sequence = np.concatenate([sequence, token[:, None]], axis=1)
        return next_token(artifact.forward(sequence)[0, -1]), sequence

    if stateful:
        out = decode_loop(step, next_token(first), state, max_new_tokens)
    else:  # a static-shape forward cannot take a longer sequence: one token
        out = decode_loop(rerun, next_token(first), tokens, 1 if artifact.static is not None else max_new_tokens)
    return first, [int(token[0]) for token in out.tokens]
