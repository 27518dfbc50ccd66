"""Exported artifacts and the code that reads them back.

* ``entries``: the entry points every exporter serves (``forward``, ``prefill``, ``step``), their abstract
  arguments, the manifest fields all formats share, and ``ExportError``.
* ``stablehlo``: the built-in ``stablehlo`` exporter (serialized ``jax.export`` entries, symbolic or static
  batch and sequence, weights in one shared file or baked in, optional ``.mlir`` text for IREE).
* ``savedmodel``: the built-in ``savedmodel`` exporter (TF SavedModel through jax2tf).
* ``runners``: ``open_artifact`` loads an Orbax checkpoint, a StableHLO or a SavedModel artifact behind one
  NumPy interface (what ``zoo run`` uses).

Checkpoints are not exports: they live in ``zoo.checkpoint`` (``zoo.export.checkpoint`` re-exports it for
one release).
"""
