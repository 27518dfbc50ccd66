"""Validated model configuration (pydantic v2), nested as in NX-AI's xlstm-jax.

``ModelConfig`` > ``mlstm_block: BlockConfig`` > ``mlstm: LayerConfig`` > ``mlstm_cell: CellConfig``
(with ``backend: BackendConfig``), plus ``feedforward: FeedForwardConfig`` and ``parallel: ParallelConfig``.

Where the reference silently copies a value from an outer config into an inner one (model
``norm_type`` into the layer and cell, model ``dtype`` everywhere, ...), the zoo makes the copy
explicit: an inner key may be left out, in which case it takes the outer value, or set to the
same value; a different value is a validation error naming both places.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from zoo import registry

DType = Literal["float32", "bfloat16", "float16"]
Loc = tuple[str | int, ...]


def raise_errors(title: str, errors: list[tuple[Loc, str, Any]]) -> None:
    """Raise one pydantic ``ValidationError`` holding ``(loc, message, input)`` errors."""
    raise ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("zoo_config", "{msg}", {"msg": msg}), loc=loc, input=value)
        for loc, msg, value in errors
    ])


def _plugin_name_check(kind: str) -> Callable[[str], str]:
    def check(name: str) -> str:
        try:
            registry.entry(kind, name)
        except registry.AmbiguousPluginError as exc:
            raise PydanticCustomError("ambiguous_plugin", "{msg}", {"msg": str(exc)}) from None
        except registry.UnknownPluginError:
            names = registry.available(kind)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            message = f"unknown {kind} {name!r}; registered: {', '.join(names)}{hint}"
            failed = registry.get_registry().failures()
            if failed:
                message += "; plugins that failed to load: " + ", ".join(f"{p.name} ({p.error})" for p in failed)
            raise PydanticCustomError("unknown_plugin", "{msg}", {"msg": message})
        return name

    return check


def _plugin_name_schema(kind: str) -> Callable[[dict[str, Any]], None]:
    def extra(schema: dict[str, Any]) -> None:
        schema["enum"] = registry.available(kind)
        schema["x-zoo-plugin-kind"] = kind

    return extra


@dataclass(frozen=True)
class PluginKind:
    """Marks a config field whose value names a plugin of ``kind``."""

    kind: str


def PluginName(kind: str) -> Any:  # noqa: N802 - used like a type
    """A string that must name a registered plugin of ``kind``; the JSON Schema lists the names."""
    return Annotated[str, PluginKind(kind), AfterValidator(_plugin_name_check(kind)),
                     Field(json_schema_extra=_plugin_name_schema(kind))]


def proj_up_dim(proj_factor: float | None, dim: int | None, multiple_of: int, round_up: bool) -> int:
    """Width of an up-projection: ``proj_factor·dim`` rounded to a multiple of ``multiple_of``."""
    if proj_factor is None or dim is None:
        return 0
    rounding = math.ceil if round_up else math.floor
    return int(multiple_of * rounding(proj_factor * dim / multiple_of))


class ZooModel(BaseModel):
    """Base of every config section: strict keys, no NaN/inf, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True,
                              protected_namespaces=(), use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = list(cls.model_fields)
            errors = []
            for key in data:
                if key not in cls.model_fields and str(key).startswith("_"):
                    errors.append(((str(key),), f"{key!r} is derived from the other fields and cannot be set",
                                   data[key]))
                elif key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    errors.append(((str(key),), f"unknown key {key!r}; {hint}valid keys: {', '.join(known)}",
                                   data[key]))
            if errors:
                raise_errors(cls.__name__, errors)
        return data


MAX_SIZE = 2**31 - 1
"""Largest accepted size or derived width: XLA indexes array dimensions with 32-bit integers here."""
Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]

PARALLEL_MODULES = ("Embed", "BlockStack", "LMHead", "mLSTMBlock", "xLSTMResBlock", "FFNResBlock",
                    "mLSTMInnerLayer", "mLSTMCell")
REMAT_MODULES = ("mLSTMBlock", "xLSTMResBlock", "FFNResBlock")
AxisSize = Annotated[int, Field(ge=1)]


