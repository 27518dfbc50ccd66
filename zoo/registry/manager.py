"""The plugin registry: built-ins plus entry-point plugins, each loaded in isolation."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .hookspecs import HOOK_BY_KIND, KINDS, PROJECT

ENTRY_POINT_GROUP = "zoo"
BUILTIN_DIST = "xlstm-zoo"


class PluginError(Exception):
    """A plugin could not be loaded or registered."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name for the same kind."""


class UnknownPluginError(LookupError):
    """A name was resolved that no loaded plugin registered."""

    def __str__(self) -> str:  # LookupError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Registration:
    """One registered object: its kind and name, where it came from, and its metadata."""

    kind: str
    name: str
    obj: Any
    plugin: str
    dist: str | None
    version: str | None
    metadata: Mapping[str, Any]

    @property
    def origin(self) -> str:
        """Human-readable origin: plugin name plus distribution and version."""
        if self.dist:
            return f"{self.plugin} ({self.dist} {self.version or '?'})"
        return self.plugin


@dataclass
class PluginInfo:
    """What one plugin is, what it registered, and why it failed if it did."""

    name: str
    dist: str | None = None
    version: str | None = None
    entry_point: str | None = None
    builtin: bool = False
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        """True when the plugin loaded and registered without error."""
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "name": self.name,
            "dist": self.dist,
            "version": self.version,
            "entry_point": self.entry_point,
            "builtin": self.builtin,
            "registered": self.registered,
            "error": self.error,
            "traceback": self.traceback,
        }


def _short_traceback(exc: BaseException, limit: int = 6) -> str:
    return "".join(traceback.format_exception(exc, limit=-limit)).rstrip()


def _check_metadata(kind: str, name: str, metadata: Mapping[str, Any]) -> None:
    model = metadata.get("kwargs_model")
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise PluginError(f"{kind} {name!r}: kwargs_model must be a pydantic BaseModel subclass, got {model!r}")


