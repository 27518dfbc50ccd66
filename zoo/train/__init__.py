"""Training a zoo model on text.

Modules: ``data`` (documents, tokenizer training, packing, Grain batches), ``loop`` (``train``, the loop of
``zoo train``), ``step`` (one update), ``optim`` (the optimizer and schedules), ``config`` (``TrainConfig``) and
``metrics`` (metrics.jsonl, TensorBoard, the loss plot).
"""

from zoo.train.config import TrainConfig
from zoo.train.loop import TrainError, TrainResult, compute_dtype, train
from zoo.train.optim import optimizer, schedule
from zoo.train.step import (
    TrainState, adamw, decay_mask, eval_losses, init_train_state, loss_fn, lower_step, state_shardings, train_step,
    update)

__all__ = ["TrainConfig", "TrainError", "TrainResult", "TrainState", "adamw", "compute_dtype", "decay_mask",
           "eval_losses", "init_train_state", "loss_fn", "lower_step", "optimizer", "schedule", "state_shardings",
           "train", "train_step", "update"]
