"""pytest fixtures of the plugin test kit; enable with ``pytest_plugins = ["zoo.testing.fixtures"]``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zoo.registry import PluginRegistry
from zoo.testing import isolated_registry


@pytest.fixture
def zoo_registry() -> Iterator[Callable[..., PluginRegistry]]:
    """Call ``zoo_registry(*plugins)`` to make the built-ins plus ``plugins`` the registry for this test."""
    with contextlib.ExitStack() as stack:
        def activate(*plugins: Any) -> PluginRegistry:
            return stack.enter_context(isolated_registry(*plugins))

        yield activate


@pytest.fixture
def cell_parity_options() -> dict[str, Any]:
    """Small shapes for ``assert_cell_matches_reference`` (override the fixture to change them)."""
    return {"seq_lens": (1, 7, 64, 130), "batch": 2, "heads": 2, "dqk": 16, "dv": 24}
