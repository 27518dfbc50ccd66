"""Make configs/demo-tokenizer.json, the demo's tokenizer: a byte-level BPE of 1024 tokens, ``<|endoftext|>`` (id 0)
its end-of-text token, trained with Hugging Face ``tokenizers`` on the first ~400 KB of the Python standard library's
top-level modules (sorted by name; those of Python 3.11.7 for the committed file), which every install has offline.

    .venv/bin/python tools/make_demo_tokenizer.py [OUT]     # default: configs/demo-tokenizer.json
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 1024
TEXT_BYTES = 400_000


def training_text() -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size >= TEXT_BYTES:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1].encode())
    return texts


def main(out: str = "configs/demo-tokenizer.json") -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    tokenizer.save(out)
    print(f"wrote {out}: {tokenizer.get_vocab_size(with_added_tokens=True)} tokens")


if __name__ == "__main__":
    main(*sys.argv[1:])
