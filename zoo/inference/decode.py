"""The one decode loop, and ``generate`` on it: prefill the prompt once, then one compiled step per token.

``decode_loop`` knows nothing of models: it feeds each new token back into a ``step`` callable. The
library (``generate``), the artifact runners (``zoo.export.runners.greedy``) and the decode benchmarks all
run it, each with its own step: a jitted model step fused with sampling, an exported entry followed by
argmax on the host, or a rerun of ``forward``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from zoo import compiled, runtime, sharding
from zoo.config import ModelConfig
from zoo.inference.sampling import check_sampling, sample
from zoo.model import Params

Step = Callable[[Any, Any], tuple[Any, Any]]
"""``step(token, carry) -> (next token, carry)``: one decoding step; ``carry`` is whatever it threads through."""


@dataclass
class Decoded:
    """What ``decode_loop`` returns: the tokens in order (the first one given), the final carry, and timings."""

    tokens: list[Any]
    carry: Any
    first_step_s: float  # the first step (includes compiling it, when it compiles)
    decode_s: float  # the remaining steps; 0.0 when there are none


def _ready(x: Any) -> Any:
    return jax.block_until_ready(x) if isinstance(x, jax.Array) else x


def decode_loop(step: Step, token: Any, carry: Any, max_new_tokens: int,
                stop: Callable[[list[Any]], bool] | None = None) -> Decoded:
    """Starting from ``token`` (already chosen), call ``step`` until ``max_new_tokens`` tokens are held.

    ``stop(tokens)``, when given, ends the loop early after any step. Device arrays are not read back:
    the loop waits for the device only after the first step and at the end, for the timings.
    """
    tokens, first_step_s = [token], 0.0
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and not (stop is not None and stop(tokens)):
        token, carry = step(token, carry)
        tokens.append(token)
        if len(tokens) == 2:
            _ready(token)
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
    _ready(token)
    decode_s = time.perf_counter() - start if len(tokens) > 2 else 0.0
    return Decoded(tokens, carry, first_step_s, decode_s)


def _make_step(config: ModelConfig, mesh: Any, top_k: int):
    """One jitted call per token: the model step, sampling and the key split; the old state's buffers are reused."""
    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(params, token, state, key, temperature):
        logits, state = runtime.apply(config, params, token, mode="step", state=state, mesh=mesh)
        key, sub = jax.random.split(key)
        return sample(logits, sub, temperature, top_k), state, key

    return run


def step_fn(config: ModelConfig, params: Params, top_k: int = 0) -> Callable:
    """The compiled per-token function ``generate`` uses, for params on their mesh:
    ``(params, token (B,), state, key, temperature) -> (next token (B,), state, key)``.

    ``state`` is donated: its buffers are reused for the new state, so pass a state you no longer need."""
    return compiled.compiled(_make_step, config, sharding.mesh_of(params), top_k)


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
    logits, state = runtime.prefill(config, params, prompt)
    logits = logits[:, -1]
    key, sub = jax.random.split(key)
    token = jax.block_until_ready(sample(logits, sub, temperature, top_k))
    prefill_s = time.perf_counter() - start
    fused = step_fn(config, params, top_k)

    def step(token: jax.Array, carry: tuple[Any, jax.Array]) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        token, state, key = fused(params, token, *carry, temperature)
        return token, (state, key)

    out = decode_loop(step, token, (state, key), max_new_tokens)
    return Generation(jnp.stack(out.tokens, axis=1), prefill_s, out.first_step_s, out.decode_s, logits)
