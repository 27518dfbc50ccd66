"""How a ``ParallelConfig`` maps the model onto a device mesh: data, FSDP and tensor parallelism.

Layers annotate their parameters with logical axis names (``nn.with_logical_partitioning``):

==============  =====================================================  ==========
logical name    what the axis holds                                      mesh axis
==============  =====================================================  ==========
``batch``       sequences of a batch (activations only)                  dp × fsdp
``vocab``       vocabulary rows of the embedding / columns of the head   tp
``heads``       mLSTM heads                                              tp
``inner``       the layer's up-projected features, split head by head    tp
``mlp``         the FFN's hidden features                                tp
``proj_blocks`` blocks of a block-diagonal (headwise) projection         tp
``embed``       the residual stream's features                           —
==============  =====================================================  ==========

Tensor parallelism follows from those names, Megatron-style: up-projections split their output
columns over ``tp`` (column-parallel), down-projections their input rows (row-parallel), so each
sub-layer needs one reduction. FSDP is added on top: in the modules listed in ``fsdp_modules``,
every parameter with more than ``fsdp_min_weight_size`` elements is split over ``fsdp`` along its
largest axis that the fsdp size divides and that is not already split. XLA (GSPMD/Shardy) inserts
the collectives; there is no hand-written communication.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import compiled
from zoo.config import ModelConfig, ParallelConfig
from zoo.errors import ZooError
from zoo.model import boxed_param_shapes, param_shapes

AXES = ("data", "fsdp", "pipeline", "model")  # ParallelConfig's <axis>_axis_size / <axis>_axis_name
TP_LOGICAL = ("vocab", "heads", "inner", "mlp", "proj_blocks")


class ShardingError(ZooError, ValueError):
    """A parallel layout that does not fit the devices, the batch or the model."""


def axis_names(parallel: ParallelConfig) -> tuple[str, ...]:
    """The mesh axis names, in mesh order (dp, fsdp, pp, tp by default)."""
    return tuple(getattr(parallel, f"{axis}_axis_name") for axis in AXES)


def axis_sizes(parallel: ParallelConfig, num_devices: int) -> tuple[int, ...]:
    """The mesh shape for ``num_devices`` devices, with ``data_axis_size=-1`` inferred."""
    fixed = parallel.product_of_fixed_sizes
    data = parallel.data_axis_size
    if data == -1:
        if num_devices % fixed:
            raise ShardingError(f"parallel: fsdp × model sizes = {fixed} must divide the {num_devices} "
                                f"device(s) to infer data_axis_size=-1")
        data = num_devices // fixed
    if data * fixed != num_devices:
        raise ShardingError(f"parallel: data × fsdp × model sizes = {data * fixed} but {num_devices} "
                            f"device(s) are available; set the sizes so that their product is {num_devices} "
                            f"(data_axis_size=-1 infers it)")
    return data, parallel.fsdp_axis_size, parallel.pipeline_axis_size, parallel.model_axis_size


def make_mesh(config: ModelConfig, devices: list[jax.Device] | None = None) -> Mesh | None:
    """The device mesh of ``config.parallel`` over ``devices`` (default: all), or None on one device."""
    if config.parallel is None:
        return None
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(config.parallel, len(devices))
    if len(devices) == 1:
        return None
    from jax.experimental import mesh_utils

    return Mesh(mesh_utils.create_device_mesh(sizes, devices), axis_names(config.parallel))


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in ``Auto`` mode (``jax.make_mesh`` makes ``Explicit`` axes), so XLA propagates."""
    return Mesh(mesh.devices, mesh.axis_names)


def with_mesh(config: ModelConfig, mesh: Mesh, updates: dict[str, Any] | None = None) -> ModelConfig:
    """``config`` with its parallel section updated by ``updates`` and sized to ``mesh`` (names must match)."""
    fields = (config.parallel or ParallelConfig()).model_dump(mode="json") | (updates or {})
    names = axis_names(ParallelConfig.model_validate(fields))
    if set(mesh.axis_names) - set(names):
        raise ShardingError(f"mesh axes {mesh.axis_names} are not the parallel axis names {names}")
    fields |= {f"{axis}_axis_size": mesh.shape.get(name, 1) for axis, name in zip(AXES, names)}
    return config.with_parallel(ParallelConfig.model_validate(fields))


