"""Training data (``zoo.train.data``): reading documents, the trained tokenizer, packing with document borders and a
loss mask, the on-disk cache, and Grain batches (seeded order, resume, sharding)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zoo.errors import ZooError
from zoo.train import data
from zoo.train.data import DataError, Packed, batches, pack, prepare, read_documents, train_tokenizer

TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i * i}  # line {i}\n" for i in range(60))


@pytest.fixture(scope="module")
def codec():
    return train_tokenizer([TEXT, TEXT.upper()], 300)


def test_pack_against_a_hand_computed_case():
    # docs [1,2,3], [4,5], [6], each followed by EOS 0: the stream 1 2 3 0 4 5 0 6 0 (T = 9 tokens)
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 0]]
    even = pack(docs, 4, pad_id=9)  # 8 targets fill exactly 2 rows of 4: no padding
    np.testing.assert_array_equal(even.tokens, [[1, 2, 3, 0, 4], [4, 5, 0, 6, 0]])
    np.testing.assert_array_equal(even.borders, [[1, 0, 0, 0, 1], [1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(even.mask, np.ones((2, 5)))
    assert even.tokens.dtype == np.int32 and even.borders.dtype == bool and even.mask.dtype == bool

    padded = pack(docs, 3, pad_id=9)  # rows cover positions 0..3, 3..6, 6..9 (position 9 is padding)
    np.testing.assert_array_equal(padded.tokens, [[1, 2, 3, 0], [0, 4, 5, 0], [0, 6, 0, 9]])
    np.testing.assert_array_equal(padded.borders, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(padded.mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])


def test_the_loss_mask_is_false_only_on_the_padded_tail():
    packed = pack([[5] * 10], 4, pad_id=7)  # 9 targets -> 3 rows (12 target slots), the last 3 are padding
    np.testing.assert_array_equal(packed.mask[:, 1:], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(packed.tokens[2], [5, 5, 7, 7, 7])
    assert packed.borders.sum() == 1 and packed.borders[0, 0]


def test_read_documents_reads_text_and_jsonl_and_refuses_a_binary_file_by_name(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("plain text\n")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")  # not a text suffix: a folder skips it
    assert read_documents([tmp_path]) == ["plain text\n", "first", "second"]  # sorted: b.txt before sub/a.jsonl

    (tmp_path / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"c\.txt: not a text file") as info:
        read_documents([tmp_path])
    assert "\n" not in str(info.value) and isinstance(info.value, ZooError)
    (tmp_path / "c.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"c\.txt: not UTF-8 text"):
        read_documents([tmp_path / "c.txt"])
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r'd\.jsonl, line 2: expected a JSON object with a "text" string'):
        read_documents([tmp_path / "d.jsonl"])
    with pytest.raises(DataError, match="missing: no such file or folder"):
        read_documents([tmp_path / "missing"])


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="--data: no text found in"):
        read_documents([tmp_path])
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="--data: no text found in"):
        read_documents([tmp_path / "other"])


def test_train_tokenizer_has_exactly_v_entries_and_round_trips(codec):
    assert codec.tokenizer.get_vocab_size(with_added_tokens=True) == 300
    assert sorted(codec.tokenizer.get_vocab(with_added_tokens=True).values()) == list(range(300))
    assert codec.tokenizer.id_to_token(0) == "<|endoftext|>" and codec.eos_ids == (0,)
    for text in ["def function_7(x):\n", "héllo wörld ✓ 日本", "\x00\t odd  bytes"]:
        ids = codec.encode(text)
        assert 0 not in ids and codec.decode(ids) == text
    assert len(codec.encode(TEXT)) < 0.6 * len(TEXT.encode())  # merges were learned on this text
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["ab"], 400)
    with pytest.raises(DataError, match="--vocab-size must be an int >= 258"):
        train_tokenizer([TEXT], 257)


def stream_of(split: Packed, array: str) -> list:
    """The token stream a split's overlapping rows hold (the first token, then every row's targets), unpadded."""
    values, mask = getattr(split, array), split.mask
    return np.concatenate([values[0, :1], values[:, 1:].ravel()])[
        np.concatenate([mask[0, :1], mask[:, 1:].ravel()])].tolist()


def test_prepare_splits_by_document_packs_and_reuses_the_cache(tmp_path, codec, monkeypatch):
    docs = [f"document {i}: " + "word " * i for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calls = []
    tokenize = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(1) or tokenize(*a))
    train, held = prepare([tmp_path / "d.jsonl"], codec, 8, holdout=0.2, seed=3, cache_dir=tmp_path / "cache")
    assert calls == [1]
    assert isinstance(train.tokens, np.memmap) and train.tokens.shape[1] == held.tokens.shape[1] == 9
    split_docs = []
    for split in (train, held):
        tokens, borders = stream_of(split, "tokens"), stream_of(split, "borders")
        ends = [i for i, t in enumerate(tokens) if t == 0]  # each document ends with EOS 0
        assert ends[-1] == len(tokens) - 1
        starts = [0] + [e + 1 for e in ends[:-1]]
        assert [i for i, b in enumerate(borders) if b] == starts
        split_docs.append([codec.decode(tokens[a:b]) for a, b in zip(starts, ends)])
    assert len(split_docs[1]) == 2  # round(0.2 * 10) whole documents held out
    assert sorted(split_docs[0] + split_docs[1]) == sorted(docs)
    assert split_docs[0] == [d for d in docs if d not in split_docs[1]]  # the rest, in order

    again = prepare([tmp_path / "d.jsonl"], codec, 8, holdout=0.2, seed=3, cache_dir=tmp_path / "cache")
    assert calls == [1]  # read from the cache, not tokenised again
    np.testing.assert_array_equal(again[0].tokens, train.tokens)
    other = prepare([tmp_path / "d.jsonl"], codec, 8, holdout=0.2, seed=4, cache_dir=tmp_path / "cache")
    assert calls == [1, 1]  # another seed is another key
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert other[1].tokens.tolist() != held.tokens.tolist()


def test_one_document_holds_out_its_last_rows(tmp_path, codec):
    (tmp_path / "one.txt").write_text(TEXT)
    train, held = prepare([tmp_path / "one.txt"], codec, 16, holdout=0.25, seed=0, cache_dir=tmp_path)
    whole = pack([codec.encode(TEXT) + [0]], 16, 0)
    cut = len(whole) - round(0.25 * len(whole))
    np.testing.assert_array_equal(train.tokens, whole.tokens[:cut])
    np.testing.assert_array_equal(held.tokens, whole.tokens[cut:])
    np.testing.assert_array_equal(held.mask, whole.mask[cut:])


ROWS = Packed(np.arange(10, dtype=np.int32)[:, None] * np.ones(5, np.int32), np.zeros((10, 5), bool),
              np.ones((10, 5), bool))
"""Ten rows whose tokens are the row's index."""


