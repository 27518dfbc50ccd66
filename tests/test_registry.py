"""The plugin registry: built-ins, resolution errors, conflicts, failure isolation, entry points."""

from __future__ import annotations

import importlib.metadata
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
    AmbiguousPluginError,
    PluginRegistry,
    UnknownPluginError,
    available,
    hookimpl,
    resolve,
    use_registry,
)
from zoo.testing import isolated_registry


def test_builtins_registered_by_kind():
    assert available("layer") == ["mlstm", "mlstm_v1"]
    assert available("norm") == ["layernorm", "rmsnorm"]
    assert available("init") == ["small", "wang", "wang2", "zeros"]
    assert available("distribution") == ["normal", "truncated_normal", "uniform"]
    assert available("cell") == ["chunkwise", "parallel_stabilized", "recurrent"]
    assert available("exporter") == ["savedmodel", "stablehlo"]
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
        register("scaled_parallel", self.scaled_cell, kwargs_model=self.Kwargs, supports_state=False,
                 exportable=True, platforms=("cpu",))


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


def valid_init(dim, num_blocks, distribution):
    return distribution(1.0)


class Conflicting:
    """Registers a new norm and the built-in name ``layernorm`` (a valid norm under a taken name)."""

    @hookimpl
    def register_norms(self, register):
        register("brand_new", resolve("norm", "rmsnorm"))
        register("layernorm", resolve("norm", "rmsnorm"))


class Overriding:
    @hookimpl
    def register_norms(self, register):
        register("rmsnorm", resolve("norm", "layernorm"), override=True)


def test_builtin_keeps_its_name_in_a_conflict_and_the_other_is_reachable_by_namespace():
    reg = fresh_registry()
    original = reg.resolve("norm", "layernorm")
    info = reg.add_plugin(Conflicting(), "clash", dist="clash-dist", version="0.3")
    assert info.ok, info.error
    assert reg.resolve("norm", "brand_new") is resolve("norm", "rmsnorm")
    [conflict] = reg.conflicts()
    assert str(conflict) == (
        f"norm 'layernorm' is registered by zoo.plugins.norms (xlstm-zoo {zoo.__version__}) and by clash "
        "(clash-dist 0.3); the name means 'xlstm-zoo:layernorm' (built in; override=True would take it), the others "
        "stay reachable as 'clash-dist:layernorm'")
    assert reg.resolve("norm", "layernorm") is original
    assert reg.resolve("norm", "xlstm-zoo:layernorm") is original
    assert reg.resolve("norm", "clash-dist:layernorm") is resolve("norm", "rmsnorm")
    assert {"layernorm", "xlstm-zoo:layernorm", "clash-dist:layernorm"} <= set(reg.available("norm"))
    with use_registry(reg):
        cfg = zoo.load_config({"vocab_size": 10, "norm_type": "clash-dist:layernorm"})
        assert cfg.norm_type == "clash-dist:layernorm"
        assert cfg.plugins_used()["norm"] == ["clash-dist:layernorm"]


class NewNorm:
    @hookimpl
    def register_norms(self, register):
        register("fancy", resolve("norm", "rmsnorm"))


def test_two_distributions_make_a_name_ambiguous_until_one_is_named():
    reg = fresh_registry()
    assert reg.add_plugin(NewNorm(), "first", dist="dist-a", version="1").ok
    assert reg.add_plugin(NewNorm(), "second", dist="dist-b", version="2").ok
    with pytest.raises(UnknownPluginError, match=r"ambiguous norm name: norm 'fancy' is registered by first "
                                                 r"\(dist-a 1\) and by second \(dist-b 2\); name one of "
                                                 r"'dist-a:fancy', 'dist-b:fancy'"):
        reg.resolve("norm", "fancy")
    assert reg.entry("norm", "dist-b:fancy").plugin == "second"
    assert "fancy" not in reg.available("norm") and "dist-a:fancy" in reg.available("norm")
    with use_registry(reg):
        with pytest.raises(ValidationError, match="ambiguous norm name"):
            zoo.load_config({"vocab_size": 10, "norm_type": "fancy"})
        assert zoo.load_config({"vocab_size": 10, "norm_type": "dist-a:fancy"}).norm_type == "dist-a:fancy"


