"""Checks that a cell backend agrees with the reference: the parity matrix behind ``zoo check-backends``.

``cell_parity(name)`` compares a registered cell with ``parallel_stabilized`` on random inputs
(outputs, and gradients of a scalar loss w.r.t. q, k, v, i, f) and, when it carries state, its
final states with a stateful reference. ``assert_cell_matches_reference(name)`` raises on failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from zoo.registry import entry, resolve

REFERENCE = "parallel_stabilized"
# relative to the reference's largest magnitude (max|a - b| / max|b|)
TOLERANCES = {("output", "float32"): 1e-4, ("states", "float32"): 1e-4, ("grads", "float32"): 1e-3,
              ("output", "bfloat16"): 2e-2}


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


def cell_parity(name: str, *, seq_lens: Sequence[int] = (1, 7, 64, 130), batch: int = 2, heads: int = 2,
                dqk: int = 16, dv: int = 24, kwargs: dict[str, Any] | None = None,
                dtypes: Sequence[str] = ("float32", "bfloat16"), seed: int = 0) -> list[ParityResult]:
    """Compare cell ``name`` with the reference at each sequence length; see the module docstring."""
    kwargs = dict(kwargs or {})
    cell = resolve("cell", name)
    reference = resolve("cell", REFERENCE)
    stateful = bool(entry("cell", name).metadata.get("supports_state"))
    state_reference = "chunkwise" if name == "recurrent" else "recurrent"
    results: list[ParityResult] = []

    def record(check: str, S: int, dtype: str, error: float, against: str = REFERENCE) -> None:
        results.append(ParityResult(name, against, check, S, dtype, error, TOLERANCES[(check, dtype)]))

    for S in seq_lens:
        inputs = random_cell_inputs(seed + S, batch, heads, S, dqk, dv)
        expected = jax.jit(reference)(*inputs)
        run = jax.jit(lambda *args: cell(*args, **kwargs))
        record("output", S, "float32", relative_error(run(*inputs), expected))
        if stateful:
            _, states = jax.jit(lambda *a: cell(*a, return_last_states=True, **kwargs))(*inputs)
            _, ref_states = jax.jit(lambda *a: resolve("cell", state_reference)(*a, return_last_states=True))(*inputs)
            record("states", S, "float32", relative_error(states, ref_states), state_reference)
        weights = jax.random.normal(jax.random.PRNGKey(seed + 1), expected.shape)
        record("grads", S, "float32", relative_error(_grads(cell, inputs, weights, kwargs),
                                                     _grads(reference, inputs, weights, {})))
        if "bfloat16" in dtypes:
            low = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
            record("output", S, "bfloat16", relative_error(run(*low), expected))
    return results


def assert_cell_matches_reference(name: str, **options: Any) -> None:
    """Raise ``AssertionError`` listing every comparison of ``cell_parity`` that failed."""
    failed = [r for r in cell_parity(name, **options) if not r.passed]
    if failed:
        lines = [f"{r.check} S={r.seq_len} {r.dtype} vs {r.reference}: {r.error:.2e} > {r.tolerance:.0e}"
                 for r in failed]
        raise AssertionError(f"cell {name!r} disagrees with the reference:\n  " + "\n  ".join(lines))
