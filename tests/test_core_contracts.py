"""The core a plugin builds on (``zoo.nn``) and the table of plugin kinds (``zoo.registry.kinds``).

Old import paths still give the very same objects; a third-party layer written only against ``zoo.nn``
and ``zoo.registry`` builds and runs through the public API; every kind of the table has its hook and its
contract check; the built-ins carry the installed distribution's version.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import flax.linen as nn
import jax
import numpy as np
import pytest

import zoo
from helpers import TinyLayer
from zoo.nn.cell import run_cell
from zoo.nn.factories import gate_bias_init
from zoo.nn.layers import GateProjection
from zoo.registry import PluginRegistry, hookimpl

# --- (a) the old paths re-export the core's objects ----------------------------------------------

MOVED = {
    "zoo.nn.cell": {"zoo.plugins.layers.components": ("run_cell", "CellError"),
                    "zoo.plugins.cells.common": ("States", "initial_states", "log_forget_matrix")},
    "zoo.nn.layers": {"zoo.plugins.layers.components": ("LinearHeadwiseExpand", "CausalConv1d", "GateProjection",
                                                        "is_integer")},
    "zoo.nn.factories": {"zoo.parts": ("initializer", "partitioned", "linspace_init", "gate_bias_init", "make_norm",
                                       "Initializer")},
}


@pytest.mark.parametrize("core", sorted(MOVED))
def test_old_import_paths_give_the_same_objects(core):
    new = importlib.import_module(core)
    for old_path, names in MOVED[core].items():
        old = importlib.import_module(old_path)
        for name in names:
            assert getattr(old, name) is getattr(new, name), f"{old_path}.{name} is not {core}.{name}"


def test_the_cell_contract_text_lives_in_the_core_and_lists_every_cell_metadata_key():
    from zoo.nn import cell
    from zoo.registry.kinds import TABLE

    keys = sorted(TABLE["cell"].required | TABLE["cell"].optional | {"description"})
    assert keys == ["description", "exportable", "kwargs_model", "platforms", "reference", "sequence_constraint",
                    "state_reference", "supports_state"]
    assert [k for k in keys if f"- ``{k}``" not in cell.__doc__] == []
    assert "zoo.nn.cell" in importlib.import_module("zoo.plugins.cells").__doc__


def test_headwise_projection_counts_projection_blocks_and_still_builds_positionally():
    from zoo.nn.layers import LinearHeadwiseExpand

    assert "num_proj_blocks" in LinearHeadwiseExpand.__dataclass_fields__
    assert "num_blocks" not in LinearHeadwiseExpand.__dataclass_fields__
    layer = LinearHeadwiseExpand(2, 3, False, nn.initializers.ones)  # blocks of b=2 inputs -> 3 outputs each
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    y, _ = layer.init_with_output(jax.random.PRNGKey(0), x)
    # all-ones kernels: every output of block h is the sum of its inputs: block 0 = 0+1, block 1 = 2+3
    np.testing.assert_array_equal(np.asarray(y), [[1, 1, 1, 5, 5, 5]])


# --- (b) a third-party layer written against zoo.nn only ------------------------------------------

def tiny_sizes(cfg):
    return {"qk_dim": cfg.embedding_dim, "v_dim": cfg.embedding_dim,
            "qk_head_dim": cfg.embedding_dim // cfg.num_heads, "v_head_dim": cfg.embedding_dim // cfg.num_heads}


class TinyLayerPlugin:
    @hookimpl
    def register_layers(self, register):
        register("tiny_dense", TinyLayer, derived_sizes=tiny_sizes, description="a test layer on zoo.nn")


def test_a_third_party_layer_on_zoo_nn_runs_forward_prefill_and_step():
    from zoo.testing import isolated_registry

    with isolated_registry(TinyLayerPlugin()):
        config = zoo.load_config({"vocab_size": 13, "embedding_dim": 8, "num_blocks": 2, "dtype": "float32",
                                  "mlstm_block": {"mlstm": {"layer_type": "tiny_dense", "num_heads": 2}}})
        params = zoo.init_params(config, seed=0)
        layer = params["blocks_1"]["xlstm"]
        assert sorted(layer) == ["dense_k", "dense_q", "dense_v", "fgate", "igate", "proj_down"]
        assert layer["proj_down"]["kernel"].shape == (8, 8)
        tokens = np.array([[1, 5, 2, 9, 4], [3, 3, 12, 0, 7]], np.int32)
        logits = np.asarray(zoo.forward(config, params, tokens))
        assert logits.shape == (2, 5, 13) and np.isfinite(logits).all()
        prefill_logits, state = zoo.prefill(config, params, tokens[:, :3])
        assert prefill_logits.shape == (2, 3, 13)
        assert state["c"].shape == (2, 2, 2, 4, 4)  # (NB, B, NH, DQK, DV)
        stepped = []
        for t in (3, 4):
            step_logits, state = zoo.step(config, params, tokens[:, t], state)
            stepped.append(np.asarray(step_logits))
    # three cell backends (parallel, chunkwise, recurrent) compute one function of the same tokens
    scale = np.abs(logits).max()
    np.testing.assert_allclose(np.asarray(prefill_logits), logits[:, :3], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(np.stack(stepped, axis=1), logits[:, 3:], atol=1e-5 * scale, rtol=0)


# --- (c) one table of kinds -----------------------------------------------------------------------

def test_every_kind_of_the_table_has_its_hook_and_its_contract_check():
    from zoo.registry import KINDS, hookspecs
    from zoo.registry.kinds import TABLE

    assert KINDS == hookspecs.KINDS == tuple(TABLE) == ("layer", "norm", "init", "distribution", "cell", "exporter",
                                                    "quantizer")
    assert hookspecs.HOOK_BY_KIND == {k.name: k.hook for k in TABLE.values()}
    pm = PluginRegistry(builtins=False, autoload=False).pm
    specs = {name for name in dir(pm.hook) if not name.startswith("_") and getattr(pm.hook, name).has_spec()}
    assert specs == {k.hook for k in TABLE.values()}
    for kind in TABLE.values():
        assert getattr(pm.hook, kind.hook).spec.function.__doc__ == kind.hook_doc
        # the registry refuses, through the kind's own check, an object that fits no contract
        plugin = type("Bad", (), {kind.hook: hookimpl(lambda self, register: register("bad", 42))})()
        info = PluginRegistry(builtins=False, autoload=False).add_plugin(plugin, "bad-plugin")
        assert info.error.startswith(f"ContractError: {kind.name} 'bad' from bad-plugin: "), info.error
        assert f"{kind.name} must be " in info.error, info.error
        assert kind.check(42, {})[0].startswith(f"{kind.name} must be ")


def test_hook_docs_describe_the_arguments_and_metadata():
    from zoo.registry import hookspecs

    exporters = hookspecs.register_exporters.__doc__
    assert "fn(config, params, out_dir, *, platforms, entries, **options)" in exporters
    assert "optional ``weights``" in exporters
    cells = hookspecs.register_cells.__doc__
    assert "optional ``kwargs_model``, ``reference``, ``sequence_constraint``, ``state_reference``" in cells
    assert "every kind also takes ``description``, ``override``" in cells


# --- (d) the version comes from the distribution's metadata ---------------------------------------

def test_the_builtins_carry_the_installed_distribution_version():
    from zoo.registry.manager import BUILTIN_DIST, BUILTIN_MODULES

    version = importlib.metadata.version("xlstm-zoo")
    registry = PluginRegistry(autoload=False)
    assert BUILTIN_DIST == "xlstm-zoo"
    assert {registry.plugins[(BUILTIN_DIST, m)].version for m in BUILTIN_MODULES} == {version}
    assert registry.entry("layer", "mlstm").origin == f"zoo.plugins.layers.mlstm (xlstm-zoo {version})"