def take(iterator, count: int) -> list[list[int]]:
    return [next(iterator)["tokens"][:, 0].tolist() for _ in range(count)]


def test_batches_follow_the_seed_and_reshuffle_each_epoch():
    batch = next(batches(ROWS, 3, seed=0))
    assert set(batch) == {"tokens", "borders", "mask"} and batch["tokens"].shape == (3, 5)
    assert batch["tokens"].dtype == np.int32 and batch["borders"].dtype == bool and batch["mask"].dtype == bool
    first = take(batches(ROWS, 5, seed=0), 6)  # three epochs of 2 batches
    assert first == take(batches(ROWS, 5, seed=0), 6)
    assert first != take(batches(ROWS, 5, seed=1), 6)
    epochs = [sorted(first[i] + first[i + 1]) for i in (0, 2, 4)]
    assert epochs == [list(range(10))] * 3  # each epoch sees every row once
    assert first[0:2] != first[2:4]  # in another order
    assert take(batches(ROWS, 5, seed=0, shuffle=False), 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    finite = batches(ROWS, 4, seed=0, num_epochs=2)  # 20 rows -> 5 batches, then stop
    assert len(take(finite, 5)) == 5
    with pytest.raises(StopIteration):
        next(finite)


def test_batches_resume_from_a_saved_state():
    iterator = batches(ROWS, 3, seed=7)
    take(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable
    expected = take(iterator, 5)
    resumed = batches(ROWS, 3, seed=7)
    resumed.set_state(state)
    assert take(resumed, 5) == expected


def test_shards_split_the_rows_disjointly_and_bad_sizes_are_refused():
    shards = [sum(take(batches(ROWS, 1, seed=0, shard_index=i, shard_count=3, num_epochs=1), n), [])
              for i, n in [(0, 4), (1, 3), (2, 3)]]
    assert sorted(sum(shards, [])) == list(range(10))
    assert [sorted(s) for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(DataError, match="--batch-size 11 is larger than the 10 rows"):
        batches(ROWS, 11, seed=0)
    with pytest.raises(DataError, match="--batch-size 4 is larger than the 3 rows of this split \\(shard 1 of 3"):
        batches(ROWS, 4, seed=0, shard_index=1, shard_count=3)
    with pytest.raises(DataError, match="shard_index"):
        batches(ROWS, 1, seed=0, shard_index=3, shard_count=3)
