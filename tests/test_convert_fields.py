"""zoo convert torch: every field of a source config is mapped, ignored for a stated reason, or refused by name.

The field lists come from the source projects themselves: ``dataclasses.fields`` of xlstm's
``xLSTMLargeConfig`` and ``xLSTMLMModelConfig`` (with its block and layer configs), and the keys of
Hugging Face ``transformers.xLSTMConfig().to_dict()``. Each field is changed from a config that
converts; the change must reach the zoo config or the metadata, be refused with the field named, or
belong to a field the converter ignores for a documented reason (and then change nothing).
"""

from __future__ import annotations

import dataclasses

import pytest

from zoo.convert.torch import (HF_XLSTM, IGNORED_LARGE, IGNORED_NEURIPS, NEURIPS, XLSTM_LARGE, ConvertError,
                               map_config)

pytest.importorskip("torch")
xlstm = pytest.importorskip("xlstm")
transformers = pytest.importorskip("transformers")
from xlstm import mLSTMBlockConfig, mLSTMLayerConfig, xLSTMLMModelConfig  # noqa: E402
from xlstm.xlstm_large.model import xLSTMLargeConfig  # noqa: E402
from xlstm.xlstm_large.utils import round_up_to_next_multiple_of  # noqa: E402

TINY = {"embedding_dim": 32, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, "ffn_round_up_to_multiple_of": 16}
HF_TINY = {"hidden_size": 32, "num_heads": 2, "num_hidden_layers": 2, "vocab_size": 97,
           "ffn_round_up_to_multiple_of": 16}
NX_AI_EXTRA = {"force_bos_token_insert": True}  # in NX-AI/xLSTM-7b's config.json, not in transformers' xLSTMConfig


def changed(value):
    """Another value of the same JSON type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, 1]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return 3  # None


def outcome(fmt, cfg, ffn_dim):
    try:
        return map_config(fmt, cfg, dtype="float32", ffn_dim=ffn_dim)
    except ConvertError as exc:
        return exc


def with_field(cfg, dotted, value):
    head, _, rest = dotted.partition(".")
    return {**cfg, head: with_field(cfg[head], rest, value) if rest else value}


def field_value(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def check_every_field(fmt, base, fields, ignored, ffn_dim=0):
    reference = outcome(fmt, base, ffn_dim)
    assert not isinstance(reference, ConvertError), reference  # every field at its source's default converts
    silent = []
    for field in fields:
        result = outcome(fmt, with_field(base, field, changed(field_value(base, field))), ffn_dim)
        if field in ignored:
            assert len(ignored[field]) > 20, field  # a stated reason
            assert result == reference, (field, result)  # and ignoring it is true
        elif isinstance(result, ConvertError):
            assert field.rpartition(".")[2] in str(result), (field, str(result))
        elif result == reference:
            silent.append(field)
    assert not silent, f"changed without effect or refusal: {silent}"


def test_every_xlstm_large_config_field_is_handled():
    fields = [f.name for f in dataclasses.fields(xLSTMLargeConfig)]
    base = dataclasses.asdict(xLSTMLargeConfig(**TINY))
    assert {"chunkwise_kernel", "weight_mode", "ffn_proj_factor", "use_bias", "eps"} <= set(fields)
    ffn_dim = round_up_to_next_multiple_of(32 * base["ffn_proj_factor"], 16)
    check_every_field(XLSTM_LARGE, base, fields, IGNORED_LARGE, ffn_dim)


def test_every_hugging_face_xlstm_config_field_is_handled():
    base = transformers.xLSTMConfig(**HF_TINY).to_dict() | NX_AI_EXTRA
    fields = sorted(base)
    assert {"tie_word_embeddings", "bos_token_id", "max_inference_chunksize", "model_type"} <= set(fields)
    ffn_dim = round_up_to_next_multiple_of(32 * base["ffn_proj_factor"], 16)
    check_every_field(HF_XLSTM, base, fields, IGNORED_LARGE, ffn_dim)


def test_every_neurips_config_field_is_handled():
    cfg = xLSTMLMModelConfig(mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=4)), context_length=32,
                             num_blocks=2, embedding_dim=32, vocab_size=97)
    base = dataclasses.asdict(cfg)
    fields = ([f.name for f in dataclasses.fields(xLSTMLMModelConfig)]
              + [f"mlstm_block.{f.name}" for f in dataclasses.fields(mLSTMBlockConfig)]
              + [f"mlstm_block.mlstm.{f.name}" for f in dataclasses.fields(mLSTMLayerConfig)])
    check_every_field(NEURIPS, base, fields, IGNORED_NEURIPS)


def test_token_settings_are_kept_and_checked():
    base = transformers.xLSTMConfig(**HF_TINY).to_dict() | NX_AI_EXTRA
    ffn_dim = round_up_to_next_multiple_of(32 * base["ffn_proj_factor"], 16)
    _, tokens = map_config(HF_XLSTM, base | {"eos_token_id": [2, 5]}, dtype="float32", ffn_dim=ffn_dim)
    assert tokens == {"bos_token_id": 0, "eos_token_id": [2, 5], "pad_token_id": 1, "force_bos_token_insert": True}
    for field, value, message in (("bos_token_id", 97, "bos_token_id=97 must be a token id in [0, 97)"),
                                  ("pad_token_id", True, "pad_token_id=True must be a token id"),
                                  ("force_bos_token_insert", "yes", "force_bos_token_insert='yes' must be bool"),
                                  ("num_heads", 2.0, "num_heads=2.0 must be int"),
                                  ("hidden_size", 64, "embedding_dim=32 and hidden_size=64 disagree")):
        with pytest.raises(ConvertError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            map_config(HF_XLSTM, base | {field: value}, dtype="float32", ffn_dim=ffn_dim)
