"""The continuous-batching engine (zoo.inference.engine): requests that join and leave a fixed table of slots.

Expected values come from zoo.generate of each prompt alone (the issue's exactness rule: greedy tokens equal wherever
the alone run's top-2 margin exceeds 1e-4; seeded draws equal), from the tokenizer, and from literal settings.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import zoo
from helpers import COMPILES, TOP2_MARGIN as MARGIN, byte_bpe_codec, generation_model
from zoo.inference import ArtifactRunner, GenerationError, ModelRunner, SamplingParams
from zoo.inference.engine import Delta, Engine, EngineClosed, EngineRequest, QueueFull

WAIT_S = 60


@pytest.fixture(scope="module")
def model():
    return generation_model()


@pytest.fixture(scope="module")
def codec():
    return byte_bpe_codec(eos_ids=(0,))


class Recorder:
    """EngineMetrics that keeps every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))

    def values(self, name):
        return [c[1:] for c in self.calls if c[0] == name]


@pytest.fixture(scope="module")
def engine(model, codec):
    """Four slots over the model in memory, with a codec but no EOS id (as zoo.generate with eos_ids=[])."""
    config, params = model
    engine = Engine(ModelRunner(config, params), max_batch=4, codec=codec, eos_ids=[], metrics=Recorder())
    engine.start(prompt_lengths=(1,))
    yield engine
    engine.close(drain=False)


class Output:
    """Collects one request's deltas; ``wait`` until the final one."""

    def __init__(self):
        self.deltas: list[Delta] = []
        self.finished = threading.Event()

    def __call__(self, delta: Delta) -> None:
        assert not self.finished.is_set(), "a delta after the final one"
        self.deltas.append(delta)
        if delta.finish_reason is not None:
            self.finished.set()

    def wait(self) -> Output:
        assert self.finished.wait(WAIT_S), "the request did not finish"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def reason(self) -> str | None:
        return self.deltas[-1].finish_reason if self.deltas else None


def serve(engine, requests, threads=4):
    """Submit ``requests`` from ``threads`` threads at once; wait for them all."""
    outputs = [Output() for _ in requests]

    def submit(i):
        time.sleep(random.Random(i).uniform(0, 0.02))
        engine.submit(requests[i], outputs[i])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(submit, range(len(requests))))
    return [out.wait() for out in outputs]


def agree(alone, tokens):
    """The alone run's tokens equal ``tokens`` up to the first step with a top-2 margin under MARGIN."""
    assert len(tokens) == len(alone.tokens[0])
    for token, other, top in zip(alone.tokens[0], tokens, alone.top_logprobs[0]):
        first, second = sorted(top.values(), reverse=True)[:2]
        if first - second <= MARGIN:
            return True
        if token != other:
            return False
    return True


def mixed_requests(count, seed, max_length):
    rng = np.random.default_rng(seed)
    return [EngineRequest(rng.integers(0, 300, size=int(n)).tolist(), int(m))
            for n, m in zip(rng.integers(1, max_length + 1, size=count), rng.integers(1, 13, size=count))]


def check_exact(model, requests, outputs):
    config, params = model
    for request, out in zip(requests, outputs):
        assert out.reason == "length" and len(out.tokens) == request.max_tokens
        alone = zoo.generate(config, params, [request.prompt], request.max_tokens, logprobs=2)
        assert agree(alone, out.tokens), (request.prompt, alone.tokens[0], out.tokens)


def test_concurrent_requests_decode_as_if_alone(model, engine):
    requests = mixed_requests(14, seed=0, max_length=30)  # buckets 16 and 32; more requests than slots
    engine.metrics.calls.clear()
    check_exact(model, requests, serve(engine, requests))
    assert engine.occupied() == 0 and engine.queue_depth() == 0
    occupancy = [o for o, _ in engine.metrics.values("slots")]
    assert max(occupancy) == 4 and max(d for d, in engine.metrics.values("queued")) > 0  # requests waited
    dips = [i for i in range(1, len(occupancy) - 1) if occupancy[i - 1] > occupancy[i] < occupancy[i + 1]]
    assert dips, occupancy  # a slot was freed and taken again while others kept running
    finished = engine.metrics.values("finished")
    assert sorted(finished) == sorted(("length", len(r.prompt), r.max_tokens) for r in requests)


