"""Plugin registry: hooks, the plugin manager, and name resolution.

``resolve(kind, name)`` and ``available(kind)`` use the process-wide registry, which is built
on first use from the built-in plugins plus the ``zoo`` entry-point group
(``ZOO_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points, ``ZOO_PLUGINS=a,b`` is an allowlist,
``ZOO_TRACE_PLUGINS=1`` logs every hook call and registration to stderr). A name registered by
several distributions stays reachable as ``dist:name`` for each of them. The bare name goes to the
one registration made with ``override=True``; when none says ``override=True``, built-in names win
and it goes to the built-in registration. With several overrides, or with neither an override nor a
built-in, it is ambiguous and resolving it names every candidate (see ``Conflict``). The plugin
kinds, their hooks, metadata and contracts are one table, ``zoo.registry.kinds``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .hookspecs import KINDS, hookimpl, hookspec
from .contracts import ContractError
from .manager import (
    AmbiguousPluginError,
    Conflict,
    PluginConflictError,
    PluginError,
    PluginInfo,
    PluginRegistry,
    Registration,
    UnknownPluginError,
)

__all__ = [
    "KINDS", "AmbiguousPluginError", "Conflict", "ContractError", "PluginConflictError", "PluginError",
    "PluginInfo", "PluginRegistry", "Registration", "UnknownPluginError", "available", "describe", "entry",
    "get_registry", "hookimpl", "hookspec", "resolve", "use_registry",
]

_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = PluginRegistry()
    return _registry


@contextlib.contextmanager
def use_registry(registry: PluginRegistry) -> Iterator[PluginRegistry]:
    """Make ``registry`` the process-wide one inside the ``with`` block (for tests and tools)."""
    global _registry
    previous, _registry = _registry, registry
    try:
        yield registry
    finally:
        _registry = previous


def resolve(kind: str, name: str) -> Any:
    """The object registered as ``name`` for ``kind``; an unknown name lists the registered ones."""
    return get_registry().resolve(kind, name)


def entry(kind: str, name: str) -> Registration:
    """The registration (object, origin, metadata) of ``name`` for ``kind``."""
    return get_registry().entry(kind, name)


def available(kind: str) -> list[str]:
    """Sorted registered names for ``kind``."""
    return get_registry().available(kind)


def describe(kind: str | None = None) -> list[Registration]:
    """All registrations, optionally of one kind."""
    return get_registry().describe(kind)
