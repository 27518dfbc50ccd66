"""The real ``zoo`` executable writing into a pipe, as in CI: nothing is cut or wrapped to a terminal width, and
``--help`` is plain text (no ``<bool>`` placeholders, no reStructuredText markup)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import typer.main

from zoo import cli
from zoo.registry import describe
from zoo.testing import isolated_registry


def zoo_piped(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m zoo.cli ARGS`` (or ``python -c CODE``) with stdout and stderr pipes and no COLUMNS hint."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "zoo.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**env, "ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"})


def test_a_long_error_stays_on_one_line(tmp_path):
    missing = str(tmp_path / ("a_config_path_that_does_not_exist_" * 5)) + ".json"
    assert len(missing) > 150
    proc = zoo_piped("validate", missing)
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: {missing!r} is neither a config file nor a preset")
    assert "mlstm-1.3b, mlstm-120m, mlstm-165m, mlstm-7b, mlstm_v1-1.3b, mlstm_v1-165m, mlstm_v1-2.7b, mlstm_v1-7b, " \
           "tiny, tiny-v1" in line


def test_a_table_keeps_every_name_whole():
    proc = zoo_piped("plugins")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.endswith(" ")] == []  # rich pads cells to the widest
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    with isolated_registry():  # the built-ins, as in the subprocess (autoload off)
        entries = describe()
    for entry in entries:
        cells = [" ".join(cell.split()) for cell in next(r for r in rows if f" {entry.name} " in r).split("│")]
        assert cells[1:5] == [entry.kind, entry.name, entry.plugin, f"{entry.dist} {entry.version}"]
        assert cells[5] == " ".join(str(entry.metadata.get("description", "")).split())


def commands(group, path=()):
    """``(argv, click command)`` for the group itself and every command under it."""
    yield list(path), group
    for name, command in getattr(group, "commands", {}).items():
        yield from commands(command, (*path, name))


HELP_ALL = """
import json, sys
from zoo.cli import main
for argv in json.loads(sys.argv[1]):
    print("=== " + " ".join(argv), flush=True)
    try:
        main([*argv, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
"""


def test_help_of_every_command_is_plain_and_whole():
    tree = list(commands(typer.main.get_command(cli.app)))
    proc = zoo_piped(json.dumps([argv for argv, _ in tree]), code=HELP_ALL)
    assert proc.returncode == 0, proc.stderr
    sections = proc.stdout.split("=== ")[1:]
    assert len(sections) == len(tree) > 10
    for section, (argv, command) in zip(sections, tree):
        assert section.splitlines()[0].strip() == " ".join(argv)
        assert "``" not in section and "<bool>" not in section and "…" not in section, argv
        flat = section.replace("\n", " ")
        for paragraph in (command.help or "").split("\n\n"):  # the docstring, each paragraph on one line
            assert " ".join(paragraph.split()) in section, (argv, paragraph)
        for param in command.params:
            help_text = " ".join((getattr(param, "help", None) or "").split())
            for name in param.opts if param.param_type_name == "option" else ():
                assert re.search(rf"[\s,]{re.escape(name)}[\s,]", flat), (argv, name)
            if help_text:  # whole, on one line
                assert help_text in section, (argv, help_text)
        for name, sub in getattr(command, "commands", {}).items():
            line = next(line for line in section.splitlines() if line.split()[:1] == [name])
            assert " ".join(line.split()[1:]) == " ".join(sub.get_short_help_str(limit=10**6).split())


def test_a_grid_through_a_pipe_has_no_trailing_spaces():
    from test_cli_bad_input import invoke

    result = invoke("info", "tiny")  # in-process: the runner's stdout is not a terminal
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "config                preset tiny"  # label column as wide as "plugins distribution" + 2
    assert [line for line in lines if line != line.rstrip()] == []
