"""Former home of the training step, kept for one release: use ``zoo.train`` (``zoo.train.step``)."""

from zoo.train.step import (  # noqa: F401
    TrainState, adamw, decay_mask, init_state, init_train_state, loss_fn, lower_step, state_shardings, train_step)
