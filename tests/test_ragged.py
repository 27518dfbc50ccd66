"""Ragged batches: right-padded prompts with ``lengths`` give each prompt what it gives alone.

Exactness as issue 16 states it: a prompt's logits in a ragged batch are within 1e-5 (relative to max |logit|)
of the same prompt run alone (batch size alone changes float rounding by about 1e-6), and its greedy token is
equal wherever the alone run's top-2 logit margin exceeds 1e-4; likewise for decoding steps from the ragged
state. The alone runs are the independent reference: they never see padding or ``lengths``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import reference
import zoo
import zoo.train
from zoo.export.runners import open_artifact
from zoo.export.stablehlo import export_stablehlo
from zoo.nn.cell import run_cell
from zoo.registry import hookimpl
from zoo.registry.contracts import ContractError
from zoo.testing import isolated_registry

LENGTHS = np.array([3, 9, 17, 24], np.int32)  # with chunks of 4: inside the first chunk, across chunks, whole
S = 24
STEPS = 3
TOL, MARGIN = 1e-5, 1e-4
TOKENS = np.random.default_rng(16).integers(0, 256, (len(LENGTHS), S)).astype(np.int32)
PRESET = {"mlstm": "tiny", "mlstm_v1": "tiny-v1"}  # both soft-cap the gates at 15; tiny-v1's input-gate bias is -10
BACKENDS = {"chunkwise": {"mlstm_block.mlstm.mlstm_cell.prefill_backend.name": "chunkwise",
                          "mlstm_block.mlstm.mlstm_cell.prefill_backend.kwargs.chunk_size": 4},
            "recurrent": {"mlstm_block.mlstm.mlstm_cell.prefill_backend.name": "recurrent"}}


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_same_greedy(got, ref) -> bool:
    """The greedy token of logits ``got (V,)`` is the reference's unless its top-2 margin is at most MARGIN (a near
    tie may flip with rounding); True when the margin decided it."""
    top2 = np.sort(np.asarray(ref))[-2:]
    if top2[1] - top2[0] <= MARGIN:
        return False
    assert np.argmax(got) == np.argmax(ref)
    return True


def model(layer: str, backend: str):
    """A one-block float32 model of the layer's tiny preset with ``backend`` prefill, and perturbed params."""
    cfg = zoo.load_config(PRESET[layer]).with_overrides({"num_blocks": 1, **BACKENDS[backend]})
    return cfg, helpers.perturbed(zoo.init_params(cfg), 3, 0.3)  # zero-init gate kernels would hide gate errors


@pytest.fixture(scope="module", params=[(layer, backend) for layer in PRESET for backend in BACKENDS],
                ids=lambda p: "-".join(p))
def runs(request):
    """The ragged prefill of the batch, and each prompt alone (batch 1, its own length, no lengths): its prefill
    logits and state, the greedy tokens it decodes and its step logits."""
    layer, backend = request.param
    cfg, params = model(layer, backend)
    logits, state = zoo.prefill(cfg, params, TOKENS, lengths=LENGTHS)
    alone = []
    for b, n in enumerate(LENGTHS):
        a_logits, a_state = zoo.prefill(cfg, params, TOKENS[b:b + 1, :n])
        run = {"logits": np.asarray(a_logits[0]), "state": a_state, "fed": [], "steps": []}
        last = run["logits"][-1]
        for _ in range(STEPS):
            run["fed"].append(int(np.argmax(last)))
            out, a_state = zoo.step(cfg, params, np.array(run["fed"][-1:], np.int32), a_state)
            last = np.asarray(out[0])
            run["steps"].append(last)
        alone.append(run)
    return layer, backend, cfg, params, np.asarray(logits), state, alone


@pytest.mark.slow  # the fixture's compiles: ~2 to 10 s per model
def test_ragged_prefill_matches_each_prompt_alone(runs):
    layer, backend, cfg, params, logits, state, alone = runs
    assert np.isfinite(logits).all()  # padded positions too: garbage, but no NaN
    errors, decided = {}, []
    for b, (n, run) in enumerate(zip(LENGTHS, alone)):
        errors.setdefault("logits", []).append(rel_err(logits[b, :n], run["logits"]))
        decided.append(assert_same_greedy(logits[b, n - 1], run["logits"][-1]))
        for key, value in state.items():  # (NB, B, ...): row b of every block
            assert np.isfinite(np.asarray(value)).all(), key
            errors.setdefault(key, []).append(rel_err(value[:, b], run["state"][key][:, 0]))
    print(f"\n{layer} {backend} prefill max rel err:", {k: f"{max(v):.1e}" for k, v in errors.items()})
    assert max(max(v) for v in errors.values()) <= TOL, errors
    assert sum(decided) >= 3


