"""zoo convert torch on Hugging Face xlstm folders; transformers' xLSTMForCausalLM is the logit oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest

import zoo
from zoo.convert.torch import ConvertError, from_torch
from zoo.checkpoint import read_metadata

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402
from helpers import by_path  # noqa: E402
from test_convert_torch import TOKENS, perturb  # noqa: E402


def hf_model(seed, tie=False):
    """A tiny random float32 xLSTMForCausalLM (the gates, zero at init, perturbed too)."""
    cfg = transformers.xLSTMConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                   ffn_round_up_to_multiple_of=16, tie_word_embeddings=tie,
                                   autocast_kernel_dtype="float32")
    torch.manual_seed(seed)
    return perturb(transformers.xLSTMForCausalLM(cfg), seed + 1)


def hf_logits(model):
    with torch.no_grad():  # use_cache=False: the cache sizes heads by rounding to 64, which tiny models are not
        return model(torch.as_tensor(TOKENS), use_cache=False).logits.numpy()


def assert_logits_match(folder, expected):
    config, params = zoo.load(folder)
    got = np.asarray(zoo.forward(config, params, TOKENS.astype(np.int32)))
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())
    return config, params


@pytest.mark.slow
def test_a_hugging_face_folder_converts_with_logit_parity_and_keeps_its_token_settings(tmp_path):
    model = hf_model(seed=0)
    model.save_pretrained(tmp_path / "hf")
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config_json["model_type"] == "xlstm" and "backbone.embeddings.weight" in load_file(
        str(tmp_path / "hf" / "model.safetensors"))
    config_json["force_bos_token_insert"] = True  # NX-AI's xLSTM-7b config.json carries it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))
    report = from_torch(tmp_path / "hf", tmp_path / "ck")
    assert report.source_format == "hf_xlstm"
    config, _ = assert_logits_match(tmp_path / "ck", hf_logits(model))
    assert (config.layer.layer_type, config.tie_weights) == ("mlstm_v1", False)
    assert read_metadata(tmp_path / "ck")["tokens"] == {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                                        "force_bos_token_insert": True}


@pytest.mark.slow
def test_a_tied_hugging_face_head_converts_tied_when_absent_or_equal_and_is_refused_when_it_differs(tmp_path):
    model = hf_model(seed=4, tie=True)
    # transformers' xLSTMForCausalLM does not tie by itself: its own save holds a separate, different head
    model.save_pretrained(tmp_path / "differs")
    with torch.no_grad():
        model.lm_head.weight.copy_(model.backbone.embeddings.weight)
    model.save_pretrained(tmp_path / "equal")
    with pytest.raises(ConvertError) as info:
        from_torch(tmp_path / "differs", tmp_path / "refused")
    assert str(info.value) == ("tensor 'lm_head.weight' differs from 'backbone.embeddings.weight' although the config "
                               "ties them (tie_word_embeddings: true); set tie_word_embeddings: false to keep a "
                               "separate head")
    assert not (tmp_path / "refused").exists()

    from_torch(tmp_path / "equal", tmp_path / "ck")
    config, params = assert_logits_match(tmp_path / "ck", hf_logits(model))
    assert config.tie_weights and "lm_head" not in params

    state = load_file(str(tmp_path / "equal" / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "equal" / "model.safetensors"))  # as a tying exporter writes it
    from_torch(tmp_path / "equal", tmp_path / "scanned", scan_blocks=True)
    config_scanned, scanned = zoo.load(tmp_path / "scanned")
    assert config_scanned.tie_weights and config_scanned.scan_blocks
    per_block, stacked = by_path(params), by_path(scanned)
    assert set(stacked) == {("blocks", *p[1:]) if p[0].startswith("blocks_") else p for p in per_block}
    for path, value in stacked.items():
        expected = (np.stack([per_block[(f"blocks_{i}", *path[1:])] for i in range(2)]) if path[0] == "blocks"
                    else per_block[path])
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=str(path))


@pytest.mark.slow
def test_a_hugging_face_tokenizer_is_copied_with_its_token_settings_and_written_back(tmp_path):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from zoo.convert.torch import to_torch
    from zoo.tokenizers import SETTINGS_FILE, load_codec

    tokenizer = tokenizers.Tokenizer(models.BPE())  # byte-level BPE of 90 tokens (the model has 97)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["the lazy dog sleeps and the quick fox jumps over it " * 40], trainers.BpeTrainer(
        vocab_size=90, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False))
    hf_model(seed=2).save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    config_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config_json["bos_token_id"], config_json["pad_token_id"], config_json["eos_token_id"]) == (0, 1, 2)
    config_json.update(force_bos_token_insert=True, eos_token_id=[2, 5])  # not what the names alone would give
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))

    from_torch(tmp_path / "hf", tmp_path / "ck")
    codec = load_codec(tmp_path / "ck")
    assert codec.to_json() == {"bos_id": 0, "eos_ids": [2, 5], "pad_id": 1, "add_bos": True}
    assert codec.encode("the quick dog") == [0, *tokenizer.encode("the quick dog").ids]

    to_torch(tmp_path / "ck", tmp_path / "back")
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json")).encode("a fox").ids == \
        tokenizer.encode("a fox").ids
    settings = json.loads((tmp_path / "back" / SETTINGS_FILE).read_text())
    assert {k: settings[k] for k in codec.to_json()} == codec.to_json()
    from_torch(tmp_path / "back", tmp_path / "again")
    assert load_codec(tmp_path / "again").to_json() == codec.to_json()
