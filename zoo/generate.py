"""Token generation: prefill the prompt once, then one jitted step function per new token."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from zoo.api import Params, build, check_seed, prefill
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
    """Generated ids, the logits they started from, and timings."""

    tokens: jax.Array  # (B, max_new_tokens) int32
    prefill_s: float
    first_step_s: float  # includes compiling the step function
    decode_s: float  # the remaining steps
    prompt_logits: jax.Array  # (B, vocab_size) float32: the next-token logits after the prompt

    @property
    def tokens_per_s(self) -> float:
        """Steady-state decoding rate (tokens per second per batch), compile excluded."""
        steps = self.tokens.shape[1] - 2
        return self.tokens.shape[0] * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, seed: int) -> None:
    """``ValueError`` naming the first argument of ``generate`` that is out of range."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 samples among all tokens), got {top_k}")
    check_seed(seed)


def generate(config: ModelConfig, params: Params, prompt: Any, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Generation:
    """Continue the integer ``prompt (B, S)`` by ``max_new_tokens`` tokens (``Generation.tokens (B, max_new_tokens)``).

    ``context_length`` bounds the prompt only; the continuation may run past it. The prompt is checked
    as ``zoo.prefill`` checks it; the tokens fed back while decoding are the model's own and are not read
    back (no device-to-host sync per token). Raises ``TokenError`` (a ``ValueError``) for a bad prompt,
    and ``ValueError`` unless ``max_new_tokens >= 1``, ``temperature`` is finite and >= 0 (0 is greedy),
    ``top_k >= 0`` (0: all tokens) and ``seed`` is in ``[0, 2**32)``.
    """
    check_sampling(max_new_tokens, temperature, top_k, seed)
    key = jax.random.PRNGKey(seed)
    temperature = jnp.float32(temperature)
    start = time.perf_counter()
    logits, state = prefill(config, params, prompt)
    logits = logits[:, -1]
    key, sub = jax.random.split(key)
    token = jax.block_until_ready(sample(logits, sub, temperature, top_k))
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
    return Generation(jnp.stack(out, axis=1), prefill_s, first_step_s, decode_s, logits)
