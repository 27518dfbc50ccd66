"""Choosing the next token from logits, per row of a batch: repetition penalty, temperature, top-k, top-p (nucleus),
min-p, a seeded draw, and the log-probabilities OpenAI's API reports.

The processing follows Hugging Face's logits processors, in their order: repetition penalty -> temperature ->
top-k -> top-p -> min-p -> draw. Ties: each filter keeps every token whose logit is at least a per-row threshold,
so a token tied with the last kept one is kept too. Top-k then keeps more than k tokens when the k-th logit is tied
(as Hugging Face's does), and top-p keeps a tied group whole where Hugging Face's splits it by sort order. The most
likely token always survives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.checks import check_int, check_seed
from zoo.errors import ZooError

MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token


class GenerationError(ZooError, ValueError):
    """A setting of ``generate`` or of the sampler that is out of range: names the argument and what was expected."""


def _check_number(name: str, value: float, ok: Callable[[float], bool], expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise GenerationError(f"{name} must be {expected}, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """One prompt's sampling settings. Raises ``ValueError`` (``TypeError`` for a wrong type) naming the field."""

    temperature: float = 0.0  # 0: greedy, the argmax of the penalised logits; finite, >= 0
    top_k: int = 0  # keep the k most likely tokens; 0: no limit
    top_p: float = 1.0  # nucleus: keep the most likely tokens until their probability reaches top_p; (0, 1]
    min_p: float = 0.0  # keep tokens with probability >= min_p * the largest probability; [0, 1]
    repetition_penalty: float = 1.0  # > 0; on every token of the prompt and output: logit > 0 -> logit / p, else * p
    seed: int = 0  # [0, 2**32)
    logprobs: int | None = None  # None, or k in [0, 20]: the chosen token's log-probability and k alternatives

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, lambda t: t >= 0, "a finite number >= 0 (0 is greedy)")
        check_int(self.top_k, "top_k", 0)
        _check_number("top_p", self.top_p, lambda p: 0 < p <= 1, "in (0, 1]")
        _check_number("min_p", self.min_p, lambda m: 0 <= m <= 1, "in [0, 1]")
        _check_number("repetition_penalty", self.repetition_penalty, lambda r: r > 0,
                      "a finite number > 0 (1 is no penalty)")
        check_seed(self.seed)
        if self.logprobs is not None:
            check_int(self.logprobs, "logprobs", 0, MAX_LOGPROBS + 1)


class SamplerState(NamedTuple):
    """The sampling settings and progress of each row, a pytree of device arrays (``B`` rows, ``V`` tokens)."""

    temperature: jax.Array  # (B,) float32
    top_k: jax.Array  # (B,) int32
    top_p: jax.Array  # (B,) float32
    min_p: jax.Array  # (B,) float32
    repetition_penalty: jax.Array  # (B,) float32
    key: jax.Array  # (B, 2) uint32: jax.random.PRNGKey(seed) of each row
    count: jax.Array  # (B,) int32: tokens drawn so far by the row
    seen: jax.Array  # (B, V) bool: the ids in the row's prompt and output


class Sampled(NamedTuple):
    """Drawn tokens with their log-probabilities under the model's raw distribution (``log_softmax(logits)``)."""

    tokens: jax.Array  # (B,) int32
    logprob: jax.Array  # (B,) float32: of the drawn token
    top_ids: jax.Array  # (B, K) int32: the K most likely tokens, most likely first
    top_logprobs: jax.Array  # (B, K) float32


def sampler_state(params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab_size: int) -> SamplerState:
    """The state of one row per prompt, its ``seen`` mask holding the prompt's ids.

    Raises ``ValueError`` when ``params`` and ``prompts`` differ in length or a prompt id is outside
    ``[0, vocab_size)``, ``TypeError`` when an entry of ``params`` is not a ``SamplingParams``."""
    if len(params) != len(prompts):
        raise GenerationError(f"sampling params: {len(params)} given for {len(prompts)} prompts; give one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling params[{i}] must be a SamplingParams, got {type(p).__name__}")
    seen = np.zeros((len(prompts), vocab_size), bool)
    for b, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise GenerationError(f"prompt {b}: token id {ids[(ids < 0) | (ids >= vocab_size)][0]} is outside "
                             f"the vocabulary [0, {vocab_size})")
        seen[b, ids] = True

    def column(field: str, dtype: type) -> jax.Array:
        return jnp.asarray(np.array([getattr(p, field) for p in params], dtype))

    return SamplerState(column("temperature", np.float32), column("top_k", np.int32), column("top_p", np.float32),
                        column("min_p", np.float32), column("repetition_penalty", np.float32),
                        jax.vmap(jax.random.PRNGKey)(column("seed", np.uint32)),
                        jnp.zeros(len(params), jnp.int32), jnp.asarray(seen))


