"""Moved to :mod:`zoo.nn.factories`; this module re-exports its names for plugins written against the old path."""

from zoo.nn.factories import Initializer, gate_bias_init, initializer, linspace_init, make_norm, partitioned

__all__ = ["Initializer", "gate_bias_init", "initializer", "linspace_init", "make_norm", "partitioned"]
