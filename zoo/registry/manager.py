"""The plugin registry: built-ins plus entry-point plugins, each loaded in isolation."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from zoo.errors import ZooError
from zoo.version import DISTRIBUTION, __version__
from . import hookspecs
from .contracts import ContractError
from .hookspecs import PROJECT
from .kinds import HOOK_BY_KIND, KINDS, check_registration

ENTRY_POINT_GROUP = "zoo"
BUILTIN_DIST = DISTRIBUTION
BUILTIN_MODULES = (
    "zoo.plugins.norms",
    "zoo.plugins.inits",
    "zoo.plugins.cells.parallel",
    "zoo.plugins.cells.chunkwise",
    "zoo.plugins.cells.recurrent",
    "zoo.plugins.layers.mlstm",
    "zoo.plugins.layers.mlstm_v1",
    "zoo.plugins.quantizers.int8",
    "zoo.export.stablehlo",
    "zoo.export.savedmodel",
)
"""The built-in plugin modules, registered under ``BUILTIN_DIST`` before any entry point."""
TRUE = {"1", "true", "yes"}
_NON_ALNUM = re.compile(r"[-_.]+")

_log = logging.getLogger("zoo.plugins")


def _origin(plugin: str, dist: str | None, version: str | None) -> str:
    return f"{plugin} ({dist} {version or '?'})" if dist else plugin


class PluginError(ZooError):
    """A plugin could not be loaded or registered."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name for the same kind."""


class UnknownPluginError(ZooError, LookupError):
    """A name was resolved that no loaded plugin registered."""

    def __str__(self) -> str:  # LookupError quotes its message; keep it readable
        return str(self.args[0])


