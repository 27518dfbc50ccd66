"""Configs the zoo writes (dumps, checkpoints) can be edited at the top level and read back.

A dump writes every value, but an inherited one only at the top level, where it is set; so a top-level
edit means what it says. Dumps and checkpoints written before (with inner copies) still load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import zoo
from zoo import presets
from zoo.config import BlockConfig, CellConfig, FeedForwardConfig, LayerConfig, ModelConfig, ParallelConfig

# A small config using every inheriting section (layer, cell, feed-forward, parallel).
SOURCE = {"vocab_size": 8, "embedding_dim": 16, "num_blocks": 1, "dtype": "float32", "context_length": 32,
          "norm_type": "rmsnorm", "bias": True, "parallel": {"remat": ["mLSTMBlock"]},
          "mlstm_block": {"mlstm": {"num_heads": 2}, "feedforward": {"proj_factor": 2.0}}}
# SOURCE as dumped by the zoo at commit 1c1d397 (before this change): inherited values repeated in every section.
OLD_DUMP = json.loads((Path(__file__).parent / "data" / "config_dump_1c1d397.json").read_text())

BLOCK, LAYER = ("mlstm_block",), ("mlstm_block", "mlstm")
CELL, FFN = ("mlstm_block", "mlstm", "mlstm_cell"), ("mlstm_block", "feedforward")
# Each inheritable model field, a new value, and every section it must reach (the reference's propagation
# rules, docs/numerics.md §2.3, written out here rather than read from zoo.config.INHERITED).
EDITS = [
    ("dtype", "bfloat16", [LAYER, CELL, FFN]),
    ("norm_type", "layernorm", [LAYER, CELL]),
    ("context_length", 64, [LAYER]),
    ("embedding_dim", 32, [LAYER, FFN]),
    ("bias", False, [LAYER]),
    ("dropout", 0.25, [LAYER]),
    ("parallel", {"fsdp_gather_dtype": "bfloat16"}, [BLOCK, LAYER, CELL, FFN]),
    ("parallel", None, [BLOCK, LAYER, CELL, FFN]),
]
DUMPS = {
    "model_dump": lambda c: c.model_dump(),
    "model_dump json": lambda c: c.model_dump(mode="json"),
    "model_dump_json": lambda c: json.loads(c.model_dump_json()),
}


def node(config: ModelConfig, path: tuple[str, ...]):
    for part in path:
        config = getattr(config, part)
    return config


def expected_value(field: str, value):
    return ParallelConfig.model_validate(value) if field == "parallel" and value is not None else value


def assert_edit_arrives(data: dict, field: str, value, places: list[tuple[str, ...]]) -> None:
    data[field] = value
    edited = ModelConfig.model_validate(data)
    want = expected_value(field, value)
    assert getattr(edited, field) == want
    for path in places:
        assert getattr(node(edited, path), field) == want, (field, path)


@pytest.mark.parametrize("how", DUMPS)
@pytest.mark.parametrize("field, value, places", EDITS, ids=[f"{f}={v}" for f, v, _ in EDITS])
def test_a_top_level_edit_of_a_dump_means_what_it_says(how, field, value, places):
    data = DUMPS[how](zoo.load_config(SOURCE))
    assert_edit_arrives(data, field, value, places)


def test_a_dump_writes_every_value_and_inherited_ones_only_at_the_top():
    data = zoo.load_config(SOURCE).model_dump(mode="json")
    assert set(data) == set(ModelConfig.model_fields)
    inherited_here = {BLOCK: {"parallel"}, LAYER: {"embedding_dim", "bias", "dropout", "context_length", "dtype",
                                                   "norm_type", "parallel"},
                      CELL: {"dtype", "norm_type", "parallel"}, FFN: {"embedding_dim", "dtype", "parallel"}}
    for path, model in ((BLOCK, BlockConfig), (LAYER, LayerConfig), (CELL, CellConfig), (FFN, FeedForwardConfig)):
        section = data
        for part in path:
            section = section[part]
        assert set(section) == set(model.model_fields) - inherited_here[path], path


@pytest.mark.parametrize("name", [*presets.names(), "source"])
@pytest.mark.parametrize("how", DUMPS)
def test_round_trips_are_lossless(name, how):
    config = zoo.load_config(SOURCE if name == "source" else name)
    again = ModelConfig.model_validate(DUMPS[how](config))
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config


def test_dumps_written_before_still_validate_and_mean_the_same():
    assert OLD_DUMP["mlstm_block"]["mlstm"]["mlstm_cell"]["dtype"] == "float32"  # the old layout, inner copies
    assert ModelConfig.model_validate(OLD_DUMP) == zoo.load_config(SOURCE)
    assert ModelConfig.model_validate_json(json.dumps(OLD_DUMP)) == zoo.load_config(SOURCE)


def test_with_parallel_and_with_overrides_agree_with_an_edited_dump():
    config = zoo.load_config(SOURCE)
    new = ParallelConfig(model_axis_size=2)
    data = config.model_dump(mode="json")
    data["parallel"] = {"model_axis_size": 2}
    by_edit = ModelConfig.model_validate(data)
    assert config.with_parallel(new) == by_edit == config.with_overrides({"parallel": {"model_axis_size": 2}})
    assert by_edit.cell.parallel.model_axis_size == by_edit.mlstm_block.feedforward.parallel.model_axis_size == 2
    assert config.with_parallel(None).layer.parallel is None
    assert config.with_overrides({"parallel.fsdp_gather_dtype": "bfloat16", "dtype": "bfloat16"}).cell.parallel == (
        ParallelConfig(remat=["mLSTMBlock"], fsdp_gather_dtype="bfloat16"))


def stored_config(step_dir: Path) -> dict:
    """The config JSON of a checkpoint step, read from the Orbax folder (JsonSave writes it as ``config/metadata``)."""
    return json.loads((step_dir / "config" / "metadata").read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = zoo.load_config(SOURCE)
    params = zoo.init_params(config, seed=1)
    root = tmp_path_factory.mktemp("roundtrip") / "ck"
    return config, params, zoo.save(root, config, params)


@pytest.mark.slow  # the module's one init and save
@pytest.mark.parametrize("field, value, places", EDITS, ids=[f"{f}={v}" for f, v, _ in EDITS])
def test_a_top_level_edit_of_a_checkpoints_stored_config_means_what_it_says(saved, field, value, places):
    config, _, step_dir = saved
    data = stored_config(step_dir)
    assert ModelConfig.model_validate(data) == config
    assert_edit_arrives(data, field, value, places)


@pytest.mark.slow
def test_a_checkpoint_written_with_inner_copies_still_loads_and_verifies(tmp_path, monkeypatch, saved):
    config, params, _ = saved
    monkeypatch.setattr(ModelConfig, "model_dump", lambda self, **kwargs: copy.deepcopy(OLD_DUMP))
    step_dir = zoo.save(tmp_path / "old", config, params)  # stores OLD_DUMP and hashes it, as the old code did
    monkeypatch.undo()
    assert stored_config(step_dir) == OLD_DUMP
    loaded_config, loaded = zoo.load(tmp_path / "old")
    assert loaded_config == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
