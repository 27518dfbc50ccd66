"""Validated model configuration (pydantic v2), nested as in NX-AI's xlstm-jax.

``ModelConfig`` > ``mlstm_block: BlockConfig`` > ``mlstm: LayerConfig`` > ``mlstm_cell: CellConfig``
(with ``backend: BackendConfig``), plus ``feedforward: FeedForwardConfig`` and ``parallel: ParallelConfig``.

Where the reference silently copies a value from an outer config into an inner one (model
``norm_type`` into the layer and cell, model ``dtype`` everywhere, ...), the zoo makes the copy
explicit: an inner key may be left out, in which case it takes the outer value, or set to the
same value; a different value is a validation error naming both places. A dump of a ``ModelConfig``
(``model_dump``, ``model_dump_json``: what checkpoints and export manifests store) writes every value,
except that an inherited one is written only at the top level (see ``INHERITED``), so editing a
top-level field of a dump means what it says.

Parsing is strict: a value of the wrong JSON type (``true``, ``"4"`` or ``1.0`` for an integer) is
refused, not converted; an integer may be given for a float, and a list for a tuple.
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
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
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


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("zoo_config", "{msg}", {"msg": message})


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
    """Base of every config section: strict keys and types, no NaN/inf, immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True, strict=True,
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

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
"""Largest finite and smallest positive normal float32: params and gates are float32, so a value outside
this range would become inf or 0 in the model."""


def _float32_range(positive: bool) -> Callable[[float], float]:
    def check(value: float) -> float:
        if abs(value) > FLOAT32_MAX or (positive and value < FLOAT32_TINY):
            low = f"{FLOAT32_TINY:.4g}" if positive else f"{-FLOAT32_MAX:.4g}"
            raise _refuse(f"must be between {low} and {FLOAT32_MAX:.4g}: float32 would round {value!r} to "
                          f"{'0' if abs(value) < 1 else 'infinity'}")
        return value

    return check


Float32 = Annotated[float, AfterValidator(_float32_range(positive=False))]
"""A float that float32 holds as a finite number."""
PositiveFloat32 = Annotated[float, Field(gt=0), AfterValidator(_float32_range(positive=True))]
"""A positive float that float32 holds as a finite normal number (never rounded to 0)."""


def _context_length(value: int) -> int:
    if value == 0 or value < -1:
        raise _refuse("must be -1 (no limit) or a positive number of tokens")
    return value


ContextLength = Annotated[int, Field(le=MAX_SIZE), AfterValidator(_context_length)]

PARALLEL_MODULES = ("Embed", "BlockStack", "LMHead", "mLSTMBlock", "xLSTMResBlock", "FFNResBlock",
                    "mLSTMInnerLayer", "mLSTMCell")
REMAT_MODULES = ("mLSTMBlock", "xLSTMResBlock", "FFNResBlock")
AxisSize = Annotated[int, Field(ge=1, le=MAX_SIZE)]


class ParallelConfig(ZooModel):
    """Device mesh and memory settings (xlstm-jax's ``ParallelConfig``); ``zoo.sharding`` maps them onto devices."""

    data_axis_size: Annotated[int, Field(ge=-1, le=MAX_SIZE)] = -1
    """Data-parallel size; -1 infers it from the device count."""
    fsdp_axis_size: AxisSize = 1
    """Devices each FSDP-sharded parameter is split over."""
    pipeline_axis_size: AxisSize = 1
    """Must be 1: pipeline parallelism is not supported."""
    model_axis_size: AxisSize = 1
    """Tensor-parallel size."""
    data_axis_name: str = "dp"
    """Mesh axis name of data parallelism."""
    fsdp_axis_name: str = "fsdp"
    """Mesh axis name of FSDP."""
    pipeline_axis_name: str = "pp"
    """Mesh axis name of the (unused) pipeline axis."""
    model_axis_name: str = "tp"
    """Mesh axis name of tensor parallelism."""
    remat: list[Literal[REMAT_MODULES]] = []  # type: ignore[valid-type]
    """Modules rematerialised in the backward pass."""
    fsdp_modules: list[Literal[PARALLEL_MODULES]] = []  # type: ignore[valid-type]
    """Modules whose parameters are FSDP-sharded."""
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


