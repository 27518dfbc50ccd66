"""The cell contract: what every mLSTM cell backend (built-in or third-party) computes and declares.

A cell is a callable, registered through the ``register_cells`` hook, with the call signature of
NX-AI's ``mlstm_kernels``::

    h = cell(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None,
             return_last_states=False, eps=1e-6, **kwargs)

========  =========================================================  ===================================
argument  shape                                                      dtype
========  =========================================================  ===================================
``q, k``  ``(B, NH, S, DQK)``                                        the model's compute ``dtype``
``v``     ``(B, NH, S, DV)``                                         the model's compute ``dtype``
``i, f``  ``(B, NH, S)``: input and forget gate pre-activations      ``gate_dtype`` (float32 by default)
``h``     ``(B, NH, S, DV)``                                         ``v.dtype``
states    ``c (B, NH, DQK, DV)``, ``n (B, NH, DQK)``, ``m (B, NH)``  float32
========  =========================================================  ===================================

With ``return_last_states=True`` the cell returns ``(h, (c, n, m))``: the states after the last
step. ``c_initial``, ``n_initial`` and ``m_initial`` are given all three or not at all (zeros).
Queries are scaled by ``1/√DQK`` inside the cell, keys are not: the states follow xlstm-jax's
k-unscaled convention. Per step, with ``m_t = max(log σ(f_t) + m_{t-1}, i_t)``::

    c_t = exp(log σ(f_t) + m_{t-1} - m_t)·c_{t-1} + exp(i_t - m_t)·k_t v_tᵀ      (k_t unscaled)
    n_t = exp(log σ(f_t) + m_{t-1} - m_t)·n_{t-1} + exp(i_t - m_t)·k_t
    h_t = (q_t/√DQK)ᵀ c_t / (max(|(q_t/√DQK)ᵀ n_t|, exp(-m_t)) + eps)

so ``c`` and ``n`` are stabilised by ``m`` (the true memory is ``exp(m)·c``). A
cell must accept any ``S ≥ 1`` (also lengths that are not a multiple of its chunk size), be
differentiable in ``q, k, v, i, f`` (a ``jax.custom_vjp`` is fine) and avoid Python comparisons on
``S``, which may be symbolic under ``jax.export``.

Registration metadata (``register(name, cell, **metadata)``; checked by ``zoo.registry.contracts``):

- ``supports_state`` (bool, required): the cell takes ``c_initial``, ``n_initial``, ``m_initial``
  and ``return_last_states``. Only such cells may be a ``prefill_backend`` or ``step_backend``.
- ``exportable`` (bool, required): the cell lowers through ``jax.export`` without custom calls that
  other machines cannot run; ``zoo export`` refuses a model whose entries run a cell that is not.
- ``platforms`` (non-empty tuple of ``cpu``, ``cuda``, ``tpu``, required): where the cell runs.
- ``sequence_constraint`` (optional): a note on the sequence lengths the cell is meant for, or None.
- ``kwargs_model`` (optional): a pydantic ``BaseModel`` that validates ``backend.kwargs`` in the
  config; every field must be a keyword argument of the cell.
- ``reference`` (optional, default ``parallel_stabilized``): the cell ``zoo.testing`` compares
  outputs and gradients with; a cell that computes a different function names its own.
- ``state_reference`` (optional, default ``recurrent``): the stateful cell ``zoo.testing`` compares
  final states with.
- ``description`` (optional, any kind): one line shown by ``zoo plugins``.

:func:`run_cell` is how a layer calls the configured cell: it applies the gate soft-cap and the
document reset, masks the padding of a ragged batch (:func:`mask_padding`: at each padded step
``i = -1e30`` and ``f = +1e30``, which a cell following the formulas above turns into exactly no input
and no forgetting, so its states pass through unchanged and ``h`` stays finite), transposes to the
contract's heads-first layout and back, and checks the output shapes, raising :class:`CellError`
naming the plugin when a cell raises or breaks the contract.
The state helpers below (:func:`initial_states`, :func:`log_forget_matrix`) are for cell authors.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from zoo.config import CellConfig
from zoo.errors import ZooError
from zoo.registry import entry, resolve

States = tuple[jax.Array, jax.Array, jax.Array]
"""A cell's ``(c (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH))`` states, float32."""

CHECK_CELL_SHAPES = os.environ.get("ZOO_CHECK_CELL_SHAPES", "1").strip().lower() not in {"0", "false", "no"}
"""Check every cell output's shape against the contract (``ZOO_CHECK_CELL_SHAPES=0`` turns it off)."""


class CellError(ZooError, RuntimeError):
    """A cell backend plugin raised, or broke the cell contract (wrong output shapes); names the plugin."""


