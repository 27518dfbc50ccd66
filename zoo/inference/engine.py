"""Continuous batching over a fixed table of decoding-state slots: the engine behind ``zoo serve`` (no HTTP here).

An xLSTM's decoding state has one fixed size per sequence, whatever its context length, so the engine allocates
``max_batch`` slots once: the state arrays with ``max_batch`` rows (on axis 0 of each block's arrays where the steps
run per block, else on axis 1 of the stacked arrays, axis 0 being the block), the sampler
rows (``SamplerState``, rows on axis 0) and the current token of each slot. One background thread owns the device:

1. it ends what was cancelled or timed out, freeing its slot;
2. it prefills waiting requests (one ragged batch, ``zoo.inference.batch.pad``; the batch padded to a power of two
   with 1-token rows whose results are dropped) and writes their states, sampler rows and first tokens into free
   slots (one jitted scatter, the table donated);
3. it runs one decoding step of every slot in one call (``Runner.step`` with ``SERVE_LOGPROBS`` alternatives, so
   one compiled step serves every request), free slots on whatever they hold, their results ignored;
4. it reads the drawn tokens back and hands each request's new output to its ``on_output`` as a ``Delta``; a
   request that ends (EOS, stop sequence, ``max_tokens``) frees its slot before the next step.

Rows never mix: a request's tokens do not depend on what shares its batch, up to float rounding (greedy tokens
equal ``zoo.generate`` of the prompt alone wherever its top-2 margin exceeds 1e-4; a seeded request draws with
its own key). Works on any ``zoo.inference.decode.Runner``: a model in memory or an exported artifact.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from zoo.checks import TokenError
from zoo.compiled import commit
from zoo.decode_layout import state_batch_axis
from zoo.errors import ZooError
from zoo.inference.batch import pad
from zoo.inference.decode import Runner
from zoo.inference.sampling import GenerationError, Sampled, SamplerState, SamplingParams, sampler_state
from zoo.inference.stopping import RowOutput, stop_lists
from zoo.tokenizers import Codec, as_codec, check_fits

log = logging.getLogger(__name__)

SERVE_LOGPROBS = 5
"""Alternatives the step always computes (one compiled step for every request); a request asks for 0 to 5."""

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class EngineError(ZooError, RuntimeError):
    """The engine refuses a request or a call (see ``QueueFull`` and ``EngineClosed``)."""


class QueueFull(EngineError):
    """``submit`` while ``max_queue`` requests already wait for a slot (HTTP 429)."""


class EngineClosed(EngineError):
    """``submit`` after ``close`` (HTTP 503)."""


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to continue; checked by ``Engine.submit``."""

    prompt: list[int]  # token ids, non-empty, each in [0, vocab_size), at most context_length of them
    max_tokens: int  # >= 1: new tokens at most (EOS and stop sequences excluded from the output)
    sampling: SamplingParams = SamplingParams()  # logprobs None or 0..SERVE_LOGPROBS; seed per request
    stop: tuple[str | tuple[int, ...], ...] = ()  # text stops need the engine's codec
    timeout_s: float | None = None  # wall time from submit, > 0; then finish_reason "timeout"


@dataclass
class Delta:
    """New output of one request, passed to its ``on_output`` from the engine thread, in order; the last one has a
    ``finish_reason``. The concatenation of every delta's ``token_ids`` (and ``text``) is the whole output."""

    token_ids: list[int]  # tokens that became final with this delta (EOS and stop sequences never included)
    text: str  # text that became final ("" without a codec)
    logprobs: list[float] | None  # one per token in token_ids, when sampling.logprobs is not None
    top_logprobs: list[dict[int, float]] | None  # one dict of sampling.logprobs entries per token, idem
    finish_reason: str | None = None  # None while running, else one of FINISH_REASONS
    error: str | None = None  # a one-line message when finish_reason == "error"


