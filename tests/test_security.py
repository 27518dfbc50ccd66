"""Security: no pickle on any loading path, and manifest paths cannot leave the artifact directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import zoo
from zoo.export.entries import ExportError
from zoo.export.runners import open_artifact

PACKAGE = Path(zoo.__file__).resolve().parent
# Deserialisers that can run code: pickle and its relatives, NumPy's pickle fallback, torch.load.
UNSAFE = re.compile(r"\b(import\s+(c?pickle|dill|cloudpickle|shelve|marshal)|from\s+(c?pickle|dill|cloudpickle|shelve|marshal)\s+import"
                    r"|pickle\.loads?|allow_pickle\s*=\s*True|torch\.load\s*\(|joblib\.load)")


def test_the_package_never_unpickles():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 30
    hits = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}" for p in sources
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if UNSAFE.search(line)]
    assert not hits, hits
    assert UNSAFE.search("import pickle") and UNSAFE.search("np.load(f, allow_pickle=True)")  # the scan can fail


@pytest.mark.parametrize("file", ["../outside.jax_exported", "/etc/passwd", "sub/../../outside.jax_exported"])
def test_manifest_paths_cannot_escape_the_artifact(tmp_path, file):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (tmp_path / "outside.jax_exported").write_bytes(b"not for you")
    (artifact / "manifest.json").write_text(json.dumps({
        "format": "stablehlo", "weights": "baked", "vocab_size": 5, "entries": {"forward": {"file": file}}}))
    with pytest.raises(ExportError, match="outside the artifact directory"):
        open_artifact(artifact)


def test_a_torch_index_cannot_point_outside_its_folder(tmp_path):
    from zoo.convert.torch import ConvertError, from_torch

    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (src / "config.yaml").write_text("embedding_dim: 64\nnum_heads: 4\nnum_blocks: 1\nvocab_size: 10\n")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"embedding.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ConvertError, match="outside"):
        from_torch(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
