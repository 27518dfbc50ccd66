"""NX-AI PyTorch xlstm checkpoints <-> zoo checkpoints, read and written with safetensors (no torch needed).

Three source formats (tensor names and config fields as NX-AI's ``xlstm`` package writes them, github.com/NX-AI/xlstm):

* ``xlstm_large`` (xLSTM-7B): ``model.safetensors`` or ``model_N.safetensors`` shards (or an index),
  plus ``config.yaml`` (an ``xLSTMLargeConfig``). It becomes ``layer_type: mlstm_v1``. ``to_torch``
  writes this format back.
* ``hf_xlstm``: a Hugging Face ``xlstm`` folder, as ``transformers``' ``xLSTMForCausalLM.save_pretrained``
  writes it (``config.json`` with ``model_type: xlstm``, the same tensors under ``backbone.``). It
  becomes ``layer_type: mlstm_v1``.
* NeurIPS ``xLSTMLMModel`` with mLSTM blocks only: a state dict in safetensors plus its
  ``xLSTMLMModelConfig`` as YAML or JSON. It becomes ``layer_type: mlstm``.

Every field of the source config is mapped into the zoo config, stored in the checkpoint metadata
(the token ids, under ``tokens``), ignored for the reason given in ``IGNORED_LARGE`` /
``IGNORED_NEURIPS`` (kernel and runtime choices, fields xlstm derives itself), or refused by name: a
value the zoo cannot represent, or a field the converter does not know. Everything is checked
before a byte is written: every tensor the model needs must be present with the right shape, no
tensor may be left over, every file must read. Tensors are then read and transformed one at a time,
keeping their dtype.

Both directions handle every parameter layout the zoo produces: blocks stacked on a leading axis
(``scan_blocks: true``) or one subtree per block, tied or untied heads, float32 or bfloat16 params.
``to_torch`` also writes the full zoo config (``zoo_config.json``), so zoo -> torch -> zoo is lossless.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from zoo.config import ModelConfig, proj_up_dim
from zoo.errors import ZooError
from zoo.staging import staged

XLSTM_LARGE = "xlstm_large"
HF_XLSTM = "hf_xlstm"
NEURIPS = "neurips"
BACKEND = {"name": "chunkwise", "kwargs": {"chunk_size": 64}}
ZOO_CONFIG = "zoo_config.json"
"""The full zoo config, written by ``to_torch`` beside ``config.yaml`` (xlstm ignores it) and read back by
``from_torch``: the settings xlstm_large cannot hold (context length, backends, init ranges, compute dtype,
layout, tying, ...) survive the round trip."""
TORCH_FOLDER = "a PyTorch xlstm folder (config.yaml or config.json, and model.safetensors or shards)"
ZOO_CHECKPOINT = "an mlstm_v1 zoo checkpoint folder (written by `zoo build`, `zoo convert torch` or zoo.save)"


class ConvertError(ZooError, ValueError):
    """The source cannot be converted exactly: a wrong folder, an unreadable file, a missing, unexpected or
    misshapen tensor, or a config field that cannot be represented."""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- the source folder and its config ----------------------------------------------------------


def _torch_folder(src: str | os.PathLike) -> Path:
    """The resolved source folder; ``ConvertError`` saying what was expected and found when it is not one."""
    from zoo.checkpoint import classify_path

    found = classify_path(src)
    if found.kind == "torch":
        return found.path
    if found.kind == "checkpoint":
        what = "a zoo checkpoint folder; to convert it to PyTorch use `zoo convert to-torch`"
    elif found.kind == "step":
        what = (f"step folder {found.path.name} of the zoo checkpoint {found.path.parent}; to convert it to PyTorch "
                f"use `zoo convert to-torch {found.path.parent} --step {found.path.name}`")
    else:
        what = found.found
    raise ConvertError(f"{found.path}: expected {TORCH_FOLDER}; found {what}")


def read_source_config(src: Path) -> tuple[str, dict[str, Any], Path]:
    """The format name (``xlstm_large``, ``hf_xlstm`` or ``neurips``), the PyTorch config dict in ``src`` and
    the file it came from.

    Raises ``ConvertError`` naming the file when there is none, or when it is unreadable, not UTF-8, over
    ``zoo.config_source.MAX_CONFIG_BYTES``, malformed, nested deeper than ``zoo.config_source.MAX_CONFIG_DEPTH`` or not a mapping.
    """
    from zoo.config_source import MAX_CONFIG_BYTES, ConfigSourceError, check_depth

    for name in ("config.yaml", "config.yml", "config.json"):
        path = src / name
        if path.is_file():
            break
    else:
        raise ConvertError(f"{src}: expected {TORCH_FOLDER}; found no config.yaml or config.json")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConvertError(f"{path}: {size:,} bytes is over the {MAX_CONFIG_BYTES:,}-byte limit of a config file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        check_depth(data, str(path))
    except ConvertError:
        raise
    except ConfigSourceError as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:
        raise ConvertError(f"{path} cannot be read: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # not UTF-8, JSON or YAML or nesting errors: the file is not a config
        raise ConvertError(f"{path} cannot be parsed: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: the top level must be a mapping")
    if "mlstm_block" in data or "slstm_block" in data:
        return NEURIPS, data, path
    if "model_type" in data:
        return HF_XLSTM, data, path
    if not {"num_heads", "embedding_dim", "hidden_size"} & set(data):
        raise ConvertError(f"{path} is neither an xlstm_large or Hugging Face xlstm config (num_heads, "
                           f"embedding_dim, ...) nor a NeurIPS xLSTMLMModelConfig (mlstm_block, ...)")
    return XLSTM_LARGE, data, path


def _shard_files(src: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of ``src`` and, for an index, the file it names for each tensor."""
    single = src / "model.safetensors"
    if single.is_file():
        return [single], None
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except Exception as exc:  # unreadable, not UTF-8, malformed, or no weight_map
            raise ConvertError(f"{index} cannot be read as a safetensors index: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{index}: weight_map must map tensor names to shard file names")
        where = {key: (src / name).resolve() for key, name in weight_map.items()}
        files = sorted(set(where.values()))
        outside = [str(f) for f in files if not f.is_relative_to(src.resolve())]
        if outside:
            raise ConvertError(f"{index} names shard files outside {src}: {', '.join(outside)}; refusing them")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{index} names shard file(s) that {src} does not hold: {', '.join(missing)}")
        return files, where
    shards = sorted(src.glob("model_*.safetensors"), key=lambda p: (0, int(p.stem.split("_")[-1]), "")
                    if p.stem.split("_")[-1].isdigit() else (1, 0, p.stem))
    if not shards:
        raise ConvertError(f"{src}: expected {TORCH_FOLDER}; found no model.safetensors, model_N.safetensors shards "
                           f"or index")
    return shards, None


