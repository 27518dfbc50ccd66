"""Small helpers shared by the tests."""

import jax


def perturbed(params, seed: int, scale: float):
    """``params`` with seeded Gaussian noise of std ``scale`` added to every leaf (zero-init leaves hide bugs)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