GateBiasInit = Annotated[tuple[Float32, Float32],
                         BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)
                         ] | Float32 | None
"""A JSON list (or a tuple) of two floats, one float, or null."""


class BackendConfig(ZooModel):
    """Which cell backend runs the mLSTM, and its options (validated by the backend's own model)."""

    name: PluginName("cell") = "parallel_stabilized"
    """A registered cell backend (see `zoo plugins`)."""
    kwargs: dict[str, Any] = {}
    """Options of the backend, checked by its own kwargs model."""

    @model_validator(mode="after")
    def _validate_kwargs(self) -> BackendConfig:
        object.__setattr__(self, "kwargs", plugin_kwargs("cell", self.name, self.kwargs, "BackendConfig"))
        return self


def plugin_kwargs(kind: str, name: str, kwargs: dict[str, Any], title: str) -> dict[str, Any]:
    """``kwargs`` of plugin ``name`` of ``kind`` validated strictly by its ``kwargs_model`` and dumped to JSON with
    every default; a pydantic ``ValidationError`` (titled ``title``) naming each bad option otherwise."""
    model = registry.entry(kind, name).metadata.get("kwargs_model")
    if model is None:
        if kwargs:
            raise_errors(title, [(("kwargs",), f"{kind} {name!r} takes no kwargs", kwargs)])
        return kwargs
    options = ", ".join(model.model_fields) or "none"
    unknown = [key for key in kwargs if key not in model.model_fields]
    if unknown:
        raise_errors(title, [(("kwargs", key), f"{kind} {name!r} has no option {key!r}; its options: "
                                               f"{options}", kwargs[key]) for key in unknown])
    try:
        parsed = model.model_validate(kwargs, strict=True)
    except ValidationError as exc:
        errors = {}  # one error per option: a union reports one per branch, under a branch-named loc
        for e in exc.errors():
            key = e["loc"][:1]
            if key in errors and key[0] in model.model_fields:
                errors[key] = (errors[key][0], _allowed(model, key[0]), errors[key][2])
            elif key not in errors:
                errors[key] = (("kwargs", *key), e["msg"], e.get("input"))
        raise_errors(title, list(errors.values()))
    return parsed.model_dump(mode="json")


class QuantizationConfig(ZooModel):
    """Weight-only quantisation: which quantizer stores the selected weights, and its options."""

    method: PluginName("quantizer")
    """A registered quantizer (``int8``; see `zoo plugins`)."""
    kwargs: dict[str, Any] = {}
    """Options of the quantizer, checked by its own kwargs model."""

    @model_validator(mode="after")
    def _validate_kwargs(self) -> QuantizationConfig:
        object.__setattr__(self, "kwargs", plugin_kwargs("quantizer", self.method, self.kwargs,
                                                         "QuantizationConfig"))
        return self


def _allowed(model: type[BaseModel], key: str) -> str:
    """What option ``key`` of a backend's kwargs model accepts, from its JSON Schema (for a union's one error)."""
    schema = model.model_json_schema()["properties"][key]
    kinds = []
    for branch in schema.get("anyOf", [schema]):
        if "const" in branch or "enum" in branch:
            kinds += [repr(v) for v in branch.get("enum", [branch.get("const")])]
        else:
            words = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
            bounds = [f"{word} {branch[b]}" for b, word in words if b in branch]
            kind = f"an {branch['type']}" if branch.get("type") in ("integer", "array", "object") else (
                f"a {branch.get('type', 'value')}")
            kinds.append("a positive integer" if bounds == [">= 1"] and kind == "an integer"
                         else kind + (f" {' and '.join(bounds)}" if bounds else ""))
    return "must be " + " or ".join(kinds)


def backend_family(name: str) -> str:
    """The numerics family of cell ``name``: the root of its ``reference`` chain (``parallel_stabilized`` when a
    cell names none), so backends of one family compute the same function."""
    seen = [name]
    while True:
        reference = registry.entry("cell", seen[-1]).metadata.get("reference", "parallel_stabilized")
        if reference in seen:
            return min(seen[seen.index(reference):])  # the root, or the smallest name of a reference cycle
        if reference not in registry.available("cell"):
            return reference  # a reference that is not installed still names the family
        seen.append(reference)


