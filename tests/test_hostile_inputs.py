"""Numerically hostile inputs: huge gate pre-activations, long sequences, all-reset batches, bfloat16, NaN/inf.

The choice for non-finite inputs: they propagate (no ``check_inputs`` flag). A NaN or inf in q, k, v
or a gate reaches the outputs of its sequence and head (in the parallel and chunkwise forms also
earlier positions, through masked products 0·NaN); other heads stay finite. Finite inputs always
give finite outputs. See docs/security.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as R
import zoo
from zoo.registry import resolve

BACKENDS = ["parallel_stabilized", "chunkwise", "recurrent"]
GATES = {"both +1e4": (1e4, 1e4), "both -1e4": (-1e4, -1e4), "i +1e4 f -1e4": (1e4, -1e4),
         "i -1e4 f +1e4": (-1e4, 1e4), "alternating": "alt"}


def cell_inputs(S: int, gates, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, S, 4)), dtype) for _ in range(3))
    if gates == "alt":
        i = np.where(np.arange(S) % 2 == 0, 1e4, -1e4)
        f = -i
    else:
        i, f = np.full(S, gates[0]), np.full(S, gates[1])
    return q, k, v, jnp.asarray(np.broadcast_to(i, (1, 2, S)), dtype), jnp.asarray(np.broadcast_to(f, (1, 2, S)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gates", sorted(GATES))
def test_extreme_gate_preactivations_give_the_float64_reference_outputs(backend, gates):
    """Finite, and equal to the float64 NumPy parallel form on the same (rounded) inputs: within 1e-5 of
    the largest magnitude (or of 1 where the outputs vanish) at float32, 1e-2 at bfloat16."""
    fn = resolve("cell", backend)
    for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        inputs = cell_inputs(16, GATES[gates], dtype)
        h = fn(*inputs)
        assert h.dtype == dtype
        h = np.asarray(h.astype(jnp.float32), np.float64)
        with np.errstate(over="ignore"):  # exp(-m) overflows to inf where every input gate is closed
            expected = R.parallel_stabilized_cell(*(np.asarray(x.astype(jnp.float32)) for x in inputs))
        assert np.isfinite(h).all()
        scale = max(float(np.abs(expected).max()), 1.0)
        assert float(np.abs(h - expected).max()) <= rtol * scale, (dtype, float(np.abs(h - expected).max()))


@pytest.mark.parametrize("backend", ["chunkwise", "recurrent"])
def test_65536_steps_stay_finite(backend):
    fn = jax.jit(resolve("cell", backend), static_argnames="return_last_states")
    q, k, v, i, f = cell_inputs(65536, (0.0, 0.0), seed=1)
    i = i + jnp.asarray(np.random.default_rng(2).normal(0, 3, i.shape), jnp.float32)
    h, (c, n, m) = fn(q, k, v, i, f + 4.0, return_last_states=True)  # forget gates near 1: long memory
    assert h.shape == (1, 2, 65536, 4)
    assert all(bool(jnp.isfinite(x).all()) for x in (h, c, n, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate_and_do_not_crash(backend):
    fn = resolve("cell", backend)
    q, k, v, i, f = cell_inputs(8, (0.0, 3.0))
    for name, bad in (("nan_v", v.at[0, 0, 3, 0].set(jnp.nan)), ("inf_q", q.at[0, 1, 5, 2].set(jnp.inf))):
        args = [q, k, bad if name == "nan_v" else v, i, f]
        if name == "inf_q":
            args[0] = bad
        h = fn(*args)
        head = 0 if name == "nan_v" else 1
        first = 3 if name == "nan_v" else 5
        assert not bool(jnp.isfinite(h[0, head, first:]).all()), (backend, name)  # reaches its positions
        assert bool(jnp.isfinite(h[0, 1 - head]).all())  # never the other head
        if backend == "recurrent":  # step by step: nothing before it either. The parallel forms multiply
            assert bool(jnp.isfinite(h[0, head, :first]).all())  # masked entries (0 * nan), so it may spread


def test_all_reset_batches_bfloat16_and_long_forward_are_finite():
    config = zoo.load_config({"vocab_size": 13, "embedding_dim": 8, "num_blocks": 1, "dtype": "bfloat16",
                              "mlstm_block": {"mlstm": {"num_heads": 2, "proj_factor": 2.0,
                                                        "round_proj_up_to_multiple_of": 8,
                                                        "mlstm_cell": {"reset_at_document_boundaries": True}}}})
    params = zoo.init_params(config, seed=0)
    tokens = np.zeros((2, 12), np.int32)  # a padding token everywhere
    for borders in (np.ones((2, 12), bool), np.zeros((2, 12), bool)):  # every token a document start, or none
        logits = zoo.forward(config, params, tokens, document_borders=borders)
        assert bool(jnp.isfinite(logits).all())
