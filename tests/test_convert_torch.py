"""zoo convert: NX-AI's PyTorch xlstm (installed by `make test`) is the oracle for both layer types."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import yaml

import zoo
from helpers import by_path, nested
from zoo.convert.torch import ConvertError, from_torch, to_torch
from zoo.checkpoint import read_metadata

torch = pytest.importorskip("torch")
pytest.importorskip("xlstm")
from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from xlstm import xLSTMLMModel, xLSTMLMModelConfig, mLSTMBlockConfig, mLSTMLayerConfig  # noqa: E402
from xlstm.xlstm_large.from_pretrained import load_from_pretrained  # noqa: E402
from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig  # noqa: E402
from xlstm.xlstm_large.utils import convert_single_weights_to_fused_weights  # noqa: E402

BACKENDS = ("parallel_stabilized", "chunkwise", "recurrent")
NATIVE = {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
          "step_kernel": "native", "mode": "inference", "return_last_states": True,
          "autocast_kernel_dtype": "float32"}
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 11))


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def large_model(seed=0, **fields):
    cfg = xLSTMLargeConfig(**{"embedding_dim": 32, "num_heads": 2, "num_blocks": 2, "vocab_size": 97, **NATIVE,
                              **fields})
    torch.manual_seed(seed)
    return perturb(xLSTMLarge(cfg), seed + 1), cfg


def neurips_model(seed=0, num_heads=4, tie_weights=False, bias=False):
    cfg = xLSTMLMModelConfig(mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=num_heads)),
                             context_length=32, num_blocks=2, embedding_dim=32, vocab_size=97,
                             tie_weights=tie_weights, bias=bias)
    torch.manual_seed(seed)
    model = xLSTMLMModel(cfg)
    model.reset_parameters()
    return perturb(model, seed + 1), cfg


def save_torch(folder, model, cfg, fused=False, drop=()):
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fused:
        state = convert_single_weights_to_fused_weights(state)
    if getattr(cfg, "tie_weights", False):
        state.pop("lm_head.weight")  # one storage, saved once (as safetensors' save_model would)
    for key in drop:
        state.pop(key)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return folder


def torch_logits(model, tokens):
    with torch.no_grad():
        out = model(torch.as_tensor(tokens))
    return (out[0] if isinstance(out, tuple) else out).numpy()


def with_backend(config, name):
    data = config.model_dump(mode="json", exclude_unset=True)
    data["mlstm_block"]["mlstm"].setdefault("mlstm_cell", {})["backend"] = {"name": name}
    return zoo.load_config(data)


def assert_logits_match(config, params, expected, tokens=TOKENS):
    errors = {}
    for backend in BACKENDS:
        logits = np.asarray(zoo.forward(with_backend(config, backend), params, tokens.astype(np.int32)))
        errors[backend] = float(np.abs(logits - expected).max() / np.abs(expected).max())
    assert max(errors.values()) <= 1e-4, errors
    return errors


@pytest.mark.parametrize("fields", [{"num_heads": 2, "qk_dim_factor": 0.5},
                                    {"num_heads": 4, "qk_dim_factor": 1.0, "gate_soft_cap": 10.0},
                                    {"num_heads": 2, "qk_dim_factor": 0.5, "add_out_norm": False,
                                     "ffn_proj_factor": 1.3, "ffn_round_up_to_multiple_of": 16}],
                         ids=["nh2-qk0.5", "nh4-qk1-cap10", "no-out-norm-ffn1.3"])
def test_xlstm_large_logits_match_for_every_backend(tmp_path, fields):
    model, cfg = large_model(**fields)
    report = from_torch(save_torch(tmp_path / "src", model, cfg), tmp_path / "ck")
    config, params = zoo.load(tmp_path / "ck")
    assert report.source_format == "xlstm_large" and config.layer.layer_type == "mlstm_v1"
    assert config.add_post_blocks_norm == cfg.add_out_norm
    assert config.mlstm_block.feedforward.proj_up_dim == model.backbone.blocks[0].ffn.up_proj_dim
    assert_logits_match(config, params, torch_logits(model, TOKENS))
    assert read_metadata(tmp_path / "ck")["converted_from"]["format"] == "xlstm_large"


def test_fused_weights_convert_to_the_same_model(tmp_path):
    model, cfg = large_model(seed=3)
    from_torch(save_torch(tmp_path / "single", model, cfg), tmp_path / "a")
    from_torch(save_torch(tmp_path / "fused", model, cfg, fused=True), tmp_path / "b")
    (_, single), (_, fused) = zoo.load(tmp_path / "a"), zoo.load(tmp_path / "b")
    for x, y in zip(*(jax_leaves(p) for p in (single, fused))):
        np.testing.assert_array_equal(x, y)


def jax_leaves(params):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


@pytest.mark.parametrize("num_heads,tie_weights,bias", [(4, False, False), (2, True, False), (4, False, True)])
def test_neurips_logits_match_for_every_backend(tmp_path, num_heads, tie_weights, bias):
    model, cfg = neurips_model(num_heads=num_heads, tie_weights=tie_weights, bias=bias)
    from_torch(save_torch(tmp_path / "src", model, cfg), tmp_path / "ck")
    config, params = zoo.load(tmp_path / "ck")
    assert config.layer.layer_type == "mlstm" and config.tie_weights == tie_weights and config.norm_eps == 1e-5
    assert_logits_match(config, params, torch_logits(model, TOKENS))


def test_decoding_matches_the_pytorch_step_api(tmp_path):
    model, cfg = large_model(seed=5, num_heads=4)
    from_torch(save_torch(tmp_path / "src", model, cfg), tmp_path / "ck")
    config, params = zoo.load(tmp_path / "ck")
    tokens = torch.as_tensor(TOKENS)
    with torch.no_grad():
        logits, state = model(tokens[:, :6])
        torch_steps = []
        for t in range(6, TOKENS.shape[1]):
            logits, state = model(tokens[:, t:t + 1], state)
            torch_steps.append(logits[:, 0].numpy())
    _, zoo_state = zoo.prefill(config, params, TOKENS[:, :6].astype(np.int32))
    for t, expected in zip(range(6, TOKENS.shape[1]), torch_steps):
        step_logits, zoo_state = zoo.step(config, params, TOKENS[:, t].astype(np.int32), zoo_state)
        assert float(np.abs(np.asarray(step_logits) - expected).max()) <= 1e-4 * float(np.abs(expected).max())


V1 = {"vocab_size": 97, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "norm_type": "rmsnorm",
      "logits_soft_cap": 30.0, "mlstm_block": {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2, "qk_dim_factor": 0.5,
                                                         "mlstm_cell": {"gate_soft_cap": 15.0}},
                                               "feedforward": {"act_fn": "swish", "proj_factor": 2.0}}}


def v1_config(scan_blocks=False, tie_weights=False, dtype="float32"):
    return zoo.load_config({**V1, "scan_blocks": scan_blocks, "tie_weights": tie_weights, "dtype": dtype})


@pytest.fixture(scope="module")
def v1_reference():
    """Per-block float32 params whose values bfloat16 holds exactly, and the zoo's logits untied and tied."""
    from zoo.model import param_shapes

    rng = np.random.default_rng(7)
    config = v1_config()
    flat = {path: (float(path[-1] == "scale") + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
            for path, leaf in by_path(param_shapes(config)).items()}
    flat = {path: np.asarray(x.astype(ml_dtypes.bfloat16), np.float32) for path, x in flat.items()}
    untied = nested(flat)
    tied = nested({p: x for p, x in flat.items() if p[0] != "lm_head"})
    logits = {tie: np.asarray(zoo.forward(v1_config(tie_weights=tie), params, TOKENS.astype(np.int32)))
              for tie, params in ((False, untied), (True, tied))}
    scanned = v1_config(scan_blocks=True)  # the zoo's own scan agrees with the stacking of layout() below
    np.testing.assert_allclose(zoo.forward(scanned, layout(flat, scanned, np.float32), TOKENS.astype(np.int32)),
                               logits[False], rtol=0, atol=1e-5 * float(np.abs(logits[False]).max()))
    return flat, logits


def layout(flat, config, param_dtype):
    """The reference params in ``config``'s layout (scanned blocks stacked, a tied head dropped) and dtype."""
    out = {p: x for p, x in flat.items() if not (config.tie_weights and p[0] == "lm_head")}
    if config.scan_blocks:
        blocks = {p[1:] for p in out if p[0].startswith("blocks_")}
        out = {p: x for p, x in out.items() if not p[0].startswith("blocks_")} | {
            ("blocks", *p): np.stack([flat[(f"blocks_{i}", *p)] for i in range(config.num_blocks)]) for p in blocks}
    return nested({p: x.astype(param_dtype) for p, x in out.items()})


# scanned or not x tied or not x param dtype (pairwise), with both compute dtypes
LAYOUTS = {"plain-f32": (False, False, "float32", "float32"), "scan-bf16": (True, False, "bfloat16", "bfloat16"),
           "tied-f32params-bf16compute": (False, True, "bfloat16", "float32"),
           "scan-tied-bf16params": (True, True, "float32", "bfloat16")}


ZOO_ONLY = {"context_length": 48, "mlstm_block": {"mlstm": {"mlstm_cell": {
    "backend": {"name": "recurrent", "kwargs": {"unroll": 2}}, "igate_bias_init_range": -10.0}}}}
"""Settings xlstm_large's config.yaml cannot hold (the converter's own defaults: -1, chunkwise, None)."""


def with_zoo_only(config):
    dump = config.model_dump(mode="json")
    cell = dump["mlstm_block"]["mlstm"]["mlstm_cell"]
    cell |= ZOO_ONLY["mlstm_block"]["mlstm"]["mlstm_cell"]
    return zoo.load_config({**dump, "context_length": ZOO_ONLY["context_length"]})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_zoo_to_torch_to_zoo_is_bitwise_and_loads_in_pytorch_for_every_layout(tmp_path, v1_reference, name):
    scan, tie, dtype, param_dtype = LAYOUTS[name]
    flat, logits = v1_reference
    config = with_zoo_only(v1_config(scan, tie, dtype))
    assert (config.context_length, config.cell.backend.name, config.cell.igate_bias_init_range) == (
        48, "recurrent", -10.0)
    params = layout(flat, config, getattr(ml_dtypes, param_dtype, np.float32))
    zoo.save(tmp_path / "ck", config, params)
    zoo.save(tmp_path / "ck", config, jax_tree_map(lambda x: x * 0, params))  # a later step that must not be picked
    report = to_torch(tmp_path / "ck", tmp_path / "torch", step=0)
    assert report.source == f"step 0 of {tmp_path / 'ck'} (steps 0-1)"
    written = load_numpy(str(tmp_path / "torch" / "model.safetensors"))
    assert {str(x.dtype) for x in written.values()} == {param_dtype}
    assert ("lm_head.weight" in written) and report.tensors == len(written) == 33
    model = load_from_pretrained(tmp_path / "torch", chunkwise_kernel_name=NATIVE["chunkwise_kernel"],
                                 sequence_kernel_name=NATIVE["sequence_kernel"], step_kernel_name="native",
                                 backend_mode="inference", return_last_states=True).eval()
    expected = logits[tie]
    got = torch_logits(model, TOKENS)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())
    report = from_torch(tmp_path / "torch", tmp_path / "back")
    config_back, params_back = zoo.load(tmp_path / "back")
    assert config_back == config and report.zoo_config  # zoo_config.json restored every setting
    back, original = by_path(params_back), by_path(params)
    assert back.keys() == original.keys()  # a tied head (a copy in xlstm_large) is dropped again
    for path, value in original.items():
        assert back[path].dtype == np.dtype(param_dtype) == value.dtype, path
        np.testing.assert_array_equal(back[path], value, err_msg=str(path))


