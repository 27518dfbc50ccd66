"""``zoo.kernels.int8_matmul``: the native CPU kernel and the pure-JAX path against a float64 NumPy reference,
the choice of path (rows, switch, missing library, export), and the build step."""

import ctypes
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import kernels
from zoo.kernels import build
from zoo.kernels import int8 as int8_mod

NATIVE_EXPECTED = sys.platform == "linux" and platform.machine() in {"x86_64", "AMD64"} and build.compiler() is not None
needs_native = pytest.mark.skipif(not kernels.native_available(), reason=kernels.native_reason())


def _arrays(lead: tuple[int, ...], K: int, N: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    q = rng.integers(-128, 128, (K, N)).astype(np.int8)
    scale = (rng.random(N) * 0.02 + 1e-3).astype(np.float32)
    return x, q, scale


def _check(y, x, q, scale, extra_rtol: float = 0.0) -> None:
    """|y - ref| within float32 summation error: (K + 2) ulps of the sum of |terms| (γ_K bound), plus
    ``extra_rtol`` of |ref| for a rounded output dtype."""
    x64, q64 = np.asarray(x, np.float64), q.astype(np.float64)
    ref = (x64 @ q64) * scale
    bound = (q.shape[0] + 2) * 2.0**-23 * (np.abs(x64) @ np.abs(q64)) * scale + extra_rtol * np.abs(ref)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert y.shape == ref.shape
    assert np.all(err <= bound), f"max error {err.max():.3g}, worst excess {np.max(err - bound):.3g}"


def _calls_native(text: str) -> bool:
    return "custom_call @zoo_int8_matmul(" in text


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_native_kernel_is_built_here():
    """On Linux x86-64 with a C++ compiler (CI), the install step's library loads: the tests below ran it."""
    if not NATIVE_EXPECTED:
        pytest.skip("the native kernel is only required on Linux x86-64 with a C++ compiler")
    assert kernels.native_available(), kernels.native_reason()
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    if {"avx2", "fma"} <= set(flags):
        assert "AVX" in kernels.native_reason(), kernels.native_reason()


@needs_native
@pytest.mark.parametrize("lead,K,N", [((1,), 7, 5), ((3,), 33, 70), ((2, 3), 130, 129), ((4, 1, 2), 64, 200),
                                      ((5,), 1, 1), ((9,), 17, 1000), ((), 40, 48),
                                      ((5, 9), 20, 70)])
def test_native_matches_reference_and_pure_path(lead, K, N, monkeypatch):
    monkeypatch.setattr(int8_mod, "MAX_NATIVE_ROWS", 64)  # 45 rows: the kernel's blocks of 32 rows and a rest
    x, q, scale = _arrays(lead, K, N, seed=K + N)
    native = jax.jit(kernels.int8_matmul)(x, q, scale)
    assert _calls_native(_lowered(kernels.int8_matmul, x, q, scale))
    pure = jax.jit(kernels.pure_int8_matmul)(x, q, scale)
    _check(native, x, q, scale)
    _check(pure, x, q, scale)
    np.testing.assert_allclose(native, pure, rtol=1e-4, atol=1e-4 * np.abs(pure).max())


def _check_grouped(y, x, q, scale) -> None:
    """Group-wise scales (K/G, N): |y - ref| within float32 summation error of the scaled terms, against a
    float64 reference summing ``scale[g] * x[group g] @ q[group g]`` over the groups."""
    groups, N = scale.shape
    K = q.shape[0]
    x64 = np.asarray(x, np.float64)
    w64 = (q.astype(np.float64).reshape(groups, K // groups, N) * scale.astype(np.float64)[:, None, :]).reshape(K, N)
    ref = x64 @ w64
    bound = (K + 2 * groups + 2) * 2.0**-23 * (np.abs(x64) @ np.abs(w64))
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert y.shape == ref.shape
    assert np.all(err <= bound), f"max error {err.max():.3g}, worst excess {np.max(err - bound):.3g}"


@needs_native
@pytest.mark.parametrize("lead,K,N,groups", [((1,), 64, 200, 2), ((3,), 96, 70, 3), ((2, 3), 130, 129, 13),
                                             ((1,), 40, 1000, 8), ((37,), 128, 48, 4), ((1,), 7, 5, 7),
                                             ((2,), 64, 33, 1)])
def test_native_group_scales_match_reference_and_pure_path(lead, K, N, groups, monkeypatch):
    """Group sizes that are and are not multiples of the kernel's 8-row blocks (32, 10, 5, 1), one group, 37 rows
    (a block of 32 rows and a rest), and scales that differ a lot between groups of one column."""
    monkeypatch.setattr(int8_mod, "MAX_NATIVE_ROWS", 64)
    x, q, _ = _arrays(lead, K, N, seed=K + N + groups)
    scale = (np.random.default_rng(groups).random((groups, N)) * 0.02 + 1e-4).astype(np.float32)
    native = jax.jit(kernels.int8_matmul)(x, q, scale)
    assert _calls_native(_lowered(kernels.int8_matmul, x, q, scale))
    pure = jax.jit(kernels.pure_int8_matmul)(x, q, scale)
    _check_grouped(native, x, q, scale)
    _check_grouped(pure, x, q, scale)
    threaded = jax.jit(lambda a, b, c: kernels.native_int8_matmul(a, b, c, threads=2))(x, q, scale)
    _check_grouped(threaded, x, q, scale)


def test_group_scales_export_and_gradients():
    """The pure path (exports) with group-wise scales, and d/dscale against the float64 reference."""
    x, q, _ = _arrays((2,), 48, 10)
    scale = (np.random.default_rng(1).random((3, 10)) + 0.5).astype(np.float32)
    exp = jax.export.export(jax.jit(kernels.int8_matmul), platforms=("cpu",))(x, q, scale)
    assert not _calls_native(exp.mlir_module())
    _check_grouped(jax.export.deserialize(exp.serialize()).call(x, q, scale), x, q, scale)
    grad = jax.grad(lambda s: kernels.int8_matmul(x, q, s).sum())(scale)
    ref = np.einsum("mgk,gkn->gn", x.astype(np.float64).reshape(2, 3, 16), q.astype(np.float64).reshape(3, 16, 10))
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("threads", [0, 1, 2])
def test_native_thread_counts_agree(threads):
    """Chunks split between threads cover every column exactly once (N = 1000: a ragged last chunk)."""
    x, q, scale = _arrays((3,), 96, 1000, seed=threads)
    y = jax.jit(lambda a, b, c: kernels.native_int8_matmul(a, b, c, threads=threads))(x, q, scale)
    _check(y, x, q, scale)


ISA_SCRIPT = """
import sys, numpy as np, jax
from zoo import kernels
rng = np.random.default_rng(0)
for M, K, N in [(1, 7, 5), (3, 33, 70), (6, 130, 129), (37, 9, 300)]:
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(-128, 128, (K, N)).astype(np.int8)
    s = rng.random(N).astype(np.float32)
    y = np.asarray(jax.jit(kernels.int8_matmul)(x, q, s), np.float64)
    ref = (x.astype(np.float64) @ q) * s
    bound = (K + 2) * 2.0**-23 * (np.abs(x.astype(np.float64)) @ np.abs(q.astype(np.float64))) * s
    assert np.all(np.abs(y - ref) <= bound), (M, K, N, np.max(np.abs(y - ref) - bound))
for M, K, N, groups in [(1, 64, 200, 2), (3, 96, 70, 3), (6, 130, 129, 13), (37, 40, 300, 8)]:
    x = rng.standard_normal((M, K)).astype(np.float32)
    q = rng.integers(-128, 128, (K, N)).astype(np.int8)
    s = rng.random((groups, N)).astype(np.float32)
    y = np.asarray(jax.jit(kernels.int8_matmul)(x, q, s), np.float64)
    w = (q.astype(np.float64).reshape(groups, K // groups, N) * s[:, None, :]).reshape(K, N)
    ref = x.astype(np.float64) @ w
    bound = (K + 2 * groups + 2) * 2.0**-23 * (np.abs(x.astype(np.float64)) @ np.abs(w))
    assert np.all(np.abs(y - ref) <= bound), (M, K, N, groups, np.max(np.abs(y - ref) - bound))
print(kernels.native_reason())
"""


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("isa,name", [(0, "portable C++"), (1, "AVX2+FMA")])
def test_other_instruction_sets(isa, name):
    """The code paths this CPU does not pick by itself, forced by ``ZOO_INT8_ISA`` in a fresh process."""
    env = {**os.environ, "ZOO_INT8_ISA": str(isa)}
    out = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"({name})"), out.stdout


@needs_native
def test_bfloat16_activations():
    x, q, scale = _arrays((2,), 50, 37)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = jax.jit(kernels.int8_matmul)(xb, q, scale)
    assert y.dtype == jnp.bfloat16
    _check(np.asarray(y, np.float32), np.asarray(xb, np.float32), q, scale, extra_rtol=2.0**-8)
    _check(np.asarray(jax.jit(kernels.pure_int8_matmul)(xb, q, scale), np.float32), np.asarray(xb, np.float32),
           q, scale, extra_rtol=2.0**-7)


def test_eager_call_and_vmap():
    x, q, scale = _arrays((4, 3), 21, 19)
    _check(kernels.int8_matmul(x, q, scale), x, q, scale)
    _check(jax.vmap(kernels.int8_matmul, in_axes=(1, None, None), out_axes=1)(x, q, scale), x, q, scale)
    qs = np.stack([q, q[::-1]])
    y = jax.jit(jax.vmap(kernels.int8_matmul, in_axes=(0, 0, None)))(x[:2], qs, scale)
    _check(y[0], x[0], q, scale)
    _check(y[1], x[1], q[::-1], scale)


def test_gradients_with_respect_to_x_and_scale():
    x, q, scale = _arrays((2,), 9, 6)
    w = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    gx, gs = jax.grad(lambda a, s: jnp.sum(kernels.int8_matmul(a, q, s) * w), argnums=(0, 1))(x, scale)
    np.testing.assert_allclose(gx, (w * scale) @ q.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gs, np.sum(w * (x.astype(np.float64) @ q), axis=0), rtol=1e-5, atol=1e-4)


def test_more_rows_than_the_threshold_take_the_pure_path(monkeypatch):
    x, q, scale = _arrays((3,), 8, 8)
    monkeypatch.setattr(int8_mod, "MAX_NATIVE_ROWS", 2)
    assert not _calls_native(_lowered(kernels.int8_matmul, x, q, scale))
    _check(jax.jit(kernels.int8_matmul)(x, q, scale), x, q, scale)


def test_switched_off_takes_the_pure_path():
    x, q, scale = _arrays((2,), 11, 13)
    previous = kernels.set_native(False)
    try:
        assert not kernels.native_available()
        assert "switched off" in kernels.native_reason()
        assert not _calls_native(_lowered(kernels.int8_matmul, x, q, scale))
        _check(jax.jit(kernels.int8_matmul)(x, q, scale), x, q, scale)
    finally:
        kernels.set_native(previous)


def test_missing_library_falls_back_with_its_reason(monkeypatch, tmp_path):
    """No library anywhere and no compiler: the pure-JAX path, and the reason in one line."""
    monkeypatch.setattr(int8_mod._State, "loaded", None)
    monkeypatch.setattr(build, "candidates", lambda: [tmp_path / "absent.so"])
    monkeypatch.setattr(build, "compiler", lambda: None)
    assert not kernels.native_available()
    assert kernels.native_reason() == "native int8 kernel unavailable: no C++ compiler on PATH ($CXX, g++ or c++)"
    x, q, scale = _arrays((1,), 10, 12)
    assert not _calls_native(_lowered(kernels.int8_matmul, x, q, scale))
    _check(jax.jit(kernels.int8_matmul)(x, q, scale), x, q, scale)


@pytest.mark.parametrize("platforms", [("cpu",), ("cpu", "cuda")])
def test_export_uses_the_pure_path(platforms):
    """An exported artifact never calls this process's library, whatever platforms it is exported for."""
    x, q, scale = _arrays((1,), 24, 10)
    exp = jax.export.export(jax.jit(kernels.int8_matmul), platforms=platforms)(x, q, scale)
    assert not _calls_native(exp.mlir_module())
    _check(jax.export.deserialize(exp.serialize()).call(x, q, scale), x, q, scale)


SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from zoo import kernels
mesh = Mesh(np.array(jax.devices()), ("model",))
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 16)).astype(np.float32)
q = rng.integers(-128, 128, (16, 8)).astype(np.int8)
s = rng.random(8).astype(np.float32)
ref = (x.astype(np.float64) @ q) * s
qd = jax.device_put(q, NamedSharding(mesh, P(None, "model")))
sd = jax.device_put(s, NamedSharding(mesh, P("model")))
f = jax.jit(kernels.int8_matmul)
g = jax.jit(jax.shard_map(kernels.int8_matmul, mesh=mesh, in_specs=(P(), P(None, "model"), P("model")),
                          out_specs=P(None, "model")))
