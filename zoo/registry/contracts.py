"""Contract checks: what a registered object and its metadata must be, per kind (the kind table uses them).

A registration that breaks its kind's contract (wrong call signature, missing or unknown
metadata, a ``kwargs_model`` that is not pydantic) is refused with a message that says what is
wrong, so the mistake surfaces at load time rather than deep inside a model build. Each check
takes ``(obj, metadata)`` and returns the list of problems (empty when the registration is fine);
:mod:`zoo.registry.kinds` names the check of each kind and raises :class:`ContractError`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from zoo.errors import ZooError

PLATFORMS = ("cpu", "cuda", "tpu")
COMMON_METADATA = frozenset({"description", "override"})
"""Metadata every kind accepts: a one-line ``description`` (``zoo plugins``) and ``override`` (bare-name conflicts)."""
CELL_STATE_ARGS = ("c_initial", "n_initial", "m_initial", "return_last_states")

Check = Callable[[Any, Mapping[str, Any]], list[str]]
"""A kind's contract check: ``check(obj, metadata) -> [problem, ...]``."""


class ContractError(ZooError, ValueError):
    """A registered object or its metadata does not follow its kind's contract."""


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and some C callables have none; give them the benefit of the doubt
        return None


def cannot_take(obj: Callable[..., Any], *args: str, keywords: tuple[str, ...] = ()) -> list[str]:
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


def check_metadata(kind: str, required: frozenset[str], optional: frozenset[str],
                   metadata: Mapping[str, Any]) -> list[str]:
    """Missing and unknown metadata keys (with a close match when there is one), and malformed common values."""
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


def callable_as(kind: str, call: str, *args: str, keywords: tuple[str, ...] = ()) -> Check:
    """The check that ``obj`` is callable as ``call`` (its text), taking positional ``args`` and ``keywords``."""

    def check(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
        missing = cannot_take(obj, *args, keywords=keywords) if callable(obj) else ["(not callable)"]
        return [f"{kind} must be callable as {call}; it cannot take: {', '.join(missing)}"] if missing else []

    return check


def module_class(kind: str, *fields: str) -> Check:
    """The check that ``obj`` is a ``flax.linen.Module`` subclass with dataclass ``fields``."""

    def check(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
        import flax.linen as nn

        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            return [f"{kind} must be a flax.linen.Module subclass, got {obj!r}"]
        names = set(getattr(obj, "__dataclass_fields__", {}))
        missing = [f for f in fields if f not in names]
        return [f"{kind} module must have fields {', '.join(fields)}; missing: {', '.join(missing)}"] if missing else []

    return check


def check_cell(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
    """The cell contract of :mod:`zoo.nn.cell`: flags, platforms and the call signature (with its kwargs)."""
    if not callable(obj):
        return ["cell must be callable"]
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
    missing = cannot_take(obj, "q", "k", "v", "i", "f", keywords=keywords)
    if missing:
        problems.append("cell must be callable as cell(q, k, v, i, f, *, eps, ...) accepting "
                        f"{', '.join(keywords)}; it cannot take: {', '.join(missing)}")
    return problems


QUANTIZER_METHODS = ("select", "quantize", "dequantize", "axes")
"""Methods every quantizer instance has (``matmul`` and ``columns`` are optional: ``zoo.nn.quant.Quantizer``)."""


def check_quantizer(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
    """A class built as ``cls(**kwargs)`` (the fields of its ``kwargs_model``) with the methods of
    ``QUANTIZER_METHODS``, as :mod:`zoo.nn.quant` documents them."""
    if not isinstance(obj, type):
        return [f"quantizer must be a class built as cls(**kwargs) with methods {', '.join(QUANTIZER_METHODS)}, "
                f"got {obj!r}"]
    problems = []
    missing = [name for name in QUANTIZER_METHODS if not callable(getattr(obj, name, None))]
    if missing:
        problems.append(f"quantizer class must have the methods {', '.join(QUANTIZER_METHODS)}; missing: "
                        f"{', '.join(missing)}")
    model = metadata.get("kwargs_model")
    if isinstance(model, type) and issubclass(model, BaseModel):
        cannot = cannot_take(obj, keywords=tuple(model.model_fields))
        if cannot:
            problems.append(f"quantizer class must be built as cls(**kwargs) with its kwargs_model's fields; it "
                            f"cannot take: {', '.join(cannot)}")
    return problems


_layer_module = module_class("layer", "config", "num_blocks")


def check_layer(obj: Any, metadata: Mapping[str, Any]) -> list[str]:
    """A flax module class with fields ``config`` and ``num_blocks``; ``derived_sizes`` and ``check_config`` callable."""
    problems = _layer_module(obj, metadata)
    for key in ("derived_sizes", "check_config"):
        if key in metadata and not callable(metadata[key]):
            problems.append(f"{key} must be callable, got {metadata[key]!r}")
    return problems
