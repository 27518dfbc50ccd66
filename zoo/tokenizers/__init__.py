"""Tokenizers: Hugging Face ``tokenizer.json`` files (the ``tokenizers`` library, no network), stored with a model.

A checkpoint step may carry its tokenizer (``zoo.save(..., tokenizer=...)``, ``zoo build --tokenizer``,
``zoo convert torch``); a ``zoo export`` artifact and a ``zoo convert to-torch`` folder carry it as two plain
JSON files, ``tokenizer.json`` and ``zoo_tokenizer.json`` (the special-token settings and the tokenizer's
SHA-256), which need no zoo to read::

    tokenizer = tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json")
    settings = json.load(open(f"{path}/zoo_tokenizer.json"))   # bos_id, eos_ids, pad_id, add_bos

A tokenizer fits a model when it has at most ``vocab_size`` tokens (``check_fits``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers

from zoo.checkpoint import CheckpointRefused, classify_path, json_hash, read_stored, read_tokenizer
from zoo.tokenizers.codec import (BOS_NAMES, EOS_NAMES, PAD_NAMES, SETTINGS_FILE, TOKENIZER_FILE, Codec, TextStream,
                                  TokenizerError, as_codec, check_fits, load_file, special_tokens, token_count)

__all__ = ["BOS_NAMES", "EOS_NAMES", "PAD_NAMES", "SETTINGS_FILE", "TOKENIZER_FILE", "Codec", "TextStream",
           "TokenizerError", "as_codec", "check_fits", "load_codec", "load_file", "load_tokenizer", "read_folder",
           "special_tokens", "token_count", "write_files"]

WHERE = "a checkpoint folder or a `zoo export` artifact"


def write_files(codec: Codec, folder: str | os.PathLike) -> None:
    """Write ``TOKENIZER_FILE`` and ``SETTINGS_FILE`` (``codec.to_json()`` plus ``tokenizer_sha256``) into an
    existing ``folder``."""
    folder = Path(folder)
    text = codec.tokenizer.to_str(pretty=True)
    (folder / TOKENIZER_FILE).write_text(text + "\n", encoding="utf-8")
    settings = {**codec.to_json(), "tokenizer_sha256": json_hash(json.loads(text))}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def read_folder(folder: str | os.PathLike, default: dict[str, Any] | None = None) -> Codec | None:
    """The codec of a folder's ``TOKENIZER_FILE``, or None when it has none.

    Its settings come from ``SETTINGS_FILE`` when there is one (its ``tokenizer_sha256``, when given, must match
    the tokenizer), else from ``default`` (``Codec.to_json``'s keys) when given, else from the tokenizer's own
    special tokens (``Codec.from_tokenizer``). ``TokenizerError`` naming the file for an unreadable file, a hash
    that does not match, or settings that do not fit the tokenizer.
    """
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).exists():
        return None
    tokenizer = load_file(folder / TOKENIZER_FILE)
    settings = _settings_file(folder)
    if settings is None:
        return Codec.from_tokenizer(tokenizer) if default is None else Codec.from_json(tokenizer, default)
    recorded = settings.get("tokenizer_sha256") if isinstance(settings, dict) else None
    if recorded is not None and recorded != json_hash(json.loads(tokenizer.to_str())):
        raise TokenizerError(f"{folder / TOKENIZER_FILE} does not match the tokenizer_sha256 recorded in "
                             f"{SETTINGS_FILE}: the file was changed or damaged")
    return Codec.from_json(tokenizer, settings, str(folder / SETTINGS_FILE))


def _settings_file(folder: Path) -> Any:
    """The JSON of ``folder``'s ``SETTINGS_FILE``; None when there is none."""
    file = folder / SETTINGS_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{file}: not a readable JSON file ({exc})") from None


def load_codec(path: str | os.PathLike, step: int | None = None,
               file: str | os.PathLike | None = None) -> Codec | None:
    """The tokenizer stored with a checkpoint step (default: the latest) or in a ``zoo export`` artifact, with its
    special-token settings; None when there is none.

    ``file``, a ``tokenizer.json`` (e.g. ``--tokenizer FILE``), replaces the stored tokenizer; its special tokens
    then come from the stored settings when there are any, else from its own added special tokens by name
    (``Codec.from_tokenizer``: ``<s>``/``<bos>`` for BOS, ``</s>``/``<eos>``/``<|endoftext|>`` for EOS,
    ``<pad>`` for pad; ``add_bos`` false). A stored tokenizer's hash is verified.

    Raises ``CheckpointRefused`` for a path that is neither (saying what it is), a step the checkpoint does not
    hold or ``step`` with an artifact; ``CheckpointError`` for a damaged step or a stored tokenizer that does not
    match its hash; ``TokenizerError`` for an unreadable ``file``, one with more tokens than the model's
    ``vocab_size``, or stored settings that do not fit it.
    """
    found = classify_path(path)
    if found.kind == "checkpoint":
        if file is None:
            stored = read_tokenizer(found.path, step)
            if stored is None:
                return None
            return Codec.from_json(tokenizers.Tokenizer.from_str(json.dumps(stored[0])), stored[1],
                                   f"the settings stored with {found.path}")
        _, config_json, metadata = read_stored(found.path, step)
        vocab_size, settings = config_json.get("vocab_size"), metadata.get("tokenizer")
    elif found.kind == "artifact":
        if step is not None:
            raise CheckpointRefused(f"{found.path}: step {step} selects a checkpoint step; this is not a checkpoint "
                                    f"but {found.found}")
        if file is None:
            return read_folder(found.path)
        vocab_size, settings = _manifest_vocab_size(found.path), _settings_file(found.path)
    else:
        raise found.refuse(WHERE)
    tokenizer = load_file(file)
    if isinstance(vocab_size, int):
        check_fits(tokenizer, vocab_size, str(file))
    if settings is None:
        return Codec.from_tokenizer(tokenizer)
    return Codec.from_json(tokenizer, settings, f"{file} with the settings stored in {found.path}")


def load_tokenizer(path: str | os.PathLike, step: int | None = None) -> tokenizers.Tokenizer | None:
    """The ``tokenizers.Tokenizer`` stored with a checkpoint step (default: the latest) or in an artifact; None
    when there is none. Raises as ``load_codec``."""
    codec = load_codec(path, step)
    return None if codec is None else codec.tokenizer


def _manifest_vocab_size(root: Path) -> Any:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{root / 'manifest.json'}: unreadable ({exc})") from None
    return manifest.get("vocab_size") if isinstance(manifest, dict) else None
