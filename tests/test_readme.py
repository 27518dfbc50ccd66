"""The README's Python API block runs as written (every name it uses is defined in it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)\n```", section, re.S).group(1)


@pytest.mark.slow
def test_the_python_api_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves "ckpt" in the working directory
    names: dict = {}
    exec(compile(python_api_block(), "README.md (Python API)", "exec"), names)
    # the vocabulary of the "tiny" preset, as presets/tiny.json states it; B = 1 as the block's tokens
    assert np.shape(names["logits"]) == (1, 256)
    assert (tmp_path / "ckpt").is_dir()


def test_no_heading_is_run_into_its_paragraph():
    text = README.read_text(encoding="utf-8")
    fenced = re.sub(r"```.*?```", "", text, flags=re.S)
    for line in fenced.splitlines():
        if line.startswith("#"):
            assert len(line) <= 70, f"a heading run into its paragraph: {line!r}"
        assert not re.match(r" \S", line), f"stray indented line: {line!r}"
