"""The StableHLO text of a static-shape artifact compiles with IREE and runs without JAX or zoo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import zoo
from helpers import EXPORT_TOKENS, assert_rel_close, export_config, perturbed
from zoo.export.stablehlo import export_stablehlo

RUNNER = """
import json, sys
import numpy as np

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("zoo", "jax", "jaxlib"):
            raise ImportError(f"{name} must not be importable here")
sys.meta_path.insert(0, Block())

import iree.compiler
import iree.runtime

artifact, tokens_file, output = sys.argv[1:]
manifest = json.load(open(f"{artifact}/manifest.json"))
entry = manifest["entries"]["forward"]
vmfb = iree.compiler.compile_file(f"{artifact}/{entry['mlir']}", target_backends=["llvm-cpu"],
                                  extra_args=["--iree-llvmcpu-target-cpu=host"])
context = iree.runtime.SystemContext(config=iree.runtime.Config("local-task"))
module = iree.runtime.VmModule.copy_buffer(context.instance, vmfb)
context.add_vm_module(module)
args = [np.load(tokens_file)]
if entry["mlir_platform_index_argument"]:
    args.insert(0, np.asarray(manifest["platforms"].index("cpu"), np.int32))
np.save(output, np.asarray(getattr(context.modules, module.name)["main"](*args)))
assert not {"jax", "zoo"} & set(sys.modules)
"""


@pytest.mark.parametrize("layer_type,platforms", [("mlstm", ["cpu", "cuda", "tpu"]), ("mlstm_v1", ["cpu"])])
def test_iree_runs_the_forward_mlir(tmp_path, layer_type, platforms):
    cfg = export_config(layer_type)
    params = perturbed(zoo.init_params(cfg), 4, 0.3)
    tokens = EXPORT_TOKENS["large"]
    artifact = export_stablehlo(cfg, params, tmp_path / "static", entries=["forward"], platforms=platforms,
                                static=tokens.shape)
    assert json.loads((artifact / "manifest.json").read_text())["static_dims"]["s"] == tokens.shape[1]
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "runner.py").write_text(textwrap.dedent(RUNNER))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(artifact), str(tmp_path / "tokens.npy"),
                           str(tmp_path / "out.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert_rel_close(np.load(tmp_path / "out.npy"), np.asarray(zoo.forward(cfg, params, tokens)))
