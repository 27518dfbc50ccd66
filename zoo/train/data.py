"""Training data: text files -> a byte-level BPE tokenizer -> packed rows with document borders -> Grain batches.

``read_documents`` reads text files, folders of them and JSONL; ``train_tokenizer`` trains a byte-level BPE of
exactly ``vocab_size`` tokens on them; ``prepare`` tokenises, splits the documents into a train and a held-out
split and packs each (``pack``) into rows cached on disk; ``batches`` shuffles, shards and batches a split with
Grain into a checkpointable iterator.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from zoo.errors import ZooError
from zoo.tokenizers.codec import Codec, token_count

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")
"""The files a folder given to ``read_documents`` contributes (searched recursively)."""
EOS_TOKEN = "<|endoftext|>"
"""The one special token of a tokenizer ``train_tokenizer`` builds: id 0, the EOS."""
ARRAYS = ("tokens", "borders", "mask")
_CACHE_VERSION = 1  # bump when the cached layout or the packing changes

BatchIterator = grain.DatasetIterator
"""What ``batches`` returns: ``next(it)`` is a batch dict; ``get_state()`` / ``set_state(state)`` checkpoint it."""


class DataError(ZooError, ValueError):
    """Training data that cannot be used: a missing path, a file that is not UTF-8 text, a bad JSONL line, no
    text at all, too little text for the tokenizer or the split, or a batch larger than the split."""


def _read_file(file: Path) -> list[str]:
    data = file.read_bytes()
    if b"\0" in data:
        raise DataError(f"--data: {file}: not a text file (it contains NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--data: {file}: not UTF-8 text (byte {exc.start}); expected UTF-8 text") from None
    if file.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'--data: {file}, line {number}: expected a JSON object with a "text" string')
        documents.append(record["text"])
    return documents


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The non-empty documents in ``paths``, in order.

    Each path is a text file (UTF-8, one document), a ``*.jsonl`` file (one JSON object per line with a
    ``"text"`` string: one document per line; blank lines skipped) or a folder (every file below it whose name
    ends in ``TEXT_SUFFIXES``, sorted by path). Documents that are empty or only whitespace are left out.
    Raises ``DataError`` (one line naming the path) for a missing path, a file that is not UTF-8 text or holds
    NUL bytes, a JSONL line without a ``"text"`` string, and when no document is left.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    documents: list[str] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"--data: {path}: no such file or folder; expected text files, folders or JSONL")
        for file in files:
            documents += [doc for doc in _read_file(file) if doc.strip()]
    if not documents:
        raise DataError(f"--data: no text found in {', '.join(str(p) for p in paths) or 'no paths'}; expected "
                        f"non-empty UTF-8 text files, folders of {'/'.join(TEXT_SUFFIXES)} files, or JSONL")
    return documents


def train_tokenizer(documents: Sequence[str], vocab_size: int) -> Codec:
    """A byte-level BPE trained on ``documents`` with exactly ``vocab_size`` tokens: ``<|endoftext|>`` (id 0,
    the codec's only EOS), the 256 bytes, then merges. Deterministic for the same documents.

    Raises ``DataError`` when ``vocab_size`` is not an int >= 258, or when the documents are too small to learn
    ``vocab_size - 257`` merges.
    """
    if type(vocab_size) is not int or vocab_size < 258:
        raise DataError(f"--vocab-size must be an int >= 258 (256 bytes + {EOS_TOKEN} + at least one merge); "
                        f"got {vocab_size!r}")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    count = token_count(tokenizer)
    if count != vocab_size:
        raise DataError(f"--vocab-size {vocab_size}: the data is too small to learn that many tokens (it gave "
                        f"{count}); use a smaller --vocab-size or more text")
    return Codec(tokenizer, eos_ids=(0,))


@dataclass(frozen=True)
class Packed:
    """One split as rows of ``seq_len + 1`` tokens (memory-mapped when read from the cache).

    Row ``r`` holds stream positions ``r * seq_len .. r * seq_len + seq_len``: consecutive rows share one token,
    so a model reads inputs ``[:, :-1]`` and predicts targets ``[:, 1:]`` and every token but the very first is
    a target exactly once.
    """

    tokens: np.ndarray
    """``(N, seq_len + 1)`` int32 token ids; the pad id after the end of the stream."""
    borders: np.ndarray
    """``(N, seq_len + 1)`` bool: True at each document's first token."""
    mask: np.ndarray
    """``(N, seq_len + 1)`` bool: False on padding (only the tail of the last row)."""

    def __len__(self) -> int:
        return len(self.tokens)


def pack(docs_ids: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> Packed:
    """Concatenate the documents' ids (each as given, EOS included if wanted) and cut the stream into rows of
    ``seq_len + 1`` tokens overlapping by one (see ``Packed``); the last row is right-padded with ``pad_id``.

    ``N = ceil((T - 1) / seq_len)`` rows for a stream of ``T >= 2`` tokens. Raises ``DataError`` for a
    ``seq_len`` below 1 or fewer than 2 tokens in all.
    """
    if type(seq_len) is not int or seq_len < 1:
        raise DataError(f"--seq-len must be an int >= 1; got {seq_len!r}")
    lengths = [len(ids) for ids in docs_ids]
    total = sum(lengths)
    if total < 2:
        raise DataError(f"too little text to pack: {total} token(s); need at least 2")
    rows = -(-(total - 1) // seq_len)
    size = rows * seq_len + 1
    stream = np.full(size, pad_id, np.int32)
    stream[:total] = np.concatenate([np.asarray(ids, np.int64) for ids in docs_ids if len(ids)]).astype(np.int32)
    borders = np.zeros(size, bool)
    borders[np.cumsum([0, *lengths[:-1]])[np.asarray(lengths) > 0]] = True
    mask = np.arange(size) < total
    starts = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)
    return Packed(stream[starts], borders[starts], mask[starts])


def _tokenize(documents: list[str], codec: Codec) -> list[list[int]]:
    """Each document's ids (BOS first when the codec adds it), followed by the first EOS if the codec has one."""
    head = [codec.bos_id] if codec.add_bos else []
    tail = list(codec.eos_ids[:1])
    return [head + e.ids + tail for e in codec.tokenizer.encode_batch(documents, add_special_tokens=False)]


def _split(count: int, holdout: float, seed: int) -> np.ndarray:
    """The indices of the held-out documents among ``count`` (sorted; at least one, never all)."""
    chosen = np.random.default_rng(seed).permutation(count)
    return np.sort(chosen[:min(count - 1, max(1, round(holdout * count)))])


def _cache_key(documents: list[str], codec: Codec, seq_len: int, holdout: float, seed: int) -> str:
    digest = hashlib.sha256(json.dumps([_CACHE_VERSION, codec.tokenizer.to_str(), codec.to_json(), seq_len,
                                        holdout, seed]).encode())
    for doc in documents:
        digest.update(hashlib.sha256(doc.encode()).digest())
    return digest.hexdigest()[:32]


def _pack_splits(documents: list[str], codec: Codec, seq_len: int, holdout: float, seed: int) -> dict[str, Packed]:
    docs_ids = _tokenize(documents, codec)
    pad_id = 0 if codec.pad_id is None else codec.pad_id
    if len(docs_ids) >= 2:
        held = set(_split(len(docs_ids), holdout, seed).tolist())
        return {"train": pack([d for i, d in enumerate(docs_ids) if i not in held], seq_len, pad_id),
                "heldout": pack([d for i, d in enumerate(docs_ids) if i in held], seq_len, pad_id)}
    packed = pack(docs_ids, seq_len, pad_id)
    if len(packed) < 2:
        raise DataError(f"--data: one document of {int(packed.mask.sum())} tokens makes a single row of "
                        f"--seq-len {seq_len}; need at least 2 rows (or 2 documents) to hold some out")
    cut = len(packed) - min(len(packed) - 1, max(1, round(holdout * len(packed))))
    return {"train": Packed(*(getattr(packed, a)[:cut] for a in ARRAYS)),
            "heldout": Packed(*(getattr(packed, a)[cut:] for a in ARRAYS))}


def prepare(paths: Sequence[str | os.PathLike], codec: Codec, seq_len: int, *, holdout: float = 0.05, seed: int = 0,
            cache_dir: str | os.PathLike) -> tuple[Packed, Packed]:
    """The ``(train, heldout)`` splits of the documents in ``paths`` (``read_documents``), tokenised with
    ``codec`` (each document's ids followed by its first EOS) and packed (``pack``, pad id ``codec.pad_id`` or
    0).

    With two documents or more, the split is by document: a ``seed``-chosen ``round(holdout * count)`` of them
    (at least one, never all) are held out. With one document, the held-out split is the last
    ``round(holdout * N)`` of its ``N`` rows (at least one; ``DataError`` if ``N < 2``).

    The arrays are cached as ``.npy`` files in ``cache_dir/<key>/``, keyed by a hash of the tokenizer JSON and
    settings, the documents' contents, ``seq_len``, ``holdout`` and ``seed``; a later call with the same key
    memory-maps them without tokenising again. Raises ``DataError`` as ``read_documents`` does and for a
    ``holdout`` outside ``(0, 1)``.
    """
    if not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise DataError(f"holdout must be a fraction in (0, 1); got {holdout!r}")
    documents = read_documents(paths)
    folder = Path(cache_dir).expanduser() / _cache_key(documents, codec, seq_len, holdout, seed)
    if not folder.is_dir():
        splits = _pack_splits(documents, codec, seq_len, holdout, seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        for name, split in splits.items():
            for array in ARRAYS:
                np.save(scratch / f"{name}_{array}.npy", getattr(split, array))
        try:
            scratch.rename(folder)
        except OSError:  # another process cached the same key first
            shutil.rmtree(scratch, ignore_errors=True)
    train, heldout = (Packed(*(np.load(folder / f"{name}_{array}.npy", mmap_mode="r") for array in ARRAYS))
                      for name in ("train", "heldout"))
    return train, heldout


def batches(split: Packed, batch_size: int, *, seed: int, shuffle: bool = True, num_epochs: int | None = None,
            shard_index: int = 0, shard_count: int = 1) -> BatchIterator:
    """A Grain iterator of batches ``{"tokens": (B, S+1) int32, "borders": (B, S+1) bool, "mask": (B, S+1)
    bool}`` of ``split``'s rows.

    This process reads rows ``shard_index, shard_index + shard_count, ...`` (e.g. ``jax.process_index()`` of
    ``jax.process_count()``), reshuffled each epoch from ``seed`` when ``shuffle``; batches may span an epoch
    boundary, and a last incomplete batch is dropped. ``num_epochs=None`` repeats forever. The iterator reads in
    this process (no workers), so the order is deterministic; ``it.get_state()`` is a JSON-serialisable dict
    and ``it.set_state(state)`` resumes at exactly the next batch. Raises ``DataError`` for a ``batch_size``
    larger than this shard's rows, or a bad shard, seed or epoch count.
    """
    if type(shard_count) is not int or shard_count < 1 or type(shard_index) is not int \
            or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be an int in [0, shard_count) and shard_count >= 1; got "
                        f"{shard_index!r} of {shard_count!r}")
    if num_epochs is not None and (type(num_epochs) is not int or num_epochs < 1):
        raise DataError(f"num_epochs must be an int >= 1 or None (forever); got {num_epochs!r}")
    if type(seed) is not int or seed < 0:
        raise DataError(f"seed must be an int >= 0; got {seed!r}")
    rows = len(range(shard_index, len(split), shard_count))
    if type(batch_size) is not int or batch_size < 1:
        raise DataError(f"--batch-size must be an int >= 1; got {batch_size!r}")
    if batch_size > rows:
        raise DataError(f"--batch-size {batch_size} is larger than the {rows} rows of this split (shard "
                        f"{shard_index} of {shard_count}); use more data, a smaller --batch-size or --seq-len")
    dataset = grain.MapDataset.range(len(split))[shard_index::shard_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=True)
    dataset = dataset.map(lambda index: {array: np.asarray(getattr(split, array)[index]) for array in ARRAYS})
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
