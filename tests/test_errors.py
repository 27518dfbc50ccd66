"""One error family: every error class the zoo defines is a ``ZooError`` that keeps its built-in base, and the
CLI maps the whole family to exit code 2."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[1]

# the built-in base each existing error had before the family existed (user code may catch it)
BUILTIN_BASE = {"ShardingError": ValueError, "ConvertError": ValueError, "ExportError": ValueError,
                "CheckpointError": RuntimeError, "ConfigSourceError": ValueError, "TokenError": ValueError,
                "PluginError": Exception, "UnknownPluginError": LookupError, "ContractError": ValueError,
                "CellError": RuntimeError}


def error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class in zoo/ whose name ends in "Error", found by reading the source."""
    found = []
    for path in sorted((ROOT / "zoo").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "ZooError":
                found.append((module, node.name))
    return found


def test_every_error_class_is_a_zoo_error_and_keeps_its_builtin_base():
    found = error_classes()
    assert {name for _, name in found} >= set(BUILTIN_BASE), found
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, ZooError), f"{module}.{name}"
        assert issubclass(cls, BUILTIN_BASE.get(name, Exception)), f"{module}.{name}"


def test_user_code_catching_the_builtin_base_still_catches_it():
    import zoo

    with pytest.raises(ValueError):
        zoo.load_config("no-such-preset-or-file")
    with pytest.raises(LookupError):
        from zoo.registry import resolve

        resolve("norm", "no_such_norm")


def test_the_cli_maps_any_zoo_error_to_exit_2_in_one_line(monkeypatch):
    from typer.testing import CliRunner

    from zoo import cli

    class PluginOwnError(ZooError):  # a third-party plugin's error joins the family by subclassing
        pass

    def refuse(source):
        raise PluginOwnError("a plugin refused this config")

    monkeypatch.setattr("zoo.config_source.load_config", refuse)
    result = CliRunner().invoke(cli.app, ["validate", "tiny"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == ["error: a plugin refused this config"]
