"""zoo convert: NX-AI's PyTorch xlstm (installed by `make test`) is the oracle for both layer types."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

import zoo
from zoo.convert.torch import ConvertError, from_torch, to_torch
from zoo.export.checkpoint import read_metadata

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


def test_zoo_to_torch_to_zoo_is_bitwise_and_loads_in_pytorch(tmp_path):
    config = zoo.load_config({"vocab_size": 97, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
                              "norm_type": "rmsnorm", "logits_soft_cap": 30.0,
                              "mlstm_block": {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2,
                                                        "qk_dim_factor": 0.5, "mlstm_cell": {"gate_soft_cap": 15.0}},
                                              "feedforward": {"act_fn": "swish", "proj_factor": 2.0}}})
    import helpers

    params = helpers.perturbed(zoo.init_params(config), 7, 0.2)
    zoo.save(tmp_path / "ck", config, params)
    to_torch(tmp_path / "ck", tmp_path / "torch")
    model = load_from_pretrained(tmp_path / "torch", chunkwise_kernel_name=NATIVE["chunkwise_kernel"],
                                 sequence_kernel_name=NATIVE["sequence_kernel"], step_kernel_name="native",
                                 backend_mode="inference", return_last_states=True).eval()
    expected = np.asarray(zoo.forward(config, params, TOKENS.astype(np.int32)))
    got = torch_logits(model, TOKENS)
    assert float(np.abs(got - expected).max()) <= 1e-4 * float(np.abs(expected).max())
    from_torch(tmp_path / "torch", tmp_path / "back")
    config_back, params_back = zoo.load(tmp_path / "back")
    for x, y in zip(jax_leaves(params), jax_leaves(params_back)):
        np.testing.assert_array_equal(x, y)
    assert config_back.derived_sizes() == config.derived_sizes()


def test_to_torch_refuses_what_xlstm_large_cannot_hold(tmp_path):
    config = zoo.load_config("tiny")  # layer_type mlstm
    zoo.save(tmp_path / "ck", config, zoo.init_params(config))
    with pytest.raises(ConvertError, match="mlstm_block.mlstm.layer_type='mlstm' cannot be represented"):
        to_torch(tmp_path / "ck", tmp_path / "out")
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


def test_cli_converts_with_progress_and_exits_2_on_bad_input(tmp_path):
    model, cfg = neurips_model(seed=9)
    src = save_torch(tmp_path / "src", model, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")} | {"ZOO_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", "torch", str(src), "--out",
                           str(tmp_path / "ck")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "converted neurips (33 tensors" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", "to-torch", str(tmp_path / "ck"), "--out",
                            str(tmp_path / "t")], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "layer_type='mlstm' cannot be represented" in " ".join(again.stderr.split())
    meta = read_metadata(tmp_path / "ck")["converted_from"]
    assert meta["format"] == "neurips" and json.dumps(meta["config"])