class AmbiguousPluginError(UnknownPluginError):
    """A bare name was resolved that several distributions registered, none with ``override=True``."""


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
    builtin: bool = False

    @property
    def namespace(self) -> str:
        """The prefix of the qualified name: the distribution, or the plugin name when there is none."""
        return self.dist or self.plugin

    @property
    def qualified_name(self) -> str:
        """``namespace:name``, unique even when two distributions register the same name."""
        return f"{self.namespace}:{self.name}"

    @property
    def override(self) -> bool:
        """True when the plugin asked this registration to take the bare name from earlier ones."""
        return bool(self.metadata.get("override"))

    @property
    def origin(self) -> str:
        """Human-readable origin: plugin name plus distribution and version."""
        return _origin(self.plugin, self.dist, self.version)


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

    @property
    def key(self) -> tuple[str | None, str]:
        """``(distribution, name)``: what tells two plugins apart (two distributions may share an
        entry-point name); the key of :attr:`PluginRegistry.plugins`."""
        return (self.dist, self.name)

    @property
    def qualified_name(self) -> str:
        """``dist:name``, or the name alone when there is no distribution (the name pluggy knows it by)."""
        return f"{self.dist}:{self.name}" if self.dist else self.name

    @property
    def origin(self) -> str:
        """Human-readable origin: plugin name plus distribution and version."""
        return _origin(self.name, self.dist, self.version)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "name": self.name,
            "qualified_name": self.qualified_name,
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


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (pluggy's messages span several)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {'; '.join(lines)}"


def _same_name(a: str | None, b: str) -> bool:
    """Whether two distribution names are the same once normalised (PEP 503: ``-``, ``_``, ``.`` and case)."""
    return a is not None and _NON_ALNUM.sub("-", a).lower() == _NON_ALNUM.sub("-", b).lower()


@dataclass(frozen=True)
class Conflict:
    """Several plugins registered one name for one kind: who did, and what the bare name resolves to.

    The bare name goes to the one registration that says ``override=True``; failing that, to the
    built-in one; failing that, it is ambiguous. Every registration stays reachable as ``dist:name``.
    """

    kind: str
    name: str
    registrations: tuple[Registration, ...]

    @property
    def winner(self) -> Registration | None:
        """The registration the bare name resolves to, or None when it is ambiguous."""
        overrides = [r for r in self.registrations if r.override]
        if overrides:
            return overrides[0] if len(overrides) == 1 else None
        return next((r for r in self.registrations if r.builtin), None)

    def __str__(self) -> str:
        who = " and by ".join(r.origin for r in self.registrations)
        winner = self.winner
        if winner is None:
            return (f"{self.kind} {self.name!r} is registered by {who}; name one of "
                    f"{', '.join(repr(r.qualified_name) for r in self.registrations)}, or let one plugin register "
                    f"it with override=True")
        why = "registered with override=True" if winner.override else "built in; override=True would take it"
        others = ", ".join(repr(r.qualified_name) for r in self.registrations if r is not winner)
        return (f"{self.kind} {self.name!r} is registered by {who}; the name means {winner.qualified_name!r} "
                f"({why}), the others stay reachable as {others}")


def _start_tracing(pm: pluggy.PluginManager) -> None:
    """Log every hook call (which plugins it reaches) and its outcome to the ``zoo.plugins`` logger on stderr."""
    if not _log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("zoo.plugins: %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False

    def before(hook_name: str, impls: list[Any], kwargs: Mapping[str, Any]) -> None:
        if impls:
            _log.info("calling %s of %s", hook_name, ", ".join(impl.plugin_name for impl in impls))

    def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: Mapping[str, Any]) -> None:
        if outcome.exception is not None:
            _log.info("%s raised %s: %s", hook_name, type(outcome.exception).__name__, outcome.exception)

    pm.add_hookcall_monitoring(before, after)


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
        trace: bool | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.trace = os.environ.get("ZOO_TRACE_PLUGINS", "").strip().lower() in TRUE if trace is None else trace
        if self.trace:
            _start_tracing(self.pm)
        self._entries: dict[str, dict[str, list[Registration]]] = {kind: {} for kind in KINDS}
        self.plugins: dict[tuple[str | None, str], PluginInfo] = {}  # by PluginInfo.key
        if builtins:
            self._load_builtins()
        if autoload is None:
            autoload = os.environ.get("ZOO_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in TRUE
        if allowlist is None and os.environ.get("ZOO_PLUGINS", "").strip():
            allowlist = [n.strip() for n in os.environ["ZOO_PLUGINS"].split(",") if n.strip()]
        if autoload:
            self.load_entry_points(allowlist)

    # -- loading -------------------------------------------------------------------------

    def _load_builtins(self) -> None:
        for module_name in BUILTIN_MODULES:
            # the one allowed path from the core to the built-in plugins (as simonw/llm loads its default plugins)
            info = self.add_plugin(importlib.import_module(module_name), module_name,
                                   dist=BUILTIN_DIST, version=__version__, builtin=True)
            if not info.ok:
                raise PluginError(f"built-in plugin {module_name} failed: {info.error}")

    def load_entry_points(self, allowlist: Iterable[str] | None = None) -> None:
        """Load every plugin of the ``zoo`` entry-point group, one at a time, keeping failures.

        Each item of ``allowlist`` names a distribution (``-``, ``_`` and ``.`` spelt alike), one entry
        point of one distribution (``dist:entry``), or a bare entry-point name. An item that selects
        nothing, or a bare name that selects plugins of several distributions (none of which is then
        loaded), is recorded as a failed plugin of that name that says why.
        """
        found = [(ep, ep.dist.metadata["Name"] if ep.dist is not None else None,
                  ep.dist.version if ep.dist is not None else None)
                 for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
        if allowlist is not None:
            found = self._allowed(found, allowlist)
        for ep, dist, version in found:
            spec = f"{ep.name} = {ep.value}"
            if self.trace:
                _log.info("loading entry point %s from %s %s", spec, dist, version)
            try:
                obj = ep.load()
            except Exception as exc:  # any import-time failure is the plugin's, not ours
                info = PluginInfo(ep.name, dist, version, spec, error=f"failed to import: {_one_line(exc)}",
                                  traceback=_short_traceback(exc))
                self.plugins.setdefault(info.key, info)
                continue
            self.add_plugin(obj, ep.name, dist=dist, version=version, entry_point=spec)

    def _allowed(self, found: list[tuple[Any, str | None, str | None]],
                 allowlist: Iterable[str]) -> list[tuple[Any, str | None, str | None]]:
        """The entries of ``found`` that ``allowlist`` selects; records the items it cannot use."""
        chosen: set[int] = set()
        for item in dict.fromkeys(allowlist):
            dist_name, _, ep_name = item.rpartition(":")
            if dist_name:
                matches = [i for i, (ep, dist, _) in enumerate(found)
                           if ep.name == ep_name and _same_name(dist, dist_name)]
            else:
                matches = [i for i, (ep, dist, _) in enumerate(found) if ep.name == item or _same_name(dist, item)]
            dists = list(dict.fromkeys(f"{found[i][1]} {found[i][2] or '?'}" for i in matches))
            error = None
            if not matches:
                error = "no installed plugin or distribution has that name"
            elif len(dists) > 1:
                qualified = " or ".join(repr(f"{found[i][1]}:{found[i][0].name}") for i in matches)
                error = (f"entry points of {len(dists)} distributions have that name: {' and '.join(dists)}; "
                         f"none of them was loaded; name one as {qualified}")
            if error:
                info = PluginInfo(item, error=f"requested (ZOO_PLUGINS or an explicit load) but {error}")
                self.plugins[info.key] = info
            else:
                chosen.update(matches)
        return [entry for i, entry in enumerate(found) if i in chosen]

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
        """Register ``obj``'s hooks and collect its registrations; failures are recorded, not raised.

        Plugins are told apart by ``(dist, name)`` (:attr:`PluginInfo.key`): two distributions may
        use one name. A second plugin of the same key, or an object that is already loaded under
        another key, is refused; the refusal is returned but not recorded over the loaded plugin.
        """
        info = PluginInfo(name, dist, version, entry_point, builtin)
        if info.key in self.plugins:
            info.error = f"PluginError: {info.origin} is already loaded"
            return info
        self.plugins[info.key] = info
        taken = self.pm.get_name(obj)
        if taken is not None:
            same = next((p.origin for p in self.plugins.values() if p.qualified_name == taken), taken)
            info.error = f"PluginError: {info.origin} is the object already loaded as {same}"
            return info
        try:
            self.pm.register(obj, name=info.qualified_name)
        except Exception as exc:
            info.error = _one_line(exc)
            info.traceback = _short_traceback(exc)
            return info
        try:
            self._check_hooks(obj)
            pending = self._collect(obj, info)
            self._check_conflicts(pending)
        except Exception as exc:
            self.pm.unregister(obj)
            info.error = _one_line(exc)
            info.traceback = _short_traceback(exc)
            return info
        for reg in pending:
            self._entries[reg.kind].setdefault(reg.name, []).append(reg)
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

    def _register_callback(self, kind: str, info: PluginInfo, pending: list[Registration]):
        def register(name: str, obj: Any, **metadata: Any) -> None:
            if not isinstance(name, str) or not name or ":" in name:
                raise PluginError(f"{kind} names must be non-empty strings without ':', got {name!r}")
            try:
                check_registration(kind, obj, metadata)
            except ContractError as exc:
                raise ContractError(f"{kind} {name!r} from {info.name}: {exc}") from None
            reg = Registration(kind, name, obj, info.name, info.dist, info.version, metadata, info.builtin)
            if self.trace:
                _log.info("%s registered %s %r%s", info.qualified_name, kind, name,
                          " (override)" if reg.override else "")
            pending.append(reg)

        return register

    def _check_conflicts(self, pending: list[Registration]) -> None:
        """Refuse a name registered twice by one plugin, or by two plugins of one distribution.

        Two distributions registering one name is allowed: both stay reachable as ``dist:name``,
        and :meth:`conflicts` reports them (see :class:`Conflict` for what the bare name means).
        """
        seen: dict[tuple[str, str], Registration] = {}
        for reg in pending:
            key = (reg.kind, reg.name)
            same = [r for r in self._entries[reg.kind].get(reg.name, []) if r.namespace == reg.namespace]
            first = seen.get(key) or (same[0] if same else None)
            if first is not None:
                raise PluginConflictError(
                    f"{reg.kind} {reg.name!r} is registered twice: by {first.origin} and by {reg.origin}")
            seen[key] = reg

    # -- queries -------------------------------------------------------------------------

    def available(self, kind: str) -> list[str]:
        """Sorted names that resolve for ``kind``: each unambiguous bare name, plus ``dist:name`` for
        every registration of a name that several plugins registered."""
        names = []
        for name, regs in self._table(kind).items():
            if isinstance(self._lookup(kind, name), Registration):
                names.append(name)
            if len(regs) > 1:
                names += [r.qualified_name for r in regs]
        return sorted(names)

    def _lookup(self, kind: str, name: str) -> Registration | Conflict | None:
        table = self._table(kind)
        if ":" in name:
            namespace, bare = name.split(":", 1)
            return next((r for r in table.get(bare, []) if _same_name(r.namespace, namespace)), None)
        regs = table.get(name, [])
        if len(regs) <= 1:
            return regs[0] if regs else None
        conflict = Conflict(kind, name, tuple(regs))
        return conflict.winner or conflict

    def entry(self, kind: str, name: str) -> Registration:
        """The registration of ``name`` (or ``dist:name``) in ``kind``; unknown or ambiguous names explain why."""
        found = self._lookup(kind, name)
        if isinstance(found, Registration):
            return found
        if isinstance(found, Conflict):
            raise AmbiguousPluginError(f"ambiguous {kind} name: {found}")
        known = self.available(kind)
        message = f"unknown {kind} {name!r}; registered {kind} names: {', '.join(known) or '(none)'}"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            message += f". Did you mean {close[0]!r}?"
        failed = [p for p in self.plugins.values() if not p.ok]
        if failed:
            message += ". Plugins that failed to load: " + "; ".join(f"{p.origin} ({p.error})" for p in failed)
        raise UnknownPluginError(message)

    def resolve(self, kind: str, name: str) -> Any:
        """The object registered as ``name`` in ``kind``."""
        return self.entry(kind, name).obj

    def describe(self, kind: str | None = None) -> list[Registration]:
        """Every registration (conflicting ones included), optionally of one kind, sorted by kind and name."""
        kinds = [kind] if kind is not None else list(KINDS)
        return [r for k in kinds for n in sorted(self._table(k)) for r in self._table(k)[n]]

    def conflicts(self) -> list[Conflict]:
        """Names registered by more than one plugin, with what each bare name resolves to."""
        found = []
        for kind in KINDS:
            for name, regs in sorted(self._table(kind).items()):
                if len(regs) > 1:
                    found.append(Conflict(kind, name, tuple(regs)))
        return found

    def shared_entry_points(self) -> list[str]:
        """One line per entry-point name that several distributions use: both load, told apart by distribution."""
        by_name: dict[str, list[PluginInfo]] = {}
        for info in self.plugins.values():
            if info.entry_point is not None:
                by_name.setdefault(info.name, []).append(info)
        return [f"entry point {name!r} is used by {' and by '.join(p.origin for p in infos)}; each is loaded as "
                f"its own plugin ({', '.join(p.qualified_name for p in infos)})"
                for name, infos in sorted(by_name.items()) if len(infos) > 1]

    def failures(self) -> list[PluginInfo]:
        """Plugins that failed to import or register."""
        return [p for p in self.plugins.values() if not p.ok]

    def _table(self, kind: str) -> dict[str, list[Registration]]:
        if kind not in self._entries:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
        return self._entries[kind]
