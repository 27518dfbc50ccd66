"""The StableHLO text of a static-shape artifact compiles with IREE and runs without JAX or zoo, its weights passed
from the artifact's weights file in the order the manifest lists."""

from __future__ import annotations

import json

import numpy as np

import zoo
from helpers import EXPORT_TOKENS, assert_rel_close, export_config, perturbed, run_without
from zoo.export.stablehlo import export_stablehlo

RUNNER = """
import json
import numpy as np
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
with np.load(f"{artifact}/{manifest['weights_file']['file']}") as npz:  # float32 here: no bfloat16 view needed
    weights = [npz[p["name"]] for p in manifest["weights_file"]["params"]]
args = [*weights, np.load(tokens_file)]
if entry["mlir_platform_index_argument"]:
    args.insert(0, np.asarray(manifest["platforms"].index("cpu"), np.int32))
np.save(output, np.asarray(getattr(context.modules, module.name)["main"](*args)))
"""


def test_iree_runs_the_forward_mlir(tmp_path):
    cfg = export_config("mlstm")  # lowered for three platforms: main takes the platform index first
    params = perturbed(zoo.init_params(cfg), 4, 0.3)
    tokens = EXPORT_TOKENS["large"]
    artifact = export_stablehlo(cfg, params, tmp_path / "static", entries=["forward"], static=tokens.shape,
                                mlir=True)
    assert json.loads((artifact / "manifest.json").read_text())["static_dims"]["s"] == tokens.shape[1]
    np.save(tmp_path / "tokens.npy", tokens)
    run_without(("zoo", "jax", "jaxlib"), tmp_path, RUNNER, artifact, tmp_path / "tokens.npy", tmp_path / "out.npy")
    assert_rel_close(np.load(tmp_path / "out.npy"), np.asarray(zoo.forward(cfg, params, tokens)))
