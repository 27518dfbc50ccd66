"""NX-AI PyTorch xlstm checkpoints <-> zoo checkpoints, read and written with safetensors (no torch needed).

Two source formats (the mapping is the reference doc's section 10):

* ``xlstm_large`` (xLSTM-7B; also the Hugging Face ``xlstm`` export): ``model.safetensors`` or
  ``model_N.safetensors`` shards (or an index), plus ``config.yaml`` / ``config.json``. It becomes
  ``layer_type: mlstm_v1``. ``to_torch`` writes this format back.
* NeurIPS ``xLSTMLMModel`` with mLSTM blocks only: a state dict in safetensors plus its
  ``xLSTMLMModelConfig`` as YAML or JSON. It becomes ``layer_type: mlstm``.

Everything is checked before a byte is written: every tensor the model needs must be present with
the right shape, no tensor may be left over, and every config field must be representable.
Tensors are then read, transformed and cast one at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from zoo.config import ModelConfig, proj_up_dim

XLSTM_LARGE = "xlstm_large"
NEURIPS = "neurips"
BACKEND = {"name": "chunkwise", "kwargs": {"chunk_size": 64}}


class ConvertError(ValueError):
    """The source cannot be converted exactly: a missing, unexpected or misshapen tensor, or a config field."""


# -- reading the source ------------------------------------------------------------------------


def read_source_config(src: Path) -> tuple[str, dict[str, Any]]:
    """The format name and the PyTorch config dict found in ``src``."""
    for name in ("config.yaml", "config.yml", "config.json"):
        path = src / name
        if path.is_file():
            break
    else:
        raise ConvertError(f"{src} has no config.yaml or config.json")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: the top level must be a mapping")
    if "mlstm_block" in data or "slstm_block" in data:
        return NEURIPS, data
    aliases = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}
    data = {aliases.get(k, k): v for k, v in data.items()}
    if "num_heads" not in data or "embedding_dim" not in data:
        raise ConvertError(f"{path} is neither an xlstm_large config (num_heads, embedding_dim, ...) "
                           f"nor a NeurIPS xLSTMLMModelConfig (mlstm_block, ...)")
    return XLSTM_LARGE, data


def _shard_files(src: Path) -> list[Path]:
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [(src / name).resolve() for name in sorted(set(weight_map.values()))]
        outside = [str(f) for f in files if not f.is_relative_to(src.resolve())]
        if outside:
            raise ConvertError(f"{index} names shard files outside {src}: {', '.join(outside)}; refusing them")
        return files
    shards = sorted(src.glob("model_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1])
                    if p.stem.split("_")[-1].isdigit() else p.stem)
    if not shards:
        raise ConvertError(f"{src} has no model.safetensors, model_N.safetensors shards or index")
    return shards


class TensorSource:
    """Lazy access to the tensors of one or more safetensors files: names and shapes first, data on demand."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        from safetensors import safe_open

        self._handles: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.nbytes = 0
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="numpy"))
            for key in handle.keys():
                if key in self._handles:
                    raise ConvertError(f"tensor {key!r} appears in more than one shard")
                piece = handle.get_slice(key)
                self._handles[key] = (handle, path)
                self.shapes[key] = tuple(piece.get_shape())
                self.dtypes[key] = piece.get_dtype()
                self.nbytes += math.prod(self.shapes[key]) * _itemsize(self.dtypes[key])

    def get(self, key: str) -> np.ndarray:
        """One tensor as a NumPy array (bfloat16 through ml_dtypes)."""
        handle, path = self._handles[key]
        if self.dtypes[key] != "BF16":
            return handle.get_tensor(key)
        from safetensors import safe_open

        with safe_open(str(path), framework="flax") as flax_handle:  # NumPy has no native bfloat16
            return np.asarray(flax_handle.get_tensor(key))


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dtype, 4)


# -- configs ---------------------------------------------------------------------------------