class CellConfig(ZooModel):
    """Gate and norm settings of the mLSTM cell, and the backends that run it."""

    backend: BackendConfig = Field(default_factory=BackendConfig)
    """Backend of ``forward`` (training and scoring)."""
    prefill_backend: BackendConfig = Field(default_factory=lambda: BackendConfig(name="chunkwise"))
    """Backend of ``prefill``: must return final states (a zoo addition)."""
    step_backend: BackendConfig = Field(default_factory=lambda: BackendConfig(name="recurrent"))
    """Backend of ``step`` (one token with carried state): must take and return states (a zoo addition)."""
    norm_eps: PositiveFloat32 = 1e-6
    """eps of the out-norm, the q/k norms and the block pre/post norms."""
    norm_type: PluginName("norm") = "layernorm"
    """Out-norm type of ``mlstm``; must equal the model's ``norm_type`` (inherited when left out)."""
    norm_type_v1: PluginName("norm") = "layernorm"
    """Out-norm type of ``mlstm_v1`` (never inherited: the reference keeps it independent)."""
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    gate_dtype: DType = "float32"
    """dtype of the input- and forget-gate projections."""
    gate_soft_cap: PositiveFloat32 | None = None
    """Soft cap c·tanh(x/c) of both gate pre-activations (None: no cap)."""
    gate_linear_headwise: bool = False
    """One gate projection per head, reading only that head's slice (``mlstm`` only; needed for tp > 1)."""
    igate_bias_init_range: GateBiasInit = None
    """Input-gate bias init; two floats: linspace over heads; one float: constant; None: N(0, 0.1²)."""
    fgate_bias_init_range: GateBiasInit = (3.0, 6.0)
    """Forget-gate bias init; two floats: linspace over heads; one float: constant; None: N(0, 0.1²)."""
    add_qk_norm: bool = False
    """Norm q and k before the cell."""
    reset_at_document_boundaries: bool = False
    """Reset the memory at each document's first token (``document_borders``)."""
    reset_fgate_value: Float32 = -25.0
    """Forget-gate pre-activation written at document borders."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""

    @model_validator(mode="before")
    @classmethod
    def _stateful_backends_of_the_family(cls, data: Any) -> Any:
        """Left out, ``prefill_backend`` and ``step_backend`` default to stateful backends of ``backend``'s family."""
        if not isinstance(data, Mapping) or {"prefill_backend", "step_backend"} <= set(data):
            return data
        backend = data.get("backend")
        name = backend.name if isinstance(backend, BackendConfig) else (
            backend.get("name") if isinstance(backend, Mapping) else None)
        if not isinstance(name, str) or name not in registry.available("cell") or (
                backend_family(name) == "parallel_stabilized"):
            return data  # the built-in defaults; an unknown name is reported by BackendConfig
        family = backend_family(name)
        stateful = [n for n in registry.available("cell")
                    if registry.entry("cell", n).metadata.get("supports_state") and backend_family(n) == family]
        if not stateful:
            return data  # refused by _check_stateful_backends, naming the fields
        defaults = {"prefill_backend": {"name": stateful[0]}, "step_backend": {"name": stateful[-1]}}
        return {**defaults, **data}

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
        family = backend_family(self.backend.name)
        for field in ("prefill_backend", "step_backend"):
            name = getattr(self, field).name
            if backend_family(name) != family:
                matching = [n for n in registry.available("cell") if registry.entry("cell", n).metadata.get(
                    "supports_state") and backend_family(n) == family]
                errors.append(((field, "name"), f"cell {name!r} computes the {backend_family(name)!r} family but "
                                                f"backend {self.backend.name!r} computes {family!r}: all three "
                                                f"backends must compute the same function; set {field} to one of: "
                                                f"{', '.join(matching) or '(no stateful backend of that family)'}",
                               name))
        if errors:
            raise_errors("CellConfig", errors)
        return self


