"""``int8_matmul``: float activations times int8 weights with per-output-channel or group-wise scales.

``y = (x @ q.astype(float32)) * scale`` with per-output-channel scales ``(N,)``; with group-wise scales ``(K/G, N)``
(one row of scales per ``G`` consecutive rows of ``q``), ``y = sum_g (x[..., group g] @ q[group g]) * scale[g]``:
each group's partial sums in float32, then scaled. On CPU, for decode-sized inputs, a native kernel reads the int8
weights once and widens them in registers (``int8_matmul.cc``, through ``jax.ffi``): XLA's CPU backend does not fuse
the int8→float convert into a matrix-vector product, so the pure-JAX formulation writes and reads a float32 copy of
the weights on every call (and in a step of many matmuls runs all the converts first, holding every copy at once):
slower than a float32 matmul wherever the weights do not fit in cache. Everywhere else the pure-JAX formulation runs
(GPU and TPU, where XLA's own int8 path serves).

Which path runs is decided when the enclosing function is lowered, by a primitive with one lowering per
platform:

* any platform but CPU: the pure-JAX path;
* CPU: the native kernel when it is available (``native_available()``), switched on (``set_native``, or
  ``ZOO_INT8_KERNEL=0`` in the environment to switch it off) and the call has at most ``MAX_NATIVE_ROWS`` rows
  ``M = prod(x.shape[:-1])``; else the pure-JAX path;
* inside ``jax.export`` (StableHLO artifacts, and SavedModel through ``jax2tf``, which exports with it) for any
  platform, the pure-JAX path, read from JAX's own ``for_export`` lowering parameter: an artifact never holds
  a call into this process's library;
* a ``jit`` partitioned over several devices, the pure-JAX path (XLA would gather the weights onto every device
  before a library call); inside ``shard_map`` each device's call runs the kernel on its shards.

The kernel's instruction set is chosen when the library loads (AVX-512, else AVX2+FMA, else portable C++);
``ZOO_INT8_ISA=1`` (or ``0``) in the environment caps it, to measure or test the other paths.

The decision is part of the compiled function: after ``set_native`` changes it, functions compiled before keep
their path until ``jax.clear_caches()``.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from zoo.errors import ZooError

TARGET = "zoo_int8_matmul"
MAX_NATIVE_ROWS = 32
"""Calls with more rows than this run the pure-JAX path: there the convert is amortised over many rows and
XLA's matmul beats a kernel written for matrix-vector products (measured by ``benchmarks/int8.py``)."""
THREADS = 0
"""Threads of the native kernel for more than one row: 0 = XLA's intra-op thread pool (one per core), 1 = the
calling thread. One row runs on the calling thread: one core already streams the weights at the memory's read
bandwidth, and a second thread only adds waiting on a core shared with other processes
(``benchmarks/int8.py`` measures both). From two rows on, the kernel is bound by its multiply-adds."""
ONE_ROW_THREADS = 1
"""Threads of the native kernel for one row (same meaning as ``THREADS``)."""


class KernelError(ZooError, ValueError):
    """Bad arguments to a kernel: names the argument and what was expected."""


class _State:
    lock = threading.Lock()
    loaded: bool | None = None  # None: not tried yet
    reason = ""
    path: str | None = None
    isa = -1
    enabled = os.environ.get("ZOO_INT8_KERNEL", "").strip().lower() not in {"0", "off", "false", "no"}


_ISA_NAMES = {0: "portable C++", 1: "AVX2+FMA", 2: "AVX-512"}


def _load() -> None:
    from zoo.kernels import build

    try:
        key = build.source_key()
        found = next((p for p in build.candidates() if p.is_file()), None)
        if found is None:
            found = build.build(build.cache_dir())
        lib = ctypes.CDLL(str(found))
        lib.zoo_int8_source_key.restype = ctypes.c_char_p
        if lib.zoo_int8_source_key().decode() != key:
            raise RuntimeError(f"{found} was built from another source (key {lib.zoo_int8_source_key().decode()})")
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ZooInt8Matmul), platform="cpu")
        _State.isa = int(lib.zoo_int8_isa())
        _State.path, _State.loaded, _State.reason = str(found), True, ""
    except (OSError, RuntimeError, AttributeError) as e:
        _State.loaded, _State.reason = False, str(e).splitlines()[0] if str(e) else type(e).__name__


