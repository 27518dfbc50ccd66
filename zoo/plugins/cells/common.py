"""Moved to :mod:`zoo.nn.cell`; the state helpers are re-exported here for plugins written against the old path."""

from zoo.nn.cell import States, initial_states, log_forget_matrix

__all__ = ["States", "initial_states", "log_forget_matrix"]
