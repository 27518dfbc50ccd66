"""Config mistakes get one error on the field the user wrote, saying what is allowed."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

import zoo
from zoo import sharding
from zoo.config import ParallelConfig

CELL = "mlstm_block.mlstm.mlstm_cell"


def errors_of(call) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        call()
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


@pytest.fixture(scope="module")
def tiny():
    return zoo.load_config("tiny")


def test_renaming_a_backend_drops_the_old_backends_options(tiny):
    assert tiny.cell.backend.kwargs == {"stabilize_rowwise": True}  # the dump carries them
    config = tiny.with_overrides({f"{CELL}.backend.name": "chunkwise"})
    assert config.cell.backend.model_dump() == {"name": "chunkwise", "kwargs": {"chunk_size": 64}}
    config = tiny.with_overrides({f"{CELL}.backend.name": "chunkwise", f"{CELL}.backend.kwargs.chunk_size": 8})
    assert config.cell.backend.kwargs == {"chunk_size": 8}


def test_an_option_of_another_backend_names_the_backend(tiny):
    assert errors_of(lambda: tiny.with_overrides({f"{CELL}.backend.kwargs.chunk_size": "auto"})) == {
        f"{CELL}.backend.kwargs.chunk_size":
            "cell 'parallel_stabilized' has no option 'chunk_size'; its options: stabilize_rowwise"}


@pytest.mark.parametrize("value", [0, -3, "x", 2.5])
def test_a_union_option_gets_one_error_saying_what_is_allowed(tiny, value):
    assert errors_of(lambda: tiny.with_overrides({f"{CELL}.prefill_backend.kwargs.chunk_size": value})) == {
        f"{CELL}.prefill_backend.kwargs.chunk_size": "must be a positive integer or 'auto'"}


def test_missing_vocab_size_says_it_is_required():
    errors = errors_of(lambda: zoo.load_config({}))
    assert list(errors) == ["vocab_size"] and "vocab_size is required" in errors["vocab_size"]
    assert "-1" not in errors["vocab_size"]


def test_top_level_null_and_duplicate_keys_are_refused_in_one_line(tmp_path):
    (tmp_path / "null.json").write_text("null")
    with pytest.raises(zoo.config_source.ConfigSourceError, match="the top level must be a JSON object, got null$"):
        zoo.load_config(tmp_path / "null.json")
    (tmp_path / "dup.json").write_text('{"vocab_size": 256, "num_blocks": 2, "vocab_size": 512}')
    with pytest.raises(zoo.config_source.ConfigSourceError, match="key 'vocab_size' appears twice") as info:
        zoo.load_config(tmp_path / "dup.json")
    assert "\n" not in str(info.value) and "dup.json" in str(info.value)


def test_num_blocks_has_a_documented_bound_that_refuses_quickly(tiny):
    start = time.perf_counter()
    errors = errors_of(lambda: tiny.with_overrides({"num_blocks": 1_000_000}))
    assert list(errors) == ["num_blocks"] and "at most 4096" in errors["num_blocks"]
    assert time.perf_counter() - start < 5
    assert zoo.ModelConfig.model_json_schema()["properties"]["num_blocks"]["maximum"] == 4096
    assert tiny.with_overrides({"num_blocks": 4096}).num_blocks == 4096


def test_a_mesh_that_does_not_fit_does_not_mention_pipeline_parallelism():
    with pytest.raises(sharding.ShardingError) as info:
        sharding.axis_sizes(ParallelConfig(fsdp_axis_size=8), 1)
    assert "pipeline" not in str(info.value) and "fsdp × model sizes = 8" in str(info.value)
