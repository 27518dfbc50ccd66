"""Plugin faults: errors raised while registering, resolving or running a plugin name the plugin; wrong shapes are caught."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import zoo
from zoo.nn import cell as nn_cell
from zoo.nn.cell import CellError
from zoo.registry import PluginRegistry, hookimpl, resolve, use_registry

TINY = {"vocab_size": 11, "embedding_dim": 8, "num_blocks": 1, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2, "proj_factor": 2.0, "round_proj_up_to_multiple_of": 8}}}


def with_backend(name: str) -> dict:
    return {**TINY, "mlstm_block": {"mlstm": {**TINY["mlstm_block"]["mlstm"], "mlstm_cell": {"backend": {"name": name}}}}}


class BrokenAtRegistration:
    @hookimpl
    def register_cells(self, register):
        raise RuntimeError("kaboom while registering")


def exploding_cell(q, k, v, i, f, **kwargs):
    raise FloatingPointError("kaboom inside the kernel")


def truncating_cell(q, k, v, i, f, **kwargs):
    return resolve("cell", "parallel_stabilized")(q, k, v, i, f)[..., :1]


class Cells:
    @hookimpl
    def register_cells(self, register):
        for name, fn in (("exploding", exploding_cell), ("truncating", truncating_cell)):
            register(name, fn, supports_state=False, exportable=False, platforms=("cpu",))


def broken_sizes(cfg):
    raise KeyError("kaboom while deriving sizes")


class BrokenLayer:
    @hookimpl
    def register_layers(self, register):
        register("fragile", resolve("layer", "mlstm_v1"), derived_sizes=broken_sizes, check_config=broken_sizes)


@pytest.fixture
def registry():
    reg = PluginRegistry(autoload=False)
    with use_registry(reg):
        yield reg


def test_a_plugin_raising_at_registration_is_named_where_its_names_are_used(registry):
    info = registry.add_plugin(BrokenAtRegistration(), "zoo-broken", dist="zoo-broken", version="0.1")
    assert not info.ok and "kaboom while registering" in info.error
    with pytest.raises(ValidationError) as caught:
        zoo.load_config(with_backend("broken_cell"))
    message = str(caught.value)
    assert "mlstm_block.mlstm.mlstm_cell.backend.name" in message
    assert "plugins that failed to load: zoo-broken (RuntimeError: kaboom while registering)" in message


def test_a_plugin_raising_during_resolution_is_named(registry):
    assert registry.add_plugin(BrokenLayer(), "zoo-fragile", dist="zoo-fragile").ok
    data = {**TINY, "mlstm_block": {"mlstm": {"layer_type": "fragile", "num_heads": 2}}}
    with pytest.raises(ValidationError) as caught:
        zoo.load_config(data)
    message = str(caught.value)
    assert "mlstm_block.mlstm.layer_type" in message and "zoo-fragile" in message and "kaboom" in message


def test_a_kernel_that_raises_is_named(registry):
    assert registry.add_plugin(Cells(), "zoo-faulty-cells", dist="zoo-faulty-cells", version="1.2").ok
    config = zoo.load_config(with_backend("exploding"))
    with pytest.raises(CellError, match=r"cell backend 'exploding' from zoo-faulty-cells \(zoo-faulty-cells 1.2\) "
                                        r"failed in forward: FloatingPointError: kaboom inside the kernel"):
        zoo.param_shapes(config)


def test_wrong_output_shapes_are_caught_at_the_cell_boundary(registry, monkeypatch):
    assert registry.add_plugin(Cells(), "zoo-faulty-cells", dist="zoo-faulty-cells", version="1.2").ok
    config = zoo.load_config(with_backend("truncating"))
    with pytest.raises(CellError, match=r"'truncating' from zoo-faulty-cells .* returned wrong shapes in forward: "
                                        r"h \(1, 2, 1, 1\), expected \(1, 2, 1, 8\)"):
        zoo.param_shapes(config)
    monkeypatch.setattr(nn_cell, "CHECK_CELL_SHAPES", False)  # what ZOO_CHECK_CELL_SHAPES=0 sets at import
    # unchecked, the bad shape travels on: h (1, 1, 2 heads x 1) meets the skip path's x_a (1, 1, 16), 16 = 2 x 8
    with pytest.raises(TypeError, match=r"incompatible shapes for broadcasting: \(1, 1, 2\), \(1, 1, 16\)") as caught:
        zoo.param_shapes(config)
    assert "truncating" not in str(caught.value)  # a plain JAX error: no shape check named the plugin


def test_the_switch_is_read_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    assert "ZOO_CHECK_CELL_SHAPES" not in os.environ
    code = "from zoo.nn import cell as c; print(c.CHECK_CELL_SHAPES)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert nn_cell.CHECK_CELL_SHAPES  # on by default (this process does not set the variable)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "ZOO_CHECK_CELL_SHAPES": "0"})
    assert proc.stdout.strip() == "False", proc.stderr