def test_decoding_from_the_ragged_state_matches_each_prompt_alone(runs):
    layer, backend, cfg, params, logits, state, alone = runs
    errors, decided = [], []
    for t in range(STEPS):
        out, state = zoo.step(cfg, params, np.array([run["fed"][t] for run in alone], np.int32), state)
        for b, run in enumerate(alone):
            errors.append(rel_err(out[b], run["steps"][t]))
            decided.append(assert_same_greedy(np.asarray(out[b]), run["steps"][t]))
    print(f"\n{layer} {backend} steps max rel err: {max(errors):.1e}")
    assert max(errors) <= TOL, errors
    assert sum(decided) >= STEPS * len(LENGTHS) - 2


def test_mlstm_conv_state_holds_the_last_real_inputs_not_the_padding(runs):
    layer, backend, cfg, params, logits, state, alone = runs
    if layer != "mlstm":
        assert set(state) == {"c", "n", "m"}  # mlstm_v1 keeps no conv window: nothing to leak into
        return
    for b, (n, run) in enumerate(zip(LENGTHS, alone)):
        assert rel_err(state["conv"][:, b], run["state"]["conv"][:, 0]) <= TOL
        if n < S:  # the same row prefilled without lengths: its conv state is the padded tail, far off
            padded = zoo.prefill(cfg, params, TOKENS[b:b + 1])[1]["conv"]
            assert rel_err(padded, run["state"]["conv"]) > 0.1


def cell_inputs(B: int = 4, NH: int = 2, D: int = 8):
    """q, k, v (B, S, NH, D), input gates around -10 (so that a leak of exp(-15 - m) shows) and forget gates."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, S, NH, D)), jnp.float32) for _ in range(3))
    i = jnp.asarray(rng.normal(-10, 2, (B, S, NH)), jnp.float32)
    f = jnp.asarray(rng.normal(3, 2, (B, S, NH)), jnp.float32)
    return q, k, v, i, f


@pytest.mark.parametrize("backend, kwargs", [("chunkwise", {"chunk_size": 4}), ("recurrent", {})],
                         ids=["chunkwise", "recurrent"])
def test_soft_capped_padding_is_a_no_op_of_the_cell(backend, kwargs):
    """Masked after the soft cap, the padded steps leave c, n, m as the float64 recurrence (docs/numerics.md §4.2)
    of each prompt alone leaves them, and finite: with chunks of 4, row 0 (3 real steps) ends on five chunks of
    padding only. Masking before the cap (-1e30 capped to -15, +1e30 to +15) would leak exp(-15 - m) of input
    and log σ(15) of forgetting at every padded step."""
    base = zoo.load_config("tiny-v1").mlstm_block.mlstm.mlstm_cell
    assert base.gate_soft_cap == 15.0
    cell = base.model_copy(update={"prefill_backend": base.prefill_backend.model_copy(
        update={"name": backend, "kwargs": kwargs})})
    q, k, v, i, f = cell_inputs()
    run = jax.jit(lambda i, f, lengths: run_cell(cell, q, k, v, i, f, None, "prefill", None, lengths))
    h, ragged = run(i, f, jnp.asarray(LENGTHS))
    valid = (np.arange(S) < LENGTHS[:, None])[..., None]
    _, capped_late = run(jnp.where(valid, i, -1e30), jnp.where(valid, f, 1e30), None)  # masked before the cap
    assert np.isfinite(np.asarray(h)).all()
    capped = (reference.soft_cap(i, 15), reference.soft_cap(f, 15))
    heads_first = [np.swapaxes(np.asarray(x), 1, 2) for x in (q, k, v, *capped)]
    errors, leaks = [], []
    for b, n in enumerate(LENGTHS):
        h_alone, alone = reference.recurrent_stabilized_cell(*(x[b, :, :n] for x in heads_first), return_state=True)
        errors.append(rel_err(np.swapaxes(h[b, :n], 0, 1), h_alone))
        for key, expected in zip("cnm", alone):
            assert np.isfinite(np.asarray(ragged[key])).all()
            errors.append(rel_err(ragged[key][b], expected))
            if n < S:
                leaks.append(rel_err(capped_late[key][b], expected))
    print(f"\ncell {backend}: max rel err vs float64 {max(errors):.1e}; masked before the cap {max(leaks):.1e}")
    assert max(errors) <= TOL and max(leaks) > 100 * TOL, (errors, leaks)


@pytest.mark.parametrize("lengths, message", [
    ([3, 9, 17], r"lengths must have shape \(4,\), one length per row of tokens, got \(3,\)"),
    ([[3, 9, 17, 24]], r"lengths must have shape \(4,\)"),
    ([3.0, 9.0, 17.0, 24.0], "lengths must hold integers, got dtype float64"),
    ([3, 0, 17, 24], r"lengths\[1\] is 0; each length must be in \[1, 24\]"),
    ([3, 9, 25, 24], r"lengths\[2\] is 25; each length must be in \[1, 24\]"),
    ([3, [9], 17, 24], "lengths must be a \\(B,\\) array of integers"),
])
def test_bad_lengths_are_refused_in_one_line(lengths, message):
    cfg, params = model("mlstm", "chunkwise")
    with pytest.raises(zoo.TokenError, match=message) as err:
        zoo.prefill(cfg, params, TOKENS, lengths=lengths)
    assert "\n" not in str(err.value)


OldLayer = helpers.TinyLayer  # a third-party layer written before ragged batches: no ``lengths`` keyword


class OldLayerPlugin:
    @hookimpl
    def register_layers(self, register):
        register("old_dense", OldLayer, derived_sizes=lambda cfg: {
            "qk_dim": cfg.embedding_dim, "v_dim": cfg.embedding_dim,
            "qk_head_dim": cfg.embedding_dim // cfg.num_heads, "v_head_dim": cfg.embedding_dim // cfg.num_heads})


def test_a_layer_without_lengths_is_refused_by_name_only_for_ragged_batches():
    with isolated_registry(OldLayerPlugin()):
        cfg = zoo.load_config({"vocab_size": 13, "embedding_dim": 8, "num_blocks": 1, "dtype": "float32",
                               "mlstm_block": {"mlstm": {"layer_type": "old_dense", "num_heads": 2}}})
        params = zoo.init_params(cfg)  # without lengths the layer runs (tests/test_core_contracts.py: TinyLayer)
        tokens = np.array([[1, 5, 2], [3, 3, 0]], np.int32)
        with pytest.raises(ContractError, match=r"layer type 'old_dense' from .* does not take the keyword lengths, "
                                                r"which ragged batches need: add `lengths=None`") as err:
            zoo.prefill(cfg, params, tokens, lengths=[3, 2])
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_masked_training_loss_counts_only_real_targets():
    """train_step's loss (loss_fn with lengths) is the mean cross-entropy of each row's real targets, worked out
    from zoo.forward's logits with a NumPy log-softmax; the padding ids (other ones here) do not matter."""
    cfg = zoo.load_config({"vocab_size": 256, "embedding_dim": 16, "dtype": "float32", "mlstm_block": {"mlstm": {
        "layer_type": "mlstm_v1", "num_heads": 2}}})
    params = helpers.perturbed(zoo.init_params(cfg), 5, 0.3)
    tokens, lengths = TOKENS[:3, :10], np.array([10, 6, 1], np.int32)
    logits = np.asarray(zoo.forward(cfg, params, tokens), np.float64)  # causal: real positions see no padding
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    terms = [-log_p[b, t, tokens[b, t + 1]] for b, n in enumerate(lengths) for t in range(n - 1)]  # t predicts t+1
    expected = np.mean(terms)  # 9 + 5 + 0 targets
    repadded = np.where(np.arange(10) < lengths[:, None], tokens, 7)  # other padding ids: the same loss
    optimizer = zoo.train.adamw(cfg)
    state = zoo.train.init_train_state(cfg, params, optimizer)
    _, loss = zoo.train.train_step(cfg, optimizer, state, repadded, lengths)  # loss_fn's value before the update
    assert abs(float(loss) - expected) <= 1e-5 * expected