class ParallelConfig(ZooModel):
    """Device mesh and memory settings (the reference's §2.7); ``zoo.sharding`` maps them onto devices."""

    data_axis_size: Annotated[int, Field(ge=-1)] = -1
    """Data-parallel size; -1 infers it from the device count."""
    fsdp_axis_size: AxisSize = 1
    pipeline_axis_size: AxisSize = 1
    model_axis_size: AxisSize = 1
    """Tensor-parallel size."""
    data_axis_name: str = "dp"
    fsdp_axis_name: str = "fsdp"
    pipeline_axis_name: str = "pp"
    model_axis_name: str = "tp"
    remat: list[Literal[REMAT_MODULES]] = []  # type: ignore[valid-type]
    """Modules rematerialised in the backward pass."""
    fsdp_modules: list[Literal[PARALLEL_MODULES]] = []  # type: ignore[valid-type]
    fsdp_min_weight_size: Annotated[int, Field(ge=0)] = 2**18
    """Parameters with at most this many elements are never FSDP-sharded."""
    fsdp_gather_dtype: DType | None = None
    """FSDP-sharded parameters are rounded to this dtype on their shard, before use (None: keep float32)."""
    fsdp_grad_scatter_dtype: DType | None = None
    """Must be None: gradients are reduce-scattered in the dtype of the gathered parameters."""
    tp_async_dense: bool = False
    """Must be False: XLA schedules the tensor-parallel collectives itself."""

    @property
    def product_of_fixed_sizes(self) -> int:
        """fsdp × pipeline × model sizes: the devices one data-parallel replica needs."""
        return self.fsdp_axis_size * self.pipeline_axis_size * self.model_axis_size

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        errors: list[tuple[Loc, str, Any]] = []
        if self.data_axis_size == 0:
            errors.append((("data_axis_size",), "must be -1 (infer) or >= 1", 0))
        if self.pipeline_axis_size != 1:
            errors.append((("pipeline_axis_size",), "pipeline parallelism is not supported; it must be 1 (use "
                                                    "fsdp_axis_size or model_axis_size to split a large model)",
                           self.pipeline_axis_size))
        if self.fsdp_grad_scatter_dtype is not None:
            errors.append((("fsdp_grad_scatter_dtype",), "is not supported and must be null: gradients are "
                                                         "reduce-scattered in the dtype the parameters were gathered "
                                                         "in", self.fsdp_grad_scatter_dtype))
        if self.tp_async_dense:
            errors.append((("tp_async_dense",), "is not supported and must be false: XLA schedules the "
                                                "tensor-parallel collectives itself", True))
        names = [self.data_axis_name, self.fsdp_axis_name, self.pipeline_axis_name, self.model_axis_name]
        if len(set(names)) != 4:
            errors.append((("model_axis_name",), f"the four axis names must differ, got {names}", names))
        if errors:
            raise_errors("ParallelConfig", errors)
        return self


GateBiasInit = tuple[float, float] | float | None


class BackendConfig(ZooModel):
    """Which cell backend runs the mLSTM, and its options (validated by the backend's own model)."""

    name: PluginName("cell") = "parallel_stabilized"
    kwargs: dict[str, Any] = {}

    @model_validator(mode="after")
    def _validate_kwargs(self) -> BackendConfig:
        model = registry.entry("cell", self.name).metadata.get("kwargs_model")
        if model is None:
            if self.kwargs:
                raise_errors("BackendConfig", [(("kwargs",), f"cell {self.name!r} takes no kwargs", self.kwargs)])
            return self
        try:
            parsed = model.model_validate(self.kwargs)
        except ValidationError as exc:
            raise_errors("BackendConfig", [(("kwargs", *e["loc"]), e["msg"], e.get("input")) for e in exc.errors()])
        object.__setattr__(self, "kwargs", parsed.model_dump(mode="json"))
        return self


