"""The one decode loop, and ``generate`` on it: prefill the prompt once, then one compiled step per token.

``decode_loop`` knows nothing of models: it feeds each new token back into a ``step`` callable. The
library (``generate``), the artifact runners (``zoo.export.runners.greedy``) and the decode benchmarks all
run it, each with its own step: a jitted model step fused with sampling, an exported entry followed by
argmax on the host, or a rerun of ``forward``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from zoo import compiled, runtime, sharding
from zoo.config import ModelConfig, check_config
from zoo.decode_layout import decode_layout, per_block_state
from zoo.inference.batch import pad, per_prompt, prompt_lists
from zoo.inference.sampling import GenerationError, Sampled, SamplerState, SamplingParams, sample, sampler_state
from zoo.inference.stopping import OnText, RowOutput, stop_lists
from zoo.model import Params
from zoo.tokenizers import Codec, as_codec, check_fits

Step = Callable[[Any, Any], tuple[Any, Any]]
"""``step(token, carry) -> (next token, carry)``: one decoding step; ``carry`` is whatever it threads through."""


@dataclass
class Decoded:
    """What ``decode_loop`` returns: the tokens in order (the first one given), the final carry, and timings."""

    tokens: list[Any]
    carry: Any
    first_step_s: float  # the first step (includes compiling it, when it compiles)
    decode_s: float  # the remaining steps; 0.0 when there are none


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
            jax.block_until_ready(token)
            first_step_s = time.perf_counter() - start
            start = time.perf_counter()
    jax.block_until_ready(token)
    decode_s = time.perf_counter() - start if len(tokens) > 2 else 0.0
    return Decoded(tokens, carry, first_step_s, decode_s)


def _make_step(config: ModelConfig, mesh: Any, num_logprobs: int):
    """One jitted call per token: the model step and the sampling; the old state's buffers are reused."""

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def run(params, token, state, sampler):
        logits, state = runtime.apply(config, params, token, mode="step", state=state, mesh=mesh)
        sampled, sampler = sample(logits, sampler, num_logprobs)
        return sampled, state, sampler

    return run


def _make_first(config: ModelConfig, mesh: Any, num_logprobs: int):
    """The first token of each row, from its next-token logits ``(B, V)`` after the prompt."""
    return jax.jit(lambda last, sampler: sample(last, sampler, num_logprobs))


def step_fn(config: ModelConfig, params: Params, num_logprobs: int = 0) -> Callable:
    """The compiled per-token function ``generate`` uses, for params on their mesh:
    ``(params, token (B,), state, sampler) -> (Sampled, state, sampler)`` (see ``zoo.inference.sampling``).

    ``state`` and ``sampler`` are donated: their buffers are reused, so pass ones you no longer need."""
    return compiled.compiled(_make_step, config, sharding.mesh_of(params), num_logprobs)


class Runner(Protocol):
    """What ``generate_with`` decodes with: a model in memory (``ModelRunner``) or an exported artifact
    (``zoo.export.runners.ArtifactRunner``). ``sampler`` is a ``SamplerState``; both calls may donate it and ``state``."""

    vocab_size: int
    context_length: int

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, sampler: SamplerState,
                num_logprobs: int) -> tuple[Any, Sampled, Any, SamplerState]:
        """``tokens (B, S)`` right-padded, ``lengths (B,)`` -> (next-token logits ``(B, V)`` after each prompt, the
        first drawn tokens, the decoding state, the sampler)."""

    def step(self, token: Any, state: Any, sampler: SamplerState, num_logprobs: int) -> tuple[Sampled, Any, SamplerState]:
        """One decoding step for ``token (B,)``: the drawn tokens, the new state and sampler."""