class UpProjConfig(ZooModel):
    """Fields shared by configs with an up-projection (the reference's UpProj mixin)."""

    proj_factor: Annotated[float, Field(gt=0)]
    """Up-projection width over ``embedding_dim``, before rounding."""
    round_proj_up_dim_up: bool = True
    """Round the up-projection width up (False: down)."""
    round_proj_up_to_multiple_of: Size = 64
    """The up-projection width is a multiple of this."""
    embedding_dim: Annotated[int, Field(ge=-1, le=MAX_SIZE)] = -1
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
    """Inner width Di over ``embedding_dim``, before rounding (``mlstm`` only)."""
    conv1d_kernel_size: Annotated[int, Field(ge=0, le=MAX_SIZE)] = 4
    """Kernel size K of the causal depthwise conv; 0: no conv (``mlstm`` only)."""
    qkv_proj_blocksize: Size = 4
    """Block size of the block-diagonal q/k/v projections (``mlstm`` only)."""
    num_heads: Size = 4
    """Number of mLSTM heads."""
    vmap_qk: bool = False
    """One stacked q/k projection instead of two (``mlstm`` only)."""
    init_distribution: PluginName("distribution") = "normal"
    """Distribution of the input-projection inits."""
    output_init_fn: PluginName("init") = "wang"
    """Init of the output projection ``proj_down``."""
    layer_type: PluginName("layer") = "mlstm"
    """The layer plugin: ``mlstm`` (NeurIPS xLSTM) or ``mlstm_v1`` (xLSTM-7B)."""
    norm_type: PluginName("norm") = "layernorm"
    """Inherited from the model."""
    qk_dim_factor: Annotated[float, Field(gt=0)] = 1.0
    """Total q/k width over the inner width (``mlstm``) or over ``embedding_dim`` (``mlstm_v1``)."""
    v_dim_factor: Annotated[float, Field(gt=0)] = 1.0
    """Total v width over the inner width (``mlstm``) or over ``embedding_dim`` (``mlstm_v1``)."""
    bias: bool = False
    """Inherited from the model."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Inherited from the model."""
    context_length: ContextLength = -1
    """Inherited from the model."""
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""
    debug_cell: bool = False
    """Skip the cell and use h = z (a debugging aid of the reference; ``mlstm`` only)."""
    gate_input: Literal["qkv", "x_mlstm", "x_mlstm_conv", "x_mlstm_conv_act"] = "qkv"
    """What the gates read (``mlstm`` only): q, k and v, or the up-projection before or after the conv."""
    mlstm_cell: CellConfig = Field(default_factory=CellConfig)
    """The mLSTM cell: gates, out-norm and backends."""

    def derived_sizes(self) -> dict[str, int]:
        """Sizes computed by the layer plugin (inner width, per-head dims, ...)."""
        sizes = registry.entry("layer", self.layer_type).metadata.get("derived_sizes")
        return dict(sizes(self)) if sizes and self.embedding_dim > 0 else {}

    def _size_errors(self) -> list[tuple[Loc, str, Any]]:
        """The first derived size outside 1..MAX_SIZE, naming the field that sets it."""
        factors = ("proj_factor", "qk_dim_factor", "v_dim_factor")
        try:
            sizes = self.derived_sizes()
        except (OverflowError, ValueError):  # a factor so large that a width is infinite
            field = max(factors, key=lambda name: getattr(self, name))
            return [((field,), "too large: the derived widths overflow", getattr(self, field))]
        for name, size in sizes.items():
            if not 1 <= size <= MAX_SIZE:
                field = SIZE_FIELDS.get(name) or (max if size > MAX_SIZE else min)(
                    factors, key=lambda f: getattr(self, f))
                what = f"too large: the derived {name} {size} exceeds {MAX_SIZE}" if size > MAX_SIZE else (
                    f"too small: the derived {name} is {size}, so the layer would have no width there")
                return [((field,), what, getattr(self, field))]
        return []

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
                errors += self._size_errors() or [((field,), msg, getattr(self, field, None))
                                                  for field, msg in check(self)]
            except Exception as exc:  # a bug in the layer plugin: name it
                raise_errors("LayerConfig", [(("layer_type",), f"layer {self.layer_type!r} from {meta_origin(self)} "
                                              f"failed to check this config: {type(exc).__name__}: {exc}",
                                              self.layer_type)])
        if errors:
            raise_errors("LayerConfig", errors)
        return self


SIZE_FIELDS = {"inner_dim": "proj_factor", "num_proj_blocks": "qkv_proj_blocksize", "qk_dim": "qk_dim_factor",
               "v_dim": "v_dim_factor", "qk_head_dim": "num_heads", "v_head_dim": "num_heads"}
"""The field named when a derived size of the shipped layers is 0 or too large."""