class CellConfig(ZooModel):
    """Gate and norm settings of the mLSTM cell, and the backends that run it."""

    backend: BackendConfig = Field(default_factory=BackendConfig)
    """Backend of ``forward`` (training and scoring)."""
    prefill_backend: BackendConfig = Field(default_factory=lambda: BackendConfig(name="chunkwise"))
    """Backend of ``prefill``: must return final states (a zoo addition)."""
    step_backend: BackendConfig = Field(default_factory=lambda: BackendConfig(name="recurrent"))
    """Backend of ``step`` (one token with carried state): must take and return states (a zoo addition)."""
    norm_eps: Annotated[float, Field(gt=0)] = 1e-6
    """eps of the out-norm, the q/k norms and the block pre/post norms."""
    norm_type: PluginName("norm") = "layernorm"
    """Out-norm type of ``mlstm``; must equal the model's ``norm_type`` (inherited when left out)."""
    norm_type_v1: PluginName("norm") = "layernorm"
    """Out-norm type of ``mlstm_v1`` (never inherited: the reference keeps it independent)."""
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    gate_dtype: DType = "float32"
    gate_soft_cap: Annotated[float, Field(gt=0)] | None = None
    gate_linear_headwise: bool = False
    igate_bias_init_range: GateBiasInit = None
    """Tuple: linspace over heads; float: constant; None: N(0, 0.1²)."""
    fgate_bias_init_range: GateBiasInit = (3.0, 6.0)
    add_qk_norm: bool = False
    reset_at_document_boundaries: bool = False
    reset_fgate_value: float = -25.0
    parallel: ParallelConfig | None = None
    """Inherited from the model."""

    @model_validator(mode="after")
    def _check_stateful_backends(self) -> CellConfig:
        errors = []
        for field in ("prefill_backend", "step_backend"):
            name = getattr(self, field).name
            if not registry.entry("cell", name).metadata.get("supports_state"):
                stateful = [n for n in registry.available("cell")
                            if registry.entry("cell", n).metadata.get("supports_state")]
                errors.append(((field, "name"), f"cell {name!r} cannot carry state (supports_state is not set); "
                                                f"{field} needs one of: {', '.join(stateful)}", name))
        if errors:
            raise_errors("CellConfig", errors)
        return self


class UpProjConfig(ZooModel):
    """Fields shared by configs with an up-projection (the reference's UpProj mixin)."""

    proj_factor: Annotated[float, Field(gt=0)]
    round_proj_up_dim_up: bool = True
    round_proj_up_to_multiple_of: Size = 64
    embedding_dim: int = -1
    """Inherited from the model."""

    @model_validator(mode="after")
    def _check_proj_up_dim(self) -> UpProjConfig:
        try:
            width = self.proj_up_dim
        except (OverflowError, ValueError):
            width = math.inf
        if width > MAX_SIZE:
            raise_errors(type(self).__name__, [(("proj_factor",), f"proj_factor·embedding_dim is too large (the "
                                                f"up-projection width must be at most {MAX_SIZE})", self.proj_factor)])
        return self

    @property
    def proj_up_dim(self) -> int:
        """The up-projection width (derived; 0 until ``embedding_dim`` is known)."""
        if self.embedding_dim <= 0:
            return 0
        return proj_up_dim(self.proj_factor, self.embedding_dim, self.round_proj_up_to_multiple_of,
                           self.round_proj_up_dim_up)


class LayerConfig(UpProjConfig):
    """One mLSTM layer; ``layer_type`` picks the plugin (``mlstm``, ``mlstm_v1``, ...)."""

    proj_factor: Annotated[float, Field(gt=0)] = 2.0
    conv1d_kernel_size: Annotated[int, Field(ge=0, le=MAX_SIZE)] = 4
    qkv_proj_blocksize: Size = 4
    num_heads: Size = 4
    vmap_qk: bool = False
    init_distribution: PluginName("distribution") = "normal"
    output_init_fn: PluginName("init") = "wang"
    layer_type: PluginName("layer") = "mlstm"
    norm_type: PluginName("norm") = "layernorm"
    """Inherited from the model."""
    qk_dim_factor: Annotated[float, Field(gt=0)] = 1.0
    v_dim_factor: Annotated[float, Field(gt=0)] = 1.0
    bias: bool = False
    """Inherited from the model."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Inherited from the model."""
    context_length: int = -1
    """Inherited from the model."""
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""
    debug_cell: bool = False
    gate_input: Literal["qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"] = "qkv"
    mlstm_cell: CellConfig = Field(default_factory=CellConfig)

    def derived_sizes(self) -> dict[str, int]:
        """Sizes computed by the layer plugin (inner width, per-head dims, ...)."""
        sizes = registry.entry("layer", self.layer_type).metadata.get("derived_sizes")
        return dict(sizes(self)) if sizes and self.embedding_dim > 0 else {}

    @model_validator(mode="after")
    def _check_layer(self) -> LayerConfig:
        meta = registry.entry("layer", self.layer_type).metadata
        errors: list[tuple[Loc, str, Any]] = []
        for dotted in meta.get("unused_fields", ()):
            *parents, leaf = dotted.split(".")
            node: ZooModel = self
            for part in parents:
                node = getattr(node, part)
            default = type(node).model_fields[leaf].default
            if leaf in node.model_fields_set and getattr(node, leaf) != default:
                errors.append((tuple(dotted.split(".")),
                               f"not used by layer_type {self.layer_type!r}; remove it (default {default!r})",
                               getattr(node, leaf)))
        check = meta.get("check_config")
        if check and self.embedding_dim > 0 and not errors:
            try:
                errors += [((field,), msg, getattr(self, field, None)) for field, msg in check(self)]
                too_large = [name for name, size in self.derived_sizes().items() if size > MAX_SIZE]
            except (OverflowError, ValueError):  # a factor so large that a width is infinite
                too_large = ["all"]
            except Exception as exc:  # a bug in the layer plugin: name it
                raise_errors("LayerConfig", [(("layer_type",), f"layer {self.layer_type!r} from {meta_origin(self)} "
                                              f"failed to check this config: {type(exc).__name__}: {exc}",
                                              self.layer_type)])
            if too_large and not errors:
                factors = ("qk_dim_factor", "v_dim_factor", "proj_factor")
                field = max(factors, key=lambda name: getattr(self, name) * (
                    too_large == ["all"] or any(name[0] in size for size in too_large)))
                what = "overflow" if too_large == ["all"] else f"{', '.join(too_large)} exceed {MAX_SIZE}"
                errors.append(((field,), f"too large: the derived widths {what}", getattr(self, field)))
        if errors:
            raise_errors("LayerConfig", errors)
        return self


