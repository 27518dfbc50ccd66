"""Hook specifications: one hook per plugin kind of :mod:`zoo.registry.kinds`, each handed a ``register`` callback.

A plugin module (built-in or third-party) implements any of these hooks::

    from zoo.registry import hookimpl

    @hookimpl
    def register_cells(register):
        register("my_kernel", my_kernel, supports_state=True, exportable=True,
                 platforms=("cpu", "cuda"), kwargs_model=MyKernelKwargs)

``register(name, obj, **metadata)`` adds ``obj`` under ``name`` for that hook's kind. The hook
functions (``register_layers``, ``register_cells``, ...) are made below, one per row of the kind
table, with the row's documentation; ``HOOK_BY_KIND`` maps each kind to its hook.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

from .kinds import HOOK_BY_KIND, KINDS, TABLE, Kind

PROJECT = "zoo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["HOOK_BY_KIND", "KINDS", "PROJECT", "Register", "hookimpl", "hookspec", *HOOK_BY_KIND.values()]


class Register(Protocol):
    """The callback each hook receives."""

    def __call__(self, name: str, obj: Any, **metadata: Any) -> None: ...


def _hookspec(kind: Kind):
    def hook(register: Register) -> None: ...

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = kind.hook_doc
    return hookspec(hook)


for _kind in TABLE.values():  # pluggy's add_hookspecs(module) finds them as module attributes
    globals()[_kind.hook] = _hookspec(_kind)
del _kind
