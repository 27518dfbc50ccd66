"""Token generation: prefill the prompt once, then one jitted step function per new token."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from zoo.api import Params, build, prefill
from zoo.config import ModelConfig


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    """Next tokens ``(B,)`` from logits ``(B, V)``: greedy at temperature 0, else top-k sampling."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def _step_and_sample(config_json: str, top_k: int):
    """One jitted call per token: the model step, sampling and the key split; the old state's buffers are reused."""
    model = build(ModelConfig.model_validate_json(config_json))

    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(params, token, state, key, temperature):
        logits, state = model.apply({"params": params}, token[:, None], mode="step", state=state)
        key, sub = jax.random.split(key)
        return sample(logits[:, 0], sub, temperature, top_k), state, key

    return run


def step_fn(config: ModelConfig, top_k: int = 0):
    """The jitted per-token function ``generate`` uses: ``(params, token, state, key, temperature) -> (token, state, key)``.

    ``state`` is donated: its buffers are reused for the new state, so pass a state you no longer need.
    """
    return _step_and_sample(config.model_dump_json(), top_k)


@dataclass
class Generation:
    """Generated ids and timings."""

    tokens: jax.Array  # (B, max_new_tokens)
    prefill_s: float
    first_step_s: float  # includes compiling the step function
    decode_s: float  # the remaining steps

    @property
    def tokens_per_s(self) -> float:
        """Steady-state decoding rate (tokens per second per batch), compile excluded."""
        steps = self.tokens.shape[1] - 2
        return self.tokens.shape[0] * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def generate(config: ModelConfig, params: Params, prompt: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Generation:
    """Continue ``prompt (B, S)`` by ``max_new_tokens`` tokens."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    prompt = jnp.asarray(prompt, jnp.int32)
    temperature = jnp.float32(temperature)
    key = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    logits, state = prefill(config, params, prompt)
    key, sub = jax.random.split(key)
    token = jax.block_until_ready(sample(logits[:, -1], sub, temperature, top_k))
    prefill_s = time.perf_counter() - start
    step = step_fn(config, top_k)
    out, first_step_s = [token], 0.0
    start = time.perf_counter()
    for n in range(max_new_tokens - 1):
        token, state, key = step(params, token, state, key, temperature)
        out.append(token)
        if n == 0:
            jax.block_until_ready(token)
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
    jax.block_until_ready(token)
    decode_s = time.perf_counter() - start if max_new_tokens > 2 else 0.0
    return Generation(jnp.stack(out, axis=1), prefill_s, first_step_s, decode_s)