class ModelRunner:
    """``Runner`` of a model in memory: a prefill with lengths that runs the LM head at each row's last real
    position only (``runtime.prefill_next``), then the compiled step fused with sampling.

    Both compute in float32 where the platform emulates the config's dtype (a CPU; docs/decoding.md), and the
    steps run per block whatever ``scan_blocks`` says, on a view of the params built at the first prefill and
    cached for as long as the params live (``zoo.decode_layout``). Where the steps run per block, the state
    ``prefill`` returns and ``step`` takes is one state per block (``zoo.decode_layout.per_block_state``), which
    each step updates in place."""

    def __init__(self, config: ModelConfig, params: Params):
        self.config, self.params = config, params
        self.vocab_size, self.context_length = config.vocab_size, config.context_length
        self.mesh = sharding.mesh_of(params)
        self._decode: tuple[ModelConfig, Params] | None = None
        self._steps: dict[int, Callable] = {}

    @property
    def decode(self) -> tuple[ModelConfig, Params]:
        """The config and params the steps run on (``zoo.decode_layout.decode_layout``)."""
        if self._decode is None:
            self._decode = decode_layout(self.config, self.params)
        return self._decode

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, sampler: SamplerState,
                num_logprobs: int) -> tuple[Any, Sampled, Any, SamplerState]:
        last, state = runtime.prefill_next(self.config, self.params, tokens, lengths=lengths)
        if not self.decode[0].scan_blocks:
            state = per_block_state(state)
        first, sampler = compiled.compiled(_make_first, self.config, self.mesh, num_logprobs)(last, sampler)
        return last, first, state, sampler

    def step(self, token: Any, state: Any, sampler: SamplerState, num_logprobs: int) -> tuple[Sampled, Any, SamplerState]:
        config, params = self.decode
        fn = self._steps.get(num_logprobs)
        if fn is None:
            fn = self._steps[num_logprobs] = step_fn(config, params, num_logprobs)
        return fn(params, token, state, sampler)


@dataclass
class Generation:
    """What ``generate`` returns: each prompt's new tokens and why it stopped, its text, and timings."""

    tokens: list[list[int]]  # each prompt's new ids, EOS and stop sequences excluded
    finish_reasons: list[str]  # "stop" (EOS or a stop sequence) or "length" (max_new_tokens reached)
    text: list[str] | None  # each prompt's new text, with a tokenizer
    logprobs: list[list[float]] | None  # log-probability of each new token under the model, when asked for
    top_logprobs: list[list[dict[int, float]]] | None  # the most likely alternatives at each new token, when asked for
    prompt_logits: jax.Array  # (B, vocab_size) float32: the next-token logits after each prompt
    prefill_s: float  # prefill and the first token, compile included when it compiled
    first_step_s: float  # the first decoding step, compile included when it compiled
    decode_s: float  # the remaining steps
    steps: int  # decoding steps run after the prefill (the batch runs until every row is done)

    @property
    def tokens_per_s(self) -> float:
        """Steady-state decoding rate over the batch (rows × steps per second), the first step excluded."""
        steps = self.steps - 1
        return len(self.tokens) * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _sampling_params(count: int, sampling: Any, **settings: Any) -> list[SamplingParams]:
    if sampling is not None:
        return per_prompt(sampling, count, "sampling")
    rows = {name: per_prompt(value, count, name) for name, value in settings.items()}
    return [SamplingParams(**{name: values[b] for name, values in rows.items()}) for b in range(count)]


def _check_budgets(max_new_tokens: Any, count: int) -> list[int]:
    budgets = per_prompt(max_new_tokens, count, "max_new_tokens")
    for n in budgets:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1 (per prompt or for all), got {n!r}")
    return [int(n) for n in budgets]


