"""``TrainConfig``: what ``zoo.train.train`` and ``zoo train`` do, apart from the model (its own pydantic model,
not a field of ``ModelConfig``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from zoo.config import ZooModel
from zoo.config_source import ConfigSourceError

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


class TrainConfig(ZooModel):
    """A training run's settings (strict types, unknown keys refused; see ``from_file`` and ``with_overrides``)."""

    steps: Positive = 1000
    """Optimizer updates in the whole run."""
    seed: NonNegative = 0
    """Seed of the init, the data order, the held-out split and dropout."""
    batch_size: Positive = 8
    """Rows (sequences) per optimizer update, summed over the ``grad_accum`` micro-batches."""
    seq_len: Positive = 256
    """Tokens per row the model reads (rows hold ``seq_len + 1`` tokens: inputs and shifted targets)."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine``: linear warmup from 0, then cosine decay to ``min_lr_ratio · lr`` at ``steps``; ``constant``:
    linear warmup, then ``lr``."""
    warmup_steps: NonNegative = 100
    """Updates of linear warmup from 0 to ``lr``."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """AdamW weight decay (matrices only; see ``zoo.train.decay_mask``)."""
    clip_norm: Annotated[float, Field(gt=0)] | None = 1.0
    """Global gradient-norm clipping (None: none)."""
    grad_accum: Positive = 1
    """Micro-batches per update (must divide ``batch_size``)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (the model config's ``dtype``; params and optimizer state stay float32). ``auto``:
    bfloat16 on platforms with native bfloat16 (GPU, TPU), float32 on CPU; any other value is used as given."""
    eval_every: Positive = 100
    """Updates between held-out evaluations (one also runs at the end)."""
    eval_batches: Positive = 8
    """Held-out batches per evaluation."""
    save_every: Positive = 100
    """Updates between checkpoints (one is also saved at the end, on Ctrl-C and at ``max_time``)."""
    keep: Positive = 3
    """Checkpoints kept: the last ``keep`` and the best (lowest ``eval_loss``)."""
    log_every: Positive = 1
    """Updates between metrics lines (the last update is always logged)."""
    max_time: Annotated[float, Field(gt=0)] | None = None
    """Seconds of training after which the run stops (after the update that passes it, saving); None: none."""
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Fraction of the documents held out for evaluation."""
    vocab_size: Annotated[int, Field(ge=258)] | None = None
    """Train a byte-level BPE of exactly this many tokens on the data and set the model's ``vocab_size`` to it."""
    data: list[str] = []
    """Text files, folders of them, or JSONL files with a ``text`` field."""
    tokenizer: str | None = None
    """A ``tokenizer.json`` to use (a checkpoint's own tokenizer is used otherwise)."""

    @field_validator("data", "tokenizer", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)):
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return value

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The config in the JSON file ``path``, with ``overrides`` (field -> value) applied. Raises
        ``ConfigSourceError`` for a file that cannot be read or is not a JSON object, ``pydantic.ValidationError``
        naming the field for invalid content."""
        try:
            data = json.loads(open(path, encoding="utf-8").read())
        except (OSError, ValueError) as exc:
            raise ConfigSourceError(f"{path}: not a readable JSON training config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigSourceError(f"{path}: expected a JSON object of training settings, got "
                                    f"{type(data).__name__}")
        return cls.model_validate({**data, **(overrides or {})})

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """This config with the given fields replaced (validated as strictly)."""
        return type(self).model_validate({**self.model_dump(), **overrides})
