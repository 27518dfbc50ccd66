"""When a row stops and what it shows: EOS, token and text stop sequences, budgets, and held-back streamed text.

The codec here maps each id to a fixed string (no tokenizer library), so every expected value is written out.
"""

from __future__ import annotations

import pytest

from zoo.inference.stopping import RowOutput, stop_lists

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\n", 7: "EN", 8: "D", 9: "x"}


class Stream:
    def step(self, token):
        return PIECES[token]

    def flush(self):
        return ""


class PieceCodec:
    def stream(self):
        return Stream()

    def decode(self, ids):
        return "".join(PIECES[i] for i in ids)


def run(tokens, *, budget=20, eos=(), stop=None, codec=PieceCodec()):
    shown = []
    stop_ids, stop_texts = stop_lists(stop)
    row = RowOutput(0, budget, frozenset(eos), stop_ids, stop_texts, codec,
                    (lambda r, piece: shown.append(piece)) if codec else None)
    for t in tokens:
        row.add(t)
    return row, shown


def test_eos_ends_the_row_and_is_not_part_of_it():
    row, shown = run([1, 2, 9, 5, 3], eos=[9])
    assert (row.tokens, row.finish_reason, row.text, "".join(shown)) == ([1, 2], "stop", "Hello", "Hello")


def test_the_budget_ends_the_row_with_length():
    row, _ = run([1, 2, 3, 4, 5], budget=3)
    assert (row.tokens, row.finish_reason, row.text) == ([1, 2, 3], "length", "Hello wor")


def test_a_token_stop_sequence_is_cut_with_its_text_never_shown():
    row, shown = run([1, 2, 7, 8, 3], stop=[[7, 8]])
    assert (row.tokens, row.finish_reason, row.text) == ([1, 2], "stop", "Hello")
    assert "".join(shown) == "Hello" and not any("EN" in piece for piece in shown)


def test_a_token_stop_prefix_that_does_not_complete_is_shown_late():
    row, shown = run([1, 7, 2], stop=[[7, 8]], budget=3)
    assert shown == ["Hel", "ENlo"]  # "EN" was held back until token 2 showed it was not the stop sequence
    assert (row.tokens, row.finish_reason) == ([1, 7, 2], "length")


def test_a_text_stop_sequence_across_tokens_is_cut_inside_a_token():
    row, shown = run([1, 2, 3, 4, 5], stop=["o wo"])
    assert (row.text, row.finish_reason) == ("Hell", "stop")
    assert "".join(shown) == "Hell"
    assert row.tokens == [1]  # only "Hel" lies wholly before the stop text


def test_text_that_may_start_a_stop_sequence_is_held_back():
    row, shown = run([1, 2, 5, 9], stop=["!\n"], budget=4)
    assert shown == ["Hel", "lo", "!x"]  # "!" waited for the next token
    assert (row.text, row.finish_reason) == ("Hello!x", "length")


def test_stop_lists_split_text_from_ids_and_refuse_empty_ones():
    assert stop_lists(["a", [1, 2]]) == (((1, 2),), ("a",))
    assert stop_lists("ab") == ((), ("ab",))
    with pytest.raises(ValueError, match="must not be empty"):
        stop_lists([""])
    with pytest.raises(ValueError, match="must not be empty"):
        stop_lists([[]])


def test_tokens_without_a_codec_still_stop_on_ids():
    row, _ = run([4, 5, 6, 1], eos=[1], stop=[[5, 6, 7]], codec=None)
    assert (row.tokens, row.finish_reason, row.text) == ([4, 5, 6], "stop", "")
