"""Moved to the core: :mod:`zoo.nn.layers` (layer parts) and :mod:`zoo.nn.cell` (``run_cell``, ``CellError``).

Re-exported here for plugins written against the old path. ``CHECK_CELL_SHAPES`` is a copy taken at
import: to switch the shape check off at run time, set ``zoo.nn.cell.CHECK_CELL_SHAPES``.
"""

from zoo.nn.cell import CHECK_CELL_SHAPES, CellError, run_cell
from zoo.nn.layers import CausalConv1d, GateProjection, LinearHeadwiseExpand, is_integer

__all__ = ["CHECK_CELL_SHAPES", "CausalConv1d", "CellError", "GateProjection", "LinearHeadwiseExpand", "is_integer",
           "run_cell"]
