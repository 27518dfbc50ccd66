"""The plugin registry: built-ins, resolution errors, conflicts, failure isolation, entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

import zoo
from zoo.registry import (
    PluginRegistry,
    UnknownPluginError,
    available,
    hookimpl,
    resolve,
    use_registry,
)


def test_builtins_registered_by_kind():
    assert available("layer") == ["mlstm", "mlstm_v1"]
    assert available("norm") == ["layernorm", "rmsnorm"]
    assert available("init") == ["small", "wang", "wang2", "zeros"]
    assert available("distribution") == ["normal", "truncated_normal", "uniform"]
    assert available("cell") == ["chunkwise", "parallel_stabilized", "recurrent"]
    assert available("exporter") == ["stablehlo"]
    assert callable(resolve("cell", "parallel_stabilized"))


def test_unknown_name_lists_registered_names():
    with pytest.raises(UnknownPluginError) as info:
        resolve("norm", "rmsnrom")
    message = str(info.value)
    assert "layernorm, rmsnorm" in message
    assert "did you mean 'rmsnorm'" in message.lower()


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="kinds: layer, norm"):
        available("widget")


class NormPlugin:
    """A third-party plugin adding a norm and a cell with validated kwargs."""

    class Kwargs(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0

    @staticmethod
    def scaled_cell(q, k, v, i, f, *, scale=1.0, **kw):
        return scale * resolve("cell", "parallel_stabilized")(q, k, v, i, f, **kw)

    @hookimpl
    def register_norms(self, register):
        register("unitnorm", resolve("norm", "rmsnorm"), description="rmsnorm under another name")

    @hookimpl
    def register_cells(self, register):
        register("scaled_parallel", self.scaled_cell, kwargs_model=self.Kwargs, supports_state=False)


def fresh_registry() -> PluginRegistry:
    return PluginRegistry(autoload=False)


def test_third_party_names_become_valid_config_values():
    reg = fresh_registry()
    with use_registry(reg):
        info = reg.add_plugin(NormPlugin(), "norm-plugin", dist="norm-plugin", version="1.2")
        assert info.ok, info.error
        assert info.registered == {"norm": ["unitnorm"], "cell": ["scaled_parallel"]}
        assert reg.entry("norm", "unitnorm").origin == "norm-plugin (norm-plugin 1.2)"
        cfg = zoo.load_config({"vocab_size": 10, "norm_type": "unitnorm", "mlstm_block": {"mlstm": {"mlstm_cell": {
            "backend": {"name": "scaled_parallel", "kwargs": {"scale": 2}}}}}})
        assert cfg.cell.norm_type == "unitnorm"
        assert cfg.cell.backend.kwargs == {"scale": 2.0}
        with pytest.raises(ValidationError) as bad:
            zoo.load_config({"vocab_size": 10, "mlstm_block": {"mlstm": {"mlstm_cell": {
                "backend": {"name": "scaled_parallel", "kwargs": {"scael": 2}}}}}})
        assert bad.value.errors()[0]["loc"] == ("mlstm_block", "mlstm", "mlstm_cell", "backend", "kwargs", "scael")
    with pytest.raises(ValidationError, match="unknown norm 'unitnorm'"):
        zoo.load_config({"vocab_size": 10, "norm_type": "unitnorm"})


class Conflicting:
    @hookimpl
    def register_norms(self, register):
        register("brand_new", object())
        register("layernorm", object())


def test_conflict_names_both_origins_and_keeps_the_first():
    reg = fresh_registry()
    original = reg.resolve("norm", "layernorm")
    info = reg.add_plugin(Conflicting(), "clash", dist="clash-dist", version="0.3")
    assert not info.ok
    assert "norm 'layernorm' is registered twice" in info.error
    assert "zoo.plugins.norms (xlstm-zoo" in info.error and "clash (clash-dist 0.3)" in info.error
    assert reg.resolve("norm", "layernorm") is original
    assert "brand_new" not in reg.available("norm"), "a failed plugin must leave nothing behind"


class DuplicateWithinPlugin:
    @hookimpl
    def register_inits(self, register):
        register("twice", object())
        register("twice", object())


def test_duplicate_within_one_plugin_is_a_conflict():
    info = fresh_registry().add_plugin(DuplicateWithinPlugin(), "dup")
    assert "init 'twice' is registered twice" in info.error


class RaisesDuringRegistration:
    @hookimpl
    def register_norms(self, register):
        register("half_done", object())

    @hookimpl
    def register_cells(self, register):
        raise RuntimeError("kernel library missing")


class UnknownHook:
    @hookimpl
    def register_widgets(self, register):
        pass


def test_failing_plugin_is_recorded_and_rolled_back_while_others_load():
    reg = fresh_registry()
    bad = reg.add_plugin(RaisesDuringRegistration(), "bad")
    good = reg.add_plugin(NormPlugin(), "good")
    assert "RuntimeError: kernel library missing" in bad.error
    assert "Traceback" in bad.traceback
    assert "half_done" not in reg.available("norm")
    assert good.ok and "unitnorm" in reg.available("norm")
    assert [p.name for p in reg.failures()] == ["bad"]
    with pytest.raises(UnknownPluginError, match=r"Plugins that failed to load: bad \(RuntimeError"):
        reg.resolve("cell", "fused_kernel")


def test_unknown_hook_is_rejected():
    info = fresh_registry().add_plugin(UnknownHook(), "typo")
    assert "unknown hook 'register_widgets'" in info.error


def test_kwargs_model_must_be_pydantic():
    class BadMeta:
        @hookimpl
        def register_cells(self, register):
            register("c", lambda *a, **k: None, kwargs_model=dict)

    info = fresh_registry().add_plugin(BadMeta(), "badmeta")
    assert "kwargs_model must be a pydantic BaseModel subclass" in info.error


# --- real entry points, discovered by importlib.metadata in a fresh process -------------------

PLUGIN_MODULES = {
    "zoo_good_plugin.py": """
        from zoo.registry import hookimpl

        def doubled_cell(q, k, v, i, f, **kw):
            from zoo.registry import resolve
            return 2 * resolve("cell", "parallel_stabilized")(q, k, v, i, f, **kw)

        @hookimpl
        def register_cells(register):
            register("doubled", doubled_cell, supports_state=False, description="twice the parallel cell")
        """,
    "zoo_import_error_plugin.py": """
        import not_a_real_module_anywhere
        """,
    "zoo_register_error_plugin.py": """
        from zoo.registry import hookimpl

        @hookimpl
        def register_norms(register):
            raise ValueError("bad norm table")
        """,
    "zoo_clash_plugin.py": """
        from zoo.registry import hookimpl

        @hookimpl
        def register_norms(register):
            register("rmsnorm", object())
        """,
}
ENTRY_POINTS = {"good": "zoo_good_plugin", "import-error": "zoo_import_error_plugin",
                "register-error": "zoo_register_error_plugin", "clash": "zoo_clash_plugin"}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, source in PLUGIN_MODULES.items():
        (root / name).write_text(textwrap.dedent(source))
    dist_info = root / "zoo_test_plugins-0.7.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-test-plugins\nVersion: 0.7\n")
    (dist_info / "entry_points.txt").write_text(
        "[zoo]\n" + "".join(f"{ep} = {module}\n" for ep, module in ENTRY_POINTS.items()))
    return root


def zoo_plugins_json(plugin_path: Path, **env: str) -> dict:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    environ = {**inherited, "PYTHONPATH": str(plugin_path), **env}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "plugins", "--json"], env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_entry_points_load_one_at_a_time(plugin_path):
    data = zoo_plugins_json(plugin_path)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["good"]["error"] is None
    assert plugins["good"]["dist"] == "zoo-test-plugins" and plugins["good"]["version"] == "0.7"
    assert plugins["good"]["registered"] == {"cell": ["doubled"]}
    assert "ModuleNotFoundError" in plugins["import-error"]["error"]
    assert "ValueError: bad norm table" in plugins["register-error"]["error"]
    assert "norm 'rmsnorm' is registered twice" in plugins["clash"]["error"]
    assert "clash (zoo-test-plugins 0.7)" in plugins["clash"]["error"]
    registered = {(r["kind"], r["name"]): r for r in data["registered"]}
    assert registered[("cell", "doubled")]["plugin"] == "good"
    assert registered[("norm", "rmsnorm")]["plugin"] == "zoo.plugins.norms"


def test_autoload_can_be_disabled(plugin_path):
    data = zoo_plugins_json(plugin_path, ZOO_DISABLE_PLUGIN_AUTOLOAD="1")
    assert all(p["builtin"] for p in data["plugins"])
    assert "doubled" not in [r["name"] for r in data["registered"]]


def test_allowlist_loads_only_named_plugins(plugin_path):
    data = zoo_plugins_json(plugin_path, ZOO_PLUGINS="good,not-installed")
    third_party = {p["name"]: p for p in data["plugins"] if not p["builtin"]}
    assert set(third_party) == {"good", "not-installed"}
    assert third_party["good"]["error"] is None
    assert "named in ZOO_PLUGINS" in third_party["not-installed"]["error"]


def test_check_backends_includes_third_party_cells_and_fails_on_disagreement(plugin_path):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "check-backends", "--seq-lens", "7"],
                          env={**inherited, "PYTHONPATH": str(plugin_path), "COLUMNS": "120"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split("│")[1].strip() + "/" + line.split("│")[2].strip(): line
            for line in proc.stdout.splitlines() if line.count("│") >= 7}
    assert "FAIL" in rows["doubled/output"]
    assert "pass" in rows["chunkwise/output"] and "pass" in rows["recurrent/states"]
    assert "check(s) failed" in proc.stderr
