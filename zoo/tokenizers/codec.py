"""A Hugging Face ``tokenizers.Tokenizer`` with the special-token settings generation needs: the ``Codec``.

This module knows no zoo file format, so that ``zoo.checkpoint`` can store a ``Codec`` (``zoo.tokenizers``,
above both, reads it back).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

from zoo.errors import ZooError

TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer, in Hugging Face's format, in an artifact or a PyTorch folder."""
SETTINGS_FILE = "zoo_tokenizer.json"
"""Its special-token settings (``Codec.to_json``) beside it, plus ``tokenizer_sha256``: plain JSON."""

BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>")
EOS_NAMES = ("</s>", "<eos>", "<|eos|>", "<|endoftext|>", "<|end_of_text|>")
PAD_NAMES = ("<pad>", "<|pad|>", "<|padding|>", "[PAD]")
"""The names ``Codec.from_tokenizer`` recognises among a tokenizer's added special tokens."""

_SETTINGS = ("bos_id", "eos_ids", "pad_id", "add_bos")


class TokenizerError(ZooError, ValueError):
    """A tokenizer file that is missing or unreadable, a tokenizer that does not fit the model, or special-token
    settings that do not fit the tokenizer."""


def load_file(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer in a Hugging Face ``tokenizer.json`` file.

    Raises ``TokenizerError`` (one line naming the file) when it is missing, unreadable or not a tokenizer.json.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        found = "a folder" if file.is_dir() else "nothing (no such file)"
        raise TokenizerError(f"{file}: expected a tokenizer.json (Hugging Face tokenizers); found {found}")
    try:
        return tokenizers.Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception; OSError, UnicodeDecodeError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TokenizerError(f"{file}: not a tokenizer.json that Hugging Face tokenizers reads ({reason})") from None


def token_count(tokenizer: tokenizers.Tokenizer) -> int:
    """How many token ids ``tokenizer`` uses: its vocabulary with added tokens (or its highest id + 1, if larger)."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def check_fits(tokenizer: tokenizers.Tokenizer, config: Any, name: str = "the tokenizer") -> None:
    """Refuse a tokenizer with more tokens than the model's ``vocab_size`` (``config``: a ``ModelConfig`` or the
    size itself); fewer is fine (presets pad the vocabulary). ``TokenizerError`` naming ``name`` and both sizes."""
    vocab_size = config if isinstance(config, int) else config.vocab_size
    count = token_count(tokenizer)
    if count > vocab_size:
        raise TokenizerError(f"{name} does not fit the model: it has {count} tokens (with added tokens), the "
                             f"model's vocab_size is {vocab_size}; use a tokenizer of at most {vocab_size} tokens "
                             f"or a config with vocab_size >= {count}")


def _named(specials: dict[str, int], names: tuple[str, ...]) -> list[int]:
    return sorted(specials[name] for name in names if name in specials)


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids: a ``tokenizers.Tokenizer`` and its special tokens.

    ``bos_id`` is put first by ``encode`` when ``add_bos`` (Hugging Face xLSTM's ``force_bos_token_insert``);
    ``eos_ids`` end a generation; ``pad_id`` fills batches. Raises ``TokenizerError`` for an id that is not an
    int in ``[0, tokens)`` of the tokenizer, or ``add_bos`` without a ``bos_id``.
    """

    tokenizer: tokenizers.Tokenizer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    add_bos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"Codec.tokenizer must be a tokenizers.Tokenizer, got {type(self.tokenizer).__name__}")
        if isinstance(self.eos_ids, (str, bytes)) or not isinstance(self.eos_ids, Sequence):
            raise TokenizerError(f"eos_ids must be a list of token ids, got {self.eos_ids!r}")
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        count = token_count(self.tokenizer)
        for name, value in [("bos_id", self.bos_id), ("pad_id", self.pad_id),
                            *((f"eos_ids[{i}]", v) for i, v in enumerate(self.eos_ids))]:
            if value is not None and (type(value) is not int or not 0 <= value < count):
                raise TokenizerError(f"{name} must be a token id of the tokenizer, an int in [0, {count}); "
                                     f"got {value!r}")
        if type(self.add_bos) is not bool:
            raise TokenizerError(f"add_bos must be true or false, got {self.add_bos!r}")
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("add_bos is true but bos_id is not set: there is no BOS token to add")

    @classmethod
    def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer) -> Codec:
        """The settings a tokenizer's own added special tokens name: ``bos_id`` the lowest id named in
        ``BOS_NAMES`` (``<s>``, ``<bos>``, ...), ``eos_ids`` every id named in ``EOS_NAMES`` (``</s>``, ``<eos>``,
        ``<|endoftext|>``, ...), ``pad_id`` the lowest in ``PAD_NAMES`` (``<pad>``, ...); ``add_bos`` false."""
        specials = special_tokens(tokenizer)
        bos, pad = _named(specials, BOS_NAMES), _named(specials, PAD_NAMES)
        return cls(tokenizer, bos[0] if bos else None, tuple(_named(specials, EOS_NAMES)), pad[0] if pad else None)

    @classmethod
    def from_json(cls, tokenizer: tokenizers.Tokenizer, settings: Any, where: str = "settings") -> Codec:
        """The codec of ``tokenizer`` with ``settings`` (``to_json``'s dict, or ``describe``'s, whose other keys
        are ignored; missing keys take their defaults). ``TokenizerError`` naming ``where`` and the field for an
        unknown key or a bad value."""
        if not isinstance(settings, dict):
            raise TokenizerError(f"{where}: expected a JSON object of {', '.join(_SETTINGS)}; got {settings!r:.80}")
        unknown = sorted(set(settings) - set(_SETTINGS) - {"vocab_size", "special_tokens", "tokenizer_sha256"})
        if unknown:
            raise TokenizerError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(_SETTINGS)}")
        try:
            return cls(tokenizer, **{k: settings[k] for k in _SETTINGS if k in settings})
        except TokenizerError as exc:
            raise TokenizerError(f"{where}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The special-token settings as JSON: ``bos_id``, ``eos_ids`` (a list), ``pad_id``, ``add_bos``."""
        return {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id, "add_bos": self.add_bos}

    def describe(self) -> dict[str, Any]:
        """``to_json()`` plus ``vocab_size`` (token ids used, with added tokens) and ``special_tokens``
        (``{content: id}`` of the tokenizer's added special tokens)."""
        return {"vocab_size": token_count(self.tokenizer), "special_tokens": special_tokens(self.tokenizer),
                **self.to_json()}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: ``bos_id`` first when ``add_bos``; no other special token is added (special
        tokens written in ``text`` itself, such as ``<|endoftext|>``, become their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens (BOS, EOS, pad, ...) left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self) -> TextStream:
        """A new incremental decoder of this codec's ids (see ``TextStream``)."""
        return TextStream(self.tokenizer)


class TextStream:
    """Incremental detokenisation, one id at a time, for printing text as tokens arrive.

    ``step(id)`` returns the text that id completes, possibly ``""``: it holds back a character whose UTF-8
    bytes are split across tokens until the last byte arrives (``tokenizers.decoders.DecodeStream``), so the
    text never holds a partial character. ``flush()``, at the end, returns what is still held back; the
    concatenation of every ``step`` and the ``flush`` equals ``Codec.decode`` of all the ids.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._shown = 0  # characters returned so far

    def step(self, token_id: int) -> str:
        """The text ``token_id`` completes ("" while a character or a word piece is incomplete)."""
        self._ids.append(int(token_id))
        text = self._stream.step(self._tokenizer, int(token_id)) or ""
        self._shown += len(text)
        return text

    def flush(self) -> str:
        """The text held back at the end (bytes of an incomplete character decode to U+FFFD, as in ``decode``)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        rest = full[self._shown:]
        self._shown = len(full)
        return rest


def special_tokens(tokenizer: tokenizers.Tokenizer) -> dict[str, int]:
    """``{content: id}`` of ``tokenizer``'s added special tokens, by id."""
    return {token.content: token_id for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
            if token.special}


def as_codec(tokenizer: Codec | tokenizers.Tokenizer) -> Codec:
    """``tokenizer`` itself for a ``Codec``; for a bare ``tokenizers.Tokenizer``, ``Codec.from_tokenizer``."""
    if isinstance(tokenizer, Codec):
        return tokenizer
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return Codec.from_tokenizer(tokenizer)
    raise TypeError(f"tokenizer must be a zoo.tokenizers.Codec or a tokenizers.Tokenizer, got "
                    f"{type(tokenizer).__name__}")
