"""The zoo's import graph, read from its source with ``ast``: no circle, and no module imports a higher layer.

Layers, bottom to top (docs/architecture.md): a module may import only from its own layer or lower ones.
Every ``import`` counts, at module level and inside functions. ``import zoo.a.b`` is an edge to ``zoo.a.b``
(the parent packages it initialises are not counted: every submodule would otherwise depend on the face);
``from zoo.a import b`` is an edge to ``zoo.a.b`` when ``b`` is a submodule, else to ``zoo.a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "zoo"

LAYERS: dict[str, int] = {
    "zoo.errors": 0, "zoo.version": 0,
    "zoo.registry": 1,
    "zoo.config": 2, "zoo.config_source": 2, "zoo.presets": 2, "zoo.compiled": 2,
    "zoo.nn": 3, "zoo.parts": 3, "zoo.kernels": 3,
    "zoo.plugins": 4,
    "zoo.model": 5,
    "zoo.sharding": 6, "zoo.checkpoint": 6, "zoo.checks": 6, "zoo.runtime": 6, "zoo.distributed": 6,
    "zoo.decode_layout": 6,
    "zoo.staging": 6, "zoo.summary": 6, "zoo.quantization": 6,
    "zoo.inference": 7, "zoo.training": 7, "zoo.export": 7, "zoo.convert": 7, "zoo.info": 7, "zoo.testing": 7,
    "zoo.tokenizers": 7, "zoo.tokenizers.codec": 2, "zoo.train": 7,
    "zoo": 8, "zoo.api": 8, "zoo.cli": 8, "zoo.serve": 8,
}
"""Module (or package prefix) -> layer. ``zoo.compiled`` only knows configs, so it sits with them: the model
caches its abstract shapes there. ``zoo.tokenizers.codec`` knows no file format, so that checkpoints can store a
tokenizer that ``zoo.tokenizers`` reads back."""


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the zoo modules it imports (see the module docstring for how an import becomes an edge)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != root.name:
                    continue
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """The layer of ``module``: that of its longest prefix in ``LAYERS``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no layer: add it to LAYERS")


GRAPH = import_graph(ROOT)


def test_the_graph_is_read_from_the_source():
    # a few edges known from the code, so that a reader that finds nothing cannot pass the tests below
    assert "zoo.model" in GRAPH["zoo.runtime"]
    assert "zoo.registry" in GRAPH["zoo.config"]
    assert "zoo.inference" in GRAPH["zoo"]
    assert sum(map(len, GRAPH.values())) > 80


def test_no_circle():
    assert circles(GRAPH) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    upward = sorted(target for target in GRAPH[module] if layer(target) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports " + ", ".join(
        f"{t} (layer {layer(t)})" for t in upward)


def test_only_the_faces_import_the_old_api_module():
    assert sorted(m for m, targets in GRAPH.items() if "zoo.api" in targets) == []


def test_the_core_reaches_the_built_in_plugins_only_by_name():
    """Layers 0-3 never import a plugin module; the registry loads the built-ins from a list of names."""
    core = [m for m in GRAPH if layer(m) <= 3]
    assert not {(m, t) for m in core for t in GRAPH[m] if t.startswith("zoo.plugins")}
