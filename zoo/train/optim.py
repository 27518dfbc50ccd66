"""The optimizer of a training run: AdamW with the decay mask, clipping and a learning-rate schedule."""

from __future__ import annotations

import optax

from zoo import compiled
from zoo.config import ModelConfig
from zoo.train.config import TrainConfig
from zoo.train.step import adamw


def schedule(train_config: TrainConfig) -> optax.Schedule:
    """The learning rate of update ``n + 1`` as a function of ``n`` (the updates done before it).

    Linear warmup from 0 over ``warmup_steps`` to ``lr``; then ``cosine``: decay to ``min_lr_ratio · lr`` at
    ``steps`` (``lr_min + (lr - lr_min) · (1 + cos(π · (n - warmup) / (steps - warmup))) / 2``), or ``constant``:
    ``lr``.
    """
    tc = train_config
    if tc.schedule == "constant":
        if tc.warmup_steps == 0:  # optax's warmup_constant_schedule stays at 0 with no warmup
            return optax.constant_schedule(tc.lr)
        return optax.warmup_constant_schedule(0.0, tc.lr, tc.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
                                              end_value=tc.min_lr_ratio * tc.lr)


OPTIMIZER_FIELDS = frozenset({"schedule", "lr", "warmup_steps", "steps", "min_lr_ratio", "weight_decay", "clip_norm"})


def optimizer(config: ModelConfig, train_config: TrainConfig) -> optax.GradientTransformation:
    """AdamW (``zoo.train.adamw``: the decay mask, ``clip_norm``) on ``schedule(train_config)``; one object per config
    and optimizer settings, so that runs with equal settings share their compiled update (``zoo.compiled``)."""
    return compiled.per_config(_make_optimizer, config, train_config.model_dump_json(include=OPTIMIZER_FIELDS))


def _make_optimizer(config: ModelConfig, settings: str) -> optax.GradientTransformation:
    tc = TrainConfig.model_validate_json(settings)
    return adamw(config, learning_rate=schedule(tc), weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