def _ffn_sizes(P: int, D: int, factor: float | None, multiple: int | None) -> dict[str, Any]:
    """FFN fields giving exactly ``P``: the source's own factor when zoo rounding reproduces it."""
    if factor is not None and multiple and proj_up_dim(factor, D, multiple, True) == P:
        return {"proj_factor": factor, "round_proj_up_to_multiple_of": multiple, "round_proj_up_dim_up": True}
    return {"proj_factor": (P + 0.5) / D, "round_proj_up_to_multiple_of": 1, "round_proj_up_dim_up": False}


def _refuse(field: str, value: Any, why: str) -> None:
    raise ConvertError(f"config field {field}={value!r} cannot be represented: {why}")


def zoo_config_xlstm_large(cfg: Mapping[str, Any], ffn_dim: int, dtype: str) -> dict[str, Any]:
    """The zoo config reproducing an ``xLSTMLargeConfig`` (FFN width taken from the tensors)."""
    if cfg.get("use_bias", False):
        _refuse("use_bias", True, "xlstm_large then adds biases to every norm, which the zoo's norms do not have")
    if cfg.get("eps", 1e-6) != 1e-6:
        _refuse("eps", cfg["eps"], "the zoo's cells use eps=1e-6")
    D = int(cfg["embedding_dim"])
    norm_eps = float(cfg.get("norm_eps", 1e-6))
    return {
        "vocab_size": int(cfg["vocab_size"]), "embedding_dim": D, "num_blocks": int(cfg["num_blocks"]),
        "dtype": dtype, "norm_type": "rmsnorm", "norm_eps": norm_eps,
        "logits_soft_cap": cfg.get("output_logit_soft_cap", 30.0),
        "add_post_blocks_norm": bool(cfg.get("add_out_norm", True)), "tie_weights": False,
        "mlstm_block": {
            "mlstm": {
                "layer_type": "mlstm_v1", "num_heads": int(cfg["num_heads"]),
                "qk_dim_factor": float(cfg.get("qk_dim_factor", 0.5)),
                "v_dim_factor": float(cfg.get("v_dim_factor", 1.0)),
                "mlstm_cell": {"norm_eps": norm_eps, "norm_type_v1": "layernorm",
                               "gate_soft_cap": cfg.get("gate_soft_cap", 15.0), "backend": BACKEND},
            },
            "feedforward": {"act_fn": "swish", "ff_type": "ffn_gated",
                            **_ffn_sizes(ffn_dim, D, cfg.get("ffn_proj_factor"),
                                         cfg.get("ffn_round_up_to_multiple_of"))},
        },
    }


NEURIPS_LAYER_FIELDS = ("proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "conv1d_kernel_size",
                        "qkv_proj_blocksize", "num_heads")


