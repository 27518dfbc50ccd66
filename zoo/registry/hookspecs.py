"""Hook specifications: one hook per plugin kind, each handed a ``register`` callback.

A plugin module (built-in or third-party) implements any of these hooks::

    from zoo.registry import hookimpl

    @hookimpl
    def register_cells(register):
        register("my_kernel", my_kernel, supports_state=True, exportable=True,
                 platforms=("cpu", "cuda"), kwargs_model=MyKernelKwargs)

``register(name, obj, **metadata)`` adds ``obj`` under ``name`` for that hook's kind.
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT = "zoo"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback each hook receives."""

    def __call__(self, name: str, obj: Any, **metadata: Any) -> None: ...


@hookspec
def register_layers(register: Register) -> None:
    """Register mLSTM layer types: flax modules built as ``cls(config=LayerConfig, num_blocks=int)``.

    Called as ``layer(x, document_borders=None, deterministic=True, mode="forward", state=None)``
    on ``x (B, S, D)``; returns ``(y (B, S, D), state)``, where ``mode`` is ``forward`` (no state),
    ``prefill`` or ``step`` (a dict of float32 arrays in and out). Metadata: ``derived_sizes(cfg)``,
    ``check_config(cfg) -> [(field, message)]`` and ``unused_fields``.
    """


@hookspec
def register_norms(register: Register) -> None:
    """Register norm types: flax modules built as ``cls(eps=float, dtype=dtype, scale_ndim=int)``."""


@hookspec
def register_inits(register: Register) -> None:
    """Register init functions ``fn(dim, num_blocks, distribution) -> jax initializer``."""


@hookspec
def register_distributions(register: Register) -> None:
    """Register distributions ``fn(std) -> jax initializer`` used by the init functions."""


@hookspec
def register_cells(register: Register) -> None:
    """Register mLSTM cell backends following the cell contract (see ``zoo.plugins.cells``)."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register exporters that turn a saved model into a serving artifact."""


HOOK_BY_KIND = {
    "layer": "register_layers",
    "norm": "register_norms",
    "init": "register_inits",
    "distribution": "register_distributions",
    "cell": "register_cells",
    "exporter": "register_exporters",
}
KINDS = tuple(HOOK_BY_KIND)