def meta_origin(layer: LayerConfig) -> str:
    """Where the layer plugin of ``layer`` comes from (plugin, distribution and version)."""
    return registry.entry("layer", layer.layer_type).origin


class FeedForwardConfig(UpProjConfig):
    """The optional feed-forward sub-block after each mLSTM layer."""

    proj_factor: Annotated[float, Field(gt=0)] = 1.3
    """Hidden width P over ``embedding_dim``, before rounding."""
    act_fn: Literal["gelu", "relu", "relu^2", "sigmoid", "swish", "selu"] = "gelu"
    """Activation; ``gelu`` is the tanh approximation (flax ``nn.gelu``)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout after the down-projection (not inherited)."""
    bias: bool = False
    """Biases in the projections (not inherited)."""
    init_distribution: PluginName("distribution") = "normal"
    """Distribution of the up-projection inits."""
    output_init_fn: PluginName("init") = "wang"
    """Init of the down-projection."""
    ff_type: Literal["ffn_gated", "ffn"] = "ffn_gated"
    """``ffn_gated``: down(act(gate(x)) ⊙ up(x)); ``ffn``: down(act(up(x)))."""
    dtype: DType = "bfloat16"
    """Inherited from the model."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""

    @model_validator(mode="after")
    def _check_width(self) -> FeedForwardConfig:
        if self.embedding_dim > 0 and self.proj_up_dim == 0:
            raise_errors("FeedForwardConfig", [(("proj_factor",), f"too small: proj_factor·embedding_dim = "
                                                f"{self.proj_factor * self.embedding_dim:g} rounds down to a hidden "
                                                f"width of 0 (a multiple of {self.round_proj_up_to_multiple_of})",
                                                self.proj_factor)])
        return self


class BlockConfig(ZooModel):
    """A residual block: pre-norm mLSTM layer, then an optional pre-norm feed-forward."""

    mlstm: LayerConfig = Field(default_factory=LayerConfig)
    """The mLSTM layer."""
    feedforward: FeedForwardConfig | None = None
    """The feed-forward sub-block after the layer (None: no feed-forward)."""
    add_post_norm: bool = False
    """Norm each sub-layer's output before the residual add (Gemma-2 style)."""
    parallel: ParallelConfig | None = None
    """Inherited from the model."""


# (path below the model, fields copied from the model into it; a dump writes them at the top level only)
INHERITED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("mlstm_block",): ("parallel",),
    ("mlstm_block", "mlstm"): ("embedding_dim", "bias", "dropout", "context_length", "dtype", "norm_type",
                               "parallel"),
    ("mlstm_block", "mlstm", "mlstm_cell"): ("dtype", "norm_type", "parallel"),
    ("mlstm_block", "feedforward"): ("embedding_dim", "dtype", "parallel"),
}


MAX_BLOCKS = 4096
"""Most blocks accepted: unscanned blocks are traced one by one, so building, ``zoo info`` and abstract shapes
take time and memory in proportion; the deepest preset (``mlstm-7b``) has 64 blocks."""


def _num_blocks(value: int) -> int:
    if value > MAX_BLOCKS:
        raise _refuse(f"must be at most {MAX_BLOCKS} (the deepest preset, mlstm-7b, has 64; unscanned blocks "
                      f"are traced one by one, so a larger count only exhausts time and memory)")
    return value


