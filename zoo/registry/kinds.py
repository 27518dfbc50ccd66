"""The table of plugin kinds: the one place a kind is defined.

Each :class:`Kind` names its hook, documents what ``register(name, obj, **metadata)`` takes, lists
its required and optional metadata and holds its contract check. The hook specifications
(:mod:`zoo.registry.hookspecs`) and the registration checks (:func:`check_registration`) are read
from it, so a new kind is one more row of :data:`TABLE` (with its check in
:mod:`zoo.registry.contracts` when it needs more than a call signature).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .contracts import (
    COMMON_METADATA,
    Check,
    ContractError,
    callable_as,
    check_cell,
    check_layer,
    check_metadata,
    check_quantizer,
    module_class,
)


@dataclass(frozen=True)
class Kind:
    """One kind of plugin object: its hook, the hook's documentation, its metadata and its contract check."""

    name: str
    hook: str
    doc: str
    check: Check
    required: frozenset[str] = field(default_factory=frozenset)
    optional: frozenset[str] = field(default_factory=frozenset)

    @property
    def hook_doc(self) -> str:
        """The hook's docstring: :attr:`doc` plus the metadata it accepts."""

        def names(keys: frozenset[str]) -> str:
            return ", ".join(f"``{k}``" for k in sorted(keys)) or "none"

        return (f"{inspect.cleandoc(self.doc)}\n\nMetadata: required {names(self.required)}; optional {names(self.optional)}; "
                f"every kind also takes {names(COMMON_METADATA)}.")

    def problems(self, obj: Any, metadata: Mapping[str, Any]) -> list[str]:
        """Every way ``obj`` and ``metadata`` break this kind's contract (empty when they do not)."""
        return check_metadata(self.name, self.required, self.optional, metadata) + self.check(obj, metadata)


TABLE: dict[str, Kind] = {kind.name: kind for kind in (
    Kind(
        "layer", "register_layers",
        """Register mLSTM layer types: flax modules built as ``cls(config=LayerConfig, num_blocks=int)``.

        Called as ``layer(x, document_borders=None, deterministic=True, mode="forward", state=None)``
        on ``x (B, S, D)``; returns ``(y (B, S, D), state)``, where ``mode`` is ``forward`` (no state),
        ``prefill`` or ``step`` (a dict of float32 arrays in and out). For a right-padded ragged batch
        the block also passes ``lengths=`` int32 ``(B,)`` (only then; a layer without the keyword is
        refused then, and works for everything else): steps ``t >= lengths[b]`` must leave row b's state
        untouched, which ``run_cell(..., lengths)`` and ``CausalConv1d(...)(x, state, lengths)`` do for the
        parts they run; the outputs there are ignored but must be finite. ``zoo.nn.layers`` and
        ``zoo.nn.cell`` hold the parts a layer builds on. ``derived_sizes(cfg) -> dict`` gives the
        layer's derived widths, ``check_config(cfg) -> [(field, message)]`` its size errors, and
        ``unused_fields`` the dotted config fields it ignores (a config that sets one is refused).""",
        check_layer, frozenset({"derived_sizes"}), frozenset({"check_config", "unused_fields"})),
    Kind(
        "norm", "register_norms",
        """Register norm types: flax modules built as ``cls(eps=float, dtype=dtype, scale_ndim=int)``.

        Called on ``x (..., F)``; returns the normalised ``x`` in ``dtype``, with a learned scale over
        the trailing ``scale_ndim`` axes (2: a per-head scale on ``(..., NH, DH)``).""",
        module_class("norm", "eps", "dtype", "scale_ndim")),
    Kind(
        "init", "register_inits",
        "Register init functions ``fn(dim, num_blocks, distribution) -> jax initializer``.",
        callable_as("init", "fn(dim, num_blocks, distribution)", "dim", "num_blocks", "distribution")),
    Kind(
        "distribution", "register_distributions",
        "Register distributions ``fn(std) -> jax initializer`` used by the init functions.",
        callable_as("distribution", "fn(std)", "std")),
    Kind(
        "cell", "register_cells",
        """Register mLSTM cell backends following the cell contract of ``zoo.nn.cell``.

        ``cell(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
        eps=1e-6, **kwargs)`` on ``q, k (B, NH, S, DQK)``, ``v (B, NH, S, DV)``, ``i, f (B, NH, S)``
        returns ``h (B, NH, S, DV)``, or ``(h, (c, n, m))`` with ``return_last_states``. ``supports_state``
        and ``exportable`` are bools, ``platforms`` a tuple among cpu, cuda, tpu, ``kwargs_model`` the
        pydantic model of ``backend.kwargs``, ``reference`` and ``state_reference`` the cells
        ``zoo.testing`` compares it with, ``sequence_constraint`` a note on the lengths it is meant for.""",
        check_cell, frozenset({"supports_state", "exportable", "platforms"}),
        frozenset({"sequence_constraint", "kwargs_model", "reference", "state_reference"})),
    Kind(
        "exporter", "register_exporters",
        """Register exporters, the formats of ``zoo export --format``.

        Called as ``fn(config, params, out_dir, *, platforms, entries, **options) -> Path`` with a
        ``ModelConfig``, its param pytree and the folder to create; ``platforms`` among cpu, cuda, tpu;
        ``entries`` among forward, prefill, step; ``options`` as the CLI passes them: ``weights`` (str),
        ``static`` (a ``(B, S)`` tuple) and ``mlir`` (bool), each only when given. An exporter raises
        ``ExportError`` for an option it does not support and returns the folder it wrote. ``weights``
        lists the ``weights`` values it accepts.""",
        callable_as("exporter", "fn(config, params, out_dir, *, platforms, entries, **options)",
                    "config", "params", "out_dir", keywords=("platforms", "entries")),
        optional=frozenset({"weights"})),
    Kind(
        "quantizer", "register_quantizers",
        """Register weight quantizers, the methods of ``quantization.method`` and ``zoo quantize --method``.

        ``obj`` is a class built as ``cls(**kwargs)`` from ``quantization.kwargs`` (validated by
        ``kwargs_model``). The model offers it every ``nn.Dense`` kernel and ``nn.Embed`` table as a weight
        ``W (K, N)`` of ``y = x @ W`` (a table as its transpose ``(D, V)``), named by its module path
        (``blocks_0/xlstm/proj_up``, ``lm_head``, ``token_embedding``). ``select(path, (K, N)) -> bool`` picks the
        weights to store quantised; ``quantize(W float32 (K, N)) -> dict`` of arrays is what the checkpoint
        holds in W's place; ``dequantize(stored) -> (K, N)`` float32 inverts it; ``axes(names) -> dict`` gives
        the logical axis names of each stored array from W's two names. Optional: ``matmul(x (..., K), stored)
        -> (..., N)`` in ``x.dtype`` and ``columns(stored, ids) -> (*ids.shape, K)`` (the default dequantises);
        ``zoo.nn.quant.Quantizer`` documents the contract.""",
        check_quantizer, optional=frozenset({"kwargs_model"})),
)}
"""Every plugin kind by name, in the order hooks are called."""

KINDS = tuple(TABLE)
HOOK_BY_KIND = {kind.name: kind.hook for kind in TABLE.values()}


def check_registration(kind: str, obj: Any, metadata: Mapping[str, Any]) -> None:
    """Raise :class:`ContractError` listing every way ``obj`` and ``metadata`` break ``kind``'s contract."""
    problems = TABLE[kind].problems(obj, metadata)
    if problems:
        raise ContractError("; ".join(problems))
