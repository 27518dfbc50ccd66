"""Load any artifact (Orbax checkpoint, StableHLO, SavedModel) behind one NumPy interface, for ``zoo run``."""

from __future__ import annotations

import json
import os
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
    _calls: dict[str, Any] = field(default_factory=dict, repr=False)

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``(B, S, V)`` for int32 tokens ``(B, S)``."""
        return np.asarray(self._calls["forward"](tokens))

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        """Logits ``(B, S, V)`` and the state after ``tokens``."""
        return self._calls["prefill"](tokens)

    def step(self, token: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """Logits ``(B, V)`` for one more token per sequence, and the new state."""
        return self._calls["step"](token, state)


def _checkpoint(path: Path) -> Artifact:
    import zoo.api
    from zoo.export.checkpoint import CheckpointError, load

    try:
        config, params = load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} has no manifest.json (not a `zoo export` directory) and is not a loadable "
                              f"checkpoint: {exc}") from exc
    calls = {
        "forward": lambda t: zoo.api.forward(config, params, t),
        "prefill": lambda t: _as_numpy(zoo.api.prefill(config, params, t)),
        "step": lambda t, s: _as_numpy(zoo.api.step(config, params, t, s)),
    }
    return Artifact(path, "checkpoint", config.vocab_size, frozenset(calls), _calls=calls)


def _as_numpy(result: tuple[Any, Any], squeeze: bool = False) -> tuple[np.ndarray, Any]:
    logits = np.asarray(result[0])
    return (logits[:, 0] if squeeze else logits), result[1]


def inside(root: Path, name: str) -> Path:
    """``root / name`` when it stays inside ``root`` (no ``..``, absolute paths or links out); else ExportError."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ExportError(f"{root / 'manifest.json'} names {name!r}, outside the artifact directory; refusing it")
    return target


def _stablehlo(path: Path, manifest: dict[str, Any]) -> Artifact:
    import jax
    from jax import export

    if manifest["weights"] != "baked":
        raise ExportError(f"{path} was exported with --weights separate; zoo run needs baked weights")
    exported = {name: jax.jit(export.deserialize(inside(path, e["file"]).read_bytes()).call)
                for name, e in manifest["entries"].items()}
    calls: dict[str, Any] = {"forward": exported.get("forward")}
    if "prefill" in exported:
        calls["prefill"] = lambda t: _as_numpy(exported["prefill"](t))
    if "step" in exported:
        calls["step"] = lambda t, s: _as_numpy(exported["step"](t, s), squeeze=True)
    static = manifest.get("static_dims")
    return Artifact(path, "stablehlo", manifest["vocab_size"], frozenset(exported),
                    (static["b"], static["s"]) if static else None, calls)


def _savedmodel(path: Path, manifest: dict[str, Any]) -> Artifact:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ExportError(f"running a SavedModel needs TensorFlow ({exc}); "
                          "pip install 'xlstm-zoo[savedmodel]'") from exc

    loaded = tf.saved_model.load(str(path))
    signatures = {name: loaded.signatures[e["signature"]] for name, e in manifest["entries"].items()}

    def split(result: dict[str, Any], squeeze: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        state = {k: v for k, v in result.items() if k.startswith("state_")}
        return _as_numpy((result["logits"].numpy(), state), squeeze)

    calls: dict[str, Any] = {}
    if "forward" in signatures:
        calls["forward"] = lambda t: signatures["forward"](tokens=tf.constant(t))["logits"].numpy()
    if "prefill" in signatures:
        calls["prefill"] = lambda t: split(signatures["prefill"](tokens=tf.constant(t)))
    if "step" in signatures:
        calls["step"] = lambda t, state: split(signatures["step"](token=tf.constant(t), **state), squeeze=True)
    return Artifact(path, "savedmodel", manifest["vocab_size"], frozenset(signatures), _calls=calls)


def open_artifact(path: str | os.PathLike) -> Artifact:
    """Load an export directory (by its ``manifest.json``) or an Orbax checkpoint directory."""
    root = Path(path).expanduser().resolve()
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        loaders = {"stablehlo": _stablehlo, "savedmodel": _savedmodel}
        if manifest.get("format") not in loaders:
            raise ExportError(f"{manifest_path} names format {manifest.get('format')!r}; zoo run knows "
                              f"{', '.join(loaders)} and Orbax checkpoints")
        return loaders[manifest["format"]](root, manifest)
    if not root.is_dir():
        raise ExportError(f"{root} is not a directory; give a `zoo export` or `zoo build` output directory")
    return _checkpoint(root)


def greedy(artifact: Artifact, prompt: Sequence[int], max_new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """The next-token logits after ``prompt`` and a greedy continuation of up to ``max_new_tokens``.

    Uses ``prefill`` then ``step`` where the artifact has them, else reruns ``forward`` on the
    growing sequence. A static-shape artifact needs a prompt of exactly its sequence length and,
    without ``step``, continues by one token.
    """
    batch = 1
    if artifact.static is not None:
        batch, length = artifact.static
        if len(prompt) != length:
            raise ExportError(f"{artifact.path} has static shapes (batch {batch}, sequence {length}); "
                              f"give exactly {length} prompt ids (got {len(prompt)})")
    tokens = np.tile(np.asarray([prompt], np.int32), (batch, 1))
    stateful = {"prefill", "step"} <= artifact.entries
    if stateful:
        logits, state = artifact.prefill(tokens)
    elif "forward" in artifact.entries:
        logits = artifact.forward(tokens)
    else:
        raise ExportError(f"{artifact.path} has neither a forward entry nor prefill and step")
    first = last = logits[0, -1]
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        generated.append(int(np.argmax(last)))
        if len(generated) == max_new_tokens or (not stateful and artifact.static is not None):
            break
        if stateful:
            step_logits, state = artifact.step(np.full((batch,), generated[-1], np.int32), state)
            last = step_logits[0]
        else:
            tokens = np.concatenate([tokens, np.full((batch, 1), generated[-1], np.int32)], axis=1)
            last = artifact.forward(tokens)[0, -1]
    return first, generated
