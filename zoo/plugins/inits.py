"""Built-in init functions (small, wang, wang2, zeros) and distributions (normal, truncated_normal, uniform).

An init function maps ``(dim, num_blocks, distribution)`` to a JAX initializer; a distribution
maps a standard deviation to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from zoo.registry import hookimpl

Initializer = Callable[..., jax.Array]
Distribution = Callable[[float], Initializer]


def normal(std: float) -> Initializer:
    """N(0, std²)."""
    return jax.nn.initializers.normal(std)


def truncated_normal(std: float) -> Initializer:
    """A standard normal truncated to [-2, 2], times ``std`` (not rescaled: realized std ≈ 0.88·std)."""
    return jax.nn.initializers.truncated_normal(std)


def uniform(std: float) -> Initializer:
    """U(-√3·std, √3·std), whose std is ``std``."""
    bound = math.sqrt(3.0) * std

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def small(dim: int, num_blocks: int, distribution: Distribution) -> Initializer:
    """Nguyen & Salazar "small" init: std √(2 / (5·dim))."""
    return distribution(math.sqrt(2.0 / (5.0 * dim)))


def wang(dim: int, num_blocks: int, distribution: Distribution) -> Initializer:
    """Wang init for output projections: std 2 / (num_blocks·√dim)."""
    return distribution(2.0 / (num_blocks * math.sqrt(dim)))


def wang2(dim: int, num_blocks: int, distribution: Distribution) -> Initializer:
    """Wang init with twice the blocks: std 1 / (num_blocks·√dim)."""
    return wang(dim, 2 * num_blocks, distribution)


def zeros(dim: int, num_blocks: int, distribution: Distribution) -> Initializer:
    """All zeros, whatever the distribution."""
    return jax.nn.initializers.zeros


@hookimpl
def register_inits(register):
    register("small", small, description="std sqrt(2/(5*dim))")
    register("wang", wang, description="std 2/(num_blocks*sqrt(dim))")
    register("wang2", wang2, description="wang with 2*num_blocks")
    register("zeros", zeros, description="all zeros")


@hookimpl
def register_distributions(register):
    register("normal", normal, description="N(0, std^2)")
    register("truncated_normal", truncated_normal, description="std * N(0,1) truncated to [-2, 2]")
    register("uniform", uniform, description="U(-sqrt(3)*std, sqrt(3)*std)")
