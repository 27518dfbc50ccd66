"""SavedModel artifacts run in a process that can import neither zoo nor jax, and match the JAX model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import zoo
from helpers import EXPORT_TOKENS as TOKENS
from helpers import assert_rel_close, perturbed, run_without
from helpers import export_config as config
from zoo.export.entries import ExportError
from zoo.export.savedmodel import export_savedmodel

RUNNER = """
import json
import numpy as np
import tensorflow as tf
inputs, output, *artifacts = sys.argv[1:]
data = dict(np.load(inputs))
results = {}
io = {}
for i, artifact in enumerate(artifacts):
    model = tf.saved_model.load(artifact)
    results[f"{i}_signatures"] = np.asarray(sorted(model.signatures))
    spec = lambda s: {"shape": [d if d is not None else "?" for d in s.shape.as_list()], "dtype": s.dtype.name}
    io[i] = {name: {"inputs": {k: spec(v) for k, v in sig.structured_input_signature[1].items()},
                    "outputs": {k: spec(v) for k, v in sig.structured_outputs.items()}}
             for name, sig in model.signatures.items()}
    results[f"{i}_variable_elements"] = np.asarray(sum(int(np.prod(v.shape)) for v in tf.nest.flatten(model.params)))
    forward, prefill, step = (model.signatures[n] for n in ("serving_default", "prefill", "step"))
    for key in ("small", "large"):
        tokens = data[key]
        results[f"{i}_forward_{key}"] = forward(tokens=tf.constant(tokens))["logits"].numpy()
        lengths = np.full(tokens.shape[:1], tokens.shape[1] - 2, np.int32)  # whole rows
        out = prefill(tokens=tf.constant(tokens[:, :-2]), lengths=tf.constant(lengths))
        results[f"{i}_prefill_{key}"] = out["logits"].numpy()
        for t in (-2, -1):
            out = step(token=tf.constant(tokens[:, t]), **{k: v for k, v in out.items() if k.startswith("state_")})
            results[f"{i}_step{t}_{key}"] = out["logits"].numpy()
        for k, v in out.items():
            if k.startswith("state_"):
                results[f"{i}_final_{k}_{key}"] = v.numpy()
np.savez(output, **results)
json.dump(io, open(output + ".json", "w"))
"""


def test_savedmodel_runs_without_jax_or_zoo_and_matches(tmp_path):
    cases = []
    for layer_type in ("mlstm", "mlstm_v1"):
        cfg = config(layer_type)
        params = perturbed(zoo.init_params(cfg), 4, 0.3)
        artifact = export_savedmodel(cfg, params, tmp_path / layer_type)
        cases.append((cfg, params, artifact))
    manifest = json.loads((cases[0][2] / "manifest.json").read_text())
    assert manifest["weights"] == "variables" and manifest["platforms"] == ["cpu", "cuda", "tpu"]
    assert manifest["entries"]["step"]["inputs"][0] == {"name": "token", "shape": ["?"], "dtype": "int32"}
    assert {"state_c", "state_n", "state_m"} <= {d["name"] for d in manifest["entries"]["step"]["inputs"]}

    np.savez(tmp_path / "inputs.npz", **TOKENS)
    run_without(("zoo", "jax", "jaxlib"), tmp_path, RUNNER, tmp_path / "inputs.npz", tmp_path / "out.npz",
                *(a for _, _, a in cases))
    out = np.load(tmp_path / "out.npz")
    signatures = json.loads((tmp_path / "out.npz.json").read_text())
    for i, (cfg, params, artifact) in enumerate(cases):
        check_manifest_against_signatures(cfg, params, artifact, signatures[str(i)])
        assert list(out[f"{i}_signatures"]) == ["prefill", "serving_default", "step"]
        # weights are variables, not constants: as many elements as the params passed in
        assert int(out[f"{i}_variable_elements"]) == sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
        for key, tokens in TOKENS.items():
            assert_rel_close(out[f"{i}_forward_{key}"], np.asarray(zoo.forward(cfg, params, tokens)))
            logits, state = zoo.prefill(cfg, params, tokens[:, :-2])
            assert_rel_close(out[f"{i}_prefill_{key}"], np.asarray(logits))
            for t in (-2, -1):
                logits, state = zoo.step(cfg, params, tokens[:, t], state)
                assert out[f"{i}_step{t}_{key}"].shape == (tokens.shape[0], cfg.vocab_size)  # (B, V)
                assert_rel_close(out[f"{i}_step{t}_{key}"], np.asarray(logits))
            for name, value in state.items():
                assert_rel_close(out[f"{i}_final_state_{name}_{key}"], np.asarray(value))


def check_manifest_against_signatures(cfg, params, artifact, signatures):
    """The manifest's inputs and outputs are the loaded signatures' (names, shapes, dtypes), the logits have the
    zoo.forward/zoo.step shapes, and the weights are stored once, in the variables, not in the graph."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    vocab = cfg.vocab_size
    state = {f"state_{k}": ["?" if i == 1 else d for i, d in enumerate(v.shape)]
             for k, v in zoo.init_decode_state(cfg, 1).items()}
    logits = {"forward": ["?", "?", vocab], "prefill": ["?", "?", vocab], "step": ["?", vocab]}
    for name, entry in manifest["entries"].items():
        signature = signatures[entry["signature"]]
        for side in ("inputs", "outputs"):
            rows = {r["name"]: {"shape": r["shape"], "dtype": r["dtype"]} for r in entry[side]}
            assert len(rows) == len(entry[side]) and rows == signature[side], (name, side)
        assert rows["logits"] == {"shape": logits[name], "dtype": "float32"}
        assert {k: v["shape"] for k, v in rows.items() if k != "logits"} == ({} if name == "forward" else state)
    embedding = np.asarray(params["token_embedding"]["embedding"]).tobytes()
    assert embedding not in (artifact / "saved_model.pb").read_bytes()
    assert sum(f.read_bytes().count(embedding) for f in (artifact / "variables").iterdir()) == 1


def test_savedmodel_options_are_checked_before_tensorflow_loads(tmp_path):
    cfg = config("mlstm")
    params = zoo.init_params(cfg)
    with pytest.raises(ExportError, match="tf.Variables"):
        export_savedmodel(cfg, params, tmp_path / "a", weights="baked")
    with pytest.raises(ExportError, match="--static applies to stablehlo"):
        export_savedmodel(cfg, params, tmp_path / "b", static=(1, 4))
    with pytest.raises(ExportError, match="--mlir applies to stablehlo"):
        export_savedmodel(cfg, params, tmp_path / "b", mlir=True)
    with pytest.raises(ExportError, match="platforms must be among cpu, cuda, tpu"):
        export_savedmodel(cfg, params, tmp_path / "c", platforms=["rocm"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