def meta_origin(layer: LayerConfig) -> str:
    """Where the layer plugin of ``layer`` comes from (plugin, distribution and version)."""
    return registry.entry("layer", layer.layer_type).origin


class FeedForwardConfig(UpProjConfig):
    """The optional feed-forward sub-block after each mLSTM layer."""

    proj_factor: Annotated[float, Field(gt=0)] = 1.3
    act_fn: Literal["gelu", "relu", "relu^2", "sigmoid", "swish", "selu"] = "gelu"
    """``gelu`` is the tanh approximation (flax ``nn.gelu``)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bias: bool = False
    init_distribution: PluginName("distribution") = "normal"
    output_init_fn: PluginName("init") = "wang"
    ff_type: Literal["ffn_gated", "ffn"] = "ffn_gated"
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""


class BlockConfig(ZooModel):
    """A residual block: pre-norm mLSTM layer, then an optional pre-norm feed-forward."""

    mlstm: LayerConfig = Field(default_factory=LayerConfig)
    feedforward: FeedForwardConfig | None = None
    add_post_norm: bool = False
    """Norm each sub-layer's output before the residual add (Gemma-2 style)."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""


# (path below the model, fields copied from the model into it)
INHERITED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("mlstm_block",): ("parallel",),
    ("mlstm_block", "mlstm"): ("embedding_dim", "bias", "dropout", "context_length", "dtype", "norm_type",
                               "parallel"),
    ("mlstm_block", "mlstm", "mlstm_cell"): ("dtype", "norm_type", "parallel"),
    ("mlstm_block", "feedforward"): ("embedding_dim", "dtype", "parallel"),
}