def _library_loaded() -> bool:
    with _State.lock:
        if _State.loaded is None:
            _load()
    return bool(_State.loaded)


def native_available() -> bool:
    """Whether the native CPU kernel is loaded and switched on; loads it (building it first if need be) once.

    When False, ``native_reason()`` says why in one line.
    """
    return _State.enabled and _library_loaded()


def native_reason() -> str:
    """One line: why the native kernel is not in use, or which library and instruction set are."""
    if not _State.enabled:
        return "switched off (set_native(False) or ZOO_INT8_KERNEL=0)"
    if not native_available():
        return f"native int8 kernel unavailable: {_State.reason}"
    return f"native int8 kernel {_State.path} ({_ISA_NAMES.get(_State.isa, _State.isa)})"


def set_native(enabled: bool) -> bool:
    """Switch the native kernel on or off for functions lowered from now on; returns the previous setting."""
    previous, _State.enabled = _State.enabled, bool(enabled)
    return previous


def pure_int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """The pure-JAX path: ``(x @ q) * scale`` with the int8 weights converted to ``x.dtype`` (exact: |q| ≤ 128)
    and the products accumulated in float32. Group-wise scales ``(K/G, N)``: the weights are dequantised to
    float32 (``q · scale`` per group) and multiplied in float32 (no ``(K/G, M, N)`` partial sums are held).
    Shapes and dtypes as ``int8_matmul``."""
    if scale.ndim == 2:
        K, N = q.shape
        groups = scale.shape[0]
        w = (q.astype(jnp.float32).reshape(groups, K // groups, N) * scale.astype(jnp.float32)[:, None, :])
        acc = lax.dot_general(x.astype(jnp.float32), w.reshape(K, N), (((x.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
        return acc.astype(x.dtype)
    acc = lax.dot_general(x, q.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
    return (acc * scale.astype(jnp.float32)).astype(x.dtype)


def native_int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, threads: int | None = None) -> jax.Array:
    """The native kernel's FFI call, whatever the platform and shape (CPU only; ``native_available()`` first).

    ``x`` (..., K) float32 or bfloat16 (computed in float32), ``q`` (K, N) int8, ``scale`` (N,) or (K/G, N) ->
    (..., N) in ``x.dtype``. ``threads``: as ``THREADS``; None = ``ONE_ROW_THREADS`` for one row, else
    ``THREADS``. ``int8_matmul`` is the entry to use; this one is for measurement and ignores ``set_native``.
    Raises ``KernelError`` when the library cannot be loaded.
    """
    if not _library_loaded():
        raise KernelError(f"native_int8_matmul: native int8 kernel unavailable: {_State.reason}")
    K, N = q.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if threads is None:
        threads = ONE_ROW_THREADS if rows == 1 else THREADS
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, N), jnp.float32))
    y = call(x.reshape(-1, K).astype(jnp.float32), q, scale.astype(jnp.float32), threads=np.int64(threads))
    return y.reshape(*lead, N).astype(x.dtype)


_int8_matmul_p = Primitive("zoo_int8_matmul")


@_int8_matmul_p.def_abstract_eval
def _abstract(x: Any, q: Any, scale: Any) -> jax.core.ShapedArray:
    return jax.core.ShapedArray((*x.shape[:-1], q.shape[1]), x.dtype)


# an eager call compiles the primitive alone, so it takes the same lowering as a jitted one
_int8_matmul_p.def_impl(jax.jit(lambda x, q, scale: _int8_matmul_p.bind(x, q, scale)))
mlir.register_lowering(_int8_matmul_p, mlir.lower_fun(pure_int8_matmul, multiple_results=False))


def use_native(rows: int, for_export: bool = False, partitioned: bool = False) -> bool:
    """Whether a CPU lowering of a call with ``rows`` rows runs the native kernel (see the module docstring)."""
    return not for_export and not partitioned and rows <= MAX_NATIVE_ROWS and native_available()


def _partitioned(axis_context: Any) -> bool:
    """Whether XLA's SPMD partitioner will split this computation over several devices: it cannot split a call
    into a library, so it would gather the weights onto every device; the pure-JAX path is partitioned instead.
    Inside ``shard_map`` over every mesh axis the call sees local shards, and the kernel serves."""
    devices = getattr(axis_context, "num_devices", None)
    if devices is not None:
        return devices > 1
    mesh = getattr(axis_context, "mesh", None)
    if mesh is not None:
        return mesh.size > 1 and not set(mesh.axis_names) <= set(getattr(axis_context, "manual_axes", ()))
    return False


def _cpu_lowering(ctx: Any, x: Any, q: Any, scale: Any) -> Any:
    x_aval = ctx.avals_in[0]
    static = all(isinstance(d, int) for d in x_aval.shape)
    rows = math.prod(x_aval.shape[:-1]) if static else MAX_NATIVE_ROWS + 1
    module = ctx.module_context
    native = use_native(rows, module.lowering_parameters.for_export, _partitioned(module.axis_context))
    return mlir.lower_fun(native_int8_matmul if native else pure_int8_matmul, multiple_results=False)(ctx, x, q, scale)


mlir.register_lowering(_int8_matmul_p, _cpu_lowering, platform="cpu")


def _batch(args: tuple[Any, ...], dims: tuple[Any, ...]) -> tuple[jax.Array, int]:
    x, q, scale = args
    dx, dq, ds = dims
    if dq is None and ds is None:
        return _int8_matmul_p.bind(jnp.moveaxis(x, dx, 0), q, scale), 0
    # weights mapped too (a vmap over stacked layers): one matmul per member, on the pure-JAX path
    return jax.vmap(pure_int8_matmul, in_axes=dims)(x, q, scale), 0


batching.primitive_batchers[_int8_matmul_p] = _batch


@jax.custom_jvp
def _int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    return _int8_matmul_p.bind(x, q, scale)


@_int8_matmul.defjvp
def _int8_matmul_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[jax.Array, jax.Array]:
    x, q, scale = primals
    dx, _, dscale = tangents
    y = _int8_matmul(x, q, scale)
    return y, pure_int8_matmul(dx, q, scale) + pure_int8_matmul(x, q, dscale.astype(jnp.float32))


_X_DTYPES = (jnp.float32, jnp.bfloat16)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """``(x @ q.astype(float32)) * scale`` up to float rounding, on the native CPU kernel where it serves.

    Args:
        x: (..., K) float32 or bfloat16 activations; any number of leading dims (M = their product rows).
        q: (K, N) int8 weights, row-major as a Flax ``Dense`` kernel is stored.
        scale: (N,) per-output-channel scales, or (K/G, N) group-wise ones: row ``g`` scales rows
            ``g·G .. g·G+G-1`` of ``q``, ``K`` a multiple of the number of groups (float32; other floats are cast).

    Returns:
        (..., N) in ``x.dtype``; the sums are accumulated in float32.

    Works under ``jit``, ``vmap`` (over ``x``; mapped weights run the pure-JAX path) and differentiation
    (with respect to ``x`` and ``scale``). Which path runs: see the module docstring.

    Raises:
        KernelError: a wrong rank, dtype or size, naming the argument.
    """
    if not hasattr(x, "shape") or x.ndim < 1 or x.dtype not in _X_DTYPES:
        raise KernelError(f"x: expected an array (..., K) of float32 or bfloat16, got "
                          f"{getattr(x, 'dtype', type(x).__name__)}{tuple(getattr(x, 'shape', ()))}")
    if not hasattr(q, "shape") or q.ndim != 2 or q.dtype != jnp.int8:
        raise KernelError(f"q: expected an int8 array (K, N), got "
                          f"{getattr(q, 'dtype', type(q).__name__)}{tuple(getattr(q, 'shape', ()))}")
    if x.shape[-1] != q.shape[0]:
        raise KernelError(f"q: expected {x.shape[-1]} rows (x's last dim K), got {q.shape[0]}")
    K, N = q.shape
    shape = tuple(getattr(scale, "shape", ()))
    grouped = len(shape) == 2 and shape[1] == N and shape[0] >= 1 and K % shape[0] == 0
    if shape != (N,) and not grouped or not jnp.issubdtype(getattr(scale, "dtype", object), jnp.floating):
        raise KernelError(f"scale: expected a float array ({N},) (q's columns N) or (groups, {N}) with {K} (q's "
                          f"rows K) a multiple of groups, got {getattr(scale, 'dtype', type(scale).__name__)}{shape}")
    return _int8_matmul(x, q, scale.astype(jnp.float32))