class ModelConfig(ZooModel):
    """The xLSTM language model: embedding, ``num_blocks`` copies of ``mlstm_block``, final norm, head."""

    mlstm_block: BlockConfig = Field(default_factory=BlockConfig)
    """The block repeated ``num_blocks`` times."""
    context_length: ContextLength = -1
    """Longest sequence accepted by ``forward`` (-1: no limit)."""
    num_blocks: Annotated[int, Field(ge=1, json_schema_extra={"maximum": MAX_BLOCKS}),
                          AfterValidator(_num_blocks)] = 1
    """Number of residual blocks (at most 4096; the deepest preset, mlstm-7b, has 64)."""
    embedding_dim: Size = 128
    """Model width D (the residual stream)."""
    add_post_blocks_norm: bool = True
    """Apply the final norm. (The reference ignores False; the zoo honours it.)"""
    bias: bool = False
    """Biases in the layer projections (inherited by ``mlstm_block.mlstm``)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout of each layer's output (inherited by ``mlstm_block.mlstm``)."""
    scan_blocks: bool = False
    """Run the blocks with ``nn.scan`` (params stacked on a leading axis)."""
    dtype: DType = "bfloat16"
    """Compute dtype; params are always float32 and gates run in ``gate_dtype``."""
    parallel: ParallelConfig | None = None
    """Device mesh and memory settings (None: one device; inherited by every section)."""
    init_distribution_embed: PluginName("distribution") = "normal"
    """Distribution of the token-embedding init."""
    init_distribution_out: PluginName("distribution") = "normal"
    """Distribution of the LM-head init."""
    vocab_size: Annotated[int, Field(le=MAX_SIZE)] = -1
    """Must be set (the reference default -1 means unset)."""
    tie_weights: bool = False
    """Use the token embedding as the LM head."""
    weight_decay_on_embedding: bool = False
    """A training option; it does not change the model."""
    add_embedding_dropout: bool = False
    """Dropout on the token embeddings (rate ``dropout``)."""
    norm_eps: PositiveFloat32 = 1e-6
    """eps of the final norm (block norms use ``mlstm_cell.norm_eps``)."""
    norm_type: PluginName("norm") = "layernorm"
    """Type of the block norms, the ``mlstm`` out-norm, the q/k norms and the final norm (inherited below)."""
    logits_soft_cap: PositiveFloat32 | None = None
    """Soft cap c·tanh(x/c) of the logits (None: no cap)."""
    lm_head_dtype: DType = "float32"
    """Compute dtype of the LM head."""
    quantization: QuantizationConfig | None = None
    """Weight-only quantisation of the projections (``zoo quantize`` sets it); None: float32 params."""

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
                outer[name] = _field_adapter(cls, name).validate_python(value, strict=True)
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

    @model_serializer(mode="wrap")
    def _write_inherited_once(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for path, fields in INHERITED.items():
            node = data
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                for name in fields:
                    node.pop(name, None)
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.vocab_size == -1:
            raise_errors("ModelConfig", [(("vocab_size",), "vocab_size is required: it must be set to a positive "
                                                           "integer", None)])
        if self.vocab_size < 1:
            raise_errors("ModelConfig", [(("vocab_size",), "must be a positive integer", self.vocab_size)])
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
        return ModelConfig.model_validate({**self.model_dump(mode="json"), "parallel": parallel})

    def with_overrides(self, overrides: Mapping[str, Any]) -> ModelConfig:
        """This config with fields set by dotted path, e.g. ``{"parallel.fsdp_axis_size": 1, "dtype": "float32"}``.

        The values are edits of this config's dump (as in a JSON file, validated as strictly); a
        section that is null or absent, like ``parallel``, is created from its defaults. Setting a backend's
        ``name`` to another backend drops the old backend's ``kwargs`` (``kwargs`` set alongside still apply). Raises
        ``pydantic.ValidationError`` naming the field when the result is not a valid config.
        """
        data = self.model_dump(mode="json")
        errors: list[tuple[Loc, str, Any]] = []
        # names first: a renamed backend drops the old backend's kwargs, then its own kwargs.* apply
        for dotted, value in sorted(overrides.items(), key=lambda item: not item[0].endswith(".name")):
            *parents, leaf = dotted.split(".")
            node = data
            for depth, part in enumerate(parents):
                if node.get(part) is None:
                    node[part] = {}
                if not isinstance(node[part], dict):
                    errors.append((tuple(parents[:depth + 1]), f"is not a section, so {dotted!r} cannot be set",
                                   node[part]))
                    break
                node = node[part]
            else:
                if leaf == "name" and isinstance(node.get("kwargs"), dict) and node.get("name") != value:
                    del node["kwargs"]  # a backend's options belong to it: a new name starts from its defaults
                node[leaf] = value
        if errors:
            raise_errors("ModelConfig", errors)
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


def check_config(config: Any) -> ModelConfig:
    """``config`` when it is a ``ModelConfig``, else ``TypeError`` (``zoo.load_config`` makes one from a preset
    name, a path or a dict)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a zoo.ModelConfig (zoo.load_config makes one from a preset name, a JSON "
                        f"path or a dict), got {type(config).__name__}")
    return config