class ModelConfig(ZooModel):
    """The xLSTM language model: embedding, ``num_blocks`` copies of ``mlstm_block``, final norm, head."""

    mlstm_block: BlockConfig = Field(default_factory=BlockConfig)
    context_length: int = -1
    """Longest sequence accepted by ``forward`` (-1: no limit)."""
    num_blocks: Size = 1
    embedding_dim: Size = 128
    add_post_blocks_norm: bool = True
    """Apply the final norm. (The reference ignores False; the zoo honours it.)"""
    bias: bool = False
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    scan_blocks: bool = False
    """Run the blocks with ``nn.scan`` (params stacked on a leading axis)."""
    dtype: DType = "bfloat16"
    """Compute dtype; params are always float32 and gates run in ``gate_dtype``."""
    parallel: ParallelConfig | None = None
    init_distribution_embed: PluginName("distribution") = "normal"
    init_distribution_out: PluginName("distribution") = "normal"
    vocab_size: Annotated[int, Field(le=MAX_SIZE)] = -1
    """Must be set (the reference default -1 means unset)."""
    tie_weights: bool = False
    """Use the token embedding as the LM head."""
    weight_decay_on_embedding: bool = False
    """A training option; it does not change the model."""
    add_embedding_dropout: bool = False
    norm_eps: Annotated[float, Field(gt=0)] = 1e-6
    """eps of the final norm (block norms use ``mlstm_cell.norm_eps``)."""
    norm_type: PluginName("norm") = "layernorm"
    logits_soft_cap: Annotated[float, Field(gt=0)] | None = None
    lm_head_dtype: DType = "float32"

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        outer = {}
        for name in {f for fields in INHERITED.values() for f in fields}:
            value = data.get(name, cls.model_fields[name].default)
            try:  # push down only values that are valid here; an invalid one is reported once, at the top
                outer[name] = _field_adapter(cls, name).validate_python(value)
            except ValidationError:
                continue
        errors: list[tuple[Loc, str, Any]] = []
        for path, fields in INHERITED.items():
            node, holder = data, None
            for part in path:
                holder, child = node, node.get(part, {} if part != "feedforward" else None)
                if isinstance(child, BaseModel):
                    child = child.model_dump(exclude_unset=True)
                if not isinstance(child, Mapping):
                    break
                node = holder[part] = dict(child)
            else:
                for name in fields:
                    if name not in outer:
                        continue
                    if name in node and not _same(name, node[name], outer[name]):
                        errors.append(((*path, name),
                                       f"conflicts with the model-level {name}={_show(outer[name])}: it is set "
                                       f"once, at the top level (leave it out here or repeat the same value)",
                                       node[name]))
                    else:
                        node[name] = outer[name]
        if errors:
            raise_errors(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.vocab_size < 1:
            raise_errors("ModelConfig", [(("vocab_size",), "must be set to a positive integer", self.vocab_size)])
        tp = self.parallel.model_axis_size if self.parallel else 1
        if self.layer.num_heads % tp:
            raise_errors("ModelConfig", [(("parallel", "model_axis_size"),
                                          f"tensor parallelism splits heads: model_axis_size={tp} must divide "
                                          f"mlstm_block.mlstm.num_heads={self.layer.num_heads}", tp)])
        return self

    @property
    def layer(self) -> LayerConfig:
        """Shortcut to ``mlstm_block.mlstm``."""
        return self.mlstm_block.mlstm

    @property
    def cell(self) -> CellConfig:
        """Shortcut to ``mlstm_block.mlstm.mlstm_cell``."""
        return self.mlstm_block.mlstm.mlstm_cell

    def plugins_used(self) -> dict[str, list[str]]:
        """Plugin names this config uses, by kind (fields the layer type ignores are skipped)."""
        unused = set(registry.entry("layer", self.layer.layer_type).metadata.get("unused_fields", ()))
        used: dict[str, set[str]] = {"init": {"small"}}  # the fixed init of every input projection

        def walk(node: BaseModel, prefix: str) -> None:
            for name, info in type(node).model_fields.items():
                value = getattr(node, name)
                if isinstance(value, BaseModel):
                    walk(value, f"{prefix}{name}.")
                for marker in info.metadata:
                    if isinstance(marker, PluginKind) and f"{prefix}{name}".removeprefix("mlstm_block.mlstm.") not in unused:
                        used.setdefault(marker.kind, set()).add(value)

        walk(self, "")
        return {kind: sorted(names) for kind, names in sorted(used.items())}

    def with_parallel(self, parallel: ParallelConfig | None) -> ModelConfig:
        """This config with another ``parallel`` section (set once, at the top, and inherited below)."""
        data = self.model_dump(mode="json")
        for path, fields in INHERITED.items():
            node = data
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and "parallel" in fields:
                node.pop("parallel", None)
        data["parallel"] = None if parallel is None else parallel.model_dump(mode="json")
        return ModelConfig.model_validate(data)

    def derived_sizes(self) -> dict[str, int]:
        """Every derived size: the layer's, plus the FFN width when there is one."""
        sizes = self.layer.derived_sizes()
        if self.mlstm_block.feedforward is not None:
            sizes["ffn_proj_up_dim"] = self.mlstm_block.feedforward.proj_up_dim
        return sizes


@functools.cache
def _field_adapter(cls: type[BaseModel], name: str) -> TypeAdapter:
    info = cls.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


def _same(name: str, value: Any, outer: Any) -> bool:
    if name == "parallel":
        try:
            value = None if value is None else ParallelConfig.model_validate(value)
        except ValidationError:
            return True  # reported by ParallelConfig's own validation
    return value == outer


def _show(value: Any) -> str:
    return repr(value.model_dump() if isinstance(value, BaseModel) else value)
