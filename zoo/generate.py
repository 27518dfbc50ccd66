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
    model = build(ModelConfig.model_validate_json(config_json))

    @jax.jit
    def run(params, token, state, key, temperature):
        logits, state = model.apply({"params": params}, token[:, None], mode="step", state=state)
        return sample(logits[:, 0], key, temperature, top_k), state

    return run


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
    step = _step_and_sample(config.model_dump_json(), top_k)
    out, first_step_s = [token], 0.0
    start = time.perf_counter()
    for n in range(max_new_tokens - 1):
        key, sub = jax.random.split(key)
        token, state = step(params, token, state, sub, temperature)
        out.append(token)
        if n == 0:
            jax.block_until_ready(token)
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
    jax.block_until_ready(token)
    decode_s = time.perf_counter() - start if max_new_tokens > 2 else 0.0
    return Generation(jnp.stack(out, axis=1), prefill_s, first_step_s, decode_s)
