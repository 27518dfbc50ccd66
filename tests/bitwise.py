"""The oracle of "loaded exactly what was saved": the same tree, and every leaf the same dtype, shape and bytes."""

import jax
import numpy as np


def assert_bitwise_equal(actual, expected, note: str = "") -> None:
    """Raise ``AssertionError`` (prefixed by ``note``) unless the pytrees match structure, dtypes, shapes and bytes."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected), note
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected)):
        where = f"{note} {jax.tree_util.keystr(path)}".strip()
        assert (x.dtype, x.shape) == (y.dtype, y.shape), (where, x.dtype, x.shape, y.dtype, y.shape)
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=where)
