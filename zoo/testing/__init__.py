"""A test kit for plugin authors: the cell parity matrix and isolated registries.

In a plugin's tests::

    from zoo.testing import assert_cell_matches_reference, isolated_registry

    def test_my_kernel_matches():
        with isolated_registry("my-plugin-dist"):        # built-ins plus only this plugin
            assert_cell_matches_reference("my_kernel")

or, with pytest, ``pytest_plugins = ["zoo.testing.fixtures"]`` in ``conftest.py`` for the
``zoo_registry`` and ``cell_parity_options`` fixtures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from zoo.registry import PluginRegistry, use_registry
from zoo.testing.parity import (
    REFERENCE,
    STATE_REFERENCE,
    TOLERANCES,
    ParityResult,
    assert_cell_matches_reference,
    cell_parity,
    random_cell_inputs,
    random_states,
    references,
    relative_error,
)

__all__ = [
    "REFERENCE", "STATE_REFERENCE", "TOLERANCES", "ParityResult", "assert_cell_matches_reference", "cell_parity",
    "isolated_registry", "random_cell_inputs", "random_states", "references", "relative_error",
]


@contextlib.contextmanager
def isolated_registry(*plugins: Any) -> Iterator[PluginRegistry]:
    """A registry of the built-ins plus only ``plugins``, active process-wide inside the block.

    Each plugin is an object or module with hook implementations, or the name of an installed
    distribution, of one of its entry points (``dist:entry``) or of an entry point (loaded through
    the ``zoo`` entry-point group; a name that entry points of several distributions share is
    refused). A plugin that fails to load raises ``AssertionError`` with its error, so a test never
    runs against a partial registry.
    """
    registry = PluginRegistry(autoload=False)
    names = [p for p in plugins if isinstance(p, str)]
    if names:
        registry.load_entry_points(names)
    added = [registry.add_plugin(plugin, getattr(plugin, "__name__", type(plugin).__name__))
             for plugin in plugins if not isinstance(plugin, str)]
    # add_plugin returns, without recording, the refusal of a plugin whose key is taken
    failed = registry.failures() + [i for i in added if not i.ok and registry.plugins.get(i.key) is not i]
    if failed:
        raise AssertionError("plugins failed to load: " + "; ".join(f"{p.origin}: {p.error}" for p in failed))
    with use_registry(registry):
        yield registry