def test_logprobs_match_generate(model, engine):
    config, params = model
    prompt = [5, 17, 3, 9]
    out = serve(engine, [EngineRequest(prompt, 6, SamplingParams(logprobs=2))])[0]
    alone = zoo.generate(config, params, [prompt], 6, logprobs=2)
    assert out.tokens == alone.tokens[0]
    logprobs = [x for d in out.deltas for x in d.logprobs]
    tops = [x for d in out.deltas for x in d.top_logprobs]
    np.testing.assert_allclose(logprobs, alone.logprobs[0], atol=1e-5)
    assert [sorted(t) for t in tops] == [sorted(t) for t in alone.top_logprobs[0]]
    np.testing.assert_allclose([sorted(t.values()) for t in tops],
                               [sorted(t.values()) for t in alone.top_logprobs[0]], atol=1e-5)


def test_seeded_draws_do_not_depend_on_the_batch(model, engine):
    config, params = model
    prompt = [7, 1, 2, 9, 4]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    expected = zoo.generate(config, params, [prompt], 10, sampling=sampled).tokens[0]
    alone = serve(engine, [EngineRequest(prompt, 10, sampled)])[0]
    others = mixed_requests(5, seed=1, max_length=20)
    others[1] = EngineRequest(others[1].prompt, 12, SamplingParams(temperature=0.7, top_k=20, seed=3))
    busy = serve(engine, others[:3] + [EngineRequest(prompt, 10, sampled)] + others[3:])[3]
    assert alone.tokens == busy.tokens == expected
    choices = [out.tokens for out in serve(engine, [  # what n=3 submits
        EngineRequest(prompt, 10, SamplingParams(temperature=1.0, top_p=0.9, seed=7 + i)) for i in range(3)])]
    assert choices[0] == expected and len({tuple(c) for c in choices}) == 3


def test_stop_sequences_and_streamed_text(model, engine, codec):
    config, params = model
    prompt = codec.encode("the lazy")
    sampled = SamplingParams(temperature=1.0, seed=5)
    free = zoo.generate(config, params, [prompt], 12, sampling=sampled, tokenizer=codec, eos_ids=[])
    text = free.text[0]
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = zoo.generate(config, params, [prompt], 12, sampling=sampled, tokenizer=codec, eos_ids=[], stop=[stop])
    pair = free.tokens[0][3:5]
    by_ids = zoo.generate(config, params, [prompt], 12, sampling=sampled, eos_ids=[], stop=[pair])
    outs = serve(engine, [EngineRequest(prompt, 12, sampled), EngineRequest(prompt, 12, sampled, stop=(stop,)),
                          EngineRequest(prompt, 12, sampled, stop=(tuple(pair),))]
                 + [EngineRequest(codec.encode("café 日本"), 16, SamplingParams(temperature=1.5, seed=s))
                    for s in range(3)])  # multi-byte characters split across tokens
    assert (outs[0].tokens, outs[0].text, outs[0].reason) == (free.tokens[0], text, "length")
    assert (outs[1].tokens, outs[1].text, outs[1].reason) == (cut.tokens[0], cut.text[0], "stop")
    assert (outs[2].tokens, outs[2].reason) == (by_ids.tokens[0], "stop")
    assert outs[2].text == codec.decode(by_ids.tokens[0])
    assert all(out.text == codec.decode(out.tokens) and out.reason == "length" for out in outs[3:])
    for out in outs:  # the tokens of each delta are those whose text is shown
        ids, shown = [], ""
        for delta in out.deltas:
            ids += delta.token_ids
            shown += delta.text
            assert shown.startswith(codec.decode(ids)), (ids, shown)
    assert engine.occupied() == 0


