"""Tokenizers (zoo.tokenizers): text round trips, streaming that never splits a character, a tokenizer stored per
checkpoint step and hashed, refused when it does not fit, carried by `zoo build --tokenizer` and `zoo export`.

The tokenizers are byte-level BPEs trained here, with Hugging Face ``tokenizers``, on a few KB of text; expected
values come from those tokenizers themselves (``Tokenizer.encode``), from the literal texts, and from sizes worked
out by hand (256 byte tokens, the trainer's vocab_size, added tokens).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import zoo
from helpers import invoke_cli as invoke_zoo
from zoo.checkpoint import CheckpointError, read_metadata
from zoo.tokenizers import (SETTINGS_FILE, TOKENIZER_FILE, Codec, TokenizerError, check_fits, load_codec, load_file,
                            load_tokenizer)

CORPUS = [f"Line {i}: the quick brown fox jumps over the lazy dog; café, naïve, 日本語 and more text {i * 7}.\n"
          for i in range(60)]
TEXTS = ["the lazy fox", "café 日本語, naïve", "emoji 😀 and \u00e9 at the end é", ""]
TINY = {"vocab_size": 320, "embedding_dim": 32, "num_blocks": 1, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2}}}




def byte_level_bpe(vocab_size: int, specials: list[str]) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@pytest.fixture(scope="module")
def tok_a():
    tokenizer = byte_level_bpe(300, ["<|endoftext|>", "<pad>", "<s>"])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 300  # 256 bytes, 3 specials, 41 merges
    return tokenizer


@pytest.fixture(scope="module")
def tok_b():
    return byte_level_bpe(280, ["<s>", "</s>"])


@pytest.fixture(scope="module")
def model():
    config = zoo.load_config(TINY)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    zoo.param_shapes(config))
    return config, params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tok_a, tok_b):
    """Step 0 with tokenizer A (BOS added, settings given), step 1 with B (a bare Tokenizer), step 2 with none."""
    root = tmp_path_factory.mktemp("tokenizers") / "ck"
    config, params = model
    zoo.save(root, config, params, tokenizer=Codec(tok_a, bos_id=2, eos_ids=(0,), pad_id=1, add_bos=True))
    zoo.save(root, config, params, tokenizer=tok_b)
    zoo.save(root, config, params)
    return root


def test_encode_and_decode_round_trip_and_only_add_bos_is_added(tok_a):
    plain, with_bos = Codec.from_tokenizer(tok_a), Codec(tok_a, bos_id=2, eos_ids=(0,), add_bos=True)
    assert plain.to_json() == {"bos_id": 2, "eos_ids": [0], "pad_id": 1, "add_bos": False}  # found by name
    for text in TEXTS:
        ids = tok_a.encode(text, add_special_tokens=False).ids
        assert plain.encode(text) == ids and with_bos.encode(text) == [2, *ids]
        assert plain.decode(ids) == text and with_bos.decode([2, *ids, 0, 1]) == text  # specials left out


def test_streaming_never_shows_a_split_character(tok_a):
    codec = Codec.from_tokenizer(tok_a)
    emoji = codec.encode("😀")
    assert len(emoji) == 4  # absent from the training text: its four UTF-8 bytes are four tokens
    for text in TEXTS:
        ids = codec.encode(text) + [0]  # an EOS at the end is not shown
        assert "\ufffd" in "".join(tok_a.decode([i]) for i in ids) or "😀" not in text  # token by token would show it
        stream = codec.stream()
        pieces = [stream.step(i) for i in ids]
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(pieces) + stream.flush() == text
    stream = codec.stream()
    assert [stream.step(i) for i in emoji] == ["", "", "", "😀"]  # held back until its last byte
    cut = codec.stream()  # a character cut off at the end comes out of flush, as decode gives it (one U+FFFD for
    assert [cut.step(i) for i in emoji[:2]] == ["", ""] and cut.flush() == "\ufffd"  # F0 9F, as Python decodes it


def test_each_step_keeps_its_own_tokenizer_and_zoo_load_is_unchanged(checkpoint, tok_a, tok_b):
    text = TEXTS[1]
    first, second = load_codec(checkpoint, step=0), load_codec(checkpoint, step=1)
    assert first.encode(text) == [2, *tok_a.encode(text, add_special_tokens=False).ids]
    assert first.to_json() == {"bos_id": 2, "eos_ids": [0], "pad_id": 1, "add_bos": True}
    assert second.encode(text) == tok_b.encode(text, add_special_tokens=False).ids
    assert second.to_json() == {"bos_id": 0, "eos_ids": [1], "pad_id": None, "add_bos": False}
    assert load_tokenizer(checkpoint, step=1).encode(text).ids == tok_b.encode(text).ids
    assert load_codec(checkpoint) is None and load_tokenizer(checkpoint) is None  # step 2 stores none
    loaded = zoo.load(checkpoint, step=0)
    assert isinstance(loaded, tuple) and len(loaded) == 2

    from zoo.info import describe_path, rows

    info = describe_path(checkpoint, step=0)
    assert info["tokenizer"] == {"vocab_size": 300, "special_tokens": {"<|endoftext|>": 0, "<pad>": 1, "<s>": 2},
                                 "bos_id": 2, "eos_ids": [0], "pad_id": 1, "add_bos": True,
                                 "sha256": read_metadata(checkpoint, 0)["tokenizer_sha256"]}
    assert info["hashes"]["tokenizer"] == info["tokenizer"]["sha256"]
    assert ("tokenizer", "300 tokens; bos <s> 2 (put before each prompt), eos <|endoftext|> 0, pad <pad> 1; "
                         "special tokens: <|endoftext|>, <pad>, <s>") in rows(info)
    assert describe_path(checkpoint, step=2)["tokenizer"] is None


def test_a_file_replaces_the_stored_tokenizer_and_keeps_the_stored_settings(checkpoint, tok_b, tmp_path):
    tok_b.save(str(tmp_path / "b.json"))
    codec = load_codec(checkpoint, step=0, file=tmp_path / "b.json")
    assert codec.encode("fox") == [2, *tok_b.encode("fox").ids] and codec.add_bos
    assert load_codec(checkpoint, step=2, file=tmp_path / "b.json").to_json() == {
        "bos_id": 0, "eos_ids": [1], "pad_id": None, "add_bos": False}  # none stored: <s>, </s> by name


def test_a_tokenizer_that_does_not_match_its_hash_is_refused(tmp_path, model, tok_a):
    zoo.save(tmp_path / "ck", *model, tokenizer=tok_a)
    stored = tmp_path / "ck" / "0" / "tokenizer" / "metadata"
    data = json.loads(stored.read_text())
    data["model"]["vocab"]["a"], data["model"]["vocab"]["b"] = data["model"]["vocab"]["b"], data["model"]["vocab"]["a"]
    stored.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_codec(tmp_path / "ck")
    assert str(info.value) == (f"step 0 of {tmp_path / 'ck'} is corrupted: its tokenizer does not match the "
                               f"tokenizer hash recorded when it was saved")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_by_name(tmp_path, model, tok_a):
    big = tokenizers.Tokenizer.from_str(tok_a.to_str())
    big.add_tokens([f"<extra_{i}>" for i in range(30)])
    with pytest.raises(TokenizerError) as info:
        zoo.save(tmp_path / "ck", *model, tokenizer=big)
    assert "the tokenizer does not fit the model: it has 330 tokens (with added tokens), the model's vocab_size " \
           "is 320" in str(info.value)
    assert not (tmp_path / "ck").exists()
    check_fits(tok_a, model[0])  # 300 <= 320: a padded vocabulary is fine


def test_zoo_build_stores_the_tokenizer_and_refuses_a_bad_file_in_one_line(tmp_path, tok_a):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    tok_a.save(str(tmp_path / "tokenizer.json"))
    proc = invoke_zoo("build", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "ck"),
                      "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert proc.exit_code == 0, proc.stderr
    assert load_codec(tmp_path / "ck").encode(TEXTS[2]) == tok_a.encode(TEXTS[2]).ids

    (tmp_path / "bad.json").write_text('{"version": "1.0"}')
    big = tokenizers.Tokenizer.from_str(tok_a.to_str())
    big.add_tokens([f"<extra_{i}>" for i in range(30)])
    big.save(str(tmp_path / "big.json"))
    for name, expected in [("bad.json", "not a tokenizer.json that Hugging Face tokenizers reads"),
                           ("missing.json", "found nothing (no such file)"),
                           ("big.json", "it has 330 tokens (with added tokens), the model's vocab_size is 320")]:
        proc = invoke_zoo("build", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "refused"),
                          "--tokenizer", str(tmp_path / name))
        assert proc.exit_code == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert expected in proc.stderr and name in proc.stderr
        assert not (tmp_path / "refused").exists()


def test_load_file_refuses_a_folder_and_bad_json_in_one_line(tmp_path):
    (tmp_path / "t.json").write_text("not json")
    for path, expected in [(tmp_path, "found a folder"), (tmp_path / "t.json", "not a tokenizer.json")]:
        with pytest.raises(TokenizerError) as info:
            load_file(path)
        assert str(info.value).startswith(str(path)) and expected in str(info.value) and "\n" not in str(info.value)


def test_an_export_carries_the_tokenizer_as_plain_files(checkpoint, tmp_path, tok_a):
    proc = invoke_zoo("export", str(checkpoint), "--out", str(tmp_path / "art"), "--step", "0",
                      "--entry", "forward", "--platforms", "cpu")
    assert proc.exit_code == 0, proc.stderr
    art = tmp_path / "art"
    assert {"manifest.json", TOKENIZER_FILE, SETTINGS_FILE} <= {p.name for p in art.iterdir()}
    # readable without the zoo
    plain = tokenizers.Tokenizer.from_file(str(art / TOKENIZER_FILE))
    assert plain.encode(TEXTS[1]).ids == tok_a.encode(TEXTS[1]).ids
    settings = json.loads((art / SETTINGS_FILE).read_text())
    assert {k: settings[k] for k in ("bos_id", "eos_ids", "pad_id", "add_bos")} == {
        "bos_id": 2, "eos_ids": [0], "pad_id": 1, "add_bos": True}
    codec = load_codec(art)
    assert codec.encode(TEXTS[1]) == load_codec(checkpoint, step=0).encode(TEXTS[1])

    from zoo.info import describe_path

    info = describe_path(art)
    assert info["tokenizer"]["sha256"] == read_metadata(checkpoint, 0)["tokenizer_sha256"] and not info["problems"]
    (art / TOKENIZER_FILE).write_text((art / TOKENIZER_FILE).read_text().replace('"<pad>"', '"<pat>"'))
    with pytest.raises(TokenizerError, match="does not match the tokenizer_sha256"):
        load_codec(art)