class TensorSource:
    """Lazy access to the tensors of one or more safetensors files: names and shapes first, data on demand."""

    def __init__(self, files: list[Path], stack: ExitStack, where: Mapping[str, Path] | None = None) -> None:
        """Raises ``ConvertError`` naming the file that is not a complete safetensors file, a tensor found in
        two files, or a tensor ``where`` (an index) places in another file or that no file holds."""
        from safetensors import safe_open

        self._handles: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.nbytes = 0
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="numpy"))
                pieces = {key: handle.get_slice(key) for key in handle.keys()}
                found = {key: (tuple(p.get_shape()), p.get_dtype()) for key, p in pieces.items()}
            except Exception as exc:  # truncated, not safetensors, unreadable
                raise ConvertError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from None
            for key, (shape, dtype) in found.items():
                if key in self._handles:
                    raise ConvertError(f"tensor {key!r} appears in more than one shard")
                if where is not None and where.get(key) != path.resolve():
                    raise ConvertError(f"tensor {key!r} is in {path.name}, but the index places it in "
                                       f"{where[key].name if key in where else 'no file'}")
                self._handles[key] = (handle, path)
                self.shapes[key], self.dtypes[key] = shape, dtype
                self.nbytes += math.prod(shape) * _itemsize(dtype)
        absent = sorted(set(where or ()) - set(self.shapes))
        if absent:
            raise ConvertError(f"the index places tensor(s) {', '.join(absent[:8])} in files that do not hold them")

    def get(self, key: str) -> np.ndarray:
        """One tensor as a NumPy array (bfloat16 through ml_dtypes); ``ConvertError`` when it cannot be read."""
        handle, path = self._handles[key]
        try:
            if self.dtypes[key] != "BF16":
                return handle.get_tensor(key)
            from safetensors import safe_open

            with safe_open(str(path), framework="flax") as flax_handle:  # older safetensors: no NumPy bfloat16
                return np.asarray(flax_handle.get_tensor(key))
        except Exception as exc:  # the file changed or broke after its header was read
            raise ConvertError(f"{path}: tensor {key!r} cannot be read: {_first_line(exc)}") from None


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dtype, 4)


# -- configs ---------------------------------------------------------------------------------

RUNTIME = "a PyTorch kernel, precision or inference-mode setting; the zoo picks its cell backends in its own config"
HF_SETTING = "a Hugging Face loading or task setting; it changes neither the weights nor the logits"
IGNORED_LARGE: dict[str, str] = {
    **dict.fromkeys(("chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "chunk_size",
                     "return_last_states", "autocast_kernel_dtype", "inference_state_dtype",
                     "max_inference_chunksize", "use_cache"), RUNTIME),
    "norm_reduction_force_float32": "the zoo's norms always reduce in float32 (or wider)",
    "weight_mode": "the tensor names tell single from fused weights",
    **dict.fromkeys(("dtype", "torch_dtype"), "the tensors' own dtype sets the default compute dtype (`--dtype` "
                                              "overrides it); params keep the tensors' dtype"),
    **dict.fromkeys(("transformers_version", "architectures", "_name_or_path", "output_hidden_states",
                     "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
                     "id2label", "label2id", "problem_type"), HF_SETTING),
}
"""Fields of xlstm's ``xLSTMLargeConfig`` and of transformers' ``xLSTMConfig`` that do not change the model, and why."""
MAPPED_LARGE = ("embedding_dim", "hidden_size", "num_blocks", "num_hidden_layers", "num_heads", "vocab_size",
                "use_bias", "eps", "norm_eps", "add_out_norm", "qk_dim_factor", "v_dim_factor", "gate_soft_cap",
                "output_logit_soft_cap", "ffn_proj_factor", "ffn_round_up_to_multiple_of", "tie_word_embeddings",
                "model_type")
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "force_bos_token_insert")
"""Hugging Face token settings (``force_bos_token_insert`` is NX-AI's): kept in the metadata under ``tokens``."""

DERIVED = "xlstm derives it from the other fields"
COPIED = "xLSTMBlockStackConfig overwrites it with the model-level value"
NEURIPS_LAYER_FIELDS = ("proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "conv1d_kernel_size",
                        "qkv_proj_blocksize", "num_heads")
IGNORED_NEURIPS: dict[str, str] = {
    "_block_map": DERIVED,
    "slstm_block": "unused while slstm_at is empty (sLSTM blocks are refused)",
    "mlstm_block._num_blocks": DERIVED,
    "mlstm_block._block_idx": DERIVED,
    **{f"mlstm_block.mlstm.{name}": DERIVED for name in ("_num_blocks", "_proj_up_dim", "_inner_embedding_dim")},
    **{f"mlstm_block.mlstm.{name}": COPIED for name in ("embedding_dim", "bias", "dropout", "context_length")},
}
"""Fields of xlstm's ``xLSTMLMModelConfig`` (dotted below ``mlstm_block``) that do not change the model, and why."""
MAPPED_NEURIPS = ("vocab_size", "embedding_dim", "num_blocks", "context_length", "add_post_blocks_norm", "bias",
                  "dropout", "tie_weights", "weight_decay_on_embedding", "add_embedding_dropout", "slstm_at",
                  "mlstm_block", "mlstm_block.mlstm", *(f"mlstm_block.mlstm.{name}" for name in NEURIPS_LAYER_FIELDS))

_MISSING = object()
_NUMBER = (int, float)