def run_cell(cell: CellConfig, q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array,
             document_borders: jax.Array | None, mode: str = "forward",
             state: dict[str, jax.Array] | None = None,
             lengths: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Soft-cap the gates, apply the document reset, mask padding, and run the backend configured for ``mode``.

    ``q, k (B, S, NH, DQK)``, ``v (B, S, NH, DV)``, ``i, f (B, S, NH)`` -> ``h (B, S, NH, DV)`` and,
    except in ``forward`` mode, the new ``{"c", "n", "m"}`` state (zeros when ``state`` is None).
    ``document_borders (B, S)`` bool marks the first token of each document. ``lengths (B,)`` int32
    (a ragged batch, right-padded) makes every step ``t >= lengths[b]`` a no-op of the state: see
    :func:`mask_padding`; ``h`` there is finite and meaningless. Raises :class:`CellError` when the
    backend raises or returns the wrong shapes.
    """
    if cell.gate_soft_cap is not None:
        cap = cell.gate_soft_cap
        i, f = cap * jnp.tanh(i / cap), cap * jnp.tanh(f / cap)
    if cell.reset_at_document_boundaries and document_borders is not None:
        f = jnp.where(document_borders[..., None], jnp.asarray(cell.reset_fgate_value, f.dtype), f)
    if lengths is not None:
        i, f = mask_padding(i, f, lengths)
    backend = {"forward": cell.backend, "prefill": cell.prefill_backend, "step": cell.step_backend}[mode]
    fn = resolve("cell", backend.name)
    q, k, v, i, f = (jnp.swapaxes(a, 1, 2) for a in (q, k, v, i, f))  # to the cell's heads-first layout
    B, NH, S, DQK = q.shape
    expected = {"h": (B, NH, S, v.shape[-1]), "c": (B, NH, DQK, v.shape[-1]), "n": (B, NH, DQK), "m": (B, NH)}
    initial = {} if state is None else {"c_initial": state["c"], "n_initial": state["n"], "m_initial": state["m"]}
    try:
        if mode == "forward":
            out = {"h": fn(q, k, v, i, f, **backend.kwargs)}
        else:
            h, (c, n, m) = fn(q, k, v, i, f, return_last_states=True, **initial, **backend.kwargs)
            out = {"h": h, "c": c, "n": n, "m": m}
    except Exception as exc:
        raise CellError(f"cell backend {backend.name!r} from {_origin(backend.name)} failed in {mode}: "
                        f"{type(exc).__name__}: {exc}") from exc
    if CHECK_CELL_SHAPES:  # shapes are static, so this costs tracing time only, never run time
        wrong = {name: tuple(x.shape) for name, x in out.items() if tuple(x.shape) != expected[name]}
        if wrong:
            raise CellError(f"cell backend {backend.name!r} from {_origin(backend.name)} returned wrong shapes in "
                            f"{mode}: " + ", ".join(f"{name} {shape}, expected {expected[name]}"
                                                    for name, shape in wrong.items())
                            + " (the cell contract is in zoo.nn.cell; ZOO_CHECK_CELL_SHAPES=0 skips this check)")
    h = jnp.swapaxes(out.pop("h"), 1, 2)
    return h, (out or None)


def mask_padding(i: jax.Array, f: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gate pre-activations ``i, f (B, S, NH)`` with every step ``t >= lengths[b]`` made a no-op of the state.

    There ``i`` becomes a large finite negative and ``f`` a large finite positive (±1e30, or the dtype's
    largest value when smaller), so that ``exp(i - m) = 0`` and ``log σ(f) = 0`` exactly in float32: no input,
    no forgetting, ``m`` unchanged. Finite rather than ±inf, because a step or chunk made only of padding
    would otherwise form ``-inf - (-inf)`` in a log-sum-exp (NaN). Applied after the soft cap, which would
    turn ``-inf`` into ``-cap``, and after the document reset, which must not act on padding.
    """
    valid = (jnp.arange(i.shape[1]) < lengths[:, None])[..., None]  # (B, S, 1)
    big = min(1e30, float(jnp.finfo(i.dtype).max))  # i and f share the gate dtype
    return jnp.where(valid, i, jnp.asarray(-big, i.dtype)), jnp.where(valid, f, jnp.asarray(big, f.dtype))


def _origin(name: str) -> str:
    return entry("cell", name).origin


def initial_states(q: jax.Array, v: jax.Array, c_initial: jax.Array | None, n_initial: jax.Array | None,
                   m_initial: jax.Array | None) -> States:
    """The given initial states in float32, or zeros of the contract's shapes; all three or none must be given.

    ``q (B, NH, S, DQK)`` and ``v (B, NH, S, DV)`` give the shapes. Raises ``ValueError`` when only
    some states are given or one has the wrong shape.
    """
    given = [s is not None for s in (c_initial, n_initial, m_initial)]
    if any(given) and not all(given):
        raise ValueError("pass all of c_initial, n_initial and m_initial, or none of them")
    B, NH, _, DQK = q.shape
    DV = v.shape[-1]
    if not any(given):
        return (jnp.zeros((B, NH, DQK, DV), jnp.float32), jnp.zeros((B, NH, DQK), jnp.float32),
                jnp.zeros((B, NH), jnp.float32))
    expected = {"c_initial": (B, NH, DQK, DV), "n_initial": (B, NH, DQK), "m_initial": (B, NH)}
    for (name, shape), state in zip(expected.items(), (c_initial, n_initial, m_initial)):
        if tuple(state.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(state.shape)}, expected {shape}")
    return (c_initial.astype(jnp.float32), n_initial.astype(jnp.float32), m_initial.astype(jnp.float32))


def log_forget_matrix(log_f: jax.Array) -> jax.Array:
    """``logF[t, s] = Σ_{s<r≤t} log_f[r]`` for s ≤ t and -inf above the diagonal; ``(..., S) -> (..., S, S)``.

    Summing the masked gates directly (rather than differencing two cumulative sums) avoids
    cancellation on long sequences.
    """
    S = log_f.shape[-1]
    idx = jnp.arange(S)
    after_s = idx[None, :] > idx[:, None]  # [s, r]: r > s
    sums = jnp.cumsum(jnp.where(after_s, log_f[..., None, :], 0.0), axis=-1)  # [s, t]
    log_F = jnp.swapaxes(sums, -1, -2)  # [t, s]
    return jnp.where(idx[:, None] >= idx[None, :], log_F, -jnp.inf)
