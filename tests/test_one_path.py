"""One path per job: one cache of compiled functions, one model call, one decode loop."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
import zoo.inference
import zoo.inference.decode
from helpers import COMPILES
from zoo.export.runners import greedy, open_artifact

REPO = Path(__file__).resolve().parents[1]
SOURCES = {path: ast.parse(path.read_text()) for path in sorted((REPO / "zoo").rglob("*.py"))}


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_one_cache_of_compiled_functions():
    """``functools.lru_cache``/``cache`` appear once for configs (``zoo.compiled``); the other two cache a pydantic
    adapter per field and a dtype predicate."""
    sites = {(path.relative_to(REPO).as_posix(), fn.name)
             for path, tree in SOURCES.items() for fn in ast.walk(tree)
             if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             and any(_decorator_name(d) in {"lru_cache", "cache"} for d in fn.decorator_list)}
    assert sites == {("zoo/compiled.py", "_cached"), ("zoo/config.py", "_field_adapter"), ("zoo/checks.py", "_floating")}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _decorator_name(n) == name]


def test_every_jitted_model_function_comes_from_the_cache():
    """In the modules that run the model, ``jax.jit`` is only called inside ``_make_*`` builders, and each builder is
    only ever handed to ``zoo.compiled.compiled``."""
    for rel in ("zoo/runtime.py", "zoo/train/step.py", "zoo/inference/decode.py"):
        tree = SOURCES[REPO / rel]
        makers = {fn.name for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("_make_")}
        assert makers, rel
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and fn.name not in makers:
                assert not [n for n in ast.walk(fn) if _decorator_name(n) == "jit"], f"{rel}:{fn.name} jits outside a builder"
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in makers]
        handed = [a for call in _calls(tree, "compiled") for a in call.args[:1] if isinstance(a, ast.Name)]
        assert len(uses) == len(handed) and {a.id for a in handed} == makers, rel


def test_one_model_call():
    """``model.apply`` is called in one place (``zoo.runtime.apply``); everything else calls that."""
    callers = [(path.relative_to(REPO).as_posix(), n.lineno) for path, tree in SOURCES.items()
               for n in _calls(tree, "apply") if isinstance(n.func, ast.Attribute)
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "model"]
    assert [rel for rel, _ in callers] == ["zoo/runtime.py"]


@pytest.fixture(scope="module")
def tiny():
    config = zoo.load_config("tiny")
    return config, zoo.init_params(config, seed=3)


def test_committed_and_uncommitted_inputs_share_one_compilation(tiny):
    config, params = tiny
    tokens = np.arange(6, dtype=np.int32).reshape(2, 3)
    committed = jax.device_put(params, jax.devices()[0])
    loose = jax.tree_util.tree_map(lambda x: jnp.array(np.asarray(x)), params)  # not committed to a device
    assert all(x.committed for x in jax.tree_util.tree_leaves(committed))
    assert not any(x.committed for x in jax.tree_util.tree_leaves(loose))
    token_kinds = (tokens, jnp.asarray(tokens), jax.device_put(tokens, jax.devices()[0]))  # made before counting
    expected = zoo.forward(config, committed, tokens)  # compiles (or finds) the forward function
    before = COMPILES.count
    for params_ in (loose, jax.tree_util.tree_map(np.asarray, params), committed):
        for tokens_ in token_kinds:
            np.testing.assert_array_equal(zoo.forward(config, params_, tokens_), expected)
    assert COMPILES.count == before


def test_the_library_the_runners_and_the_benchmarks_share_the_decode_loop(tiny, monkeypatch, tmp_path):
    config, params = tiny
    seen = []
    loop = zoo.inference.decode.decode_loop

    def counted(step, token, carry, max_new_tokens, stop=None):
        seen.append(max_new_tokens)
        return loop(step, token, carry, max_new_tokens, stop)

    monkeypatch.setattr(zoo.inference.decode, "decode_loop", counted)
    monkeypatch.setattr(zoo.inference, "decode_loop", counted)
    library = zoo.generate(config, params, [[1, 2, 3]], 4).tokens
    zoo.save(tmp_path / "ck", config, params)
    _, from_checkpoint = greedy(open_artifact(tmp_path / "ck"), [1, 2, 3], 4)
    assert from_checkpoint == [int(t) for t in library[0]]
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import decode as bench
        monkeypatch.setattr(bench, "decode_loop", counted)
        rows = bench.latency_vs_context(config, params, [3], 2, 2)
    finally:
        sys.path.remove(str(REPO))
    assert rows[0]["context"] == 3 and rows[0]["zoo_ms_per_token"] > 0
    assert seen == [4, 4, 3, 3, 3]  # generate, greedy, then the benchmark's rounds (warm-up included)