def _refuse(field: str, value: Any, why: str) -> None:
    raise ConvertError(f"config field {field}={value!r} cannot be represented: {why}")


def _refuse_unknown(fields: list[str], known: tuple[str, ...] | dict[str, str], *more: Any) -> None:
    unknown = sorted(set(fields) - set(known).union(*more))
    if unknown:
        raise ConvertError(f"config field(s) {', '.join(unknown)} unknown to the converter; refusing to drop "
                           f"{'it' if len(unknown) == 1 else 'them'} silently")


def _get(cfg: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any = _MISSING,
         where: str = "") -> Any:
    """``cfg[name]`` (or ``default``), refused by name when missing or of another type (a bool is no number)."""
    if name not in cfg:
        if default is _MISSING:
            raise ConvertError(f"config field {where}{name} is missing")
        return default
    value = cfg[name]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ConvertError(f"config field {where}{name}={value!r} must be {names}")
    return value


def _aliased(cfg: Mapping[str, Any], name: str, alias: str) -> int:
    """A size given under its xlstm name, its Hugging Face name or both (then they must agree)."""
    values = {n: v for n in (name, alias) if (v := _get(cfg, n, (int, type(None)), None)) is not None}
    if not values:
        raise ConvertError(f"config field {name} (or {alias}) is missing")
    if len(set(values.values())) > 1:
        raise ConvertError(f"config fields {name}={values[name]!r} and {alias}={values[alias]!r} disagree")
    return next(iter(values.values()))


def _ffn_sizes(P: int, D: int, factor: float, multiple: int) -> dict[str, Any]:
    """FFN fields giving exactly ``P``: the source's own factor when zoo rounding reproduces it."""
    if proj_up_dim(factor, D, multiple, True) == P:
        return {"proj_factor": factor, "round_proj_up_to_multiple_of": multiple, "round_proj_up_dim_up": True}
    return {"proj_factor": (P + 0.5) / D, "round_proj_up_to_multiple_of": 1, "round_proj_up_dim_up": False}