for fn in (f, g):
    np.testing.assert_allclose(fn(x, qd, sd), ref, rtol=1e-5, atol=1e-4)
    print("custom_call @zoo_int8_matmul(" in fn.lower(x, qd, sd).as_text())
"""


@needs_native
@pytest.mark.slow
def test_partitioned_jit_takes_the_pure_path_and_shard_map_the_kernel():
    """Weights split over 2 devices: a partitioned jit runs the pure-JAX path (XLA cannot split a library call),
    ``shard_map`` runs the kernel on each device's shard; both match the reference."""
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("args,field", [
    ((np.ones((2, 4), np.int32), np.ones((4, 3), np.int8), np.ones(3, np.float32)), "x:"),
    ((np.ones((2, 4), np.float32), np.ones((4, 3), np.float32), np.ones(3, np.float32)), "q:"),
    ((np.ones((2, 5), np.float32), np.ones((4, 3), np.int8), np.ones(3, np.float32)), "q: expected 5 rows"),
    ((np.ones((2, 4), np.float32), np.ones((4, 3), np.int8), np.ones(4, np.float32)), "scale:"),
    ((np.ones((2, 4), np.float32), np.ones((4, 3), np.int8), np.ones((3, 3), np.float32)), "scale:"),
    ((np.ones((2, 4), np.float32), np.ones((4, 3), np.int8), np.ones((2, 4), np.float32)), "scale:"),
])
def test_bad_arguments_are_refused_by_name(args, field):
    with pytest.raises(kernels.KernelError, match=f"^{field}") as info:
        kernels.int8_matmul(*args)
    assert isinstance(info.value, ValueError)


@pytest.mark.slow
@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler on PATH")
def test_build_step_writes_a_loadable_library(tmp_path):
    """``python -m zoo.kernels.build --out DIR`` compiles a library of the current key; stale ones are removed;
    the lazy build at first use writes one into the cache folder when the package has none."""
    (tmp_path / f"{build.STEM}-0000000000000000.so").write_bytes(b"stale")
    assert build.main(["--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.glob("*.so")] == [build.library_name()]
    lib = ctypes.CDLL(str(tmp_path / build.library_name()))
    lib.zoo_int8_source_key.restype = ctypes.c_char_p
    assert lib.zoo_int8_source_key().decode() == build.source_key()

    # in a fresh process: one process registers one library under the target name
    script = ("from pathlib import Path; from zoo.kernels import build, int8_matmul, native_available, native_reason; "
              f"build.HERE = Path({str(tmp_path / 'package')!r}); "
              "print(native_available(), native_reason())")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("True native int8 kernel " + str(tmp_path / "cache" / "xlstm-zoo" / "kernels")), out
