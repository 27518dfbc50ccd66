"""Stateful decoding: prefill + steps reproduce one full forward pass, for both layer types."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

import helpers
import zoo

V, S = 61, 14
TOKENS = jnp.asarray(np.random.default_rng(7).integers(0, V, size=(3, S)), jnp.int32)


def config(layer_type: str, layer: dict | None = None, **overrides):
    layer = {"layer_type": layer_type, "num_heads": 2, **(layer or {})}
    if layer_type == "mlstm_v1":
        layer["qk_dim_factor"] = 0.5
    block = {"mlstm": {**layer, "mlstm_cell": {"gate_soft_cap": 15.0,
                                               "prefill_backend": {"name": "chunkwise", "kwargs": {"chunk_size": 4}}}},
             "feedforward": {"act_fn": "swish"} if layer_type == "mlstm_v1" else None}
    return zoo.load_config({"vocab_size": V, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
                            "norm_type": "rmsnorm", "mlstm_block": block, **overrides})


def perturbed(params, seed=3, scale=0.3):
    return helpers.perturbed(params, seed, scale)


@pytest.fixture(scope="module", params=["mlstm", "mlstm_v1"])
def model(request):
    cfg = config(request.param)
    params = perturbed(zoo.init_params(cfg))
    return cfg, params, zoo.forward(cfg, params, TOKENS)


@pytest.mark.parametrize("split", [1, 5, 9, 13])
def test_prefill_then_steps_equals_full_forward(model, split):
    cfg, params, full = model
    logits, state = zoo.prefill(cfg, params, TOKENS[:, :split])
    np.testing.assert_allclose(logits, full[:, :split], atol=1e-4, rtol=0)
    for t in range(split, S):
        step_logits, state = zoo.step(cfg, params, TOKENS[:, t], state)
        assert float(jnp.abs(step_logits - full[:, t]).max()) <= 1e-4, t


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size", [0, 1, 2])
def test_prefill_then_steps_equals_full_forward_for_each_conv_kernel_size(kernel_size):
    """conv1d_kernel_size may be any K >= 0: K = 0 has no conv, K = 1 an empty conv state, K = 2 a state
    shorter than the prompt (K = 4, the default, is `model`'s, whose 1-token prompt is shorter than its
    state). Steps-only decoding is checked too."""
    cfg = config("mlstm", {"conv1d_kernel_size": kernel_size}, embedding_dim=16, num_blocks=1)
    rng = np.random.default_rng(kernel_size)  # N(0, 0.3) parameters from shapes: no init to compile
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                                    zoo.param_shapes(cfg))
    tokens = TOKENS[:2, :7]
    full = zoo.forward(cfg, params, tokens)
    logits, state = zoo.prefill(cfg, params, tokens[:, :3])
    assert state["conv"].shape == (1, 2, max(kernel_size - 1, 0), 64)  # Di = round64(2·16)
    zero = zoo.init_decode_state(cfg, 2)
    decoded, from_zero = [logits], []
    for t in range(tokens.shape[1]):
        if t >= 3:
            step_logits, state = zoo.step(cfg, params, tokens[:, t], state)
            decoded.append(step_logits[:, None])
        zero_logits, zero = zoo.step(cfg, params, tokens[:, t], zero)
        from_zero.append(zero_logits[:, None])
    helpers.assert_rel_close(jnp.concatenate(decoded, axis=1), full, rtol=1e-5)
    helpers.assert_rel_close(jnp.concatenate(from_zero, axis=1), full, rtol=1e-5)


def test_decoding_from_the_zero_state_with_steps_only(model):
    cfg, params, full = model
    state = zoo.init_decode_state(cfg, TOKENS.shape[0])
    for t in range(S):
        logits, state = zoo.step(cfg, params, TOKENS[:, t], state)
        assert float(jnp.abs(logits - full[:, t]).max()) <= 1e-4, t


def test_prefill_continues_from_a_state(model):
    cfg, params, full = model
    _, state = zoo.prefill(cfg, params, TOKENS[:, :6])
    logits, _ = zoo.prefill(cfg, params, TOKENS[:, 6:], state=state)
    np.testing.assert_allclose(logits, full[:, 6:], atol=1e-4, rtol=0)


def test_state_layout(model):
    cfg, params, _ = model
    _, state = zoo.prefill(cfg, params, TOKENS[:, :3])
    # by hand (docs/numerics.md §3.1, §8), NB=2, B=3, NH=2, D=32: mlstm Di=round64(2D)=64, DQK=DV=Di/NH=32,
    # conv K-1=3 inputs of width Di; mlstm_v1 DQK=0.5·D/NH=8, DV=D/NH=16
    expected = {"mlstm": {"c": (2, 3, 2, 32, 32), "n": (2, 3, 2, 32), "m": (2, 3, 2), "conv": (2, 3, 3, 64)},
                "mlstm_v1": {"c": (2, 3, 2, 8, 16), "n": (2, 3, 2, 8), "m": (2, 3, 2)}}[cfg.layer.layer_type]
    assert {k: v.shape for k, v in state.items()} == expected
    assert all(v.dtype == jnp.float32 for v in state.values())


def test_the_conv_state_matters_for_mlstm():
    """Without carrying the conv inputs (the reference's behaviour), steps would diverge."""
    cfg = config("mlstm")
    params = perturbed(zoo.init_params(cfg))
    full = zoo.forward(cfg, params, TOKENS)
    _, state = zoo.prefill(cfg, params, TOKENS[:, :8])
    state = {**state, "conv": jnp.zeros_like(state["conv"])}
    logits, _ = zoo.step(cfg, params, TOKENS[:, 8], state)
    assert float(jnp.abs(logits - full[:, 8]).max()) > 1e-3


@pytest.mark.parametrize("overrides", [{"scan_blocks": True}, {"parallel": {"remat": ["mLSTMBlock"]}}])
def test_decoding_with_scanned_or_rematerialised_blocks(overrides):
    cfg = config("mlstm_v1", **overrides)
    params = perturbed(zoo.init_params(cfg))
    full = zoo.forward(cfg, params, TOKENS)
    _, state = zoo.prefill(cfg, params, TOKENS[:, :10])
    logits, _ = zoo.step(cfg, params, TOKENS[:, 10], state)
    assert float(jnp.abs(logits - full[:, 10]).max()) <= 1e-4


def test_backends_without_state_are_rejected_for_decoding():
    with pytest.raises(ValidationError, match="prefill_backend.name"):
        zoo.load_config({"vocab_size": 5, "mlstm_block": {"mlstm": {"mlstm_cell": {
            "prefill_backend": {"name": "parallel_stabilized"}}}}})


def test_forward_backend_choice_does_not_change_logits(model):
    cfg, params, full = model
    data = cfg.model_dump()
    data["mlstm_block"]["mlstm"]["mlstm_cell"]["backend"] = {"name": "chunkwise", "kwargs": {"chunk_size": 4}}
    chunked = zoo.load_config(data)
    np.testing.assert_allclose(zoo.forward(chunked, params, TOKENS), full, atol=1e-4, rtol=0)


def greedy_by_full_forward(cfg, params, prompt, n):
    tokens = jnp.asarray(prompt, jnp.int32)
    for _ in range(n):
        nxt = jnp.argmax(zoo.forward(cfg, params, tokens)[:, -1], axis=-1).astype(jnp.int32)
        tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
    return tokens[:, len(prompt[0]):]


def test_greedy_generation_matches_rerunning_the_full_forward(model):
    from zoo.inference import generate

    cfg, params, _ = model
    prompt = [[1, 2, 3, 4], [5, 6, 7, 8]]
    result = generate(cfg, params, prompt, 6)
    np.testing.assert_array_equal(result.tokens, greedy_by_full_forward(cfg, params, prompt, 6))


def test_sampling_is_seeded_and_respects_top_k(model):
    from zoo.inference import generate
    from zoo.inference.sampling import SamplingParams, sample, sampler_state

    cfg, params, _ = model
    a = generate(cfg, params, [[1, 2]], 8, temperature=1.0, top_k=3, seed=5).tokens
    b = generate(cfg, params, [[1, 2]], 8, temperature=1.0, top_k=3, seed=5).tokens
    np.testing.assert_array_equal(a, b)
    logits = jnp.tile(jnp.asarray([[0.0, 5.0, 4.0, 3.0, -1.0]]), (51, 1))  # 50 seeds, then a greedy row
    settings = [SamplingParams(temperature=5.0, top_k=2, seed=s) for s in range(50)] + [SamplingParams()]
    tokens = sample(logits, sampler_state(settings, [[]] * 51, 5))[0].tokens.tolist()
    assert set(tokens[:50]) == {1, 2} and tokens[50] == 1


def test_generate_cli(tmp_path):
    import subprocess
    import sys

    from zoo.inference import generate

    env = {"COLUMNS": "120", "PATH": "/usr/bin:/bin"}
    build = subprocess.run([sys.executable, "-m", "zoo.cli", "build", "tiny-v1", "--out", str(tmp_path / "ck")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stderr
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", str(tmp_path / "ck"), "--prompt-ids",
                           "5,9,200", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    generated = [line for line in proc.stdout.splitlines() if line.startswith("generated:")][0]
    cfg, params = zoo.load(tmp_path / "ck")
    expected = generate(cfg, params, [[5, 9, 200]], 5).tokens[0]
    assert generated.split()[1:] == [str(int(t)) for t in expected]
    assert "tokens/s" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", str(tmp_path / "ck"), "--prompt-ids", "999"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
