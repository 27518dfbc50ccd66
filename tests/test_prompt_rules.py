"""The library's rules for token ids: ``context_length`` bounds the prompt (each forward or prefill call) while
decoding may continue past it; ids outside the vocabulary, bad shapes and dtypes are refused on the host before
anything is dispatched; the decode loop never reads token values back from the device."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
import zoo.inference.decode
from zoo.checks import TokenError

V, CONTEXT = 13, 6
SPEC = {"vocab_size": V, "embedding_dim": 8, "num_blocks": 1, "context_length": CONTEXT, "dtype": "float32",
        "mlstm_block": {"mlstm": {"num_heads": 2, "proj_factor": 2.0, "round_proj_up_to_multiple_of": 8}}}
TOKENS = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]], np.int32)  # 10 > CONTEXT tokens


@pytest.fixture(scope="module")
def model():
    config = zoo.load_config(SPEC)
    return config, zoo.init_params(config, seed=0)


def test_a_prompt_of_context_length_runs_and_one_more_is_refused_before_dispatch(model):
    config, params = model
    assert zoo.forward(config, params, TOKENS[:, :CONTEXT]).shape == (1, CONTEXT, V)
    assert zoo.prefill(config, params, TOKENS[:, :CONTEXT])[0].shape == (1, CONTEXT, V)
    for call in (zoo.forward, zoo.prefill):
        # refused on the host: no host-to-device copy of the tokens happens first
        with jax.transfer_guard("disallow"), pytest.raises(TokenError) as caught:
            call(config, params, TOKENS[:, :CONTEXT + 1])
        message = str(caught.value)
        assert "\n" not in message
        assert f"sequence length {CONTEXT + 1} exceeds context_length={CONTEXT}" in message
    with pytest.raises(TokenError, match=r"sequence length 7 exceeds context_length=6"):
        zoo.generate(config, params, TOKENS[:, :CONTEXT + 1], 2)


def test_the_first_check_of_a_config_places_nothing_on_the_device():
    """The host checks build the expected parameter shapes abstractly: the first call with a config (nothing cached
    for it yet) refuses a bad id under a transfer guard, with no host-to-device copy (a PRNG key placed to trace the
    initialiser used to fail here whenever this ran before any other call of its config)."""
    config = zoo.load_config({**SPEC, "vocab_size": V + 4})  # no other test uses it: its shapes are not cached
    params = zoo.init_params(config, seed=0)
    for call in (zoo.forward, zoo.prefill):
        with jax.transfer_guard("disallow"), pytest.raises(TokenError, match=f"id {V + 4} at index"):
            call(config, params, [[1, V + 4]])


@pytest.mark.slow
def test_decoding_continues_past_context_length(model):
    config, params = model
    unbounded = zoo.load_config({**SPEC, "context_length": -1})  # the same parameters, no bound
    expected = np.asarray(zoo.forward(unbounded, params, TOKENS), np.float64)  # the parallel form, all 10 at once
    logits, state = zoo.prefill(config, params, TOKENS[:, :CONTEXT])  # chunkwise, then recurrent steps
    got = [np.asarray(logits[0, -1])]
    for t in range(CONTEXT, TOKENS.shape[1]):
        logits, state = zoo.step(config, params, TOKENS[:, t], state)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(got), expected[0, CONTEXT - 1:], rtol=1e-4, atol=1e-4)
    greedy = zoo.generate(config, params, TOKENS[:, :CONTEXT], 2 * CONTEXT).tokens
    assert [len(row) for row in greedy] == [2 * CONTEXT]


@pytest.mark.parametrize("bad_id", [V, -1, 2**40])
def test_ids_outside_the_vocabulary_are_refused_with_the_argument_id_and_range(model, bad_id):
    config, params = model
    ids = [[1, 2, bad_id, 4]]
    for call, tokens, what in ((zoo.forward, ids, "tokens"), (zoo.prefill, np.array(ids), "tokens"),
                               (zoo.step, [1, bad_id], "token"), (zoo.step, np.array([1, bad_id]), "token")):
        state = (zoo.init_decode_state(config, len(tokens)),) if call is zoo.step else ()
        with jax.transfer_guard("disallow"), pytest.raises(TokenError) as caught:
            call(config, params, tokens, *state)
        assert str(caught.value).startswith(f"{what}: id {bad_id} at index ")
        assert str(caught.value).endswith(f"outside the vocabulary, valid ids are 0 to {V - 1}")
    at = f"tokens: id {bad_id} at index \\(0, 2\\) is outside"
    with pytest.raises(TokenError, match=at.replace("tokens", "prompts")):  # generate's argument is prompts
        zoo.generate(config, params, ids, 3)
    from zoo.train import adamw, init_train_state, train_step  # the training step checks host data the same way

    optimizer = adamw(config)
    with pytest.raises(TokenError, match=at):
        train_step(config, optimizer, init_train_state(config, params, optimizer), ids)
    if abs(bad_id) < 2**31:  # a concrete jax.Array prompt is checked too
        with pytest.raises(TokenError, match=at):
            zoo.forward(config, params, jnp.asarray(ids, jnp.int32))


@pytest.mark.parametrize("tokens, message", [
    ([[]], r"non-empty \(B, S\) array of token ids, got shape \(1, 0\)"),
    (np.zeros((0, 3), np.int32), r"got shape \(0, 3\)"),
    ([1, 2, 3], r"got shape \(3,\)"),
    ([[1, 2], [3]], "rectangular array of token ids"),
    ([[1.0, 2.0]], "integer token ids, got dtype float64"),
    ([[True, False]], "integer token ids, got dtype bool"),
])
def test_bad_shapes_and_dtypes_are_refused(model, tokens, message):
    config, params = model
    for call in (zoo.forward, zoo.prefill):
        with pytest.raises(TokenError, match=message):
            call(config, params, tokens)


def test_a_state_that_does_not_fit_is_refused_by_key_and_shape(model):
    config, params = model
    two = zoo.init_decode_state(config, 2)  # c is (blocks 1, batch, heads 2, qk head dim 8, v head dim 8)
    wrong_batch = r"state\['c'\] has shape \(1, 2, 2, 8, 8\); this config with batch size 1 needs \(1, 1, 2, 8, 8\)"
    with pytest.raises(ValueError, match=wrong_batch):
        zoo.step(config, params, [1], two)
    with pytest.raises(ValueError, match=wrong_batch):
        zoo.prefill(config, params, [[1, 2]], state=two)
    with pytest.raises(ValueError, match=r"state must be a dict with keys \['c', 'conv', 'm', 'n'\] .*got \['c'\]"):
        zoo.step(config, params, [1, 2], {"c": two["c"]})


def test_under_a_callers_jit_ids_are_not_checked_and_behave_as_documented(model):
    config, params = model
    run = jax.jit(lambda p, t: zoo.forward(config, p, t))
    out = np.asarray(run(params, jnp.array([[1, V, 2], [1, -1, 2]])))
    assert np.isnan(out[0]).all()  # an id >= vocab_size: NaN logits for its whole sequence
    wrapped = np.asarray(zoo.forward(config, params, [[1, V - 1, 2]]))[0]  # -1 counts from the end
    np.testing.assert_allclose(out[1], wrapped, rtol=1e-5, atol=1e-5)


def _slow_device_tokens(n: int) -> jax.Array:
    """Token ids that are still being computed for a while (async dispatch), to see whether a call waits on them."""
    @jax.jit
    def compute(x):
        a = jax.lax.fori_loop(0, n, lambda i, a: jnp.tanh(a @ a), jnp.full((128, 128), 0.1, jnp.float32))
        return x + (a[0, 0] > 2).astype(x.dtype)  # always x (|tanh| < 1), but only once the loop is done

    return compute(jnp.asarray([2], jnp.int32))


def test_step_with_a_device_token_adds_no_host_sync(model):
    config, params = model
    state = zoo.init_decode_state(config, 1)
    token = jnp.asarray([2], jnp.int32)
    logits, _ = zoo.step(config, params, token, state)  # compile
    with jax.transfer_guard("disallow"):
        zoo.step(config, params, token, state)
    jax.block_until_ready(_slow_device_tokens(1))  # compile the producer
    pending = _slow_device_tokens(4000)  # about a second of work on one CPU core
    step_logits, _ = zoo.step(config, params, pending, state)
    assert not pending.is_ready(), "zoo.step waited for its device-resident token (a device-to-host sync)"
    np.testing.assert_array_equal(np.asarray(step_logits), np.asarray(logits))


def test_the_decode_loop_of_generate_reads_nothing_back(model, monkeypatch):
    from jax._src.array import ArrayImpl

    config, params = model
    prompt = jnp.asarray(TOKENS[:, :3])
    reads = []
    value = ArrayImpl._value
    monkeypatch.setattr(ArrayImpl, "_value", property(lambda a: reads.append(a.shape) or value.fget(a)))
    real_step_fn = zoo.inference.decode.step_fn

    def guarded_step_fn(*args):
        step = real_step_fn(*args)

        def guarded(*step_args):
            with jax.transfer_guard("disallow"):  # no transfer either way inside a decoding step
                return step(*step_args)

        return guarded

    monkeypatch.setattr(zoo.inference.decode, "step_fn", guarded_step_fn)
    counts = []
    for new_tokens in (2, 7):
        reads.clear()
        result = zoo.generate(config, params, prompt, new_tokens)
        assert [len(row) for row in result.tokens] == [new_tokens]
        counts.append(len(reads))
    # the prompt check and one read of all the new tokens at the end, whatever the number of steps
    assert counts[0] == counts[1] <= 2, counts  # at most the prompt check, whatever the number of steps
