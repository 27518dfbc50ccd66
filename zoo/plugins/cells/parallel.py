"""The ``parallel_stabilized`` cell: the quadratic, max-stabilised parallel form of the mLSTM.

See ``zoo.nn.cell`` for the cell contract.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, Field

from zoo.nn.cell import log_forget_matrix
from zoo.registry import hookimpl


class ParallelStabilizedKwargs(BaseModel):
    """Options of ``parallel_stabilized``."""

    model_config = ConfigDict(extra="forbid")

    stabilize_rowwise: bool = Field(
        True, description="stabilise each row with its own max (True) or with one max per head (False)")


def parallel_stabilized(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None,
                        return_last_states=False, eps=1e-6, stabilize_rowwise=True):
    """mLSTM over a whole sequence at once, O(S²) in time and memory; takes and returns no state."""
    if return_last_states or any(s is not None for s in (c_initial, n_initial, m_initial)):
        raise ValueError("parallel_stabilized carries no state: use a cell registered with supports_state=True")
    dqk = q.shape[-1]
    log_f = jax.nn.log_sigmoid(f.astype(jnp.float32))
    log_D = log_forget_matrix(log_f) + i.astype(jnp.float32)[..., None, :]
    axes = (-1,) if stabilize_rowwise else (-2, -1)
    m = jnp.max(log_D, axis=axes, keepdims=True)
    decay = jnp.exp(log_D - m)
    scores = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=jnp.float32) / math.sqrt(dqk)
    weights = scores * decay
    norm = jnp.maximum(jnp.abs(weights.sum(-1, keepdims=True)), jnp.exp(-m))
    h = jnp.einsum("...ts,...sd->...td", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (h / (norm + eps)).astype(v.dtype)


@hookimpl
def register_cells(register):
    register(
        "parallel_stabilized",
        parallel_stabilized,
        supports_state=False,
        exportable=True,
        platforms=("cpu", "cuda", "tpu"),
        sequence_constraint=None,
        kwargs_model=ParallelStabilizedKwargs,
        description="quadratic parallel form, row-max stabilised; no states",
    )