@contextlib.contextmanager
def logical_context(config: ModelConfig, mesh: Mesh | None) -> Iterator[None]:
    """Map the model's logical axis names onto ``mesh`` while tracing (a no-op without a mesh).

    Entered inside a jitted function around ``model.apply``: it installs ``mesh`` as the abstract mesh and
    ``logical_rules``, so the model's ``nn.with_logical_constraint`` calls become sharding constraints.
    """
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(
            logical_rules(config.parallel or ParallelConfig())):
        yield


def logical_rules(parallel: ParallelConfig) -> tuple[tuple[str, Any], ...]:
    """Logical axis name -> mesh axis (or axes), for parameters and activations."""
    tp = parallel.model_axis_name
    return (("batch", (parallel.data_axis_name, parallel.fsdp_axis_name)), *((name, tp) for name in TP_LOGICAL))


# The reference's module names, as patterns of the parameter paths they own.
_BLOCK = r"blocks(_\d+)?"
MODULE_PATHS = {
    "Embed": r"token_embedding/",
    "LMHead": r"(out_norm|lm_head)/",
    "BlockStack": _BLOCK + "/",
    "mLSTMBlock": _BLOCK + "/",
    "xLSTMResBlock": _BLOCK + r"/xlstm(_norm|_post_norm)?/",
    "FFNResBlock": _BLOCK + r"/ffn(_norm|_post_norm)?/",
    "mLSTMInnerLayer": _BLOCK + r"/xlstm/(?!proj_up|proj_down)",
    "mLSTMCell": _BLOCK + r"/xlstm/(mlstm_cell|igate|fgate|outnorm)/",
}


def _in_modules(path: str, modules: list[str]) -> bool:
    return any(re.match(MODULE_PATHS[m], path) for m in modules)


@dataclass(frozen=True)
class Placement:
    """Where one parameter lives: its mesh partition spec and why it was laid out so."""

    spec: PartitionSpec
    note: str = ""


def _sizes_by_name(parallel: ParallelConfig, sizes: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(axis_names(parallel), sizes))


def place(config: ModelConfig, sizes: tuple[int, ...], logical: Any, shapes: Any) -> Any:
    """A ``Placement`` per parameter, from its logical spec and shape, for a mesh of ``sizes``."""
    parallel = config.parallel or ParallelConfig()
    size_of = _sizes_by_name(parallel, sizes)
    rules = dict(logical_rules(parallel))
    fsdp = parallel.fsdp_axis_name

    def one(path: tuple, spec: PartitionSpec, shape: jax.ShapeDtypeStruct) -> Placement:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        axes: list[Any] = []
        notes = []
        names = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
        for dim, name in zip(shape.shape, names):
            mesh_axis = rules.get(name) if isinstance(name, str) else None
            if mesh_axis is not None and size_of.get(mesh_axis, 1) > 1 and dim % size_of[mesh_axis]:
                notes.append(f"{name} ({dim}) not divisible by {mesh_axis}={size_of[mesh_axis]}: replicated")
                mesh_axis = None
            axes.append(mesh_axis if mesh_axis is not None and size_of.get(mesh_axis, 1) > 1 else None)
        n = size_of[fsdp]
        if n > 1 and _in_modules(key, parallel.fsdp_modules) and math.prod(shape.shape) > parallel.fsdp_min_weight_size:
            free = [d for d, a in enumerate(axes) if a is None and names[d] != "layers" and shape.shape[d] % n == 0]
            if free:
                axes[max(free, key=lambda d: shape.shape[d])] = fsdp
            else:
                notes.append(f"no free axis divisible by {fsdp}={n}: not FSDP-sharded")
        return Placement(PartitionSpec(*axes), "; ".join(notes))

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_specs(boxed: Any) -> Any:
    """The logical ``PartitionSpec`` of every parameter in a boxed (``nn.Partitioned``) tree."""
    return nn.get_partition_spec(boxed)


def param_placements(config: ModelConfig, sizes: tuple[int, ...]) -> Any:
    """``Placement`` of every parameter of ``config`` for a mesh of ``sizes``; computed abstractly."""
    return compiled.per_config(_placements, config, tuple(sizes))