def zoo_config_xlstm_large(cfg: Mapping[str, Any], ffn_dim: int, dtype: str, hf: bool = False) -> dict[str, Any]:
    """The zoo config reproducing an ``xLSTMLargeConfig`` (``hf``: a transformers ``xLSTMConfig``).

    ``ffn_dim`` is the FFN width of the tensors. Raises ``ConvertError`` naming the field that is
    unknown, missing, mistyped or not representable.
    """
    _refuse_unknown(list(cfg), MAPPED_LARGE, IGNORED_LARGE, TOKEN_FIELDS)
    if hf and cfg.get("model_type") != "xlstm":
        _refuse("model_type", cfg.get("model_type"), "a Hugging Face xlstm config has model_type 'xlstm'")
    D = _aliased(cfg, "embedding_dim", "hidden_size")
    if _get(cfg, "use_bias", (bool,), False):
        _refuse("use_bias", True, "xlstm_large then adds biases to every norm, which the zoo's norms do not have")
    if _get(cfg, "eps", _NUMBER, 1e-6) != 1e-6:
        _refuse("eps", cfg["eps"], "the zoo's cells use eps=1e-6")
    add_out_norm = _get(cfg, "add_out_norm", (bool,), True)
    if hf and not add_out_norm:
        _refuse("add_out_norm", False, "transformers' xLSTMForCausalLM applies backbone.out_norm whatever "
                                       "add_out_norm says")
    factor = _get(cfg, "ffn_proj_factor", _NUMBER, 2.667 if hf else 2.6667)
    multiple = _get(cfg, "ffn_round_up_to_multiple_of", (int,), 64)
    if multiple < 1:
        _refuse("ffn_round_up_to_multiple_of", multiple, "it must be at least 1")
    width = int(((D * factor + multiple - 1) // multiple) * multiple)  # xlstm's round_up_to_next_multiple_of
    if width != ffn_dim:
        raise ConvertError(f"config fields ffn_proj_factor={factor!r} and ffn_round_up_to_multiple_of={multiple!r} "
                           f"give an FFN width of {width}; the tensors have {ffn_dim}")
    norm_eps = float(_get(cfg, "norm_eps", _NUMBER, 1e-6))
    return {
        "vocab_size": _get(cfg, "vocab_size", (int,)), "embedding_dim": D,
        "num_blocks": _aliased(cfg, "num_blocks", "num_hidden_layers"),
        "dtype": dtype, "norm_type": "rmsnorm", "norm_eps": norm_eps,
        "logits_soft_cap": _get(cfg, "output_logit_soft_cap", (*_NUMBER, type(None)), 30.0),
        "add_post_blocks_norm": add_out_norm, "tie_weights": _get(cfg, "tie_word_embeddings", (bool,), False),
        "mlstm_block": {
            "mlstm": {
                "layer_type": "mlstm_v1", "num_heads": _get(cfg, "num_heads", (int,)),
                "qk_dim_factor": float(_get(cfg, "qk_dim_factor", _NUMBER, 0.5)),
                "v_dim_factor": float(_get(cfg, "v_dim_factor", _NUMBER, 1.0)),
                "mlstm_cell": {"norm_eps": norm_eps, "norm_type_v1": "layernorm",
                               "gate_soft_cap": _get(cfg, "gate_soft_cap", (*_NUMBER, type(None)), 15.0),
                               "backend": BACKEND},
            },
            "feedforward": {"act_fn": "swish", "ff_type": "ffn_gated", **_ffn_sizes(ffn_dim, D, factor, multiple)},
        },
    }


def token_settings(cfg: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The ``TOKEN_FIELDS`` present in ``cfg``, checked: ids in ``[0, vocab_size)`` (eos may be a list), or null."""
    tokens: dict[str, Any] = {}
    for name in TOKEN_FIELDS[:3]:
        if name in cfg:
            value = cfg[name]
            ids = value if isinstance(value, list) else [value]
            if value is not None and not (ids and all(type(i) is int and 0 <= i < vocab_size for i in ids)):
                raise ConvertError(f"config field {name}={value!r} must be a token id in [0, {vocab_size}), a list "
                                   f"of them, or null")
            tokens[name] = value
    if "force_bos_token_insert" in cfg:
        tokens["force_bos_token_insert"] = _get(cfg, "force_bos_token_insert", (bool,))
    return tokens


def codec_settings(tokens: Mapping[str, Any]) -> dict[str, Any]:
    """``token_settings`` as ``zoo.tokenizers.Codec.to_json`` settings (``force_bos_token_insert`` is ``add_bos``)."""
    eos = tokens.get("eos_token_id")
    return {"bos_id": tokens.get("bos_token_id"), "pad_id": tokens.get("pad_token_id"),
            "eos_ids": eos if isinstance(eos, list) else [] if eos is None else [eos],
            "add_bos": tokens.get("force_bos_token_insert", False)}


def zoo_config_neurips(cfg: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """The zoo config reproducing an ``xLSTMLMModelConfig`` made of mLSTM blocks.

    Raises ``ConvertError`` naming the field that is unknown, missing, mistyped or not representable.
    """
    block = _get(cfg, "mlstm_block", (dict,), None)
    if block is None:
        _refuse("mlstm_block", None, "a NeurIPS config needs an mlstm_block")
    if "mlstm" in block and "mlstm_layer" in block:
        raise ConvertError("config fields mlstm_block.mlstm and mlstm_block.mlstm_layer both set; give one")
    block = {("mlstm" if k == "mlstm_layer" else k): v for k, v in block.items()}
    layer = _get(block, "mlstm", (dict,), {}, "mlstm_block.")
    _refuse_unknown([*cfg, *(f"mlstm_block.{k}" for k in block), *(f"mlstm_block.mlstm.{k}" for k in layer)],
                    MAPPED_NEURIPS, IGNORED_NEURIPS)
    slstm_at = _get(cfg, "slstm_at", (list, str), [])
    if slstm_at:
        _refuse("slstm_at", slstm_at, "sLSTM blocks cannot be imported; only mLSTM blocks")
    kinds = {"proj_factor": _NUMBER, "round_proj_up_dim_up": (bool,)}
    layer_fields = {k: _get(layer, k, kinds.get(k, (int,)), where="mlstm_block.mlstm.")
                    for k in NEURIPS_LAYER_FIELDS if k in layer}
    return {
        "vocab_size": _get(cfg, "vocab_size", (int,)), "embedding_dim": _get(cfg, "embedding_dim", (int,), 128),
        "num_blocks": _get(cfg, "num_blocks", (int,), 1),
        "dtype": dtype, "norm_type": "layernorm", "norm_eps": 1e-5, "logits_soft_cap": None,
        "add_post_blocks_norm": _get(cfg, "add_post_blocks_norm", (bool,), True),
        "tie_weights": _get(cfg, "tie_weights", (bool,), False), "bias": _get(cfg, "bias", (bool,), False),
        "dropout": float(_get(cfg, "dropout", _NUMBER, 0.0)),
        "add_embedding_dropout": _get(cfg, "add_embedding_dropout", (bool,), False),
        "weight_decay_on_embedding": _get(cfg, "weight_decay_on_embedding", (bool,), False),
        "context_length": _get(cfg, "context_length", (int,), -1),
        "mlstm_block": {"mlstm": {
            "layer_type": "mlstm", "qk_dim_factor": 1.0, "v_dim_factor": 1.0, "gate_input": "qkv", **layer_fields,
            "mlstm_cell": {"norm_eps": 1e-5, "gate_soft_cap": None, "gate_linear_headwise": False,
                           "backend": BACKEND},
        }},
    }


def map_config(fmt: str, cfg: Mapping[str, Any], *, dtype: str, ffn_dim: int = 0) -> tuple[dict[str, Any],
                                                                                         dict[str, Any]]:
    """``(zoo config dict, token settings)`` for the source config ``cfg`` of format ``fmt``.

    ``ffn_dim`` is the FFN width of the tensors (``xlstm_large``, ``hf_xlstm``). Every field of
    ``cfg`` is mapped, ignored for the reason in ``IGNORED_LARGE``/``IGNORED_NEURIPS``, or refused:
    ``ConvertError`` names it.
    """
    if fmt == NEURIPS:
        return zoo_config_neurips(cfg, dtype), {}
    zoo_dict = zoo_config_xlstm_large(cfg, ffn_dim, dtype, hf=fmt == HF_XLSTM)
    return zoo_dict, token_settings(cfg, zoo_dict["vocab_size"])


# -- the tensor mapping --------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one zoo parameter comes from: a tensor, an optional row range of it, and a transform."""

    key: str
    transform: Callable[[np.ndarray], np.ndarray]
    rows: tuple[int, int] | None = None


def transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def same(w: np.ndarray) -> np.ndarray:
    return w


def one_plus(w: np.ndarray) -> np.ndarray:
    """NeurIPS LayerNorms store ``w`` and apply ``1 + w`` (in float32: a narrower dtype may not hold it)."""
    return 1 + np.asarray(w, np.float32)


HEAD = "lm_head.weight"


def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def mapping_xlstm_large(cfg: ModelConfig, keys: set[str]) -> dict[str, Source]:
    """zoo param path -> source, for xlstm_large single or fused weights (Hugging Face names accepted).

    Paths name one subtree per block (``blocks_{i}/...``) whatever ``cfg.scan_blocks`` says; a tied
    head has no entry.
    """
    NH = cfg.layer.num_heads
    sizes = cfg.derived_sizes()
    dqk, dv = sizes["qk_dim"], sizes["v_dim"]
    embedding = "backbone.embeddings.weight" if "backbone.embeddings.weight" in keys else "embedding.weight"
    heads = lambda w: w.reshape(NH, -1)  # noqa: E731
    out = {"token_embedding/embedding": Source(embedding, same)}
    if not cfg.tie_weights:
        out["lm_head/kernel"] = Source(HEAD, transpose)
    if cfg.add_post_blocks_norm:
        out["out_norm/scale"] = Source("backbone.out_norm.weight", same)
    P = cfg.mlstm_block.feedforward.proj_up_dim
    for i in range(cfg.num_blocks):
        src, dst = f"backbone.blocks.{i}.", f"blocks_{i}/"
        layer = src + "mlstm_layer."
        out |= {
            dst + "xlstm_norm/scale": Source(src + "norm_mlstm.weight", same),
            dst + "ffn_norm/scale": Source(src + "norm_ffn.weight", same),
            dst + "xlstm/outnorm/scale": Source(layer + "multihead_norm.weight", heads),
            dst + "xlstm/proj_down/kernel": Source(layer + "out_proj.weight", transpose),
            dst + "ffn/proj_down/kernel": Source(src + "ffn.proj_down.weight", transpose),
        }
        if layer + "qkv_opreact.weight" in keys:
            fused = layer + "qkv_opreact.weight"
            bounds = {"q": (0, dqk), "k": (dqk, 2 * dqk), "v": (2 * dqk, 2 * dqk + dv),
                      "o": (2 * dqk + dv, 2 * dqk + 2 * dv)}
            out |= {dst + f"xlstm/dense_{n}/kernel": Source(fused, transpose, rows) for n, rows in bounds.items()}
            for n, rows in (("i", (0, NH)), ("f", (NH, 2 * NH))):
                out[dst + f"xlstm/{n}gate/kernel"] = Source(layer + "ifgate_preact.weight", transpose, rows)
                out[dst + f"xlstm/{n}gate/bias"] = Source(layer + "ifgate_preact.bias", same, rows)
        else:
            for n, key in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "ogate_preact")):
                out[dst + f"xlstm/dense_{n}/kernel"] = Source(layer + f"{key}.weight", transpose)
            for n in ("i", "f"):
                out[dst + f"xlstm/{n}gate/kernel"] = Source(layer + f"{n}gate_preact.weight", transpose)
                out[dst + f"xlstm/{n}gate/bias"] = Source(layer + f"{n}gate_preact.bias", same)
        if src + "ffn.proj_up_gate_z.weight" in keys:
            fused = src + "ffn.proj_up_gate_z.weight"
            out[dst + "ffn/proj_up_gate/kernel"] = Source(fused, transpose, (0, P))
            out[dst + "ffn/proj_up/kernel"] = Source(fused, transpose, (P, 2 * P))
        else:
            out[dst + "ffn/proj_up_gate/kernel"] = Source(src + "ffn.proj_up_gate.weight", transpose)
            out[dst + "ffn/proj_up/kernel"] = Source(src + "ffn.proj_up.weight", transpose)
    return out


def mapping_neurips(cfg: ModelConfig, keys: set[str]) -> dict[str, Source]:
    """zoo param path -> source, for a NeurIPS xLSTMLMModel of mLSTM blocks (one subtree per block)."""
    NH = cfg.layer.num_heads
    Di = cfg.derived_sizes()["inner_dim"]
    heads = lambda w: one_plus(w).reshape(NH, -1)  # noqa: E731
    out = {"token_embedding/embedding": Source("token_embedding.weight", same)}
    if not cfg.tie_weights:
        out["lm_head/kernel"] = Source(HEAD, transpose)
    if cfg.add_post_blocks_norm:
        out["out_norm/scale"] = Source("xlstm_block_stack.post_blocks_norm.weight", one_plus)
    for i in range(cfg.num_blocks):
        src, dst = f"xlstm_block_stack.blocks.{i}.", f"blocks_{i}/"
        layer, x = src + "xlstm.", dst + "xlstm/"
        out |= {
            dst + "xlstm_norm/scale": Source(src + "xlstm_norm.weight", one_plus),
            x + "proj_up_mlstm/kernel": Source(layer + "proj_up.weight", transpose, (0, Di)),
            x + "proj_up_z/kernel": Source(layer + "proj_up.weight", transpose, (Di, 2 * Di)),
            x + "conv1d/kernel": Source(layer + "conv1d.conv.weight", lambda w: np.ascontiguousarray(
                w.transpose(2, 1, 0))),
            x + "conv1d/bias": Source(layer + "conv1d.conv.bias", same),
            x + "mlstm_cell/igate/kernel": Source(layer + "mlstm_cell.igate.weight", transpose),
            x + "mlstm_cell/igate/bias": Source(layer + "mlstm_cell.igate.bias", same),
            x + "mlstm_cell/fgate/kernel": Source(layer + "mlstm_cell.fgate.weight", transpose),
            x + "mlstm_cell/fgate/bias": Source(layer + "mlstm_cell.fgate.bias", same),
            x + "mlstm_cell/outnorm/scale": Source(layer + "mlstm_cell.outnorm.weight", heads),
            x + "learnable_skip": Source(layer + "learnable_skip", same),
            x + "proj_down/kernel": Source(layer + "proj_down.weight", transpose),
        }
        for n in ("q", "k", "v"):
            out[x + f"{n}_proj/kernel"] = Source(layer + f"{n}_proj.weight", same)
        if cfg.layer.bias:
            out |= {
                x + "proj_up_mlstm/bias": Source(layer + "proj_up.bias", same, (0, Di)),
                x + "proj_up_z/bias": Source(layer + "proj_up.bias", same, (Di, 2 * Di)),
                x + "proj_down/bias": Source(layer + "proj_down.bias", same),
                **{x + f"{n}_proj/bias": Source(layer + f"{n}_proj.bias", same) for n in ("q", "k", "v")},
            }
    return out


# -- parameter layouts ---------------------------------------------------------------------------


def per_block(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """``params`` flattened to ``path -> array`` with one ``blocks_{i}/...`` entry per block.

    Scanned blocks (``scan_blocks: true``: one ``blocks/...`` subtree whose leaves have a leading
    ``num_blocks`` axis) are split; arrays keep their dtype.
    """
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, array = _join(tuple(k.key for k in path)), np.asarray(leaf)
        if config.scan_blocks and name.startswith("blocks/"):
            flat |= {f"blocks_{i}/{name.removeprefix('blocks/')}": array[i] for i in range(config.num_blocks)}
        else:
            flat[name] = array
    return flat


def stack_blocks(flat: Mapping[str, np.ndarray], num_blocks: int) -> dict[str, np.ndarray]:
    """The inverse of ``per_block`` for a scanned config: ``blocks_{i}/x`` stacked into ``blocks/x``."""
    out = {k: v for k, v in flat.items() if not k.startswith("blocks_")}
    for name in {k.split("/", 1)[1] for k in flat if k.startswith("blocks_0/")}:
        out[f"blocks/{name}"] = np.stack([flat[f"blocks_{i}/{name}"] for i in range(num_blocks)])
    return out


def _flat_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from zoo.model import param_shapes

    return {_join(tuple(k.key for k in path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# -- conversion ----------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What ``from_torch`` read and wrote."""

    source_format: str
    checkpoint: Path
    tensors: int
    source_bytes: int
    zoo_config: bool = False
    """Whether a ``ZOO_CONFIG`` beside the source config supplied the zoo-only settings."""


@dataclass
class TorchExport:
    """What ``to_torch`` read and wrote: ``source`` names the step ("step 3 of /ck (steps 0-3)")."""

    folder: Path
    source: str
    tensors: int
    nbytes: int


def _new_output(out: str | os.PathLike) -> Path:
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConvertError(f"{out_dir}: expected a new or empty folder for the output; found "
                           f"{'a file' if not out_dir.is_dir() else 'a folder that is not empty'}")
    return out_dir


def _staged(out_dir: Path) -> AbstractContextManager[Path]:
    """A path to write into, renamed to ``out_dir`` when the block succeeds and removed when it fails."""
    return staged(out_dir, prefix=".converting-")


def _check_sources(mapping: Mapping[str, Source], shapes: Mapping[str, tuple[int, ...]], source: TensorSource,
                   optional: set[str]) -> None:
    """Refuse missing and unexpected tensors (``optional`` ones may be left over) before reading any data."""
    needed = {s.key for s in mapping.values()}
    missing = sorted(needed - set(source.shapes))
    if missing:
        raise ConvertError(f"missing tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(set(source.shapes) - needed)
    unexpected = [k for k in extra if k not in optional]
    if unexpected:
        raise ConvertError(f"unexpected tensor(s) the model has no place for: {', '.join(unexpected[:8])}"
                           f"{' ...' if len(unexpected) > 8 else ''}")
    unmapped = sorted(set(shapes) - set(mapping))
    if unmapped:
        raise ConvertError(f"zoo parameter(s) with no source: {', '.join(unmapped)}")


def _read(source: TensorSource, spec: Source, path: str, expected: tuple[int, ...]) -> np.ndarray:
    array = source.get(spec.key)
    if spec.rows is not None:
        start, stop = spec.rows
        if array.shape[0] < stop:
            raise ConvertError(f"tensor {spec.key!r} has shape {array.shape}; rows [{start}, {stop}) are needed "
                               f"for {path}")
        array = array[start:stop]
    value = spec.transform(array)
    if tuple(value.shape) != expected:
        raise ConvertError(f"tensor {spec.key} has shape {tuple(source.shapes[spec.key])}, which "
                           f"gives {tuple(value.shape)} for {path}; the config needs {expected}")
    return value


PARAM_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
"""Source tensor dtypes a param keeps; others are refused by name rather than cast."""


def _check_dtypes(mapping: Mapping[str, Source], source: TensorSource) -> None:
    odd = sorted({f"{s.key} ({source.dtypes[s.key]})" for s in mapping.values()
                  if source.dtypes[s.key] not in PARAM_DTYPES})
    if odd:
        raise ConvertError(f"tensor(s) {', '.join(odd[:8])} have a dtype params cannot keep exactly; expected "
                           f"{', '.join(PARAM_DTYPES)}")


def _source_dtype(source: TensorSource) -> str:
    kinds = {d for d in source.dtypes.values() if d.startswith(("F", "BF"))}
    return "bfloat16" if kinds == {"BF16"} else "float32"


def _ffn_dim(source: TensorSource) -> int:
    for key, shape in sorted(source.shapes.items()):
        if key.endswith("ffn.proj_up.weight"):
            return shape[0]
        if key.endswith("ffn.proj_up_gate_z.weight"):
            return shape[0] // 2
    raise ConvertError("missing tensor(s): backbone.blocks.0.ffn.proj_up.weight")


SOURCE_FIELDS = {
    "vocab_size": ("vocab_size",), "embedding_dim": ("embedding_dim", "hidden_size"),
    "num_blocks": ("num_blocks", "num_hidden_layers"), "mlstm_block.mlstm.num_heads": ("num_heads",),
    "mlstm_block.mlstm.qk_dim_factor": ("qk_dim_factor",), "mlstm_block.mlstm.v_dim_factor": ("v_dim_factor",),
    "mlstm_block.mlstm.mlstm_cell.gate_soft_cap": ("gate_soft_cap",), "logits_soft_cap": ("output_logit_soft_cap",),
    "norm_eps": ("norm_eps",), "mlstm_block.mlstm.mlstm_cell.norm_eps": ("norm_eps",),
}
"""zoo config path -> the xlstm_large / Hugging Face fields it comes from (NeurIPS fields keep the zoo's paths)."""


def _validated(zoo_dict: dict[str, Any], torch_config: Mapping[str, Any], where: Path) -> ModelConfig:
    """``zoo_dict`` as a ``ModelConfig``; else one ``ConvertError`` line naming the source fields and the zoo's
    complaint about each."""
    from pydantic import ValidationError

    from zoo.config_source import load_config

    try:
        return load_config(zoo_dict)
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for error in exc.errors(include_url=False):
            loc = ".".join(str(part) for part in error["loc"])
            names = [n for n in (*SOURCE_FIELDS.get(loc, ()), loc, loc.replace("mlstm_block.mlstm.", "mlstm_block."
                     "mlstm_layer.")) if _dotted(torch_config, n) is not _MISSING]
            given = f"{names[0]}={_dotted(torch_config, names[0])!r} " if names else ""
            problems.setdefault(given, []).append(f"{loc}: {error['msg']}")
        raise ConvertError(f"{where.name}: " + "; ".join(f"{given}gives an invalid zoo config: {'; '.join(why)}"
                                                         for given, why in problems.items())) from None


def _dotted(cfg: Mapping[str, Any], name: str) -> Any:
    for part in name.split("."):
        if not isinstance(cfg, Mapping) or part not in cfg:
            return _MISSING
        cfg = cfg[part]
    return cfg


def _stored_zoo_config(src: Path, fmt: str, from_source: ModelConfig, where: Path) -> ModelConfig | None:
    """The ``ZOO_CONFIG`` beside the source config, when there is one; it must agree with ``from_source`` (the
    model the source config describes) on every field xlstm_large holds, else ``ConvertError`` names them."""
    from pydantic import ValidationError

    from zoo.config_source import ConfigSourceError, load_config

    path = src / ZOO_CONFIG
    if not path.exists():
        return None
    if fmt != XLSTM_LARGE:
        raise ConvertError(f"{path}: `zoo convert to-torch` writes it beside an xlstm_large config.yaml; found it "
                           f"beside a {fmt} config; remove it")
    try:
        stored = load_config(path)
        theirs = xlstm_large_config(stored)
    except ConfigSourceError as exc:
        raise ConvertError(str(exc)) from None
    except OSError as exc:
        raise ConvertError(f"{path} cannot be read: {exc.strerror or _first_line(exc)}") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConvertError(f"{path} holds an invalid zoo config: {'.'.join(map(str, first['loc']))}: "
                           f"{first['msg']}") from None
    except ConvertError as exc:
        raise ConvertError(f"{path}: {exc}") from None
    ours = xlstm_large_config(from_source)
    differ = [f"{k}={ours[k]!r} in {where.name} but {theirs[k]!r} in {ZOO_CONFIG}"
              for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ConvertError(f"{where.name} and {ZOO_CONFIG} describe different models: {'; '.join(differ)}; remove "
                           f"{ZOO_CONFIG} to convert from {where.name} alone")
    return stored


def from_torch(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
               scan_blocks: bool | None = None,
               progress: Callable[[str, int, int, int], None] | None = None) -> ConversionReport:
    """Convert a PyTorch xlstm checkpoint folder into a new zoo checkpoint at ``out``.

    The zoo config comes from the source config; when a ``ZOO_CONFIG`` (written by ``to_torch``) sits
    beside it and agrees with it, from that, so a zoo -> torch -> zoo round trip gives back the same
    config and bitwise-equal params. ``dtype`` overrides the compute dtype (default: the stored zoo
    config's, else bfloat16 for bfloat16 tensors, else float32); params keep each tensor's dtype
    (float32, bfloat16 or float16; NeurIPS norms, stored as ``w`` for ``1 + w``, become float32).
    ``scan_blocks`` stacks the blocks' params on a leading axis (default: the stored zoo config's,
    else not). A tied head (``tie_word_embeddings`` / ``tie_weights`` / the stored ``tie_weights``)
    may be absent or equal to the embedding. The source token ids (``TOKEN_FIELDS``) go into the
    metadata under ``tokens``. A ``tokenizer.json`` in the folder is stored with the step
    (``zoo.tokenizers.load_codec`` reads it), its special tokens from ``zoo_tokenizer.json`` (written by
    ``to_torch``) when there is one, else from the source's token ids (``force_bos_token_insert`` as
    ``add_bos``), else found by name (``Codec.from_tokenizer``). ``progress(param, nbytes, total_params,
    total_bytes)`` is called after each parameter.

    Raises ``ConvertError`` (one line naming the folder, file, tensor or config field), or ``TokenizerError`` for
    a tokenizer that does not load or fit the model, before anything is written.
    """
    from zoo.config_source import load_config
    from zoo.checkpoint import save
    from zoo.tokenizers import TOKENIZER_FILE, check_fits, read_folder

    src_dir = _torch_folder(src)
    out_dir = _new_output(out)
    fmt, torch_config, config_path = read_source_config(src_dir)
    with ExitStack() as stack:
        files, where = _shard_files(src_dir)
        source = TensorSource(files, stack, where)
        keys = set(source.shapes)
        zoo_dict, tokens = map_config(fmt, torch_config, dtype=dtype or _source_dtype(source),
                                      ffn_dim=0 if fmt == NEURIPS else _ffn_dim(source))
        config = _validated({**zoo_dict, "scan_blocks": False}, torch_config, config_path)
        codec = read_folder(src_dir, codec_settings(tokens) if tokens else None)
        if codec is not None:
            check_fits(codec.tokenizer, config, str(src_dir / TOKENIZER_FILE))
        stored = _stored_zoo_config(src_dir, fmt, config, config_path)
        final = stored.model_dump(mode="json") if stored else zoo_dict
        final |= {"dtype": dtype} if dtype else {}
        final["scan_blocks"] = bool(stored and stored.scan_blocks) if scan_blocks is None else scan_blocks
        config = load_config({**final, "scan_blocks": False})
        shapes = _flat_shapes(config)
        mapping = (mapping_neurips if fmt == NEURIPS else mapping_xlstm_large)(config, keys)
        _check_sources(mapping, shapes, source, optional={HEAD} if config.tie_weights else set())
        _check_dtypes(mapping, source)
        embedding = mapping["token_embedding/embedding"].key
        if config.tie_weights and HEAD in keys and not np.array_equal(source.get(HEAD), source.get(embedding)):
            tie = "tie_weights" if fmt == NEURIPS or stored else "tie_word_embeddings"
            ties = f"{ZOO_CONFIG} ties them (tie_weights" if stored else f"the config ties them ({tie}"
            raise ConvertError(f"tensor {HEAD!r} differs from {embedding!r} although {ties}: true); set {tie}: "
                               f"false to keep a separate head")
        flat = {}
        total_bytes = sum(math.prod(shape) * _itemsize(source.dtypes[mapping[path].key])
                          for path, shape in shapes.items())
        for path, expected in shapes.items():
            flat[path] = _read(source, mapping[path], path, expected)
            if progress:
                progress(path, flat[path].nbytes, len(shapes), total_bytes)
    config = load_config(final)
    if config.scan_blocks:
        flat = stack_blocks(flat, config.num_blocks)
    metadata: dict[str, Any] = {"converted_from": {"format": fmt, "path": str(src_dir), "config": torch_config,
                                                   "zoo_config": stored is not None}}
    if tokens:
        metadata["tokens"] = tokens
    with _staged(out_dir) as staging:
        save(staging, config, _unflatten(flat), extra_metadata=metadata, tokenizer=codec)
    return ConversionReport(fmt, out_dir, len(shapes), source.nbytes, stored is not None)


# -- zoo -> xlstm_large --------------------------------------------------------------------------


def xlstm_large_config(config: ModelConfig) -> dict[str, Any]:
    """The ``xLSTMLargeConfig`` fields of an ``mlstm_v1`` zoo model; refuses what the format cannot hold.

    A tied head is written as a copy of the embedding (xlstm_large has no tying).
    """
    layer, cell, ffn = config.layer, config.cell, config.mlstm_block.feedforward
    if layer.layer_type != "mlstm_v1":
        _refuse("mlstm_block.mlstm.layer_type", layer.layer_type,
                "to-torch writes xlstm_large, which holds mlstm_v1 models only")
    if config.quantization is not None:
        _refuse("quantization.method", config.quantization.method,
                "xlstm_large holds float weights; convert the float checkpoint this one was quantised from")
    checks = [
        ("norm_type", config.norm_type, "rmsnorm"),
        ("mlstm_block.mlstm.mlstm_cell.norm_type_v1", cell.norm_type_v1, "layernorm"),
        ("mlstm_block.mlstm.mlstm_cell.norm_eps", cell.norm_eps, config.norm_eps),
        ("bias", config.bias, False),
        ("mlstm_block.add_post_norm", config.mlstm_block.add_post_norm, False),
        ("mlstm_block.mlstm.mlstm_cell.add_qk_norm", cell.add_qk_norm, False),
        ("mlstm_block.feedforward", ffn is not None, True),
    ]
    for field, value, required in checks:
        if value != required:
            _refuse(field, value, f"xlstm_large needs {required!r}")
    if (ffn.ff_type, ffn.act_fn, ffn.bias) != ("ffn_gated", "swish", False):
        _refuse("mlstm_block.feedforward", f"{ffn.ff_type}/{ffn.act_fn}/bias={ffn.bias}",
                "xlstm_large's FFN is gated, swish, without bias")
    D, P = config.embedding_dim, ffn.proj_up_dim
    return {
        "embedding_dim": D, "num_heads": layer.num_heads, "num_blocks": config.num_blocks,
        "vocab_size": config.vocab_size, "use_bias": False, "norm_eps": config.norm_eps,
        "norm_reduction_force_float32": True, "add_out_norm": config.add_post_blocks_norm,
        "qk_dim_factor": layer.qk_dim_factor, "v_dim_factor": layer.v_dim_factor,
        "gate_soft_cap": cell.gate_soft_cap, "output_logit_soft_cap": config.logits_soft_cap,
        # round_up_to_next_multiple_of(D * f, 1) floors, so (P + 0.5) / D gives exactly P
        "ffn_proj_factor": (P + 0.5) / D, "ffn_round_up_to_multiple_of": 1,
        "weight_mode": "single", "eps": 1e-6,
    }


def torch_tensors(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """The xlstm_large state dict (single weights) of an ``mlstm_v1`` model, each tensor in its param's dtype.

    Any layout: scanned or per-block params, a tied or separate head.
    """
    flat = per_block(config, params)
    mapping = mapping_xlstm_large(config, set())
    left = sorted(set(flat) - set(mapping))
    if left:
        raise ConvertError(f"zoo parameter(s) xlstm_large has no place for: {', '.join(left[:8])}"
                           f"{' ...' if len(left) > 8 else ''}")
    tensors: dict[str, np.ndarray] = {}
    for path, spec in mapping.items():
        value = flat[path]
        if spec.transform is transpose:
            value = value.T
        elif spec.transform is not same:  # the head reshape of the multi-head norm
            value = value.reshape(-1)
        tensors[spec.key] = np.ascontiguousarray(value)
    if config.tie_weights:
        tensors[HEAD] = tensors["embedding.weight"].copy()
    return tensors


def to_torch(checkpoint: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None) -> TorchExport:
    """Write step ``step`` (default: the latest) of an ``mlstm_v1`` zoo checkpoint as ``model.safetensors`` +
    ``config.yaml`` in xlstm_large format, loadable by ``xlstm.xlstm_large.from_pretrained.load_from_pretrained``,
    plus the full zoo config as ``ZOO_CONFIG`` (which ``from_torch`` reads back), and the step's tokenizer, when
    it has one, as ``tokenizer.json`` and ``zoo_tokenizer.json`` (its special tokens). Tensors keep the params'
    dtypes.

    Raises ``ConvertError`` for a path that is not a zoo checkpoint folder, a step it does not hold,
    or a config field xlstm_large cannot hold, before anything is written.
    """
    import yaml
    from safetensors.numpy import save_file

    from zoo.checkpoint import CheckpointRefused, find_step, load, read_stored
    from zoo.tokenizers import load_codec, write_files

    out_dir = _new_output(out)
    try:
        ref = find_step(checkpoint, step, expected=ZOO_CHECKPOINT)
        stored = read_stored(ref.root, ref.step)[1]
    except CheckpointRefused as exc:
        raise ConvertError(str(exc)) from None
    layer_type = stored.get("mlstm_block", {}).get("mlstm", {}).get("layer_type", "mlstm")
    if layer_type != "mlstm_v1":  # before reading any parameter
        _refuse("mlstm_block.mlstm.layer_type", layer_type,
                "to-torch writes xlstm_large, which holds mlstm_v1 models only")
    config, params = load(ref.root, step=ref.step)
    codec = load_codec(ref.root, ref.step)
    torch_config = xlstm_large_config(config)
    tensors = torch_tensors(config, params)
    with _staged(out_dir) as folder:
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.yaml").write_text(yaml.safe_dump(torch_config, sort_keys=False))
        (folder / ZOO_CONFIG).write_text(json.dumps(config.model_dump(mode="json"), indent=1) + "\n")
        if codec is not None:
            write_files(codec, folder)
    return TorchExport(out_dir, str(ref), len(tensors), sum(t.nbytes for t in tensors.values()))