def test_override_takes_the_bare_name_and_keeps_the_other_reachable():
    reg = fresh_registry()
    builtin = reg.resolve("norm", "rmsnorm")
    assert reg.add_plugin(Overriding(), "over", dist="over-dist", version="1").ok
    assert reg.resolve("norm", "rmsnorm") is resolve("norm", "layernorm")
    assert reg.resolve("norm", "xlstm-zoo:rmsnorm") is builtin
    [conflict] = reg.conflicts()
    assert conflict.winner.plugin == "over"
    assert "the name means 'over-dist:rmsnorm' (registered with override=True)" in str(conflict)


def test_two_overrides_of_one_name_make_it_ambiguous_and_each_stays_reachable():
    reg = fresh_registry()
    builtin = reg.resolve("norm", "rmsnorm")
    assert reg.add_plugin(Overriding(), "over", dist="over-a", version="1").ok
    assert reg.add_plugin(Overriding(), "over-again", dist="over-b", version="2").ok
    with pytest.raises(AmbiguousPluginError) as caught:
        reg.resolve("norm", "rmsnorm")
    assert str(caught.value) == (
        f"ambiguous norm name: norm 'rmsnorm' is registered by zoo.plugins.norms (xlstm-zoo {zoo.__version__}) and "
        "by over (over-a 1) and by over-again (over-b 2); name one of 'xlstm-zoo:rmsnorm', 'over-a:rmsnorm', "
        "'over-b:rmsnorm', or let one plugin register it with override=True")
    assert (reg.entry("norm", "over-a:rmsnorm").dist, reg.entry("norm", "over-b:rmsnorm").dist) == ("over-a", "over-b")
    assert reg.resolve("norm", "over-b:rmsnorm") is resolve("norm", "layernorm")
    assert reg.resolve("norm", "xlstm-zoo:rmsnorm") is builtin
    names = reg.available("norm")
    assert "rmsnorm" not in names and {"xlstm-zoo:rmsnorm", "over-a:rmsnorm", "over-b:rmsnorm"} <= set(names)
    with use_registry(reg), pytest.raises(ValidationError, match="ambiguous norm name"):
        zoo.load_config({"vocab_size": 10, "norm_type": "rmsnorm"})


def test_same_distribution_cannot_register_a_name_twice():
    reg = fresh_registry()
    assert reg.add_plugin(Conflicting(), "clash", dist="clash-dist").ok
    again = reg.add_plugin(Conflicting(), "clash-again", dist="clash-dist")
    assert "norm 'brand_new' is registered twice" in again.error
    assert reg.resolve("norm", "brand_new") is resolve("norm", "rmsnorm")


class DuplicateWithinPlugin:
    @hookimpl
    def register_inits(self, register):
        register("twice", valid_init)
        register("twice", valid_init)


def test_duplicate_within_one_plugin_is_a_conflict():
    info = fresh_registry().add_plugin(DuplicateWithinPlugin(), "dup")
    assert "init 'twice' is registered twice" in info.error


class RaisesDuringRegistration:
    @hookimpl
    def register_norms(self, register):
        register("half_done", resolve("norm", "rmsnorm"))

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


# --- entry points of fake distributions, in this process ---------------------------------------

def norm_module(name: str) -> str:
    return f"""
        from zoo.registry import hookimpl, resolve

        @hookimpl
        def register_norms(register):
            register({name!r}, resolve("norm", "rmsnorm"))
        """


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """``fake_dists({dist: {entry_point: module}}, module=source, ...)`` writes the modules and a dist-info
    folder per distribution (version 1.0) and makes them the only ``zoo`` entry points for this test."""
    def install(dists: dict[str, dict[str, str]], **modules: str) -> None:
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        for dist, entry_points in dists.items():
            info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
            (info / "entry_points.txt").write_text(
                "[zoo]\n" + "".join(f"{ep} = {module}\n" for ep, module in entry_points.items()))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [
            ep for d in importlib.metadata.distributions(path=[str(tmp_path)]) for ep in d.entry_points
            if ep.group == group])

    return install


