"""Ragged prompts: token-id sequences of different lengths, right-padded into one batch with their lengths."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from zoo.checks import TokenError
from zoo.inference.sampling import GenerationError

T = TypeVar("T")

MIN_BUCKET = 16
"""The shortest padded prompt length: shorter prompts pad up to it, longer ones to the next power of two."""


def prompt_lists(prompts: Any, codec: Any = None, vocab_size: int | None = None) -> list[list[int]]:
    """``prompts`` as a list of id lists: a list of id sequences (ragged or not), a rectangular int array ``(B, S)``,
    or, with a ``codec`` (``zoo.tokenizers.Codec``), strings (a single string is one prompt).

    Raises ``TokenError`` for an empty batch or prompt, a string without a codec, ids that are not integers, or
    (given ``vocab_size``) an id outside ``[0, vocab_size)``, naming its ``(prompt, position)`` index. The length
    is checked against ``context_length`` where the prompts are prefilled."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "__array__") and not isinstance(prompts, list):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise TokenError(f"prompts must be a list of token-id lists or a (B, S) array, got shape {array.shape}")
        prompts = array.tolist()
    if not isinstance(prompts, Sequence) or not prompts:
        raise TokenError("prompts must be a non-empty list of prompts (token-id lists, or strings with a tokenizer)")
    out = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if codec is None:
                raise TokenError(f"prompts[{b}] is text, but no tokenizer was given (pass tokenizer=, or token ids)")
            prompt = codec.encode(prompt)
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise TokenError(f"prompts[{b}] must be a non-empty sequence of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TokenError(f"prompts[{b}] must hold integer token ids, got dtype {ids.dtype}")
        if vocab_size is not None:
            outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
            if outside.size:
                s = int(outside[0])
                raise TokenError(f"prompts: id {int(ids[s])} at index ({b}, {s}) is outside the vocabulary, valid ids "
                                 f"are 0 to {vocab_size - 1}")
        out.append([int(i) for i in ids])
    return out


def per_prompt(value: T | Sequence[T], count: int, name: str) -> list[T]:
    """``value`` repeated for ``count`` prompts, or the list of one value per prompt (``GenerationError``, a ``ValueError``, naming ``name``
    when its length differs)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise GenerationError(f"{name} has {len(value)} values for {count} prompts; give one value or one per prompt")
        return list(value)
    return [value] * count


def bucket(length: int, limit: int) -> int:
    """The padded length for a longest prompt of ``length``: a power of two of at least ``MIN_BUCKET``, at most
    ``limit`` when ``limit > 0`` (``context_length``), so prompts of nearby lengths share one compiled prefill."""
    size = max(MIN_BUCKET, 1 << (length - 1).bit_length())
    return max(length, min(size, limit)) if limit > 0 else size


def pad(prompts: list[list[int]], limit: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 ``tokens (B, bucket(max length))`` (padding id 0) and int32 ``lengths (B,)``."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), bucket(int(lengths.max()), limit)), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = prompt
    return tokens, lengths
