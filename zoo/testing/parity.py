"""The parity matrix: does a cell backend agree with its references? (``zoo check-backends`` runs it.)

For each sequence length (ragged ones included) ``cell_parity(name)`` compares a registered cell
with its reference, ``parallel_stabilized`` unless the cell's ``reference`` metadata names another:
outputs and gradients of a scalar loss w.r.t. q, k, v, i, f at float32, outputs at bfloat16 (within
2e-2, or 1.5x the reference's own bfloat16 error when that is larger). A cell
that carries state is also compared with its stateful reference (``recurrent`` unless its
``state_reference`` metadata says otherwise): final states from zero states, and outputs and final
states when started from random states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from zoo.registry import entry, resolve

REFERENCE = "parallel_stabilized"
STATE_REFERENCE = "recurrent"
# relative to the reference's largest magnitude (max|a - b| / max|b|)
TOLERANCES = {("output", "float32"): 1e-4, ("states", "float32"): 1e-4, ("grads", "float32"): 1e-3,
              ("output", "bfloat16"): 2e-2, ("states-in output", "float32"): 1e-4,
              ("states-in states", "float32"): 1e-4}


@dataclass(frozen=True)
class ParityResult:
    """One comparison of a backend with its reference."""

    backend: str
    reference: str
    check: str
    seq_len: int
    dtype: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when the error is within tolerance (NaN never passes)."""
        return bool(self.error <= self.tolerance)


def random_cell_inputs(seed: int, batch: int, heads: int, seq_len: int, dqk: int, dv: int,
                       dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
    """q, k, v (in ``dtype``) and float32 gate pre-activations, with forget gates biased open."""
    kq, kk, kv, ki, kf = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(kq, (batch, heads, seq_len, dqk)).astype(dtype)
    k = jax.random.normal(kk, (batch, heads, seq_len, dqk)).astype(dtype)
    v = jax.random.normal(kv, (batch, heads, seq_len, dv)).astype(dtype)
    i = jax.random.normal(ki, (batch, heads, seq_len))
    f = jax.random.normal(kf, (batch, heads, seq_len)) + 3.0
    return q, k, v, i, f


def relative_error(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` over all leaves of two pytrees."""
    diff = max(float(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    scale = max(float(jnp.abs(y.astype(jnp.float32)).max()) for y in jax.tree_util.tree_leaves(b))
    return diff / max(scale, 1e-30)


def _grads(cell, inputs, weights, kwargs):
    def loss(*args):
        return jnp.sum(cell(*args, **kwargs).astype(jnp.float32) * weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)


def _stateful(cell, kwargs, inputs, initial=None):
    names = ("c_initial", "n_initial", "m_initial")

    def run(*args):
        given = dict(zip(names, args[5:]))
        return cell(*args[:5], return_last_states=True, **given, **kwargs)

    return jax.jit(run)(*inputs, *(initial or ()))


def random_states(seed: int, batch: int, heads: int, dqk: int, dv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plausible (C, n, m) states: what a few random steps from zero would leave behind."""
    kc, kn, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    c = jax.random.normal(kc, (batch, heads, dqk, dv))
    n = jax.random.normal(kn, (batch, heads, dqk))
    m = jax.random.uniform(km, (batch, heads), minval=-1.0, maxval=2.0)
    return c, n, m


def references(name: str) -> tuple[str, str]:
    """The output reference and the stateful reference that ``name`` is compared with."""
    meta = entry("cell", name).metadata
    state_default = "chunkwise" if name == STATE_REFERENCE else STATE_REFERENCE
    return meta.get("reference", REFERENCE), meta.get("state_reference", state_default)


def cell_parity(name: str, *, seq_lens: Sequence[int] = (1, 7, 64, 130), batch: int = 2, heads: int = 2,
                dqk: int = 16, dv: int = 24, kwargs: dict[str, Any] | None = None,
                dtypes: Sequence[str] = ("float32", "bfloat16"), grads: bool = True,
                seed: int = 0) -> list[ParityResult]:
    """Compare cell ``name`` with its references at each sequence length; see the module docstring."""
    kwargs = dict(kwargs or {})
    cell = resolve("cell", name)
    reference_name, state_reference_name = references(name)
    reference = resolve("cell", reference_name)
    stateful = bool(entry("cell", name).metadata.get("supports_state"))
    results: list[ParityResult] = []

    def record(check: str, S: int, dtype: str, error: float, against: str = reference_name,
               tolerance: float | None = None) -> None:
        results.append(ParityResult(name, against, check, S, dtype, error,
                                    tolerance if tolerance is not None else TOLERANCES[(check, dtype)]))

    for S in seq_lens:
        inputs = random_cell_inputs(seed + S, batch, heads, S, dqk, dv)
        expected = jax.jit(reference)(*inputs)
        run = jax.jit(lambda *args: cell(*args, **kwargs))
        record("output", S, "float32", relative_error(run(*inputs), expected))
        if stateful:
            state_reference = resolve("cell", state_reference_name)
            _, states = _stateful(cell, kwargs, inputs)
            _, ref_states = _stateful(state_reference, {}, inputs)
            record("states", S, "float32", relative_error(states, ref_states), state_reference_name)
            initial = random_states(seed + 2 * S + 1, batch, heads, dqk, dv)
            h, states = _stateful(cell, kwargs, inputs, initial)
            ref_h, ref_states = _stateful(state_reference, {}, inputs, initial)
            record("states-in output", S, "float32", relative_error(h, ref_h), state_reference_name)
            record("states-in states", S, "float32", relative_error(states, ref_states), state_reference_name)
        if grads:
            weights = jax.random.normal(jax.random.PRNGKey(seed + 1), expected.shape)
            record("grads", S, "float32", relative_error(_grads(cell, inputs, weights, kwargs),
                                                         _grads(reference, inputs, weights, {})))
        if "bfloat16" in dtypes:
            # bfloat16 rounding error grows with head size and S; a cell passes when it is within the
            # tolerance or no worse than 1.5x the reference's own error on the same bfloat16 inputs
            low = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
            own = relative_error(jax.jit(reference)(*low), expected)
            record("output", S, "bfloat16", relative_error(run(*low), expected),
                   tolerance=max(TOLERANCES[("output", "bfloat16")], 1.5 * own))
    return results


def assert_cell_matches_reference(name: str, **options: Any) -> None:
    """Raise ``AssertionError`` listing every comparison of ``cell_parity`` that failed."""
    failed = [r for r in cell_parity(name, **options) if not r.passed]
    if failed:
        lines = [f"{r.check} S={r.seq_len} {r.dtype} vs {r.reference}: {r.error:.2e} > {r.tolerance:.0e}"
                 for r in failed]
        raise AssertionError(f"cell {name!r} disagrees with the reference:\n  " + "\n  ".join(lines))