class EngineMetrics(Protocol):
    """An optional observer of the engine; every call comes from the engine thread (times in seconds)."""

    def queued(self, depth: int) -> None:
        """Requests waiting for a slot, when it changes."""

    def slots(self, occupied: int, total: int) -> None:
        """Occupied slots, when it changes."""

    def first_token(self, seconds: float) -> None:
        """From submit to a request's first drawn token."""

    def inter_token(self, seconds: float) -> None:
        """Between two consecutive tokens of one request."""

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A request ended; ``completion_tokens`` counts its output tokens."""


@dataclass(eq=False)
class _Live:
    """A request in the engine (queued or in a slot)."""

    id: int
    request: EngineRequest
    prompt: list[int]
    on_output: Callable[[Delta], None]
    row: RowOutput
    submitted: float
    deadline: float | None
    want_logprobs: bool
    cancelled: bool = False
    done: bool = False
    slot: int | None = None
    last_token_at: float | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    logprobs: list[float] = field(default_factory=list)  # one per drawn token, when asked for
    tops: list[dict[int, float]] = field(default_factory=list)


class Ticket:
    """A submitted request: ``cancel()`` it from any thread."""

    def __init__(self, live: _Live, engine: Engine):
        self.id = live.id
        self._live, self._engine = live, engine

    def cancel(self) -> None:
        """End the request with finish_reason ``"cancelled"`` (its slot is freed before the next step); a final
        ``Delta`` follows. Nothing happens when it has already finished. Thread-safe."""
        self._live.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        """True once the request has finished (its final ``Delta`` is delivered or being delivered)."""
        return self._live.done


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _write_slots(state: Any, sampler: SamplerState, tokens: jax.Array, new_state: Any, new_sampler: SamplerState,
                 new_tokens: jax.Array, slots: jax.Array) -> tuple[Any, SamplerState, jax.Array]:
    """Row ``i`` of the new state (on its batch axis), sampler and tokens (axis 0) into slot ``slots[i]``; a slot
    index out of range (``max_batch``) drops its row (the padding of a prefill batch). The table's buffers are
    reused."""
    rows = (slice(None),) * state_batch_axis(state) + (slots,)
    state = jax.tree_util.tree_map(lambda t, n: t.at[rows].set(n.astype(t.dtype), mode="drop"), state, new_state)
    sampler = jax.tree_util.tree_map(lambda t, n: t.at[slots].set(n.astype(t.dtype), mode="drop"), sampler,
                                     new_sampler)
    return state, sampler, tokens.at[slots].set(new_tokens.astype(tokens.dtype), mode="drop")


def _check_count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise GenerationError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class Engine:
    """Serve many requests at once on ``max_batch`` state slots of ``runner`` (see the module docstring).

    ``runner``: a ``zoo.inference.ModelRunner`` (a checkpoint in memory) or ``zoo.inference.ArtifactRunner`` (an
    exported StableHLO artifact). ``codec``: a ``zoo.tokenizers.Codec`` (or ``tokenizers.Tokenizer``) for text
    output and text stop sequences. ``eos_ids``: ids that end a request (default: the codec's, else none).
    ``metrics``: an ``EngineMetrics``. Raises ``GenerationError`` for a bad ``max_batch`` or ``max_queue``,
    ``TokenizerError`` for a codec larger than the vocabulary.
    """

    def __init__(self, runner: Runner, *, max_batch: int = 8, max_queue: int = 256, codec: Codec | None = None,
                 eos_ids: Sequence[int] | None = None, metrics: EngineMetrics | None = None):
        self.runner = runner
        self.vocab_size, self.context_length = int(runner.vocab_size), int(runner.context_length)
        self.max_batch = _check_count(max_batch, "max_batch", 1)
        self.max_queue = _check_count(max_queue, "max_queue", 1)
        self.codec = None if codec is None else as_codec(codec)
        if self.codec is not None:
            check_fits(self.codec.tokenizer, self.vocab_size)
        ids = self.codec.eos_ids if eos_ids is None and self.codec is not None else (eos_ids or ())
        self.eos_ids = frozenset(int(i) for i in ids)
        self.metrics = metrics
        self.num_logprobs = min(SERVE_LOGPROBS, self.vocab_size)
        self._cond = threading.Condition()
        self._queue: deque[_Live] = deque()
        self._active: dict[int, _Live] = {}  # slot -> request; changed by the engine thread only
        self._free = list(range(self.max_batch))
        self._ids = itertools.count(1)
        self._table: tuple[Any, SamplerState, jax.Array] | None = None  # (state, sampler, tokens) of every slot
        self._thread: threading.Thread | None = None
        self._closing = self._cancel_all = False
        self._reported: tuple[int, int] | None = None

    # -- the caller's side --------------------------------------------------------------------------------------

    def start(self, prompt_lengths: Sequence[int] = ()) -> None:
        """Allocate the slots, compile the step (one step of every slot) and start the engine thread.

        ``prompt_lengths``: also compile the prefill of every admission batch size (powers of two up to
        ``max_batch``) for prompts of these lengths (one length per bucket is enough), so that serving them
        compiles nothing. Raises ``EngineError`` when started twice, ``EngineClosed`` after ``close``."""
        with self._cond:
            if self._thread is not None:
                raise EngineError("the engine is already started")
            if self._closing:
                raise EngineClosed("the engine is closed")
        self._allocate()
        state, sampler, tokens = self._table
        sampled, state, sampler = self.runner.step(tokens, state, sampler, self.num_logprobs)
        self._table = commit((state, sampler, jnp.asarray(sampled.tokens)))
        jax.block_until_ready(self._table)
        for length in prompt_lengths:
            length = _check_count(length, "prompt_lengths", 1)
            for size in self.batch_sizes():  # the prefill and the slot write, the write dropping every row
                first, state, sampler = self._prefill([[0] * length] * size, [SamplingParams()] * size)
                self._table = _write_slots(*self._table, state, sampler, first.tokens,
                                           jnp.full(size, self.max_batch, jnp.int32))
                jax.block_until_ready(self._table)
        self._thread = threading.Thread(target=self._run, name="zoo-engine", daemon=True)
        self._thread.start()

    def batch_sizes(self) -> list[int]:
        """The prefill batch sizes the engine uses: powers of two below ``max_batch``, and ``max_batch``."""
        return sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})

    def submit(self, request: EngineRequest, on_output: Callable[[Delta], None]) -> Ticket:
        """Queue ``request``; its output goes to ``on_output(delta)``, called from the engine thread.

        Raises, on the caller's thread: ``TypeError`` for a request that is not an ``EngineRequest`` or an
        ``on_output`` that is not callable; ``TokenError`` naming ``prompt`` (an empty prompt, ids outside the
        vocabulary, more than ``context_length`` tokens); ``GenerationError`` naming ``max_tokens``, ``sampling``,
        ``stop`` (a text stop without a codec) or ``timeout_s``; ``QueueFull`` when ``max_queue`` requests already
        wait; ``EngineClosed`` after ``close``."""
        if not isinstance(request, EngineRequest):
            raise TypeError(f"request must be an EngineRequest, got {type(request).__name__}")
        if not callable(on_output):
            raise TypeError(f"on_output must be callable, got {type(on_output).__name__}")
        prompt = self._check_prompt(request.prompt)
        _check_count(request.max_tokens, "max_tokens", 1)
        sampling = request.sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if sampling.logprobs is not None and sampling.logprobs > self.num_logprobs:
            raise GenerationError(f"sampling.logprobs must be at most {self.num_logprobs}, got {sampling.logprobs}")
        stop_ids, stop_texts = self._check_stop(request.stop)
        timeout = request.timeout_s
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
                    math.isfinite(timeout) and timeout > 0):
                raise GenerationError(f"timeout_s must be None or a number of seconds > 0, got {timeout!r}")
        now = time.monotonic()
        row = RowOutput(0, int(request.max_tokens), self.eos_ids, stop_ids, stop_texts, self.codec)
        live = _Live(next(self._ids), request, prompt, on_output, row, now, None if timeout is None else now + timeout,
                     sampling.logprobs is not None)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed: it takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full: {self.max_queue} requests already wait for a slot")
            self._queue.append(live)
            self._cond.notify_all()
        return Ticket(live, self)

    def occupied(self) -> int:
        """Slots held by a request now."""
        return len(self._active)

    def queue_depth(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._queue)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests (``EngineClosed``) and stop the engine thread.

        ``drain=True``: running and queued requests finish first; those still running after ``timeout`` seconds
        (None: no limit) are cancelled. ``drain=False``: every request is cancelled now. Returns when the thread
        has ended (at once when called from ``on_output``, on the engine thread itself)."""
        with self._cond:
            self._closing = True
            self._cancel_all = self._cancel_all or not drain
            self._cond.notify_all()
            thread = self._thread
        if thread is None:  # never started: end what waits, here
            self._cancel_all = True
            self._sweep()
            return
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self._cancel_all = True
                self._cond.notify_all()
            thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _check_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist() if prompt.ndim == 1 else prompt
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise TokenError(f"prompt must be a non-empty list of token ids, got {type(prompt).__name__}"
                             f"{' (empty)' if isinstance(prompt, Sequence) and not prompt else ''}")
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise TokenError(f"prompt[{i}] must be an integer token id, got {type(token).__name__} {token!r}")
            if not 0 <= token < self.vocab_size:
                raise TokenError(f"prompt[{i}] = {token} is outside the vocabulary, valid ids are 0 to "
                                 f"{self.vocab_size - 1}")
        if 0 < self.context_length < len(prompt):
            raise TokenError(f"prompt has {len(prompt)} tokens; context_length={self.context_length} bounds it")
        return prompt if isinstance(prompt, list) and all(type(t) is int for t in prompt) else [int(t) for t in prompt]

    def _check_stop(self, stop: Any) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
        if isinstance(stop, str) or not isinstance(stop, Sequence):
            raise GenerationError(f"stop must be a tuple of strings and token-id tuples, got {type(stop).__name__}")
        for i, s in enumerate(stop):
            if isinstance(s, str):
                if self.codec is None:
                    raise GenerationError(f"stop[{i}] is text, but the engine has no tokenizer; give token ids")
                continue
            if not isinstance(s, Sequence) or any(isinstance(t, bool) or not isinstance(t, (int, np.integer))
                                                  or not 0 <= t < self.vocab_size for t in s):
                raise GenerationError(f"stop[{i}] must be a string or a sequence of token ids in [0, "
                                      f"{self.vocab_size}), got {s!r}")
        return stop_lists(list(stop))

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._active or self._closing or self._cancel_all):
                    self._cond.wait()
                if self._closing and not self._queue and not self._active:
                    break
            try:
                self._sweep()
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a fault of the engine itself must not stop the thread
                log.exception("engine iteration failed")
                self._table = None
                for live in list(self._active.values()):
                    self._finish(live, "error", f"engine failure: {type(exc).__name__}: {exc}")
            self._report()
        self._report()

    def _sweep(self) -> None:
        """End cancelled and timed-out requests, queued or running; their slots are free afterwards."""
        now = time.monotonic()

        def ended(live: _Live) -> str | None:
            if live.cancelled or self._cancel_all:
                return "cancelled"
            return "timeout" if live.deadline is not None and now >= live.deadline else None

        with self._cond:
            gone = [(live, ended(live)) for live in self._queue if ended(live)]
            for live, _ in gone:
                self._queue.remove(live)
        gone += [(live, ended(live)) for live in list(self._active.values()) if ended(live)]
        for live, reason in gone:
            self._finish(live, reason)

    def _admit(self) -> None:
        """Prefill as many waiting requests as there are free slots, in one batch, into those slots."""
        with self._cond:
            batch = [self._queue.popleft() for _ in range(min(len(self._free), len(self._queue)))]
        if not batch:
            return
        try:
            if self._table is None:
                self._allocate()
            first, state, sampler = self._prefill([live.prompt for live in batch],
                                                  [live.request.sampling for live in batch])
        except Exception as exc:  # noqa: BLE001 - a failed prefill fails its own requests only
            log.exception("prefill failed")
            for live in batch:
                self._finish(live, "error", f"prefill failed: {type(exc).__name__}: {exc}")
            return
        self._free.sort()
        slots = [self._free.pop(0) for _ in batch]
        size = len(first.tokens)
        index = np.full(size, self.max_batch, np.int32)
        index[:len(batch)] = slots
        try:
            self._table = _write_slots(*self._table, state, sampler, first.tokens, jnp.asarray(index))
            host = jax.device_get(first)
        except Exception as exc:  # noqa: BLE001 - the table's buffers were donated: rebuild it
            log.exception("writing slots failed")
            self._free.extend(slots)
            self._table = None
            for live in batch + list(self._active.values()):
                self._finish(live, "error", f"writing slots failed: {type(exc).__name__}: {exc}")
            return
        for live, slot in zip(batch, slots):
            live.slot = slot
            self._active[slot] = live
        now = time.monotonic()
        for i, live in enumerate(batch):
            self._take(live, host, i, now)

    def _step(self) -> None:
        """One decoding step of every slot; each running request takes its row's token."""
        state, sampler, tokens = self._table
        try:
            sampled, state, sampler = self.runner.step(tokens, state, sampler, self.num_logprobs)
            host = jax.device_get(sampled)
        except Exception as exc:  # noqa: BLE001 - fail the requests involved; the state was donated: rebuild it
            log.exception("decoding step failed")
            self._table = None
            for live in list(self._active.values()):
                self._finish(live, "error", f"decoding step failed: {type(exc).__name__}: {exc}")
            return
        self._table = commit((state, sampler, jnp.asarray(sampled.tokens)))
        now = time.monotonic()
        for slot, live in sorted(self._active.items()):
            self._take(live, host, slot, now)

    def _allocate(self) -> None:
        """The slot table: a prefill of ``max_batch`` one-token rows gives arrays of every shape and dtype."""
        self._table = None
        first, state, sampler = self._prefill([[0]] * self.max_batch, [SamplingParams()] * self.max_batch)
        self._table = commit((state, sampler, jnp.asarray(first.tokens)))

    def _prefill(self, prompts: list[list[int]], settings: list[SamplingParams]) -> tuple[Sampled, Any, SamplerState]:
        """Prefill ``prompts``, padded with 1-token rows to a batch size of ``batch_sizes()``: the first drawn
        tokens, the states (as jax arrays) and the sampler rows, padding rows included."""
        size = min(1 << (len(prompts) - 1).bit_length(), self.max_batch)
        prompts = prompts + [[0]] * (size - len(prompts))
        settings = settings + [SamplingParams()] * (size - len(settings))
        tokens, lengths = pad(prompts, self.context_length)
        sampler = sampler_state(settings, prompts, self.vocab_size)
        _, first, state, sampler = self.runner.prefill(tokens, lengths, sampler, self.num_logprobs)
        # One device and committed (an artifact's outputs may be NumPy or uncommitted): jit keys its compiles on it.
        return commit((first, jax.tree_util.tree_map(jnp.asarray, state), sampler))

    def _take(self, live: _Live, host: Sampled, row: int, now: float) -> None:
        """Give ``live`` the token drawn in ``row`` of ``host``; deliver what became final; end it when done."""
        if live.done:
            return
        try:
            if live.last_token_at is None:
                self._observe("first_token", now - live.submitted)
            else:
                self._observe("inter_token", now - live.last_token_at)
            live.last_token_at = now
            if live.want_logprobs:
                k = live.request.sampling.logprobs
                live.logprobs.append(float(host.logprob[row]))
                live.tops.append(dict(zip(host.top_ids[row, :k].tolist(), host.top_logprobs[row, :k].tolist())))
            live.row.add(int(host.tokens[row]))
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failing on this request's tokens
            log.exception("request %d failed", live.id)
            return self._finish(live, "error", f"{type(exc).__name__}: {exc}")
        if live.row.done:
            return self._finish(live, live.row.finish_reason)
        delta = self._delta(live)
        if delta.token_ids or delta.text:
            self._send(live, delta)

    def _delta(self, live: _Live, reason: str | None = None, error: str | None = None) -> Delta:
        """What became final since the last delta (everything left, with ``reason``)."""
        row = live.row
        end = max(len(row.tokens) if reason is not None else row.final_tokens(), live.sent_tokens)
        start, live.sent_tokens = live.sent_tokens, end
        text, live.sent_text = row.text[live.sent_text:], len(row.text)
        return Delta(row.tokens[start:end], text, live.logprobs[start:end] if live.want_logprobs else None,
                     live.tops[start:end] if live.want_logprobs else None, reason, error)

    def _send(self, live: _Live, delta: Delta) -> None:
        try:
            live.on_output(delta)
        except Exception as exc:  # noqa: BLE001 - a failing consumer ends its own request only
            log.exception("on_output of request %d raised", live.id)
            if delta.finish_reason is None:
                self._finish(live, "error", f"on_output raised {type(exc).__name__}: {exc}")

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        """Free the slot of ``live`` (at once), then deliver its final delta."""
        if live.done:
            return
        live.done = True
        if live.slot is not None:
            del self._active[live.slot]
            self._free.append(live.slot)
            live.slot = None
        try:
            live.row.end(reason)
        except Exception as exc:  # noqa: BLE001 - a tokenizer failing on the held text
            reason, error = "error", f"{type(exc).__name__}: {exc}"
        self._observe("finished", reason, len(live.prompt), len(live.row.tokens))
        self._send(live, self._delta(live, reason, error))

    def _observe(self, name: str, *args: Any) -> None:
        if self.metrics is not None:
            try:
                getattr(self.metrics, name)(*args)
            except Exception:  # noqa: BLE001 - metrics never stop serving
                log.exception("metrics.%s raised", name)

    def _report(self) -> None:
        now = (len(self._queue), len(self._active))
        if now != self._reported:
            if self._reported is None or now[0] != self._reported[0]:
                self._observe("queued", now[0])
            if self._reported is None or now[1] != self._reported[1]:
                self._observe("slots", now[1], self.max_batch)
            self._reported = now