def zoo_config_neurips(cfg: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """The zoo config reproducing an ``xLSTMLMModelConfig`` made of mLSTM blocks."""
    slstm_at = cfg.get("slstm_at") or []
    if slstm_at:
        _refuse("slstm_at", slstm_at, "sLSTM blocks cannot be imported; only mLSTM blocks")
    block = cfg.get("mlstm_block") or {}
    layer = dict(block.get("mlstm") or block.get("mlstm_layer") or {})
    if not layer and "mlstm_block" not in cfg:
        _refuse("mlstm_block", None, "a NeurIPS config needs an mlstm_block")
    embedding_dim = int(cfg.get("embedding_dim", 128))
    if layer.get("embedding_dim", embedding_dim) not in (-1, embedding_dim):
        _refuse("mlstm_block.mlstm.embedding_dim", layer["embedding_dim"],
                f"it differs from the model's {embedding_dim}")
    context_length = int(cfg.get("context_length", -1))
    return {
        "vocab_size": int(cfg["vocab_size"]), "embedding_dim": embedding_dim,
        "num_blocks": int(cfg.get("num_blocks", 1)),
        "dtype": dtype, "norm_type": "layernorm", "norm_eps": 1e-5, "logits_soft_cap": None,
        "add_post_blocks_norm": bool(cfg.get("add_post_blocks_norm", True)),
        "tie_weights": bool(cfg.get("tie_weights", False)), "bias": bool(cfg.get("bias", False)),
        "context_length": context_length,
        "mlstm_block": {"mlstm": {
            "layer_type": "mlstm", "qk_dim_factor": 1.0, "v_dim_factor": 1.0, "gate_input": "qkv",
            **{k: layer[k] for k in NEURIPS_LAYER_FIELDS if k in layer},
            "mlstm_cell": {"norm_eps": 1e-5, "gate_soft_cap": None, "gate_linear_headwise": False,
                           "backend": BACKEND},
        }},
    }


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
    """NeurIPS LayerNorms store ``w`` and apply ``1 + w``."""
    return 1 + w


def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def mapping_xlstm_large(cfg: ModelConfig, keys: set[str]) -> dict[str, Source]:
    """zoo param path -> source, for xlstm_large single or fused weights (HF embedding name accepted)."""
    NH = cfg.layer.num_heads
    sizes = cfg.derived_sizes()
    dqk, dv = sizes["qk_dim"], sizes["v_dim"]
    embedding = "backbone.embeddings.weight" if "backbone.embeddings.weight" in keys else "embedding.weight"
    heads = lambda w: w.reshape(NH, -1)  # noqa: E731
    out = {"token_embedding/embedding": Source(embedding, same),
           "lm_head/kernel": Source("lm_head.weight", transpose)}
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
    """zoo param path -> source, for a NeurIPS xLSTMLMModel of mLSTM blocks."""
    NH = cfg.layer.num_heads
    Di = cfg.derived_sizes()["inner_dim"]
    heads = lambda w: (1 + w).reshape(NH, -1)  # noqa: E731
    out = {"token_embedding/embedding": Source("token_embedding.weight", same)}
    if not cfg.tie_weights:
        out["lm_head/kernel"] = Source("lm_head.weight", transpose)
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


# -- conversion ----------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion read and wrote."""

    source_format: str
    checkpoint: Path
    tensors: int
    source_bytes: int


def _flat_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from zoo.api import param_shapes

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
    return np.asarray(value, np.float32)


def _source_dtype(source: TensorSource) -> str:
    kinds = {d for d in source.dtypes.values() if d.startswith(("F", "BF"))}
    return "bfloat16" if kinds == {"BF16"} else "float32"


def from_torch(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
               progress: Callable[[str, int, int, int], None] | None = None) -> ConversionReport:
    """Convert a PyTorch xlstm checkpoint folder into a new zoo checkpoint at ``out``.

    ``dtype`` is the compute dtype of the zoo config (default: bfloat16 for bfloat16 tensors, else
    float32); params are stored in float32. ``progress(param, nbytes, total_params, total_bytes)`` is
    called after each parameter.
    """
    from zoo.api import load_config
    from zoo.export.checkpoint import save

    src_dir = Path(src).expanduser().resolve()
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir} is not empty; convert into a new directory")
    fmt, torch_config = read_source_config(src_dir)
    with ExitStack() as stack:
        source = TensorSource(_shard_files(src_dir), stack)
        dtype = dtype or _source_dtype(source)
        keys = set(source.shapes)
        if fmt == XLSTM_LARGE:
            ffn_key = next((k for k in keys if k.endswith("ffn.proj_up.weight")), None)
            fused_key = next((k for k in keys if k.endswith("ffn.proj_up_gate_z.weight")), None)
            if ffn_key is None and fused_key is None:
                raise ConvertError("missing tensor(s): backbone.blocks.0.ffn.proj_up.weight")
            ffn_dim = source.shapes[ffn_key][0] if ffn_key else source.shapes[fused_key][0] // 2
            zoo_dict = zoo_config_xlstm_large(torch_config, ffn_dim, dtype)
        else:
            zoo_dict = zoo_config_neurips(torch_config, dtype)
        try:
            config = load_config(zoo_dict)
        except Exception as exc:  # a source config the zoo cannot express
            raise ConvertError(f"the source config does not map to a valid zoo config: {exc}") from exc
        shapes = _flat_shapes(config)
        mapping = (mapping_xlstm_large if fmt == XLSTM_LARGE else mapping_neurips)(config, keys)
        tied = {"lm_head.weight"} if fmt == NEURIPS and config.tie_weights else set()
        _check_sources(mapping, shapes, source, optional=tied)
        if tied and "lm_head.weight" in source.shapes and not np.array_equal(
                source.get("lm_head.weight"), source.get("token_embedding.weight")):
            raise ConvertError("tensor 'lm_head.weight' differs from 'token_embedding.weight' although the config "
                               "ties them (tie_weights: true)")
        flat = {}
        total_bytes = sum(4 * math.prod(shape) for shape in shapes.values())
        for path, expected in shapes.items():
            flat[path] = _read(source, mapping[path], path, expected)
            if progress:
                progress(path, flat[path].nbytes, len(shapes), total_bytes)
        params = _unflatten(flat)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))  # same filesystem: rename is atomic
    try:
        save(staging / "checkpoint", config, params, extra_metadata={
            "converted_from": {"format": fmt, "path": str(src_dir), "config": torch_config}})
        if out_dir.exists():
            out_dir.rmdir()
        (staging / "checkpoint").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionReport(fmt, out_dir, len(shapes), source.nbytes)


