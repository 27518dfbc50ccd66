"""The plugin test kit catches the mistakes it promises to catch, and isolates registries."""

from __future__ import annotations

import jax
import pytest

from zoo.registry import get_registry, hookimpl, resolve
from zoo.testing import assert_cell_matches_reference, cell_parity, isolated_registry

SMALL = {"seq_lens": (5, 19), "batch": 1, "heads": 2, "dqk": 8, "dv": 8, "dtypes": ("float32",)}


def forgetful(q, k, v, i, f, *, c_initial=None, n_initial=None, m_initial=None, return_last_states=False,
              eps=1e-6, chunk_size=8):
    """The built-in chunkwise cell, except that it ignores the states it is given."""
    return resolve("cell", "chunkwise")(q, k, v, i, f, return_last_states=return_last_states, eps=eps,
                                        chunk_size=chunk_size)


@jax.custom_vjp
def _no_gradient(q, k, v, i, f):
    return resolve("cell", "parallel_stabilized")(q, k, v, i, f)


_no_gradient.defvjp(lambda *args: (_no_gradient(*args), args),
                    lambda args, g: tuple(jax.numpy.zeros_like(a) for a in args))


def gradient_free(q, k, v, i, f, *, eps=1e-6):
    """Right outputs, zero gradients."""
    return _no_gradient(q, k, v, i, f)


class FlawedCells:
    @hookimpl
    def register_cells(self, register):
        register("forgetful", forgetful, supports_state=True, exportable=True, platforms=("cpu",))
        register("gradient_free", gradient_free, supports_state=False, exportable=True, platforms=("cpu",))


def test_a_cell_that_ignores_initial_states_fails_only_the_states_in_checks():
    with isolated_registry(FlawedCells()):
        results = cell_parity("forgetful", **SMALL, grads=False)
        failed = {r.check for r in results if not r.passed}
        assert failed == {"states-in output", "states-in states"}
        assert {r.reference for r in results if r.check.startswith("states")} == {"recurrent"}
        with pytest.raises(AssertionError, match=r"cell 'forgetful' disagrees with the reference:\n  "
                                                 r"states-in output S=5 float32 vs recurrent"):
            assert_cell_matches_reference("forgetful", **SMALL, grads=False)


def test_a_cell_with_wrong_gradients_fails_the_gradient_check():
    with isolated_registry(FlawedCells()):
        results = cell_parity("gradient_free", **SMALL)
        assert {r.check for r in results if not r.passed} == {"grads"}


def test_isolated_registry_is_undone_and_refuses_missing_plugins():
    outer = get_registry()
    with isolated_registry(FlawedCells()) as reg:
        assert get_registry() is reg and "forgetful" in reg.available("cell")
    assert get_registry() is outer and "forgetful" not in outer.available("cell")
    with pytest.raises(AssertionError, match="plugins failed to load: zoo-not-installed: requested"):
        with isolated_registry("zoo-not-installed"):
            pass


def test_isolated_registry_refuses_two_plugins_of_one_name():
    with pytest.raises(AssertionError) as caught:
        with isolated_registry(FlawedCells(), FlawedCells()):
            pass
    assert str(caught.value) == "plugins failed to load: FlawedCells: PluginError: FlawedCells is already loaded"


def test_zoo_registry_fixture(zoo_registry):
    reg = zoo_registry(FlawedCells())
    assert get_registry() is reg
    assert reg.entry("cell", "forgetful").plugin == "FlawedCells"