def generate(config: ModelConfig, params: Params, prompts: Any, max_new_tokens: int | Sequence[int] = 16, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | Sequence[int] = 0, logprobs: int | None = None,
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             stop: str | Sequence[str | Sequence[int]] | None = None, eos_ids: Sequence[int] | None = None,
             tokenizer: Any = None, on_text: OnText | None = None) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens: one ragged prefill, then one compiled step per token.

    ``prompts``: token-id lists of any lengths, a rectangular int array ``(B, S)``, or strings with a
    ``tokenizer`` (a ``zoo.tokenizers.Codec`` or a ``tokenizers.Tokenizer``). Each prompt is prefilled
    exactly as if alone (``zoo.prefill`` with ``lengths``) and then decoded in lockstep with the others.
    ``max_new_tokens`` and the sampling settings (``temperature`` ... ``seed``; see ``SamplingParams``) are
    one value for all prompts or one per prompt; ``sampling`` gives whole ``SamplingParams`` instead. A row
    stops at an EOS id (``eos_ids``, default: the tokenizer's), at a ``stop`` sequence (strings need a
    tokenizer; token-id lists do not) or after its ``max_new_tokens``; the batch runs until every row stops.
    EOS and stop sequences are not part of the output. ``on_text(row, piece)`` receives each row's text as it
    is generated (needs a tokenizer); pieces never split a UTF-8 character or a stop sequence.

    The tokens are read back to the host after every step only when something needs them (EOS ids, stop
    sequences, ``on_text``); otherwise once at the end. Raises ``TokenError`` for a bad prompt (as
    ``zoo.prefill``), ``GenerationError`` (a ``ValueError``) naming a bad setting, ``TokenizerError`` for a tokenizer that does
    not fit the model.
    """
    return generate_with(ModelRunner(check_config(config), params), prompts, max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                         logprobs=logprobs, sampling=sampling, stop=stop, eos_ids=eos_ids, tokenizer=tokenizer,
                         on_text=on_text)


def generate_with(runner: Runner, prompts: Any, max_new_tokens: int | Sequence[int] = 16, *,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  repetition_penalty: float = 1.0, seed: int | Sequence[int] = 0, logprobs: int | None = None,
                  sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                  stop: str | Sequence[str | Sequence[int]] | None = None, eos_ids: Sequence[int] | None = None,
                  tokenizer: Any = None, on_text: OnText | None = None) -> Generation:
    """``generate`` on any ``Runner`` (a model in memory or an exported artifact); the arguments are ``generate``'s."""
    codec = _fitting_codec(tokenizer, runner.vocab_size)
    ids = prompt_lists(prompts, codec, runner.vocab_size)
    budgets = _check_budgets(max_new_tokens, len(ids))
    settings = _sampling_params(len(ids), sampling, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, logprobs=logprobs)
    stop_ids, stop_texts = stop_lists(stop)
    if (stop_texts or on_text is not None) and codec is None:
        raise GenerationError("text stop sequences and on_text need a tokenizer (pass tokenizer=)")
    eos = frozenset(codec.eos_ids if eos_ids is None and codec is not None else (eos_ids or ()))
    rows = [RowOutput(b, budgets[b], eos, stop_ids, stop_texts, codec, on_text) for b in range(len(ids))]
    num_logprobs = max((s.logprobs or 0 for s in settings), default=0)

    start = time.perf_counter()
    tokens, lengths = pad(ids, runner.context_length)
    sampler = sampler_state(settings, ids, runner.vocab_size)
    prompt_logits, first, state, sampler = runner.prefill(tokens, lengths, sampler, num_logprobs)
    jax.block_until_ready(first)
    prefill_s = time.perf_counter() - start
    follow = bool(eos or stop_ids or stop_texts or on_text is not None)

    def step(sampled: Sampled, carry: tuple[Any, SamplerState]) -> tuple[Sampled, tuple[Any, SamplerState]]:
        sampled, state, sampler = runner.step(sampled.tokens, *carry, num_logprobs)
        return sampled, (state, sampler)

    def finished(drawn: list[Sampled]) -> bool:
        if follow:
            for row, token in zip(rows, np.asarray(drawn[-1].tokens).tolist()):
                row.add(token)
        return all(row.done for row in rows) if follow else False

    out = decode_loop(step, first, (state, sampler), max(budgets), stop=finished)
    want_logprobs = any(s.logprobs is not None for s in settings)
    fields = ("tokens",) + ("logprob",) * want_logprobs + ("top_ids", "top_logprobs") * bool(num_logprobs)
    stacked = {f: np.asarray(jnp.stack([getattr(d, f) for d in out.tokens])) for f in fields}  # one read of each
    if not follow:
        for tokens in stacked["tokens"].tolist():
            for row, token in zip(rows, tokens):
                row.add(token)
    elif not all(row.done for row in rows):  # the loop ended on length: its last tokens were not looked at yet
        for row, token in zip(rows, stacked["tokens"][-1].tolist()):
            row.add(token)
    return Generation(
        tokens=[row.tokens for row in rows], finish_reasons=[row.finish_reason or "length" for row in rows],
        text=[row.text for row in rows] if codec is not None else None,
        logprobs=[stacked["logprob"][:len(row.tokens), b].tolist() for b, row in enumerate(rows)]
        if want_logprobs else None,
        top_logprobs=[[dict(zip(ids, lps)) for ids, lps in zip(stacked["top_ids"][:len(row.tokens), b].tolist(),
                                                                stacked["top_logprobs"][:len(row.tokens), b].tolist())]
                      for b, row in enumerate(rows)] if num_logprobs else None,
        prompt_logits=prompt_logits, prefill_s=prefill_s, first_step_s=out.first_step_s, decode_s=out.decode_s,
        steps=len(out.tokens) - 1)


def _fitting_codec(tokenizer: Any, vocab_size: int) -> Codec | None:
    """``tokenizer`` (a ``Codec``, a ``tokenizers.Tokenizer`` or None) as a Codec that fits a model of ``vocab_size``."""
    if tokenizer is None:
        return None
    codec = as_codec(tokenizer)
    check_fits(codec.tokenizer, vocab_size)
    return codec