@pytest.fixture(scope="module")
def ragged_reference():
    """The mlstm model (conv state included, chunks of 4) of ``runs``, and its ragged and whole prefills through zoo
    (compiled already when ``runs`` ran)."""
    cfg, params = model("mlstm", "chunkwise")
    whole = np.full(len(LENGTHS), S, np.int32)
    return (cfg, params, zoo.prefill(cfg, params, TOKENS, lengths=LENGTHS),
            zoo.prefill(cfg, params, TOKENS, lengths=whole)[0])


def assert_artifact_prefill_matches(artifact, ragged_reference):
    (logits, state), whole = ragged_reference[2:]
    got_logits, got_state = artifact.prefill(TOKENS, LENGTHS)
    for b, n in enumerate(LENGTHS):
        assert rel_err(got_logits[b, :n], logits[b, :n]) <= TOL
    for key, value in state.items():
        assert rel_err(np.asarray(got_state[key if key in got_state else f"state_{key}"]), value) <= TOL, key
    assert rel_err(artifact.prefill(TOKENS)[0], whole) <= TOL  # no lengths: every row whole


def test_the_exported_stablehlo_prefill_takes_lengths(ragged_reference, tmp_path):
    cfg, params = ragged_reference[:2]
    out = export_stablehlo(cfg, params, tmp_path / "hlo", entries=["prefill"], platforms=["cpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["entries"]["prefill"]["inputs"][-2:] == [{"name": "tokens", "shape": ["b", "s"], "dtype": "int32"},
                                                             {"name": "lengths", "shape": ["b"], "dtype": "int32"}]
    assert_artifact_prefill_matches(open_artifact(out), ragged_reference)


@pytest.mark.slow
def test_the_exported_savedmodel_prefill_takes_lengths(ragged_reference, tmp_path):
    from zoo.export.savedmodel import export_savedmodel

    cfg, params = ragged_reference[:2]
    out = export_savedmodel(cfg, params, tmp_path / "tf", entries=["prefill"], platforms=["cpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["entries"]["prefill"]["inputs"] == [{"name": "tokens", "shape": ["?", "?"], "dtype": "int32"},
                                                        {"name": "lengths", "shape": ["?"], "dtype": "int32"}]
    assert_artifact_prefill_matches(open_artifact(out), ragged_reference)
