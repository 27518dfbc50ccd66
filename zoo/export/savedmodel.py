"""TF SavedModel artifacts through jax2tf: params as ``tf.Variable``s, polymorphic batch and sequence.

Signatures (keyword tensors in, a dict of tensors out; ``state_*`` are the decoding-state arrays
listed in ``manifest.json``)::

    serving_default(tokens int32 [B, S])                  -> logits [B, S, V]
    prefill(tokens int32 [B, S], lengths int32 [B])       -> logits [B, S, V], state_c, state_n, ...
    step(token int32 [B], state_c, state_n, ...)          -> logits [B, V], state_c, state_n, ...

The artifact needs only TensorFlow: ``tf.saved_model.load(DIR).signatures["step"](token=..., ...)``.
All signatures read one set of variables: the weights are stored once, in their own dtypes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from zoo.config import ModelConfig
from zoo.export.entries import (ENTRIES, PLATFORMS, ExportError, check_request, common_manifest, make_entries,
                                new_directory)
from zoo.registry import hookimpl
from zoo.staging import staged

SIGNATURE_OF_ENTRY = {"forward": "serving_default", "prefill": "prefill", "step": "step"}


def import_tensorflow(why: str) -> Any:
    """TensorFlow, imported without its start-up log lines (oneDNN, CPU features) unless the caller asked for them
    by setting ``TF_CPP_MIN_LOG_LEVEL`` or ``TF_ENABLE_ONEDNN_OPTS``. Raises ExportError, naming ``why``, when
    TensorFlow is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The oneDNN notice ignores the log level. jax2tf runs the model in XLA, not in TF's oneDNN kernels.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ExportError(f"{why} needs TensorFlow ({exc}); pip install 'xlstm-zoo[savedmodel]'") from exc
    return tf


def _shape_spec(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _tensor_spec(tf: Any, aval: Any, name: str) -> Any:
    return tf.TensorSpec([d if isinstance(d, int) else None for d in aval.shape], tf.as_dtype(aval.dtype), name=name)


def _spec_rows(specs: dict[str, Any]) -> list[dict[str, Any]]:
    """Name, shape (``?`` where polymorphic) and dtype of each named ``tf.TensorSpec``."""
    return [{"name": name, "shape": [d if d is not None else "?" for d in spec.shape.as_list()],
             "dtype": spec.dtype.name} for name, spec in specs.items()]


def _flat_inputs(entry: Any) -> list[tuple[str, Any]]:
    if entry.name != "step":
        return list(zip(entry.arg_names, entry.args))
    token, state = entry.args
    return [("token", token), *((f"state_{k}", v) for k, v in state.items())]


def _serving_fn(converted: Any, module: Any, name: str, arg_names: Sequence[str]) -> Any:
    """Keyword tensors in, a dict of named tensors out: what a SavedModel signature needs."""
    def serve(**inputs: Any) -> dict[str, Any]:
        if name == "step":
            state = {k.removeprefix("state_"): v for k, v in inputs.items() if k.startswith("state_")}
            result = converted(module.params, inputs["token"], state)
        else:
            result = converted(module.params, *(inputs[arg] for arg in arg_names))
        if name == "forward":
            return {"logits": result}
        logits, state = result
        return {"logits": logits, **{f"state_{k}": v for k, v in state.items()}}

    return serve


def export_savedmodel(config: ModelConfig, params: Any, out_dir: str | os.PathLike, *,
                      platforms: Sequence[str] = PLATFORMS, entries: Sequence[str] = ENTRIES,
                      weights: str | None = None, static: tuple[int, int] | None = None, mlir: bool = False) -> Path:
    """Write a SavedModel with one signature per entry (``forward`` is ``serving_default``) and a manifest.

    The params become one set of ``tf.Variable``s, in their own dtypes, read by every signature. Raises
    ``ExportError`` for weights other than ``"variables"``, for ``static`` or ``mlir`` (StableHLO options),
    for an unknown or repeated entry or platform, an ``out_dir`` that is a file or not empty, and when TensorFlow
    is not installed. The folder is written under a staging name and renamed into place when complete.
    """
    if weights not in (None, "variables"):
        raise ExportError(f"savedmodel stores params as tf.Variables (weights 'variables'); got {weights!r}")
    if static is not None:
        raise ExportError("savedmodel signatures are polymorphic in batch and sequence; --static applies to stablehlo")
    if mlir:
        raise ExportError("savedmodel has no .mlir text to write; --mlir applies to stablehlo")
    check_request(config, entries, platforms)
    tf = import_tensorflow("savedmodel export")
    from jax.experimental import jax2tf

    out = new_directory(out_dir)
    module = tf.Module()
    module.params = jax.tree_util.tree_map(lambda x: tf.Variable(np.asarray(x), trainable=False), params)
    signatures: dict[str, Any] = {}
    manifest_signatures: dict[str, Any] = {}
    for entry in make_entries(config, entries, platforms=platforms):
        poly = [None] + [jax.tree_util.tree_map(lambda a: _shape_spec(a.shape), arg) for arg in entry.args]
        converted = jax2tf.convert(entry.fn, polymorphic_shapes=poly, with_gradient=False,
                                   native_serialization_platforms=tuple(platforms))
        specs = {name: _tensor_spec(tf, aval, name) for name, aval in _flat_inputs(entry)}
        function = tf.function(_serving_fn(converted, module, entry.name, entry.arg_names), autograph=False)
        concrete = function.get_concrete_function(**specs)
        signatures[SIGNATURE_OF_ENTRY[entry.name]] = concrete
        manifest_signatures[entry.name] = {
            "signature": SIGNATURE_OF_ENTRY[entry.name],
            "inputs": _spec_rows(specs),
            "outputs": _spec_rows(concrete.structured_outputs),
        }
    manifest = common_manifest(config, "savedmodel", platforms, entries)
    manifest.update({"entries": manifest_signatures, "weights": "variables", "tensorflow_version": tf.__version__,
                     "symbolic_dims": {"b": "batch size", "s": "sequence length"}})
    with staged(out) as staging:  # a failed or interrupted save leaves no out_dir
        tf.saved_model.save(module, str(staging), signatures=signatures)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


@hookimpl
def register_exporters(register):
    register("savedmodel", export_savedmodel, description="TF SavedModel via jax2tf, params as tf.Variables",
             weights=("variables",))