def _placements(config: ModelConfig, sizes: tuple[int, ...]) -> Any:
    boxed = boxed_param_shapes(config)
    return place(config, sizes, logical_specs(boxed), nn.unbox(boxed))


def _is_placement(x: Any) -> bool:
    return isinstance(x, Placement)


def mesh_sizes(config: ModelConfig, mesh: Mesh) -> tuple[int, ...]:
    """The (dp, fsdp, pp, tp) sizes of ``mesh``, in ``config.parallel``'s axis names."""
    return tuple(mesh.shape.get(name, 1) for name in axis_names(config.parallel or ParallelConfig()))


def param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
    """A ``NamedSharding`` per parameter of ``config`` on ``mesh``."""
    return jax.tree_util.tree_map(lambda p: NamedSharding(mesh, p.spec),
                                  param_placements(config, mesh_sizes(config, mesh)), is_leaf=_is_placement)


def cast_for_gather(config: ModelConfig, mesh: Mesh | None, params: Any) -> Any:
    """Round the FSDP-sharded parameters to ``fsdp_gather_dtype`` (if set), on each device's shard.

    Called inside ``jit`` before the model. The rounded shards are pinned to their layout, so XLA
    gathers them in that dtype where a layer needs them.
    """
    parallel = config.parallel
    if mesh is None or parallel is None or parallel.fsdp_gather_dtype is None:
        return params
    dtype = jnp.dtype(parallel.fsdp_gather_dtype)

    def cast(placement: Placement, x: jax.Array) -> jax.Array:
        if parallel.fsdp_axis_name not in _mesh_axes(placement.spec) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x  # the int8 values of a quantised weight travel as they are
        return jax.lax.with_sharding_constraint(x.astype(dtype), NamedSharding(mesh, placement.spec))

    return jax.tree_util.tree_map(cast, param_placements(config, mesh_sizes(config, mesh)), params,
                                  is_leaf=_is_placement)


def _mesh_axes(spec: PartitionSpec) -> set[str]:
    return {name for axis in spec if axis is not None for name in ((axis,) if isinstance(axis, str) else axis)}


def batch_spec(config: ModelConfig) -> PartitionSpec:
    """Sequences are split over dp × fsdp; the length axis is whole."""
    parallel = config.parallel or ParallelConfig()
    return PartitionSpec((parallel.data_axis_name, parallel.fsdp_axis_name))


def check_batch(config: ModelConfig, mesh: Mesh, batch_size: int) -> None:
    """Refuse a batch that does not split evenly over dp × fsdp."""
    parallel = config.parallel or ParallelConfig()
    ways = mesh.shape[parallel.data_axis_name] * mesh.shape[parallel.fsdp_axis_name]
    if batch_size % ways:
        raise ShardingError(f"batch size {batch_size} must be a multiple of dp × fsdp = {ways} on this mesh")


def place_batch(config: ModelConfig, params: Any, *arrays: jax.Array | None) -> tuple[Mesh | None, tuple]:
    """The mesh ``params`` live on, and ``arrays`` (batch first; None passes) split over dp × fsdp on it."""
    mesh = mesh_of(params)
    if mesh is None:
        return None, arrays
    check_batch(config, mesh, arrays[0].shape[0])
    batch = NamedSharding(mesh, batch_spec(config))
    return mesh, tuple(None if a is None else jax.device_put(a, batch) for a in arrays)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of ``tree`` are laid out on, or None when they live on one device."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def bytes_per_device(config: ModelConfig, sizes: tuple[int, ...]) -> int:
    """The largest parameter footprint of any device, in float32 bytes, for a mesh of ``sizes``."""
    parallel = config.parallel or ParallelConfig()
    size_of = _sizes_by_name(parallel, sizes)
    total = 0
    for shape, placement in zip(jax.tree_util.tree_leaves(param_shapes(config)),
                                jax.tree_util.tree_leaves(param_placements(config, sizes), is_leaf=_is_placement)):
        local = list(shape.shape)
        for d, axis in enumerate(placement.spec):
            for name in (axis,) if isinstance(axis, str) else (axis or ()):
                local[d] = -(-local[d] // size_of[name])
        total += math.prod(local) * np.dtype(shape.dtype).itemsize
    return total
