"""When a sequence is done, and what of it the caller sees: EOS, stop sequences, per-prompt lengths, streamed text.

A ``RowOutput`` follows one prompt's new tokens on the host. It finishes the row with ``"stop"`` at an EOS id
or a stop sequence (neither is part of the output, as in OpenAI's API) and with ``"length"`` after its
``max_new_tokens``. With a tokenizer it also streams text: pieces never end inside a UTF-8 character (the
tokenizer's decode stream holds incomplete bytes back) nor inside what may still become a text stop sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zoo.inference.sampling import GenerationError

OnText = Callable[[int, str], None]
"""``on_text(row, piece)``: called with each new piece of a row's text as it becomes final."""


@dataclass
class RowOutput:
    """One prompt's output, fed one token at a time (``add``)."""

    row: int
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    stop_ids: tuple[tuple[int, ...], ...] = ()
    stop_texts: tuple[str, ...] = ()
    codec: Any = None  # zoo.tokenizers.Codec: needed for text stops, text and streaming
    on_text: OnText | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""  # the text shown so far (all of it once the row is done)
    _held: list[str] = field(default_factory=list)  # the unshown text of the last tokens, one entry per token
    _stream: Any = None

    def __post_init__(self) -> None:
        if self.codec is not None:
            self._stream = self.codec.stream()

    @property
    def done(self) -> bool:
        """True once the row has a finish reason."""
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        """Take the next generated ``token`` (ignored once the row is done)."""
        if self.done:
            return
        if token in self.eos_ids:
            return self._finish("stop")
        self.tokens.append(token)
        self._held.append(self._stream.step(token) or "" if self._stream is not None else "")
        for stop in self.stop_ids:
            if tuple(self.tokens[-len(stop):]) == stop:
                del self.tokens[-len(stop):], self._held[-len(stop):]
                return self._finish("stop")
        pending = "".join(self._held)
        hits = [pending.find(s) for s in self.stop_texts if s in pending]
        if hits:
            self._show(min(hits))
            self._held.clear()
            self.tokens = self._tokens_within(self.text)
            self.finish_reason = "stop"
            return
        if len(self.tokens) >= self.max_new_tokens:
            return self._finish("length")
        self._show(len(pending) - self._unsafe_chars(pending))

    def final_tokens(self) -> int:
        """How many leading tokens can no longer change: their text is wholly shown (with a codec) and they cannot
        be the start of a token stop sequence."""
        if self.done:
            return len(self.tokens)
        if self.codec is not None:
            return len(self.tokens) - len(self._held)  # _held: one entry per token whose text is not all shown
        return len(self.tokens) - self._stop_prefix()

    def end(self, reason: str) -> None:
        """End the row now (cancelled, timeout, error): the held text is shown."""
        if not self.done:
            self._finish(reason)

    def _stop_prefix(self) -> int:
        """How many of the last tokens may be the start of a token stop sequence."""
        hold = 0
        for stop in self.stop_ids:
            for k in range(min(len(stop) - 1, len(self.tokens)), 0, -1):
                if tuple(self.tokens[-k:]) == stop[:k]:
                    hold = max(hold, k)
                    break
        return hold

    def _unsafe_chars(self, pending: str) -> int:
        """How many trailing characters may still turn out to belong to a stop sequence (and are held back)."""
        k = self._stop_prefix()
        chars = sum(map(len, self._held[-k:])) if k else 0
        for stop in self.stop_texts:  # the text may end with the start of a text stop sequence
            for k in range(min(len(stop) - 1, len(pending)), 0, -1):
                if pending.endswith(stop[:k]):
                    chars = max(chars, k)
                    break
        return min(chars, len(pending))

    def _show(self, length: int) -> None:
        """Show the first ``length`` held characters (calling ``on_text``)."""
        shown = []
        while length > 0 and self._held:
            first = self._held[0]
            shown.append(first[:length])
            if len(first) <= length:
                self._held.pop(0)
            else:
                self._held[0] = first[length:]
            length -= len(shown[-1])
        piece = "".join(shown)
        if piece:
            self.text += piece
            if self.on_text is not None:
                self.on_text(self.row, piece)

    def _tokens_within(self, text: str) -> list[int]:
        """The longest prefix of the tokens whose text lies wholly within ``text``."""
        for n in range(len(self.tokens), -1, -1):
            if len(self.codec.decode(self.tokens[:n])) <= len(text):
                return self.tokens[:n]
        return []

    def _finish(self, reason: str) -> None:
        if self._stream is not None:
            self._held.append(self._stream.flush() or "")
        self._show(sum(map(len, self._held)))
        self.finish_reason = reason


def stop_lists(stop: Sequence[str | Sequence[int]] | str | None) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Split ``stop`` (a string, or a list of strings and token-id sequences) into token and text stop sequences;
    ``GenerationError`` (a ``ValueError``) for an empty one."""
    if stop is None:
        return (), ()
    if isinstance(stop, str):
        stop = [stop]
    ids, texts = [], []
    for s in stop:
        if isinstance(s, str):
            texts.append(s)
        else:
            ids.append(tuple(int(t) for t in s))
        if not (texts[-1] if isinstance(s, str) else ids[-1]):
            raise GenerationError("stop sequences must not be empty")
    return tuple(ids), tuple(texts)
