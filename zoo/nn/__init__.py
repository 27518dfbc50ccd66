"""Core modules every layer plugin builds on (layer 3 of docs/architecture): the cell contract, layer parts, blocks.

========================  ==================================================================================
module                    what a plugin author imports from it
========================  ==================================================================================
``zoo.nn.cell``           the cell contract (its docstring), ``run_cell``, ``mask_padding``, ``CellError``,
                          ``CHECK_CELL_SHAPES``; for cell authors ``States``, ``initial_states``, ``log_forget_matrix``
``zoo.nn.layers``         the layer preamble ``preamble(cfg, x) -> LayerPreamble`` (``.dense``,
                          ``.project_down``), ``LinearHeadwiseExpand``, ``CausalConv1d``, ``GateProjection``,
                          ``is_integer``
``zoo.nn.factories``      ``initializer``, ``partitioned`` (logical axis names), ``gate_bias_init``,
                          ``linspace_init``, ``make_norm``, ``Initializer``
``zoo.nn.blocks``         the residual block and its feed-forward sub-layer
========================  ==================================================================================

These modules import only from the layers below them (``zoo.registry``, ``zoo.config``,
``zoo.errors``), never from ``zoo.plugins``, the model, the API or the runtime services. The old
paths ``zoo.parts``, ``zoo.plugins.layers.components`` and ``zoo.plugins.cells.common`` re-export
their names for plugins written against them.
"""
