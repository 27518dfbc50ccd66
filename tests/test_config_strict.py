"""Strict parsing: wrong JSON types, sizes that cannot build a model, hostile files, preset typos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import zoo
from zoo import presets
from zoo.config_source import ConfigSourceError
from zoo.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = {"vocab_size": 16, "embedding_dim": 64, "num_blocks": 1, "dtype": "float32", "context_length": 8,
        "mlstm_block": {"mlstm": {"num_heads": 2}}}
LAYER, CELL, FFN = ("mlstm_block", "mlstm"), ("mlstm_block", "mlstm", "mlstm_cell"), ("mlstm_block", "feedforward")


def with_(*changes: tuple[tuple, object]) -> dict:
    data = json.loads(json.dumps(BASE))
    for path, value in changes:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def error_locs(source) -> list[tuple]:
    with pytest.raises(ValidationError) as info:
        zoo.load_config(source)
    return [e["loc"] for e in info.value.errors()]


def as_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


# --- wrong JSON types are refused, not coerced ---------------------------------------------------

WRONG_TYPES = [
    (("mlstm_block", "mlstm", "num_heads"), True),
    (("mlstm_block", "mlstm", "num_heads"), "4"),
    (("embedding_dim",), 64.0),
    (("vocab_size",), "16"),
    (("num_blocks",), False),
    (("scan_blocks",), 1),
    (("scan_blocks",), "true"),
    (("dtype",), 32),
    (("norm_eps",), "1e-6"),
    (("parallel", "fsdp_axis_size"), "1"),
    (("mlstm_block", "mlstm", "mlstm_cell", "backend", "kwargs", "chunk_size"), "64"),
    (("mlstm_block", "mlstm", "mlstm_cell", "step_backend", "kwargs", "unroll"), 1.0),
]


@pytest.mark.parametrize("source", ["dict", "file"])
@pytest.mark.parametrize("path, value", WRONG_TYPES, ids=[f"{'.'.join(p)}={v!r}" for p, v in WRONG_TYPES])
def test_wrong_json_types_are_refused_naming_the_field(path, value, source, tmp_path):
    changes = [(path, value)]
    if path[-1] == "chunk_size":
        changes.append((path[:-2] + ("name",), "chunkwise"))
    if path[-1] == "unroll":
        changes.append((path[:-2] + ("name",), "recurrent"))
    data = with_(*changes)
    locs = error_locs(data if source == "dict" else as_file(tmp_path, data))
    assert any(loc[:len(path)] == path for loc in locs), locs


@pytest.mark.parametrize("source", ["dict", "file", "json string"])
def test_integers_for_floats_and_lists_for_pairs_still_work(source, tmp_path):
    data = with_((("norm_eps",), 1), (LAYER + ("proj_factor",), 3), (CELL + ("gate_soft_cap",), 15),
                 (CELL + ("fgate_bias_init_range",), [3, 6]), (CELL + ("igate_bias_init_range",), [-1, 1]))
    if source == "json string":
        config = ModelConfig.model_validate_json(json.dumps(data))
    else:
        config = zoo.load_config(data if source == "dict" else as_file(tmp_path, data))
    assert (config.norm_eps, config.layer.proj_factor, config.cell.gate_soft_cap) == (1.0, 3.0, 15.0)
    assert config.cell.fgate_bias_init_range == (3.0, 6.0) and config.cell.igate_bias_init_range == (-1.0, 1.0)
    assert config.derived_sizes()["inner_dim"] == 192  # 64·ceil(3·64/64)


@pytest.mark.parametrize("name", [*presets.names(), "configs/demo.json"])
def test_shipped_configs_still_validate(name):
    config = zoo.load_config(ROOT / name if name.endswith(".json") else name)
    assert config.vocab_size > 0


# --- sizes that cannot build a model --------------------------------------------------------------

V1 = (LAYER + ("layer_type",), "mlstm_v1")
CANNOT_BUILD = {
    # context_length 0 and -5 were taken as "no limit"
    "context_length 0": ([(("context_length",), 0)], ("context_length",)),
    "context_length -5": ([(("context_length",), -5)], ("context_length",)),
    # up-projections rounded down to width 0: the mlstm layer was refused naming num_heads; the FFN built with
    # a hidden width of 0 (it added nothing)
    "mlstm Di 0": ([(LAYER + ("proj_factor",), 0.01), (LAYER + ("round_proj_up_dim_up",), False)],
                   LAYER + ("proj_factor",)),
    "ffn P 0": ([(FFN, {"proj_factor": 0.01, "round_proj_up_dim_up": False})], FFN + ("proj_factor",)),
    # mlstm_v1: int(64·0.01) = 0 q/k or v width was refused naming num_heads
    "v1 qk width 0": ([V1, (LAYER + ("qk_dim_factor",), 0.01)], LAYER + ("qk_dim_factor",)),
    "v1 v width 0": ([V1, (LAYER + ("v_dim_factor",), 0.01)], LAYER + ("v_dim_factor",)),
    "v1 head dim 0": ([V1, (LAYER + ("num_heads",), 128), (LAYER + ("qk_dim_factor",), 0.5)],
                      LAYER + ("num_heads",)),
    # floats that float32 rounds to 0 (eps, soft caps: all-zero logits, no gates) or to infinity (NaN logits)
    "norm_eps 1e-50": ([(("norm_eps",), 1e-50)], ("norm_eps",)),
    "cell norm_eps 1e-40": ([(CELL + ("norm_eps",), 1e-40)], CELL + ("norm_eps",)),
    "logits_soft_cap 1e-50": ([(("logits_soft_cap",), 1e-50)], ("logits_soft_cap",)),
    "logits_soft_cap 1e39": ([(("logits_soft_cap",), 1e39)], ("logits_soft_cap",)),
    "gate_soft_cap 1e-50": ([(CELL + ("gate_soft_cap",), 1e-50)], CELL + ("gate_soft_cap",)),
    "fgate_bias_init 1e39": ([(CELL + ("fgate_bias_init_range",), [3.0, 1e39])], CELL + ("fgate_bias_init_range",)),
    "igate_bias_init 1e39": ([(CELL + ("igate_bias_init_range",), 1e39)], CELL + ("igate_bias_init_range",)),
    "reset_fgate_value -1e39": ([(CELL + ("reset_fgate_value",), -1e39)], CELL + ("reset_fgate_value",)),
    # a mesh axis larger than any device count (2**31 devices)
    "fsdp_axis_size 2**31": ([(("parallel",), {"fsdp_axis_size": 2**31})], ("parallel", "fsdp_axis_size")),
}


@pytest.mark.parametrize("case", CANNOT_BUILD)
def test_sizes_that_cannot_build_are_refused_naming_the_field(case):
    changes, field = CANNOT_BUILD[case]
    locs = error_locs(with_(*changes))
    assert locs and all(loc[:len(field)] == field for loc in locs), locs


@pytest.mark.parametrize("changes", [
    [(("context_length",), -1)], [(("context_length",), 1)], [(LAYER + ("conv1d_kernel_size",), 0)],
    [(("norm_eps",), 1.2e-38)], [(CELL + ("reset_fgate_value",), -3e38)],
    [(LAYER + ("proj_factor",), 0.01)],  # rounded up to 64
])
def test_the_edges_of_those_ranges_are_accepted(changes):
    zoo.load_config(with_(*changes))


# --- hostile files and dicts ---------------------------------------------------------------------

def test_deeply_nested_json_is_refused_in_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"vocab_size": 16, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigSourceError, match="nested more than 32 levels"):
        zoo.load_config(path)


@pytest.mark.parametrize("depth, refused", [(32, False), (33, True), (100_000, True)])
def test_nested_dicts_are_refused_past_32_levels(depth, refused):
    deep = {}
    data = {"vocab_size": 16, "extra": deep}  # the top level is level 1
    for _ in range(depth - 2):
        deep["k"] = {}
        deep = deep["k"]
    if refused:
        with pytest.raises(ConfigSourceError, match="nested more than 32 levels"):
            zoo.load_config(data)
    else:
        assert error_locs(data) == [("extra",)]  # an ordinary unknown-key error


def test_config_files_over_1_mib_are_refused(tmp_path):
    text = json.dumps(BASE)
    path = tmp_path / "padded.json"
    path.write_text(text + " " * (2**20 - len(text)))  # exactly 1 MiB: read
    assert zoo.load_config(path).vocab_size == 16
    path.write_text(text + " " * (2**20 + 1 - len(text)))
    with pytest.raises(ConfigSourceError, match="1,048,577 bytes is over the 1,048,576-byte"):
        zoo.load_config(path)


# --- preset names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", [("tiny_v1", "tiny-v1"), ("mlstm-7", "mlstm-7b"), ("mlstm_v1_7b", "mlstm_v1-7b")])
def test_a_preset_typo_suggests_the_preset(typo, meant):
    with pytest.raises(ConfigSourceError, match=f"did you mean '{meant}'"):
        zoo.load_config(typo)