def test_eos_ends_a_request(model):
    config, params = model
    prompt = [5, 17, 3]
    free = zoo.generate(config, params, [prompt], 8).tokens[0]
    eos = free[3]
    engine = Engine(ModelRunner(config, params), max_batch=4, eos_ids=[eos])
    engine.start()
    out = serve(engine, [EngineRequest(prompt, 8)])[0]
    engine.close()
    assert out.tokens == free[:free.index(eos)] and out.reason == "stop" and engine.occupied() == 0


def test_cancel_and_timeout_free_their_slots_for_the_next_request(model, engine):
    config, params = model
    long = [Output() for _ in range(4)]
    tickets = [engine.submit(EngineRequest([i + 1, 2], 10**6), out) for i, out in enumerate(long)]
    late = Output()
    engine.submit(EngineRequest([3, 1, 4, 1, 5], 6), late)  # waits: every slot is taken
    deadline = time.monotonic() + WAIT_S
    while engine.occupied() < 4 or not all(out.deltas for out in long):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.queue_depth() == 1 and not late.deltas
    tickets[1].cancel()
    assert late.wait().reason == "length"  # it took the freed slot
    assert late.tokens == zoo.generate(config, params, [[3, 1, 4, 1, 5]], 6).tokens[0]
    assert long[1].wait().reason == "cancelled" and long[1].tokens  # the tokens it had are delivered
    for ticket in tickets:
        ticket.cancel()
    assert [out.wait().reason for out in long] == ["cancelled"] * 4
    assert engine.occupied() == 0
    timed = Output()
    start = time.monotonic()
    engine.submit(EngineRequest([1, 2, 3], 10**6, timeout_s=0.3), timed)
    assert timed.wait().reason == "timeout" and 0.3 <= time.monotonic() - start < 10
    assert engine.occupied() == 0


def test_a_failing_on_output_fails_only_its_request(model, engine):
    config, params = model
    seen: list[Delta] = []

    def broken(delta):
        seen.append(delta)
        raise RuntimeError("client gone")

    requests = mixed_requests(3, seed=2, max_length=10)
    engine.submit(EngineRequest([4, 4, 4], 8), broken)
    check_exact(model, requests, serve(engine, requests))
    deadline = time.monotonic() + WAIT_S
    while not (seen and seen[-1].finish_reason):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert seen[-1].finish_reason == "error" and "on_output raised RuntimeError: client gone" in seen[-1].error
    assert len(seen) == 2 and engine.occupied() == 0  # one delta raised, then the final one