def test_two_distributions_may_use_one_entry_point_name(fake_dists):
    fake_dists({"zoo-dist-a": {"plugin": "zoo_shared_a"}, "zoo-dist-b": {"plugin": "zoo_shared_b"},
                "zoo-dist-c": {"other": "zoo_shared_c"}},
               zoo_shared_a=norm_module("norm_a"), zoo_shared_b=norm_module("norm_b"), zoo_shared_c="import nowhere_x")
    reg = fresh_registry()
    reg.load_entry_points()
    a, b, c = (reg.plugins[key] for key in [("zoo-dist-a", "plugin"), ("zoo-dist-b", "plugin"),
                                            ("zoo-dist-c", "other")])
    assert a.ok and b.ok, (a.error, b.error)
    assert (a.registered, b.registered) == ({"norm": ["norm_a"]}, {"norm": ["norm_b"]})
    assert (a.entry_point, b.entry_point) == ("plugin = zoo_shared_a", "plugin = zoo_shared_b")
    assert reg.entry("norm", "norm_a").dist == "zoo-dist-a" and reg.entry("norm", "norm_b").dist == "zoo-dist-b"
    assert c.error == "failed to import: ModuleNotFoundError: No module named 'nowhere_x'"
    assert reg.failures() == [c]
    [shared] = reg.shared_entry_points()  # the clash is reported in one line naming both distributions
    assert "\n" not in shared and "'plugin'" in shared
    assert "zoo-dist-a 1.0" in shared and "zoo-dist-b 1.0" in shared and "zoo-dist-c" not in shared


def test_an_allowlist_name_that_two_distributions_share_loads_neither_and_says_so(fake_dists):
    fake_dists({"zoo-dist-a": {"plugin": "zoo_allow_a"}, "zoo-dist-b": {"plugin": "zoo_allow_b", "solo": "zoo_solo"}},
               zoo_allow_a=norm_module("allow_a"), zoo_allow_b=norm_module("allow_b"), zoo_solo=norm_module("solo"))
    reg = fresh_registry()
    reg.load_entry_points(["plugin", "solo"])
    [failure] = reg.failures()
    assert failure.key == (None, "plugin")
    message = failure.error
    assert "\n" not in message
    assert message.startswith("requested (ZOO_PLUGINS or an explicit load) but entry points of 2 distributions "
                              "have that name: ")
    assert "zoo-dist-a 1.0" in message and "zoo-dist-b 1.0" in message
    assert "'zoo-dist-a:plugin'" in message and "'zoo-dist-b:plugin'" in message
    assert set(reg.available("norm")) & {"allow_a", "allow_b", "solo"} == {"solo"}
    with pytest.raises(AssertionError, match="plugin: requested .* entry points of 2 distributions"):
        with isolated_registry("plugin"):
            pass

    qualified = fresh_registry()
    qualified.load_entry_points(["zoo_dist_a:plugin"])  # the distribution spelt as pip would accept it
    assert qualified.failures() == [] and "allow_a" in qualified.available("norm")
    assert "allow_b" not in qualified.available("norm")
    by_dist = fresh_registry()
    by_dist.load_entry_points(["Zoo.Dist-B"])
    assert by_dist.failures() == [] and {"allow_b", "solo"} <= set(by_dist.available("norm"))
    assert "allow_a" not in by_dist.available("norm")


def test_one_module_behind_two_entry_points_is_refused_in_one_line(fake_dists):
    fake_dists({"zoo-dist-a": {"first": "zoo_twice"}, "zoo-dist-b": {"second": "zoo_twice"}},
               zoo_twice=norm_module("twice_norm"))
    reg = fresh_registry()
    reg.load_entry_points()
    [failure] = reg.failures()
    [loaded] = [p for p in reg.plugins.values() if not p.builtin and p.ok]
    assert failure.error == f"PluginError: {failure.origin} is the object already loaded as {loaded.origin}"
    assert reg.entry("norm", "twice_norm").dist == loaded.dist


