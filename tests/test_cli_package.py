"""The CLI as a package (``zoo/cli/``, one module per command group): its functions are ``*_command`` and rebind
no library name, ``python -m zoo.cli`` and the ``zoo`` console script reach the same ``main``, and its docstring
names every command. In-process, except one ``python -m zoo.cli --help``."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import zoo
import zoo.cli

# What users type, from the README and the developers' guide: the commands and the one group with its own two.
COMMANDS = ["validate", "build", "train", "generate", "export", "quantize", "run", "serve", "check-backends",
            "plugins", "presets", "schema", "info", "convert"]
ENTRIES = [*COMMANDS[:-1], "convert torch", "convert to-torch"]


def cli_modules():
    """zoo.cli and each of its modules but ``__main__`` (importing that one runs the CLI)."""
    names = [info.name for info in pkgutil.iter_modules(getattr(zoo.cli, "__path__", [])) if info.name != "__main__"]
    return [zoo.cli, *(importlib.import_module(f"zoo.cli.{name}") for name in names)]


def commands(group, prefix: str = ""):
    """``(command path, callback)`` of every command of a click ``group`` and of its groups."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command.callback


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = zoo.load_config("tiny")
    params = zoo.init_params(config, seed=0)
    path = tmp_path_factory.mktemp("cli") / "ck"
    zoo.save(path, config, params)
    return path, config, params


@pytest.mark.slow  # init, save, compile and decode a tiny model: ~8 s on 2 cores
def test_zoo_generate_stays_the_library_function_after_the_cli_and_its_generate_ran(checkpoint):
    cli_modules()  # every module of zoo.cli imported
    library = getattr(zoo, "generate", None)
    result = CliRunner().invoke(zoo.cli.app, ["generate", str(checkpoint[0]), "--prompt-ids", "1,2",
                                              "--max-new-tokens", "3", "--show-logits", "0"])
    assert result.exit_code == 0, result.output
    # a submodule zoo/generate.py, once the command imported it, would have replaced the function
    assert callable(zoo.generate), zoo.generate
    assert zoo.generate is library is importlib.import_module("zoo.inference").generate
    config, params = checkpoint[1], checkpoint[2]
    expected = " ".join(str(int(t)) for t in zoo.generate(config, params, [[1, 2]], 3).tokens[0])
    assert f"generated: {expected}" in result.stdout.splitlines()


def test_python_m_zoo_cli_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("Commands:", 1)[1].splitlines()
    assert [line.split()[0] for line in listed if line.strip()] == COMMANDS


def test_the_console_script_is_the_cli_main():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "zoo"]
    assert script.value == "zoo.cli:main"
    assert script.load() is zoo.cli.main


def test_every_command_function_is_named_command():
    callbacks = dict(commands(typer.main.get_command(zoo.cli.app)))
    assert sorted(callbacks) == sorted(ENTRIES)
    misnamed = {path: fn.__name__ for path, fn in callbacks.items() if not fn.__name__.endswith("_command")}
    assert not misnamed


def test_one_module_per_command_group():
    groups = {module.__name__: {path for path, fn in commands(typer.main.get_command(zoo.cli.app))
                                if fn.__module__ == module.__name__} for module in cli_modules()}
    assert groups == {"zoo.cli": set(), "zoo.cli.common": set(), "zoo.cli.model": {"validate", "build", "info",
                      "presets", "schema"}, "zoo.cli.inference": {"generate", "run"},
                      "zoo.cli.artifacts": {"export", "convert torch", "convert to-torch"},
                      "zoo.cli.plugins": {"plugins", "check-backends"}, "zoo.cli.train": {"train"},
                      "zoo.cli.quantization": {"quantize"}, "zoo.cli.serve": {"serve"}}


def test_no_cli_module_rebinds_a_library_name():
    public = set(zoo.__all__)
    for module in cli_modules():
        clashes = {name for name in public & set(vars(module)) if getattr(module, name) is not getattr(zoo, name)}
        assert not clashes, module.__name__
    # Inside a function too: `from zoo.inference import generate as run` would make a library function look
    # like another command.
    taken = public | {path.split()[-1].replace("-", "_") for path in ENTRIES}
    for path in Path(zoo.cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                renamed = [a for a in node.names if a.asname in taken and a.asname != a.name.rpartition(".")[2]]
                assert not renamed, (path.name, ast.unparse(node))


def test_the_cli_docstring_names_every_command_in_one_line():
    lines = zoo.cli.__doc__.splitlines()
    for entry in ENTRIES:
        naming = [line for line in lines if re.search(rf"``zoo {re.escape(entry)}(\s|``)", line)]
        assert len(naming) == 1, (entry, naming)
