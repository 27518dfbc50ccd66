"""Config validation: reference defaults, derived sizes, explicit inheritance, clear errors, round trips."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import zoo
from zoo import presets
from zoo.config import (
    BlockConfig,
    CellConfig,
    FeedForwardConfig,
    LayerConfig,
    ModelConfig,
    ParallelConfig,
    proj_up_dim,
)


def make(**overrides) -> dict:
    """A small valid config dict with nested overrides given as ``layer=``, ``cell=``, ``ffn=``."""
    layer = overrides.pop("layer", {})
    cell = overrides.pop("cell", None)
    ffn = overrides.pop("ffn", None)
    if cell is not None:
        layer = {**layer, "mlstm_cell": cell}
    block = {"mlstm": layer}
    if ffn is not None:
        block["feedforward"] = ffn
    return {"vocab_size": 32, "embedding_dim": 64, "num_blocks": 2, "dtype": "float32", "mlstm_block": block,
            **overrides}


def errors_of(data: dict) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        ModelConfig.model_validate(data)
    return info.value.errors()


def locs(data: dict) -> list[tuple]:
    return [e["loc"] for e in errors_of(data)]


# --- xlstm-jax's defaults (docs/numerics.md §2.2) ----------------------------------------------

def test_layer_defaults_match_reference():
    layer = LayerConfig()
    expected = dict(proj_factor=2.0, round_proj_up_dim_up=True, round_proj_up_to_multiple_of=64, conv1d_kernel_size=4,
                    qkv_proj_blocksize=4, num_heads=4, vmap_qk=False, init_distribution="normal",
                    output_init_fn="wang", layer_type="mlstm", norm_type="layernorm", qk_dim_factor=1.0,
                    v_dim_factor=1.0, embedding_dim=-1, bias=False, dropout=0.0, context_length=-1,
                    dtype="bfloat16", parallel=None, debug_cell=False, gate_input="qkv")
    assert {k: getattr(layer, k) for k in expected} == expected


def test_cell_ffn_block_model_parallel_defaults_match_reference():
    cell = CellConfig()
    assert (cell.backend.name, cell.backend.kwargs) == ("parallel_stabilized", {"stabilize_rowwise": True})
    assert (cell.norm_eps, cell.norm_type, cell.norm_type_v1, cell.dtype, cell.gate_dtype) == (
        1e-6, "layernorm", "layernorm", "bfloat16", "float32")
    assert (cell.gate_soft_cap, cell.gate_linear_headwise, cell.igate_bias_init_range,
            cell.fgate_bias_init_range) == (None, False, None, (3.0, 6.0))
    assert (cell.add_qk_norm, cell.reset_at_document_boundaries, cell.reset_fgate_value) == (False, False, -25.0)
    ffn = FeedForwardConfig()
    assert (ffn.proj_factor, ffn.act_fn, ffn.ff_type, ffn.output_init_fn, ffn.dtype, ffn.bias) == (
        1.3, "gelu", "ffn_gated", "wang", "bfloat16", False)
    block = BlockConfig()
    assert (block.feedforward, block.add_post_norm) == (None, False)
    model = ModelConfig(vocab_size=10)
    assert (model.num_blocks, model.embedding_dim, model.add_post_blocks_norm, model.scan_blocks, model.dtype,
            model.norm_eps, model.norm_type, model.logits_soft_cap, model.lm_head_dtype, model.tie_weights) == (
        1, 128, True, False, "bfloat16", 1e-6, "layernorm", None, "float32", False)
    par = ParallelConfig()
    assert (par.data_axis_size, par.fsdp_axis_size, par.pipeline_axis_size, par.model_axis_size) == (-1, 1, 1, 1)
    assert (par.data_axis_name, par.fsdp_axis_name, par.pipeline_axis_name, par.model_axis_name) == (
        "dp", "fsdp", "pp", "tp")
    assert par.fsdp_min_weight_size == 262144


@pytest.mark.parametrize("dim, factor, round_up, expected", [
    (768, 2.0, True, 1536), (2048, 2.0, True, 4096), (4096, 2.0, True, 8192), (64, 2.667, True, 192),
    (768, 2.667, True, 2112), (768, 2.667, False, 2048), (2048, 2.667, True, 5504), (2560, 2.667, True, 6848),
    (4096, 2.667, True, 10944), (768, 1.3, True, 1024),
])
def test_proj_up_dim_rounding_table(dim, factor, round_up, expected):
    assert proj_up_dim(factor, dim, 64, round_up) == expected


# Expected sizes worked out by hand from docs/numerics.md §2.1 and §3.1:
#   mlstm:    Di = 64·ceil(pf·D/64), NPH = Di // b, Dqk_tot = NPH·(round(qk·Di) // NPH), Dv_tot = int(Di·v),
#             F = 2·Dqk_tot + Dv_tot for gate_input qkv, else Di
#   mlstm_v1: Dqk_tot = int(D·qk), Dv_tot = int(D·v);  both: per-head = total / NH;  FFN P = 64·ceil(pf·D/64)
@pytest.mark.parametrize("data, expected", [
    # D=768, pf 2: Di=1536, NPH=384, Dqk=Dv=1536, per head 384 (the example of docs/numerics.md §3.1), F = 3·1536
    (make(embedding_dim=768, layer={"num_heads": 4}),
     {"inner_dim": 1536, "num_proj_blocks": 384, "qk_dim": 1536, "v_dim": 1536, "qk_head_dim": 384,
      "v_head_dim": 384, "gate_input_dim": 4608}),
    # D=64, pf 2, b=4, qk 0.5, v 2, NH 8: Di=128, NPH=32, Dqk=32·(64//32)=64, Dv=256, F = 2·64+256 = 384;
    # FFN pf 1.3: 83.2/64 -> ceil 2 -> P=128
    (make(layer={"num_heads": 8, "qk_dim_factor": 0.5, "v_dim_factor": 2.0}, ffn={}),
     {"inner_dim": 128, "num_proj_blocks": 32, "qk_dim": 64, "v_dim": 256, "qk_head_dim": 8, "v_head_dim": 32,
      "gate_input_dim": 384, "ffn_proj_up_dim": 128}),
    # D=64, pf 3 rounded down: 192; b=8: NPH=24; gate_input x_mlstm: F = Di = 192; v 0.5: Dv=96, NH 2
    (make(layer={"proj_factor": 3.0, "round_proj_up_dim_up": False, "qkv_proj_blocksize": 8, "num_heads": 2,
                 "v_dim_factor": 0.5, "gate_input": "x_mlstm"}),
     {"inner_dim": 192, "num_proj_blocks": 24, "qk_dim": 192, "v_dim": 96, "qk_head_dim": 96, "v_head_dim": 48,
      "gate_input_dim": 192}),
    # mlstm_v1, D=4096, NH 8, qk 0.5: Dqk=2048 (256 per head), Dv=4096 (512 per head), FFN pf 2.667 -> 10944
    (make(embedding_dim=4096, layer={"layer_type": "mlstm_v1", "num_heads": 8, "qk_dim_factor": 0.5},
          ffn={"proj_factor": 2.667}),
     {"qk_dim": 2048, "v_dim": 4096, "qk_head_dim": 256, "v_head_dim": 512, "ffn_proj_up_dim": 10944}),
])
def test_derived_sizes_worked_by_hand(data, expected):
    assert zoo.load_config(data).derived_sizes() == expected


def test_derived_sizes_are_not_inputs():
    errs = errors_of(make(layer={"_proj_up_dim": 128}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "_proj_up_dim")
    assert "derived" in errs[0]["msg"]


# --- explicit inheritance instead of silent overrides (docs/numerics.md §2.3) -----------------

def test_model_values_flow_into_layer_cell_and_ffn():
    cfg = zoo.load_config(make(norm_type="rmsnorm", bias=True, dtype="bfloat16", ffn={}))
    assert cfg.layer.norm_type == cfg.cell.norm_type == "rmsnorm"
    assert cfg.layer.embedding_dim == cfg.mlstm_block.feedforward.embedding_dim == 64
    assert cfg.layer.bias is True
    assert cfg.layer.dtype == cfg.cell.dtype == cfg.mlstm_block.feedforward.dtype == "bfloat16"


def test_repeating_the_model_value_is_allowed():
    cfg = zoo.load_config(make(norm_type="rmsnorm", layer={"norm_type": "rmsnorm"}, cell={"norm_type": "rmsnorm"}))
    assert cfg.cell.norm_type == "rmsnorm"


@pytest.mark.parametrize("data, loc", [
    (make(norm_type="rmsnorm", layer={"norm_type": "layernorm"}), ("mlstm_block", "mlstm", "norm_type")),
    (make(norm_type="rmsnorm", cell={"norm_type": "layernorm"}), ("mlstm_block", "mlstm", "mlstm_cell", "norm_type")),
    (make(dtype="float32", cell={"dtype": "bfloat16"}), ("mlstm_block", "mlstm", "mlstm_cell", "dtype")),
    (make(layer={"embedding_dim": 32}), ("mlstm_block", "mlstm", "embedding_dim")),
    (make(ffn={"dtype": "bfloat16"}), ("mlstm_block", "feedforward", "dtype")),
])
def test_conflicting_inner_value_is_an_error_naming_both(data, loc):
    errs = errors_of(data)
    assert [e["loc"] for e in errs] == [loc]
    assert "conflicts with the model-level" in errs[0]["msg"]


def test_invalid_model_value_is_reported_once():
    assert locs(make(norm_type="batchnorm")) == [("norm_type",)]


def test_norm_type_v1_is_independent():
    cfg = zoo.load_config(make(norm_type="rmsnorm", layer={"layer_type": "mlstm_v1"},
                               cell={"norm_type_v1": "layernorm"}))
    assert (cfg.cell.norm_type, cfg.cell.norm_type_v1) == ("rmsnorm", "layernorm")


# --- clear errors ------------------------------------------------------------------------------

def test_unknown_key_suggests_closest():
    errs = errors_of(make(layer={"num_head": 4}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "num_head")
    assert "did you mean 'num_heads'" in errs[0]["msg"]
    assert "valid keys:" in errs[0]["msg"]


def test_unknown_plugin_name_lists_registered_names():
    errs = errors_of(make(layer={"layer_type": "mlstm_v2"}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "layer_type")
    assert "registered: mlstm, mlstm_v1" in errs[0]["msg"]


def test_literal_fields_list_allowed_values():
    errs = errors_of(make(layer={"gate_input": "qk"}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "gate_input")
    assert "'x_mlstm_conv_act'" in errs[0]["msg"]


@pytest.mark.parametrize("layer, field", [
    ({"num_heads": 3}, "num_heads"),
    ({"qk_dim_factor": 0.3}, "qk_dim_factor"),
    ({"v_dim_factor": 0.3}, "v_dim_factor"),
    ({"qkv_proj_blocksize": 5}, "qkv_proj_blocksize"),
    ({"layer_type": "mlstm_v1", "num_heads": 3}, "num_heads"),
    ({"layer_type": "mlstm_v1", "qk_dim_factor": 0.5, "num_heads": 64}, "num_heads"),
])
def test_inconsistent_sizes_name_the_field(layer, field):
    errs = errors_of(make(layer=layer))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", field), errs


def test_headwise_gates_need_heads_dividing_gate_input():
    # Di = 128 and q/k/v widths 192: 96 heads divide the q/k/v widths but not the x_mlstm gate input
    layer = {"num_heads": 96, "qk_dim_factor": 1.5, "v_dim_factor": 1.5, "gate_input": "x_mlstm"}
    errs = errors_of(make(embedding_dim=64, layer=layer, cell={"gate_linear_headwise": True}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "num_heads")
    assert "gate input width 128" in errs[0]["msg"]
    zoo.load_config(make(embedding_dim=64, layer={**layer, "gate_input": "qkv"}, cell={"gate_linear_headwise": True}))


@pytest.mark.parametrize("field, value", [("gate_input", "x_mlstm"), ("conv1d_kernel_size", 2),
                                          ("proj_factor", 1.5), ("vmap_qk", True)])
def test_fields_ignored_by_mlstm_v1_are_rejected(field, value):
    errs = errors_of(make(layer={"layer_type": "mlstm_v1", field: value}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", field)
    assert "not used by layer_type 'mlstm_v1'" in errs[0]["msg"]


def test_headwise_gates_rejected_for_mlstm_v1():
    assert locs(make(layer={"layer_type": "mlstm_v1"}, cell={"gate_linear_headwise": True})) == [
        ("mlstm_block", "mlstm", "mlstm_cell", "gate_linear_headwise")]


def test_backend_kwargs_validated_by_the_backend():
    errs = errors_of(make(cell={"backend": {"name": "parallel_stabilized", "kwargs": {"stabilize_rowwise": "x"}}}))
    assert errs[0]["loc"] == ("mlstm_block", "mlstm", "mlstm_cell", "backend", "kwargs", "stabilize_rowwise")
    errs = errors_of(make(cell={"backend": {"name": "parallel_stabilized", "kwargs": {"chunk_size": 64}}}))
    assert errs[0]["loc"][-1] == "chunk_size"


@pytest.mark.parametrize("data, loc", [
    ({**make(), "vocab_size": -1}, ("vocab_size",)),
    ({**make(), "norm_eps": float("nan")}, ("norm_eps",)),
    ({**make(), "logits_soft_cap": float("inf")}, ("logits_soft_cap",)),
    ({**make(), "num_blocks": 0}, ("num_blocks",)),
    ({**make(), "embedding_dim": "64"}, ("embedding_dim",)),  # strict: a numeric string is not an integer
    ({**make(), "parallel": {"data_axis_size": 0}}, ("parallel", "data_axis_size")),
    ({**make(), "parallel": {"remat": ["Decoder"]}}, ("parallel", "remat", 0)),
    ({**make(), "parallel": {"fsdp_gather_dtype": "float64"}}, ("parallel", "fsdp_gather_dtype")),
    ({**make(), "parallel": {"pipeline_axis_size": 2}}, ("parallel", "pipeline_axis_size")),
    ({**make(), "parallel": {"tp_async_dense": True}}, ("parallel", "tp_async_dense")),
    ({**make(), "parallel": {"fsdp_grad_scatter_dtype": "bfloat16"}}, ("parallel", "fsdp_grad_scatter_dtype")),
    ({**make(), "parallel": {"model_axis_name": "dp"}}, ("parallel", "model_axis_name")),
    ({**make(), "parallel": {"model_axis_size": 3}}, ("parallel", "model_axis_size")),
    (make(cell={"gate_soft_cap": 0}), ("mlstm_block", "mlstm", "mlstm_cell", "gate_soft_cap")),
])
def test_out_of_range_values(data, loc):
    assert loc in locs(data)


def test_parallel_flows_down_and_conflicts_are_caught():
    cfg = zoo.load_config(make(parallel={"remat": ["mLSTMBlock"]}))
    assert cfg.layer.parallel == cfg.parallel
    assert locs(make(parallel={"remat": ["mLSTMBlock"]}, layer={"parallel": {"remat": []}})) == [
        ("mlstm_block", "mlstm", "parallel")]


# --- round trips and schema ---------------------------------------------------------------------

@pytest.mark.parametrize("name", presets.names())
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = zoo.load_config(name)
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    again = zoo.load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


def test_custom_config_round_trip():
    cfg = zoo.load_config(make(norm_type="rmsnorm", layer={"qk_dim_factor": 0.5, "gate_input": "x_mlstm_conv"},
                               cell={"gate_soft_cap": 15, "igate_bias_init_range": [-1, 1]},
                               ffn={"act_fn": "swish"}, parallel={"remat": ["FFNResBlock"]}))
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert ModelConfig.model_validate(json.loads(cfg.model_dump_json())).cell.igate_bias_init_range == (-1.0, 1.0)


def test_json_schema_lists_plugin_names():
    schema = ModelConfig.model_json_schema()
    layer = schema["$defs"]["LayerConfig"]["properties"]
    assert layer["layer_type"]["enum"] == ["mlstm", "mlstm_v1"]
    assert layer["output_init_fn"]["enum"] == ["small", "wang", "wang2", "zeros"]
    assert schema["$defs"]["LayerConfig"]["additionalProperties"] is False
    assert "Inherited from the model" in layer["norm_type"]["description"]


def test_plugins_used():
    cfg = zoo.load_config(make(layer={"layer_type": "mlstm_v1"}, ffn={"output_init_fn": "wang2"}))
    used = cfg.plugins_used()
    assert used["layer"] == ["mlstm_v1"]
    assert used["init"] == ["small", "wang", "wang2"]
    assert used["cell"] == ["chunkwise", "parallel_stabilized", "recurrent"]
    assert used["norm"] == ["layernorm"]


def test_configs_are_immutable():
    cfg = zoo.load_config(make())
    with pytest.raises(ValidationError):
        cfg.num_blocks = 3