class Flaky:
    """A runner whose step fails once, on its ``fail_at``-th call."""

    def __init__(self, runner, fail_at):
        self.runner, self.calls, self.fail_at = runner, 0, fail_at
        self.vocab_size, self.context_length, self.prefill = runner.vocab_size, runner.context_length, runner.prefill

    def step(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        return self.runner.step(*args)


def test_a_failed_step_fails_its_requests_and_the_engine_recovers(model):
    config, params = model
    engine = Engine(Flaky(ModelRunner(config, params), fail_at=2), max_batch=4)
    failed = [Output(), Output()]
    engine.submit(EngineRequest([1, 2], 10), failed[0])
    engine.submit(EngineRequest([3], 10), failed[1])
    engine.start()  # the warm-up is step 1; both requests are prefilled together, then step 2 fails
    assert [out.wait().reason for out in failed] == ["error"] * 2
    assert "decoding step failed: RuntimeError: device lost" in failed[0].deltas[-1].error
    requests = mixed_requests(5, seed=6, max_length=16)
    check_exact(model, requests, serve(engine, requests))
    engine.close()


def test_queue_full_closed_and_bad_input(model):
    config, params = model
    engine = Engine(ModelRunner(config, params), max_batch=2, max_queue=2)  # not started: requests wait
    waiting = [Output(), Output()]
    for out in waiting:
        engine.submit(EngineRequest([1], 2), out)
    with pytest.raises(QueueFull, match="the queue is full: 2 requests already wait"):
        engine.submit(EngineRequest([1], 2), Output())
    bad = [(EngineRequest([], 2), zoo.TokenError, "prompt must be a non-empty list of token ids"),
           (EngineRequest([1, 300], 2), zoo.TokenError, r"prompt\[1\] = 300 is outside the vocabulary, valid ids "
                                                        r"are 0 to 299"),
           (EngineRequest([1, -1], 2), zoo.TokenError, r"prompt\[1\] = -1 is outside"),
           (EngineRequest([1, 2.0], 2), zoo.TokenError, r"prompt\[1\] must be an integer token id"),
           (EngineRequest([1] * 65, 2), zoo.TokenError, "prompt has 65 tokens; context_length=64 bounds it"),
           (EngineRequest([1], 0), GenerationError, "max_tokens must be an integer >= 1, got 0"),
           (EngineRequest([1], 2, SamplingParams(logprobs=6)), GenerationError,
            "sampling.logprobs must be at most 5, got 6"),
           (EngineRequest([1], 2, stop=("x",)), GenerationError, r"stop\[0\] is text, but the engine has no tokenizer"),
           (EngineRequest([1], 2, stop=((1, 300),)), GenerationError, r"stop\[0\] must be a string or a sequence of "
                                                                      r"token ids in \[0, 300\)"),
           (EngineRequest([1], 2, timeout_s=-1), GenerationError, "timeout_s must be None or a number of seconds > 0")]
    for request, error, message in bad:
        with pytest.raises(error, match=message):
            engine.submit(request, Output())
    with pytest.raises(TypeError, match="request must be an EngineRequest"):
        engine.submit({"prompt": [1]}, Output())
    engine.close()
    assert [out.wait().reason for out in waiting] == ["cancelled"] * 2
    with pytest.raises(EngineClosed):
        engine.submit(EngineRequest([1], 2), Output())


def test_close_drains_or_cancels(model):
    config, params = model
    runner = ModelRunner(config, params)
    draining = Engine(runner, max_batch=4)  # the fixture's shapes: nothing new to compile
    draining.start()
    outs = [Output() for _ in range(6)]
    for out in outs:
        draining.submit(EngineRequest([6, 5, 4], 20), out)
    draining.close(drain=True)  # running and queued requests finish
    assert [out.reason for out in outs] == ["length"] * 6 and all(len(out.tokens) == 20 for out in outs)
    with pytest.raises(EngineClosed, match="takes no new requests"):
        draining.submit(EngineRequest([1], 2), Output())
    hurried = Engine(runner, max_batch=4)
    hurried.start()
    outs = [Output() for _ in range(6)]
    for out in outs:
        hurried.submit(EngineRequest([6, 5, 4], 10**6), out)
    start = time.monotonic()
    hurried.close(drain=True, timeout=0.3)  # then cancelled
    assert [out.reason for out in outs] == ["cancelled"] * 6 and time.monotonic() - start < 10


def test_no_compile_after_warm_up(engine):
    requests = mixed_requests(16, seed=3, max_length=16)  # one bucket (16)
    for i in range(0, 16, 3):
        requests[i] = EngineRequest(requests[i].prompt, requests[i].max_tokens,
                                    SamplingParams(temperature=0.8, top_p=0.9, top_k=5, seed=i, logprobs=i % 6),
                                    stop=((7, 7),))
    before = COMPILES.count
    outs = serve(engine, requests)
    assert COMPILES.count == before
    assert all(out.reason in ("length", "stop") for out in outs)


@pytest.fixture(scope="module")
def artifact_engine(model, tmp_path_factory):
    from zoo.export.runners import open_artifact
    from zoo.export.stablehlo import export_stablehlo

    config, params = model
    path = export_stablehlo(config, params, tmp_path_factory.mktemp("engine") / "hlo", platforms=["cpu"],
                            entries=["prefill", "step"])
    engine = Engine(ArtifactRunner(open_artifact(path)), max_batch=4)
    engine.start(prompt_lengths=(1,))
    yield engine
    engine.close(drain=False)


def test_an_exported_artifact_serves_as_exactly(model, artifact_engine):
    requests = mixed_requests(12, seed=4, max_length=16)  # the bucket compiled at start
    before = COMPILES.count
    outputs = serve(artifact_engine, requests)
    assert COMPILES.count == before
    check_exact(model, requests, outputs)
    assert artifact_engine.occupied() == 0
