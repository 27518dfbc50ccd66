"""Optional GPU kernel benchmark (not part of ``all``; nothing in CI uses it): zoo ``chunkwise`` forward+backward
in bfloat16 at 65,536 tokens per step (B·S), the setup of the TFLA kernel benchmarks of NX-AI's mlstm_kernels
(github.com/NX-AI/mlstm_kernels), with its PyTorch kernels on the same GPU when that package is importable.

``python -m benchmarks.gpu OUT.json``. The zoo cell is loaded from its file with only JAX, because a GPU
image may lack the zoo's other dependencies (pydantic is stubbed when missing; the cell uses none of it).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ZOO = Path(__file__).resolve().parent.parent / "zoo"
CELLS = ZOO / "plugins" / "cells"
SHAPES = [(8, 8192), (1, 65536)]  # (B, S) with B·S = 65,536
NH, DQK, DV = 8, 256, 512


def _load_chunkwise():
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pydantic")
        stub.BaseModel, stub.ConfigDict, stub.Field = object, (lambda **kw: kw), (lambda *a, **kw: None)
        sys.modules["pydantic"] = stub
    for name in ("zoo", "zoo.nn", "zoo.plugins", "zoo.plugins.cells"):
        sys.modules.setdefault(name, types.ModuleType(name))
    stubs = {"zoo.registry": {"hookimpl": lambda f: f, "entry": None, "resolve": None},
             "zoo.config": {"CellConfig": object}, "zoo.errors": {"ZooError": type("ZooError", (Exception,), {})}}
    for name, attributes in stubs.items():
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attributes)
    for name, path in (("zoo.nn.cell", ZOO / "nn" / "cell.py"), ("zoo.plugins.cells.chunkwise", CELLS / "chunkwise.py")):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["zoo.plugins.cells.chunkwise"].chunkwise


def _time(fn, repeats: int = 5) -> list[float]:
    fn()
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def zoo_rows(chunkwise) -> list[dict[str, Any]]:
    rows = []
    for B, S in SHAPES:
        rng = np.random.default_rng(0)
        q, k = (jnp.asarray(rng.standard_normal((B, NH, S, DQK)), jnp.bfloat16) for _ in range(2))
        v = jnp.asarray(rng.standard_normal((B, NH, S, DV)), jnp.bfloat16)
        i = jnp.asarray(rng.standard_normal((B, NH, S)), jnp.float32)
        f = jnp.asarray(rng.standard_normal((B, NH, S)) + 3.0, jnp.float32)
        for L in (128, 256):
            loss = lambda *a, L=L: jnp.sum(chunkwise(*a, chunk_size=L).astype(jnp.float32))  # noqa: E731
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
            ts = _time(lambda: jax.block_until_ready(fb(q, k, v, i, f)))
            rows.append({"impl": "zoo chunkwise (JAX)", "B": B, "S": S, "chunk": L, "ms": statistics.median(ts) * 1e3})
            print(rows[-1], flush=True)
    return rows


def torch_rows() -> list[dict[str, Any]]:
    try:
        import torch
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError as e:
        print(f"mlstm_kernels not importable ({e}); torch rows skipped", flush=True)
        return []
    rows = []
    for B, S in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        leaves = [mk(B, NH, S, DQK).bfloat16(), mk(B, NH, S, DQK).bfloat16(), mk(B, NH, S, DV).bfloat16(),
                  mk(B, NH, S), mk(B, NH, S) + 3.0]
        leaves = [x.requires_grad_() for x in leaves]
        for name, L in (("chunkwise--triton_xl_chunk", 128), ("chunkwise--native_custbw", 256)):
            kernel = get_mlstm_kernel(name)

            def run():
                for x in leaves:
                    x.grad = None
                kernel(*leaves, chunk_size=L, autocast_kernel_dtype=torch.bfloat16).float().sum().backward()
                torch.cuda.synchronize()
            try:
                ts = _time(run)
            except Exception as e:  # a kernel that fails on this GPU/version is reported, not fatal
                rows.append({"impl": name, "B": B, "S": S, "chunk": L, "error": repr(e)[:300]})
            else:
                rows.append({"impl": name, "B": B, "S": S, "chunk": L, "ms": statistics.median(ts) * 1e3})
            print(rows[-1], flush=True)
    return rows


def main(out: str) -> None:
    """Run both and write ``out``."""
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "dtype": "bfloat16 q,k,v; float32 gates",
              "pass": "forward+backward", "NH": NH, "DQK": DQK, "DV": DV,
              "zoo": zoo_rows(_load_chunkwise()), "torch": torch_rows(),
              "published_tfla_h100_ms": {"triton_xl_chunk (S=65536)": 21.2, "native_custbw (S=65536)": 156.3,
                                         "native_autograd (S=65536)": 1179.3}}
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