def test_a_plugin_key_already_taken_is_refused_and_the_loaded_record_kept():
    reg = fresh_registry()
    first = reg.add_plugin(NewNorm(), "fancy-plugin", dist="dist-a", version="1")
    again = reg.add_plugin(NormPlugin(), "fancy-plugin", dist="dist-a", version="1")
    assert first.ok and again.error == "PluginError: fancy-plugin (dist-a 1) is already loaded"
    assert reg.plugins[("dist-a", "fancy-plugin")] is first and reg.failures() == []
    assert "unitnorm" not in reg.available("norm")


class WrongHookArgument:
    @hookimpl
    def register_norms(self, registrar):
        pass


def test_a_hook_pluggy_refuses_is_recorded_in_one_line():
    info = fresh_registry().add_plugin(WrongHookArgument(), "wrong-arg", dist="dist-w", version="1")
    assert info.error.startswith("PluginValidationError: Plugin 'dist-w:wrong-arg' for hook 'register_norms'; ")
    assert "registrar" in info.error and "\n" not in info.error


def parallel(q, k, v, i, f, **kw):
    return resolve("cell", "parallel_stabilized")(q, k, v, i, f, **kw)


def two_args(q, k):
    return q


class NoDefaults(BaseModel):
    width: int = 4


BROKEN = {
    "kwargs model not pydantic": (
        "cell", parallel, {"supports_state": False, "exportable": True, "platforms": ("cpu",), "kwargs_model": dict},
        "kwargs_model must be a pydantic BaseModel subclass, got <class 'dict'>"),
    "missing metadata": ("cell", parallel, {"supports_state": False},
                         "missing metadata 'exportable'; missing metadata 'platforms'"),
    "misspelt metadata": ("cell", parallel, {"suports_state": False, "exportable": True, "platforms": ("cpu",)},
                          "unknown metadata 'suports_state' (did you mean 'supports_state'?)"),
    "wrong cell signature": ("cell", two_args, {"supports_state": False, "exportable": True, "platforms": ("cpu",)},
                             "cell must be callable as cell(q, k, v, i, f, *, eps, ...)"),
    "stateful cell without state arguments": (
        "cell", lambda q, k, v, i, f, eps=1e-6: q, {"supports_state": True, "exportable": True, "platforms": ("cpu",)},
        "it cannot take: c_initial, n_initial, m_initial, return_last_states"),
    "kwargs the cell cannot take": (
        "cell", lambda q, k, v, i, f, eps=1e-6: q,
        {"supports_state": False, "exportable": True, "platforms": ("cpu",), "kwargs_model": NoDefaults},
        "it cannot take: width"),
    "unknown platform": ("cell", parallel, {"supports_state": False, "exportable": True, "platforms": ("rocm",)},
                         "platforms must be a non-empty tuple among cpu, cuda, tpu"),
    "norm not a module": ("norm", object(), {}, "norm must be a flax.linen.Module subclass"),
    "init signature": ("init", lambda dim: None, {}, "init must be callable as fn(dim, num_blocks, distribution); "
                                                     "it cannot take: num_blocks, distribution"),
    "layer without derived sizes": ("layer", resolve("layer", "mlstm"), {}, "missing metadata 'derived_sizes'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_contract_breaking_registration_is_refused_with_the_reason(case):
    kind, obj, metadata, expected = BROKEN[case]

    def hook(self, register):
        register("broken", obj, **metadata)

    hook_name = {"cell": "register_cells", "norm": "register_norms", "init": "register_inits",
                 "layer": "register_layers"}[kind]
    reg = fresh_registry()
    info = reg.add_plugin(type("Broken", (), {hook_name: hookimpl(hook)})(), "broken-plugin")
    assert f"ContractError: {kind} 'broken' from broken-plugin: " in info.error
    assert expected in info.error
    assert "broken" not in reg.available(kind)
    assert reg.resolve("cell", "chunkwise") is resolve("cell", "chunkwise"), "the rest still works"


def test_trace_logs_every_hook_call_and_registration():
    proc = subprocess.run([sys.executable, "-c", "from zoo.registry import available; available('cell')"],
                          env={**os.environ, "ZOO_TRACE_PLUGINS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "zoo.plugins: calling register_cells of xlstm-zoo:zoo.plugins.cells.chunkwise" in proc.stderr
    assert "zoo.plugins: xlstm-zoo:zoo.plugins.cells.chunkwise registered cell 'chunkwise'" in proc.stderr
    assert "zoo.plugins: calling register_norms of xlstm-zoo:zoo.plugins.norms" in proc.stderr


# --- real entry points, discovered by importlib.metadata in a fresh process -------------------

PLUGIN_MODULES = {
    "zoo_good_plugin.py": """
        from zoo.registry import hookimpl

        def doubled_cell(q, k, v, i, f, **kw):
            from zoo.registry import resolve
            return 2 * resolve("cell", "parallel_stabilized")(q, k, v, i, f, **kw)

        @hookimpl
        def register_cells(register):
            register("doubled", doubled_cell, supports_state=False, exportable=True, platforms=("cpu",),
                     description="twice the parallel cell")
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
        from zoo.registry import hookimpl, resolve

        @hookimpl
        def register_norms(register):
            register("rmsnorm", resolve("norm", "layernorm"))
        """,
    "zoo_contract_plugin.py": """
        from zoo.registry import hookimpl

        @hookimpl
        def register_inits(register):
            register("broken_init", lambda dim: None)
        """,
    "zoo_more_good_plugin.py": """
        from zoo.registry import hookimpl, resolve

        @hookimpl
        def register_norms(register):
            register("more_norm", resolve("norm", "rmsnorm"))
        """,
    "zoo_more_import_error_plugin.py": """
        import another_missing_module
        """,
}
ENTRY_POINTS = {"good": "zoo_good_plugin", "import-error": "zoo_import_error_plugin",
                "register-error": "zoo_register_error_plugin", "clash": "zoo_clash_plugin",
                "contract": "zoo_contract_plugin"}
# a second distribution that uses two of the same entry-point names: one loads, one fails to import
MORE_ENTRY_POINTS = {"good": "zoo_more_good_plugin", "import-error": "zoo_more_import_error_plugin"}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, source in PLUGIN_MODULES.items():
        (root / name).write_text(textwrap.dedent(source))
    for dist, version, entry_points in [("zoo-test-plugins", "0.7", ENTRY_POINTS),
                                        ("zoo-more-plugins", "2.1", MORE_ENTRY_POINTS)]:
        dist_info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (dist_info / "entry_points.txt").write_text(
            "[zoo]\n" + "".join(f"{ep} = {module}\n" for ep, module in entry_points.items()))
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
    records = [(p["dist"], p["name"]) for p in data["plugins"]]
    assert len(records) == len(set(records))
    plugins = {p["name"]: p for p in data["plugins"] if p["dist"] == "zoo-test-plugins"}
    more = {p["name"]: p for p in data["plugins"] if p["dist"] == "zoo-more-plugins"}
    assert plugins["good"]["error"] is None and plugins["good"]["version"] == "0.7"
    assert plugins["good"]["registered"] == {"cell": ["doubled"]}
    assert "ModuleNotFoundError" in plugins["import-error"]["error"]
    assert "ValueError: bad norm table" in plugins["register-error"]["error"]
    assert "init 'broken_init' from contract: init must be callable as fn(dim" in plugins["contract"]["error"]
    assert plugins["clash"]["error"] is None and plugins["clash"]["registered"] == {"norm": ["rmsnorm"]}
    assert set(more) == {"good", "import-error"}
    assert more["good"]["error"] is None and more["good"]["registered"] == {"norm": ["more_norm"]}
    assert more["good"]["version"] == "2.1" and more["good"]["entry_point"] == "good = zoo_more_good_plugin"
    assert more["import-error"]["error"] == ("failed to import: ModuleNotFoundError: No module named "
                                             "'another_missing_module'")
    assert data["conflicts"] == [
        "norm 'rmsnorm' is registered by zoo.plugins.norms (xlstm-zoo 0.1.0) and by clash (zoo-test-plugins 0.7); "
        "the name means 'xlstm-zoo:rmsnorm' (built in; override=True would take it), the others stay reachable as "
        "'zoo-test-plugins:rmsnorm'"]
    registered = {r["qualified_name"]: r for r in data["registered"]}
    assert registered["zoo-test-plugins:doubled"]["plugin"] == "good"
    assert registered["xlstm-zoo:rmsnorm"]["plugin"] == "zoo.plugins.norms"
    assert registered["zoo-test-plugins:rmsnorm"]["plugin"] == "clash"


def test_verbose_listing_groups_by_distribution_with_failures(plugin_path):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "plugins", "--verbose"], capture_output=True, text=True,
                          env={**inherited, "PYTHONPATH": str(plugin_path), "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.index("xlstm-zoo 0.1.0") < text.index("ok zoo.plugins.norms (built-in module)")
    assert text.index("zoo-test-plugins 0.7") < text.index("ok good (entry point good = zoo_good_plugin)")
    assert "cell: doubled" in text
    more = text.index("zoo-more-plugins 2.1")
    assert more < text.index("ok good (entry point good = zoo_more_good_plugin)") < text.index("norm: more_norm")
    assert more < text.index("FAILED import-error (entry point import-error = zoo_more_import_error_plugin)")
    assert "FAILED import-error (entry point import-error = zoo_import_error_plugin)" in text
    assert "error: failed to import: ModuleNotFoundError: No module named 'not_a_real_module_anywhere'" in text
    assert "Traceback (most recent call last)" in text and "import not_a_real_module_anywhere" in text
    assert "conflict: norm 'rmsnorm' is registered by" in " ".join(text.split())


def test_autoload_can_be_disabled(plugin_path):
    data = zoo_plugins_json(plugin_path, ZOO_DISABLE_PLUGIN_AUTOLOAD="1")
    assert all(p["builtin"] for p in data["plugins"])
    assert "doubled" not in [r["name"] for r in data["registered"]]


def test_allowlist_loads_only_named_plugins(plugin_path):
    data = zoo_plugins_json(plugin_path, ZOO_PLUGINS="zoo_test_plugins:good,clash,import-error,not-installed")
    third_party = {(p["dist"], p["name"]): p for p in data["plugins"] if not p["builtin"]}
    assert set(third_party) == {("zoo-test-plugins", "good"), ("zoo-test-plugins", "clash"),
                                (None, "import-error"), (None, "not-installed")}
    assert third_party[("zoo-test-plugins", "good")]["error"] is None
    assert third_party[("zoo-test-plugins", "clash")]["error"] is None
    assert "requested (ZOO_PLUGINS or an explicit load) but no installed plugin" in \
        third_party[(None, "not-installed")]["error"]
    assert "entry points of 2 distributions have that name" in third_party[(None, "import-error")]["error"]


def test_check_backends_includes_third_party_cells_and_fails_on_disagreement(plugin_path):
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "check-backends", "--seq-lens", "7"],
                          env={**inherited, "PYTHONPATH": str(plugin_path), "COLUMNS": "160",
                               "ZOO_PLUGINS": "zoo-test-plugins:good"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split("│")[1].strip() + "/" + line.split("│")[2].strip(): line
            for line in proc.stdout.splitlines() if line.count("│") >= 7}
    assert "FAIL" in rows["doubled/output"]
    assert "pass" in rows["chunkwise/output"] and "pass" in rows["recurrent/states"]
    assert "check(s) failed" in proc.stderr
