"""The installed version of the zoo, read from the distribution's metadata (layer 0: imports nothing of the zoo)."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "xlstm-zoo"
"""The distribution name (``pyproject.toml``); the built-in plugins are registered under it."""

__version__ = importlib.metadata.version(DISTRIBUTION)