def _penalised(logits: jax.Array, state: SamplerState) -> jax.Array:
    penalty = state.repetition_penalty[:, None]
    return jnp.where(state.seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _sort_descending(x: jax.Array) -> jax.Array:
    """Float32 ``x`` sorted along its last axis, largest first (NaN aside). The floats are mapped to int32 keys in
    the same order (negative floats' magnitude bits flipped), which XLA:CPU sorts about 3x faster than floats."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    keys = ~jax.lax.sort(~jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits), dimension=-1)  # ~: descending, no overflow
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ 0x7FFFFFFF, keys), jnp.float32)


def _filtered(penalised: jax.Array, state: SamplerState) -> jax.Array:
    """``(B, V)`` logits divided by the temperature (1 for greedy rows), ``-inf`` for tokens the filters remove."""
    temperature = jnp.where(state.temperature > 0, state.temperature, 1.0)[:, None]
    # Shifted so that the largest is 0: a tiny temperature cannot overflow, and min-p is a threshold at log(min_p).
    scaled = (penalised - jnp.max(penalised, axis=-1, keepdims=True)) / temperature
    vocab = scaled.shape[-1]
    sorts = (state.temperature > 0) & (((state.top_k > 0) & (state.top_k < vocab)) | (state.top_p < 1))
    cut = jax.lax.cond(jnp.any(sorts), lambda: _top_k_top_p_cut(scaled, state),
                       lambda: jnp.full((scaled.shape[0], 1), -jnp.inf, scaled.dtype))
    threshold = jnp.maximum(cut, jnp.log(state.min_p)[:, None])
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _top_k_top_p_cut(scaled: jax.Array, state: SamplerState) -> jax.Array:
    """``(B, 1)``: the smallest logit that top-k and then top-p keep (the only part that needs a sort)."""
    descending = _sort_descending(scaled)
    vocab = scaled.shape[-1]
    k = jnp.where(state.top_k > 0, jnp.minimum(state.top_k, vocab), vocab)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    descending = jnp.where(descending >= kth, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # the probability of the tokens more likely than each
    top_p = state.top_p[:, None]
    in_nucleus = (before < top_p) | (top_p >= 1)
    return jnp.maximum(kth, jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True))


def processed_logprobs(logits: jax.Array, state: SamplerState) -> jax.Array:
    """The distribution ``sample`` draws from: ``(B, V)`` float32 log-probabilities after the penalty, temperature
    and filters, ``-inf`` for removed tokens; a greedy row (temperature 0) is all mass on its argmax."""
    penalised = _penalised(logits, state)
    greedy = jnp.arange(logits.shape[-1]) == jnp.argmax(penalised, axis=-1)[:, None]
    return jnp.where((state.temperature > 0)[:, None], jax.nn.log_softmax(_filtered(penalised, state), axis=-1),
                     jnp.where(greedy, 0.0, -jnp.inf))


def sample(logits: jax.Array, state: SamplerState, num_logprobs: int = 0) -> tuple[Sampled, SamplerState]:
    """Next tokens from float32 ``logits (B, V)``, and the state after them (``count + 1``, the tokens ``seen``).

    Row ``b`` draws from ``processed_logprobs`` with the key ``fold_in(key[b], count[b])``, so a seeded row gives
    the same tokens whichever rows share its batch. Work is skipped at run time (``lax.cond``): everything but an
    argmax when every row is greedy, and the sort when no sampled row uses top-k or top-p. ``num_logprobs``
    (static, in ``[0, 20]`` and at most ``V``) is the ``K`` of ``Sampled.top_ids``. Jittable with ``num_logprobs``
    static; raises ``ValueError`` for a bad ``num_logprobs`` or logits whose shape does not match the state."""
    check_int(num_logprobs, "num_logprobs", 0, min(MAX_LOGPROBS, logits.shape[-1]) + 1)
    if logits.shape != state.seen.shape:
        raise GenerationError(f"logits of shape {logits.shape} do not match the sampler state's {state.seen.shape}")
    penalised = _penalised(logits, state)
    greedy = jnp.argmax(penalised, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        keys = jax.vmap(jax.random.fold_in)(state.key, state.count)
        drawn = jax.vmap(jax.random.categorical)(keys, _filtered(penalised, state))
        return jnp.where(state.temperature > 0, drawn.astype(jnp.int32), greedy)

    tokens = jax.lax.cond(jnp.all(state.temperature == 0), lambda: greedy, draw)
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(raw, num_logprobs)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    seen = state.seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return (Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs),
            state._replace(count=state.count + 1, seen=seen))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, seed: int) -> None:
    """``ValueError`` (``TypeError`` for a wrong type) naming the first of these arguments that is out of range."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
