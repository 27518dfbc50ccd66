"""zoo-pallas-mlstm: the chunkwise mLSTM forward as a Pallas kernel, registered with xlstm-zoo as the
``pallas_chunkwise`` cell backend (entry point ``pallas-mlstm`` in the ``zoo`` group)."""

from __future__ import annotations

__version__ = "0.1.0"

from zoo_pallas_mlstm.kernel import pallas_chunkwise  # noqa: E402

__all__ = ["__version__", "pallas_chunkwise"]