class PluginRegistry:
    """Holds every registered object by kind and name, and the load record of every plugin.

    Built-ins register through the same hooks as third-party plugins. Each plugin is added
    atomically: if any of its hooks raises, or it registers a name that is already taken,
    nothing of it is kept and the failure is recorded on its :class:`PluginInfo`.
    """

    def __init__(
        self,
        *,
        builtins: bool = True,
        autoload: bool | None = None,
        allowlist: Iterable[str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}
        if builtins:
            self._load_builtins()
        if autoload is None:
            autoload = os.environ.get("ZOO_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in {"1", "true", "yes"}
        if allowlist is None and os.environ.get("ZOO_PLUGINS", "").strip():
            allowlist = [n.strip() for n in os.environ["ZOO_PLUGINS"].split(",") if n.strip()]
        if autoload:
            self.load_entry_points(allowlist)

    # -- loading -------------------------------------------------------------------------

    def _load_builtins(self) -> None:
        from zoo import __version__
        from zoo.plugins import BUILTIN_MODULES

        for module_name in BUILTIN_MODULES:
            info = self.add_plugin(importlib.import_module(module_name), module_name,
                                   dist=BUILTIN_DIST, version=__version__, builtin=True)
            if not info.ok:
                raise PluginError(f"built-in plugin {module_name} failed: {info.error}")

    def load_entry_points(self, allowlist: Iterable[str] | None = None) -> None:
        """Load every plugin of the ``zoo`` entry-point group, one at a time, keeping failures."""
        wanted = set(allowlist) if allowlist is not None else None
        seen: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if wanted is not None and not ({ep.name, dist} & wanted):
                continue
            seen.update({ep.name, dist})
            spec = f"{ep.name} = {ep.value}"
            try:
                obj = ep.load()
            except Exception as exc:  # any import-time failure is the plugin's, not ours
                self.plugins[ep.name] = PluginInfo(
                    ep.name, dist, version, spec,
                    error=f"failed to import: {type(exc).__name__}: {exc}",
                    traceback=_short_traceback(exc))
                continue
            self.add_plugin(obj, ep.name, dist=dist, version=version, entry_point=spec)
        for missing in sorted((wanted or set()) - seen):
            self.plugins[missing] = PluginInfo(
                missing, error="named in ZOO_PLUGINS but no installed plugin has that name")

    def add_plugin(
        self,
        obj: Any,
        name: str,
        *,
        dist: str | None = None,
        version: str | None = None,
        entry_point: str | None = None,
        builtin: bool = False,
    ) -> PluginInfo:
        """Register ``obj``'s hooks and collect its registrations; failures are recorded, not raised."""
        info = PluginInfo(name, dist, version, entry_point, builtin)
        self.plugins[name] = info
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            info.error = f"{type(exc).__name__}: {exc}"
            info.traceback = _short_traceback(exc)
            return info
        try:
            self._check_hooks(obj)
            pending = self._collect(obj, info)
            self._check_conflicts(pending)
        except Exception as exc:
            self.pm.unregister(obj)
            info.error = f"{type(exc).__name__}: {exc}"
            info.traceback = _short_traceback(exc)
            return info
        for reg in pending:
            self._entries[reg.kind][reg.name] = reg
            info.registered.setdefault(reg.kind, []).append(reg.name)
        return info

    def _check_hooks(self, obj: Any) -> None:
        for caller in self.pm.get_hookcallers(obj) or []:
            if not caller.has_spec():
                raise PluginError(
                    f"unknown hook {caller.name!r}; known hooks: {', '.join(HOOK_BY_KIND.values())}")

    def _collect(self, obj: Any, info: PluginInfo) -> list[Registration]:
        others = [p for p in self.pm.get_plugins() if p is not obj]
        pending: list[Registration] = []
        for kind, hook_name in HOOK_BY_KIND.items():
            register = self._register_callback(kind, info, pending)
            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        return pending

    @staticmethod
    def _register_callback(kind: str, info: PluginInfo, pending: list[Registration]):
        def register(name: str, obj: Any, **metadata: Any) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(f"{kind} names must be non-empty strings, got {name!r}")
            _check_metadata(kind, name, metadata)
            pending.append(Registration(kind, name, obj, info.name, info.dist, info.version, metadata))

        return register

    def _check_conflicts(self, pending: list[Registration]) -> None:
        seen: dict[tuple[str, str], Registration] = {}
        for reg in pending:
            key = (reg.kind, reg.name)
            first = seen.get(key) or self._entries[reg.kind].get(reg.name)
            if first is not None:
                raise PluginConflictError(
                    f"{reg.kind} {reg.name!r} is registered twice: by {first.origin} and by {reg.origin}")
            seen[key] = reg

    # -- queries -------------------------------------------------------------------------

    def available(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(self._table(kind))

    def entry(self, kind: str, name: str) -> Registration:
        """The full registration of ``name`` in ``kind``; unknown names list the known ones."""
        table = self._table(kind)
        if name in table:
            return table[name]
        message = f"unknown {kind} {name!r}; registered {kind} names: {', '.join(sorted(table)) or '(none)'}"
        close = difflib.get_close_matches(name, list(table), n=1)
        if close:
            message += f". Did you mean {close[0]!r}?"
        failed = [p for p in self.plugins.values() if not p.ok]
        if failed:
            message += ". Plugins that failed to load: " + "; ".join(f"{p.name} ({p.error})" for p in failed)
        raise UnknownPluginError(message)

    def resolve(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` in ``kind``."""
        return self.entry(kind, name).obj

    def describe(self, kind: str | None = None) -> list[Registration]:
        """Every registration, optionally of one kind, sorted by kind and name."""
        kinds = [kind] if kind is not None else list(KINDS)
        return [self._table(k)[n] for k in kinds for n in sorted(self._table(k))]

    def failures(self) -> list[PluginInfo]:
        """Plugins that failed to import or register."""
        return [p for p in self.plugins.values() if not p.ok]

    def _table(self, kind: str) -> dict[str, Registration]:
        if kind not in self._entries:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._entries[kind]
