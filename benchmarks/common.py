"""Timing, memory and machine helpers shared by the benchmark modules."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

GIB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"


class Compiles:
    """Counts XLA compilations in this process (JAX's own monitoring event)."""

    def __init__(self) -> None:
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = Compiles()


@contextlib.contextmanager
def no_compiles(where: str) -> Iterator[None]:
    """``RuntimeError`` when an XLA compile happens inside the block: a timed region must not count compile time."""
    before = COMPILES.count
    yield
    if COMPILES.count != before:
        raise RuntimeError(f"{COMPILES.count - before} XLA compiles happened inside {where}: the figures would count "
                           "compile time; warm every shape first")


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each ``fn()`` over ``repeats`` round-robin rounds, after ``warmup`` untimed calls each.

    Round-robin order means load from other processes on the machine hits every candidate alike, so
    ratios of medians from one call are comparable even on a noisy machine. Each ``fn`` must block
    until its result is ready.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    """The median, or nan for an empty list."""
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """(max - min) / median over the rounds: how noisy a figure is; nan for fewer than two rounds."""
    return (max(xs) - min(xs)) / median(xs) if len(xs) > 1 else float("nan")


def memory(compiled: Any) -> dict[str, int] | None:
    """XLA's planned memory of a compiled function: temp, arguments, outputs and peak (= their sum - aliases)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    temp, arg = int(ma.temp_size_in_bytes), int(ma.argument_size_in_bytes)
    out, alias = int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes)
    return {"temp_bytes": temp, "argument_bytes": arg, "output_bytes": out, "peak_bytes": temp + arg + out - alias}


def matmul_fn(n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A blocking float32 ``n x n`` jitted matmul and its FLOP count (``2 n³``), to measure the machine's rate."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return (lambda: mm(x).block_until_ready()), 2.0 * n**3


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "cpu_model": model,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "load_avg": list(os.getloadavg()),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = "each PyTorch candidate timed at 1 thread and at one per core; the faster counts"
    except ImportError:
        pass
    return info


def fmt_bytes(b: float | None) -> str:
    """``1.5 GiB``-style size."""
    if b is None:
        return "?"
    for unit, div in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


def _with_threads(fn: Callable[[], Any], threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return fn()


def torch_thread_variants(fns: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
    """Each PyTorch candidate twice, as ``"name @1t"`` and ``"name @Nt"`` (N = cores).

    On a loaded machine PyTorch's OpenMP threads can run several times slower with one thread per core
    than with one thread; both are timed in the same rounds and the faster counts (``best_of_threads``).
    """
    counts = sorted({1, os.cpu_count() or 1})
    return {f"{name} @{n}t": (lambda fn=fn, n=n: _with_threads(fn, n)) for name, fn in fns.items() for n in counts}


def best_of_threads(med: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """Medians with every ``"name @Nt"`` group collapsed to its fastest entry, and the variant chosen per name."""
    out: dict[str, float] = {}
    chosen: dict[str, str] = {}
    for key, t in med.items():
        name = key.rsplit(" @", 1)[0] if key.endswith("t") and " @" in key else key
        if name not in out or t < out[name]:
            out[name] = t
            if name != key:
                chosen[name] = key.rsplit(" @", 1)[1]
    return out, chosen