# -- zoo -> xlstm_large --------------------------------------------------------------------------


def xlstm_large_config(config: ModelConfig) -> dict[str, Any]:
    """The ``xLSTMLargeConfig`` fields of an ``mlstm_v1`` zoo model; refuses what the format cannot hold."""
    layer, cell, ffn = config.layer, config.cell, config.mlstm_block.feedforward
    checks = [
        ("mlstm_block.mlstm.layer_type", layer.layer_type, "mlstm_v1"),
        ("norm_type", config.norm_type, "rmsnorm"),
        ("mlstm_block.mlstm.mlstm_cell.norm_type_v1", cell.norm_type_v1, "layernorm"),
        ("mlstm_block.mlstm.mlstm_cell.norm_eps", cell.norm_eps, config.norm_eps),
        ("tie_weights", config.tie_weights, False),
        ("bias", config.bias, False),
        ("mlstm_block.add_post_norm", config.mlstm_block.add_post_norm, False),
        ("mlstm_block.mlstm.mlstm_cell.gate_linear_headwise", cell.gate_linear_headwise, False),
        ("mlstm_block.feedforward", ffn is not None, True),
    ]
    for field, value, required in checks:
        if value != required:
            _refuse(field, value, f"xlstm_large needs {required!r}")
    for field in ("vmap_qk", "add_qk_norm"):
        if getattr(layer, field, False):
            _refuse(f"mlstm_block.mlstm.{field}", True, "xlstm_large has no such option")
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


def to_torch(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write an ``mlstm_v1`` zoo checkpoint as ``model.safetensors`` + ``config.yaml`` in xlstm_large format."""
    import yaml
    from safetensors.numpy import save_file

    from zoo.export.checkpoint import load

    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir} is not empty; write into a new directory")
    config, params = load(checkpoint)
    if config.layer.layer_type != "mlstm_v1":
        _refuse("mlstm_block.mlstm.layer_type", config.layer.layer_type, "to-torch writes xlstm_large (mlstm_v1)")
    if config.logits_soft_cap is None or config.cell.gate_soft_cap is None:
        _refuse("logits_soft_cap / gate_soft_cap", None, "xlstm_large always soft-caps gates and logits")
    torch_config = xlstm_large_config(config)
    flat = {_join(tuple(k.key for k in path)): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    tensors: dict[str, np.ndarray] = {}
    for path, spec in mapping_xlstm_large(config, set()).items():
        value, key = flat[path], spec.key
        if spec.transform is transpose:
            value = value.T
        elif spec.transform is not same:  # the head reshape of the multi-head norm
            value = value.reshape(-1)
        tensors[key] = np.ascontiguousarray(value)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(torch_config, sort_keys=False))
    return out_dir
