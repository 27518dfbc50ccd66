"""Built-in plugins. Each module registers itself through the same hooks a third party uses."""

BUILTIN_MODULES = (
    "zoo.plugins.norms",
    "zoo.plugins.inits",
    "zoo.plugins.cells.parallel",
    "zoo.plugins.cells.chunkwise",
    "zoo.plugins.cells.recurrent",
    "zoo.plugins.layers.mlstm",
    "zoo.plugins.layers.mlstm_v1",
    "zoo.export.stablehlo",
    "zoo.export.savedmodel",
)
