"""What each kind of registered object must be, checked when a plugin registers it.

A registration that breaks its kind's contract (wrong call signature, missing or unknown
metadata, a ``kwargs_model`` that is not pydantic) is refused with a message that says what is
wrong, so the mistake surfaces at load time rather than deep inside a model build.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from zoo.errors import ZooError

PLATFORMS = ("cpu", "cuda", "tpu")
COMMON_METADATA = {"description", "override"}
CELL_STATE_ARGS = ("c_initial", "n_initial", "m_initial", "return_last_states")

# kind: (required metadata, optional metadata)
METADATA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "layer": (frozenset({"derived_sizes"}), frozenset({"check_config", "unused_fields"})),
    "norm": (frozenset(), frozenset()),
    "init": (frozenset(), frozenset()),
    "distribution": (frozenset(), frozenset()),
    "cell": (frozenset({"supports_state", "exportable", "platforms"}),
             frozenset({"sequence_constraint", "kwargs_model", "reference", "state_reference"})),
    "exporter": (frozenset(), frozenset({"weights"})),
}


class ContractError(ZooError, ValueError):
    """A registered object or its metadata does not follow its kind's contract."""


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and some C callables have none; give them the benefit of the doubt
        return None


def _accepts(obj: Callable[..., Any], *args: str, keywords: tuple[str, ...] = ()) -> list[str]:
    """Parameter names of the contract that ``obj`` cannot take (positional ``args``, keyword ``keywords``)."""
    sig = _signature(obj)
    if sig is None:
        return []
    params = list(sig.parameters.values())
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [] if var_positional else list(args[len(positional):])
    required_extra = [p.name for p in positional[len(args):] if p.default is p.empty]
    required_extra += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
                       and p.name not in keywords]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing += [k for k in keywords if k not in named and not var_keyword]
    return missing + [f"(no default for {name})" for name in required_extra]


def _check_metadata(kind: str, metadata: Mapping[str, Any]) -> list[str]:
    required, optional = METADATA[kind]
    allowed = required | optional | COMMON_METADATA
    problems = [f"missing metadata {key!r}" for key in sorted(required - set(metadata))]
    for key in sorted(set(metadata) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown metadata {key!r}{hint}; {kind} metadata: {', '.join(sorted(allowed))}")
    model = metadata.get("kwargs_model")
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        problems.append(f"kwargs_model must be a pydantic BaseModel subclass, got {model!r}")
    if "override" in metadata and not isinstance(metadata["override"], bool):
        problems.append(f"override must be True or False, got {metadata['override']!r}")
    return problems


def _check_cell(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("supports_state", "exportable"):
        if key in metadata and not isinstance(metadata[key], bool):
            problems.append(f"{key} must be True or False, got {metadata[key]!r}")
    platforms = metadata.get("platforms")
    if "platforms" in metadata and (isinstance(platforms, str) or not platforms
                                    or not set(platforms) <= set(PLATFORMS)):
        problems.append(f"platforms must be a non-empty tuple among {', '.join(PLATFORMS)}, got {platforms!r}")
    keywords = ("eps",) + (CELL_STATE_ARGS if metadata.get("supports_state") else ())
    model = metadata.get("kwargs_model")
    if isinstance(model, type) and issubclass(model, BaseModel):
        keywords += tuple(model.model_fields)
    missing = _accepts(obj, "q", "k", "v", "i", "f", keywords=keywords)
    if missing:
        problems.append("cell must be callable as cell(q, k, v, i, f, *, eps, ...) accepting "
                        f"{', '.join(keywords)}; it cannot take: {', '.join(missing)}")
    return problems


def _check_module_class(kind: str, obj: Any, fields: tuple[str, ...]) -> list[str]:
    import flax.linen as nn

    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return [f"{kind} must be a flax.linen.Module subclass, got {obj!r}"]
    names = set(getattr(obj, "__dataclass_fields__", {}))
    missing = [f for f in fields if f not in names]
    return [f"{kind} module must have fields {', '.join(fields)}; missing: {', '.join(missing)}"] if missing else []


def check_registration(kind: str, obj: Any, metadata: Mapping[str, Any]) -> None:
    """Raise :class:`ContractError` listing every way ``obj`` and ``metadata`` break ``kind``'s contract."""
    problems = _check_metadata(kind, metadata)
    if kind == "cell":
        problems += ["cell must be callable"] if not callable(obj) else _check_cell(obj, metadata)
    elif kind == "layer":
        problems += _check_module_class("layer", obj, ("config", "num_blocks"))
        for key in ("derived_sizes", "check_config"):
            if key in metadata and not callable(metadata[key]):
                problems.append(f"{key} must be callable, got {metadata[key]!r}")
    elif kind == "norm":
        problems += _check_module_class("norm", obj, ("eps", "dtype", "scale_ndim"))
    elif kind == "init":
        missing = _accepts(obj, "dim", "num_blocks", "distribution") if callable(obj) else ["(not callable)"]
        if missing:
            problems.append(f"init must be callable as fn(dim, num_blocks, distribution); it cannot take: "
                            f"{', '.join(missing)}")
    elif kind == "distribution":
        missing = _accepts(obj, "std") if callable(obj) else ["(not callable)"]
        if missing:
            problems.append(f"distribution must be callable as fn(std); it cannot take: {', '.join(missing)}")
    elif kind == "exporter":
        missing = (_accepts(obj, "config", "params", "out_dir", keywords=("platforms", "entries"))
                   if callable(obj) else ["(not callable)"])
        if missing:
            problems.append("exporter must be callable as fn(config, params, out_dir, *, platforms, entries, "
                            f"**options); it cannot take: {', '.join(missing)}")
    if problems:
        raise ContractError("; ".join(problems))