def jax_tree_map(fn, tree):
    import jax

    return jax.tree_util.tree_map(fn, tree)


def zeros(config):
    from zoo.model import param_shapes

    return jax_tree_map(lambda leaf: np.zeros(leaf.shape, np.float32), param_shapes(config))


QK_NORM = {**V1, "mlstm_block": {**V1["mlstm_block"], "mlstm": {
    **V1["mlstm_block"]["mlstm"], "mlstm_cell": {"gate_soft_cap": 15.0, "add_qk_norm": True}}}}


@pytest.mark.parametrize("source,message", [
    ("tiny", "mlstm_block.mlstm.layer_type='mlstm' cannot be represented: to-torch writes xlstm_large, which holds "
             "mlstm_v1 models only"),
    (QK_NORM, "mlstm_block.mlstm.mlstm_cell.add_qk_norm=True cannot be represented: xlstm_large needs False")],
    ids=["mlstm", "qk-norm"])
def test_to_torch_refuses_what_xlstm_large_cannot_hold(tmp_path, source, message):
    config = zoo.load_config(source)
    zoo.save(tmp_path / "ck", config, zeros(config))
    with pytest.raises(ConvertError) as info:
        to_torch(tmp_path / "ck", tmp_path / "out")
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder of each kind a user might pass to the wrong command."""
    root = tmp_path_factory.mktemp("kinds")
    zoo.save(root / "ck", v1_config(), zeros(v1_config()))
    (root / "artifact").mkdir()
    (root / "artifact" / "manifest.json").write_text(json.dumps({"format": "stablehlo", "entries": {}}))
    model, cfg = large_model()
    save_torch(root / "torch", model, cfg)
    return root


WRONG = {  # (function, folder, what the one-line message must say besides "expected ...; found")
    "torch <- checkpoint": (from_torch, "ck", "found a zoo checkpoint folder; to convert it to PyTorch use "
                                              "`zoo convert to-torch`"),
    "torch <- step": (from_torch, "ck/0", "found step folder 0 of the zoo checkpoint {root}/ck; to convert it to "
                                          "PyTorch use `zoo convert to-torch {root}/ck --step 0`"),
    "torch <- artifact": (from_torch, "artifact", "found a `zoo export` artifact (manifest.json, format 'stablehlo')"),
    "torch <- missing": (from_torch, "nothing", "found nothing (no such file or folder)"),
    "to-torch <- step": (to_torch, "ck/0", "found step folder 0 of the checkpoint {root}/ck; pass {root}/ck with "
                                           "--step 0"),
    "to-torch <- artifact": (to_torch, "artifact", "found a `zoo export` artifact"),
    "to-torch <- torch": (to_torch, "torch", "found a PyTorch / Hugging Face model folder"),
    "to-torch <- missing": (to_torch, "nothing", "found nothing (no such file or folder)"),
    "to-torch <- no such step": (to_torch, "ck", "{root}/ck does not hold step 5 (steps: [0])"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_each_convert_command_says_what_it_expected_and_what_it_found(tmp_path, folders, case):
    function, name, found = WRONG[case]
    expected = ("expected a PyTorch xlstm folder (config.yaml or config.json, and model.safetensors or shards)"
                if function is from_torch
                else "expected an mlstm_v1 zoo checkpoint folder")
    with pytest.raises(ConvertError) as info:
        function(folders / name, tmp_path / "out", **({"step": 5} if "step 5" in found else {}))
    message = str(info.value)
    assert "\n" not in message and found.format(root=folders) in message, message
    if "step 5" not in found:
        assert message.startswith(f"{folders / name}: {expected}"), message
    assert not (tmp_path / "out").exists()


BAD = {
    "missing tensor": ("drop", "missing tensor(s): backbone.blocks.1.mlstm_layer.q.weight"),
    "unexpected tensor": ("extra", "unexpected tensor(s) the model has no place for: backbone.blocks.0.extra.weight"),
    "shape mismatch": ("shape", "tensor backbone.blocks.0.mlstm_layer.k.weight has shape (8, 32), which gives "
                                "(32, 8) for blocks_0/xlstm/dense_k/kernel; the config needs (32, 16)"),
    "unsupported field": ("bias", "config field use_bias=True cannot be represented"),
    "sLSTM blocks": ("slstm", "config field slstm_at=[1] cannot be represented: sLSTM blocks cannot be imported"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sources_name_the_tensor_or_field_and_leave_nothing(tmp_path, case):
    how, message = BAD[case]
    if how == "slstm":
        model, cfg = neurips_model()
        src = save_torch(tmp_path / "src", model, cfg)
        data = yaml.safe_load((src / "config.yaml").read_text())
        (src / "config.yaml").write_text(yaml.safe_dump({**data, "slstm_at": [1]}))
    else:
        model, cfg = large_model()
        src = save_torch(tmp_path / "src", model, cfg, drop=("backbone.blocks.1.mlstm_layer.q.weight",)
                         if how == "drop" else ())
        state = load_numpy(str(src / "model.safetensors"))
        if how == "extra":
            state["backbone.blocks.0.extra.weight"] = np.zeros(3, np.float32)
        if how == "shape":
            state["backbone.blocks.0.mlstm_layer.k.weight"] = state["backbone.blocks.0.mlstm_layer.k.weight"][:8]
        from safetensors.numpy import save_file as save_numpy

        save_numpy(state, str(src / "model.safetensors"))
        if how == "bias":
            data = yaml.safe_load((src / "config.yaml").read_text())
            (src / "config.yaml").write_text(yaml.safe_dump({**data, "use_bias": True}))
    with pytest.raises(ConvertError) as info:
        from_torch(src, tmp_path / "ck")
    assert message in str(info.value)
    assert not (tmp_path / "ck").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converting")]


@pytest.mark.slow
def test_cli_converts_both_ways_names_the_step_and_exits_2_on_bad_input(tmp_path, folders):
    from test_cli import invoke_zoo

    model, cfg = neurips_model(seed=9)
    src = save_torch(tmp_path / "src", model, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", "torch", str(src), "--out",
                           str(tmp_path / "ck")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "converted neurips (33 tensors" in proc.stdout
    meta = read_metadata(tmp_path / "ck")["converted_from"]
    assert meta["format"] == "neurips" and json.dumps(meta["config"])
    written = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", "to-torch", str(folders / "ck"), "--step",
                              "0", "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=300,
                             env=env | {"COLUMNS": "300"})
    assert written.returncode == 0, written.stderr
    assert f"to {tmp_path / 't'} from step 0 of {folders / 'ck'} (step 0 only)" in written.stdout
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.yaml", "model.safetensors",
                                                                  "zoo_config.json"]
    for args, message in ((("to-torch", str(tmp_path / "ck")), "layer_type='mlstm' cannot be represented: to-torch "
                                                              "writes xlstm_large, which holds mlstm_v1 models only"),
                          (("torch", str(folders / "ck")), "to convert it to PyTorch use `zoo convert to-torch`")):
        refused = invoke_zoo("convert", *args, "--out", str(tmp_path / "none"))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert message in " ".join(refused.stderr.split()), refused.stderr
