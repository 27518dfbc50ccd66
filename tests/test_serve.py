"""`zoo serve` on a checkpoint with a tokenizer: a real server in a subprocess, queried with the official `openai`
client and with raw HTTP (urllib, http.client).

Expected values come from ``zoo.generate`` of each prompt alone in this process (the exactness rule: greedy tokens
equal wherever the alone run's top-2 margin exceeds 1e-4), from the tokenizer itself, and from OpenAI's protocol.
One server serves every test of this module.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import zoo
from helpers import CORPUS
from serve_support import (KEY, MAX_PROMPT_TOKENS, Server, agrees, assert_error, get, metric, open_stream, post,
                           stream_events, tiny_model, wait_for)

# one server per module: `make test` runs with --dist loadgroup, so one worker takes all of a group
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_checkpoint")]
NAME = "tiny-serve"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    server = Server(model.checkpoint, log, "--max-batch", "4", "--max-queue", "64", "--max-prompt-tokens",
                    str(MAX_PROMPT_TOKENS), "--api-key", KEY, "--model-name", NAME, "--drain-timeout", "10").start()
    yield server
    server.stop()
    assert server.proc.returncode == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def completions(server, **body):
    return post(server.url + "/v1/completions", {"model": NAME, **body})


def reference(model, ids, max_tokens, **kwargs):
    """``zoo.generate`` of one prompt alone, with the top-2 log-probabilities the exactness rule needs."""
    return zoo.generate(model.config, model.params, [ids], max_tokens, logprobs=kwargs.pop("logprobs", 2), **kwargs)


def idle(server):
    text = get(server.url + "/metrics")[1]
    return metric(text, "zoo_slots_occupied") == 0 and metric(text, "zoo_queue_depth") == 0


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    status, body = get(server.url + "/v1/models/other", KEY)
    assert_error(status, body, 404, code="model_not_found")
    status, body = get(server.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"]["total"] == 4
    status, text = get(server.url + "/metrics")
    assert status == 200
    for name, kind in (("zoo_requests_total", "counter"), ("zoo_prompt_tokens_total", "counter"),
                       ("zoo_completion_tokens_total", "counter"), ("zoo_http_requests_total", "counter"),
                       ("zoo_time_to_first_token_seconds", "histogram"),
                       ("zoo_inter_token_latency_seconds", "histogram"), ("zoo_slots_occupied", "gauge"),
                       ("zoo_queue_depth", "gauge"), ("zoo_xla_compiles_total", "counter")):
        assert f"# TYPE {name} {kind}\n" in text, name
    assert metric(text, "zoo_slots_total") == 4


def test_32_concurrent_requests_each_decode_as_if_alone(model, server, client):
    """Mixed prompt lengths (ids and text) and budgets, every third streamed, all in flight at once on 4 slots."""
    rng = np.random.default_rng(0)
    lengths = [1, 3, 7, 12, 16, 17, 25, 33, 40]
    budgets = [1, 2, 5, 8, 13, 20]
    cases = []
    for i in range(32):
        if i % 4 == 3:
            prompt = CORPUS[i][: 10 + i]
            ids = model.codec.encode(prompt)
        else:
            ids = prompt = rng.integers(0, 300, lengths[i % len(lengths)]).tolist()
        cases.append((prompt, ids, budgets[i % len(budgets)], i % 3 == 0))
    before = get(server.url + "/metrics")[1]

    def run(case):
        prompt, _, max_tokens, stream = case
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=stream)
        if not stream:
            (choice,) = response.choices
            assert response.usage.completion_tokens == len(choice.token_ids)
            return choice.token_ids, choice.text, choice.finish_reason
        ids, text, finish = [], "", None
        for chunk in response:
            for choice in chunk.choices:
                ids += choice.token_ids
                text += choice.text
                finish = choice.finish_reason or finish
        return ids, text, finish

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    for (prompt, ids, max_tokens, stream), (tokens, text, finish) in zip(cases, results):
        alone = reference(model, ids, max_tokens)
        assert agrees(alone.tokens[0], alone.top_logprobs[0], tokens), (prompt, stream, alone.tokens[0], tokens)
        assert finish == "length" and len(tokens) == max_tokens
        assert text == model.codec.decode(tokens)
    after = get(server.url + "/metrics")[1]
    finished = metric(after, "zoo_requests_total", reason="length") - metric(before, "zoo_requests_total",
                                                                            reason="length")
    assert finished == 32
    added = metric(after, "zoo_completion_tokens_total") - metric(before, "zoo_completion_tokens_total")
    assert added == sum(c[2] for c in cases)
    assert metric(after, "zoo_time_to_first_token_seconds_count") >= 32
    wait_for(lambda: idle(server), what="every slot free")


@pytest.mark.parametrize("settings", [{"temperature": 0, "logprobs": 3},
                                      {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7, "logprobs": 2}],
                         ids=["greedy", "sampled"])
def test_streamed_and_not_streamed_are_identical(server, settings):
    body = {"prompt": "the quick brown fox", "max_tokens": 12, **settings}
    status, whole = completions(server, **body)
    assert status == 200, whole
    events = stream_events(server.url, {"model": NAME, **body}, KEY)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    (choice,) = whole["choices"]
    parts = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in parts) == choice["text"]
    assert sum((p["token_ids"] for p in parts), []) == choice["token_ids"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((p["logprobs"][key] for p in parts), []) == choice["logprobs"][key], key
    assert [p["finish_reason"] for p in parts][-1] == choice["finish_reason"] == "length"
    assert all(p["finish_reason"] is None for p in parts[:-1])


def test_logprobs_object_matches_generate(model, server):
    prompt = "Line 3: the quick"
    status, body = completions(server, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    assert status == 200, body
    (choice,) = body["choices"]
    alone = reference(model, model.codec.encode(prompt), 10, logprobs=3)
    assert agrees(alone.tokens[0], alone.top_logprobs[0], choice["token_ids"])
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(choice["token_ids"]) == 10
    agreed = 0
    for i, token in enumerate(choice["token_ids"]):
        if token != alone.tokens[0][i]:
            break
        agreed += 1
        np.testing.assert_allclose(logprobs["token_logprobs"][i], alone.logprobs[0][i], atol=1e-4)
        expected = sorted(alone.top_logprobs[0][i].values(), reverse=True)
        np.testing.assert_allclose(sorted(logprobs["top_logprobs"][i].values(), reverse=True)[:len(set(
            logprobs["top_logprobs"][i]))], expected[:len(logprobs["top_logprobs"][i])], atol=1e-4)
        name = logprobs["tokens"][i]
        assert name == model.codec.decode([token]) or name == f"token_id:{token}"
        before = model.codec.decode(choice["token_ids"][:i])
        if not name.startswith("token_id:") and "\ufffd" not in before:  # whole characters: its text is at its offset
            assert logprobs["text_offset"][i] == len(before)
            assert choice["text"][logprobs["text_offset"][i]:].startswith(name)
    assert agreed >= 1
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(choice["text"])


def test_n_seeds_echo_and_prompt_lists(model, server):
    prompts = ["the lazy dog", "Line 7: the"]
    status, body = completions(server, prompt=prompts, n=3, max_tokens=4, temperature=1.0, seed=11)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))  # prompt-major: prompt p, choice i at 3 p + i
    assert body["usage"]["prompt_tokens"] == sum(len(model.codec.encode(p)) for p in prompts)
    assert body["usage"]["completion_tokens"] == 24
    # choice i of a prompt uses seed + i: choice 1 of seed 11 is choice 0 of seed 12
    status, alone = completions(server, prompt=prompts[0], max_tokens=4, temperature=1.0, seed=12)
    assert alone["choices"][0]["token_ids"] == body["choices"][1]["token_ids"]
    assert len({tuple(c["token_ids"]) for c in body["choices"][:3]}) > 1  # different seeds, different draws
    status, ids = completions(server, prompt=[model.codec.encode(p) for p in prompts], n=3, max_tokens=4,
                              temperature=1.0, seed=11)
    assert [c["token_ids"] for c in ids["choices"]] == [c["token_ids"] for c in body["choices"]]
    status, echoed = completions(server, prompt=prompts[1], max_tokens=4, temperature=1.0, seed=11, echo=True)
    assert echoed["choices"][0]["text"] == prompts[1] + body["choices"][3]["text"]
    assert echoed["choices"][0]["token_ids"] == body["choices"][3]["token_ids"]


def test_stop_sequences_end_the_text_before_them(model, server, client):
    prompt = [9, 8, 7, 6]
    alone = zoo.generate(model.config, model.params, [prompt], 16, tokenizer=model.codec)
    text = alone.text[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    expected = zoo.generate(model.config, model.params, [prompt], 16, tokenizer=model.codec, stop=[stop])
    response = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    (choice,) = response.choices
    assert choice.finish_reason == expected.finish_reasons[0] == "stop"
    assert choice.text == expected.text[0] and stop not in choice.text
    assert choice.token_ids == expected.tokens[0]


BAD = {
    "malformed JSON": (b'{"model": "tiny-serve", "prompt": ', 400, None, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None, "invalid_json"),
    "unknown field": ({"prompt": "a", "temprature": 0}, 400, "temprature", "unknown_field"),
    "missing prompt": ({}, 400, "prompt", "missing"),
    "max_tokens 0": ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "max_tokens text": ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    "temperature 3": ({"prompt": "a", "temperature": 3}, 400, "temperature", "invalid_value"),
    "top_p 0": ({"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    "logprobs 6": ({"prompt": "a", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    "n 0": ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    "seed -1": ({"prompt": "a", "seed": -1}, 400, "seed", "invalid_value"),
    "prompt of floats": ({"prompt": [1.5, 2]}, 400, "prompt", "invalid_type"),
    "prompt of booleans": ({"prompt": [True]}, 400, "prompt", "invalid_type"),
    "empty prompt": ({"prompt": []}, 400, "prompt", "invalid_value"),
    "id outside vocab": ({"prompt": [1, 300]}, 400, "prompt", "invalid_value"),
    "negative id": ({"prompt": [[1], [-1]]}, 400, "prompt", "invalid_value"),
    "prompt over the limit": ({"prompt": list(range(MAX_PROMPT_TOKENS + 1))}, 400, "prompt",
                              "context_length_exceeded"),
    "five stops": ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    "presence_penalty": ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported"),
    "echo with logprobs": ({"prompt": "a", "echo": True, "logprobs": 1}, 400, "echo", "unsupported"),
    "other model": ({"prompt": "a", "model": "gpt-4"}, 404, "model", "model_not_found"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gets_an_error_object_and_the_server_keeps_serving(server, case):
    body, status, param, code = BAD[case]
    if isinstance(body, dict):
        body = {"model": NAME, **body}
    assert_error(*post(server.url + "/v1/completions", body), status, param, code)
    status, good = completions(server, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert status == 200 and len(good["choices"][0]["token_ids"]) == 2


def test_api_key_chat_and_routes(server, client):
    url = server.url
    for key in (None, "wrong"):
        assert_error(*post(url + "/v1/completions", {"model": NAME, "prompt": "a"}, key=key), 401,
                     code="invalid_api_key")
        assert_error(*get(url + "/v1/models", key), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=NAME, prompt="a")
    status, body = post(url + "/v1/chat/completions", {"model": NAME, "messages": []})
    assert_error(status, body, 404)
    assert "chat template" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert_error(*get(url + "/v1/nothing", KEY), 404, code="not_found")
    assert_error(*get(url + "/v1/completions", KEY), 405)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="a", max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"


def test_a_full_queue_answers_429_and_frees_what_it_took(server):
    before = get(server.url + "/metrics")[1]
    status, body = completions(server, prompt=[1, 2], n=100, max_tokens=50)  # 4 slots + 64 queued < 100
    assert_error(status, body, 429, code="queue_full")
    wait_for(lambda: idle(server), what="the queue and slots to empty")
    after = get(server.url + "/metrics")[1]
    cancelled = metric(after, "zoo_requests_total", reason="cancelled") - metric(before, "zoo_requests_total",
                                                                                reason="cancelled")
    assert 64 <= cancelled <= 64 + 4  # the 64 queued, and those the engine took into slots meanwhile
    assert metric(after, "zoo_requests_total", reason="length") == metric(before, "zoo_requests_total",
                                                                          reason="length")
    assert completions(server, prompt=[1, 2], max_tokens=1)[0] == 200


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = metric(get(server.url + "/metrics")[1], "zoo_requests_total", reason="cancelled")
    conn, response = open_stream(server.url, {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 100_000,
                                              "stream": True})
    try:
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # decoding has started
        wait_for(lambda: metric(get(server.url + "/metrics")[1], "zoo_slots_occupied") == 1,
                 what="/metrics to show the slot taken")  # the engine reports after the step it is in
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    wait_for(lambda: idle(server), what="the slot to be freed")
    assert metric(get(server.url + "/metrics")[1], "zoo_requests_total", reason="cancelled") == cancelled + 1

    # a non-streaming request whose client leaves: noticed by polling, cancelled too
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": NAME, "prompt": [4, 5], "max_tokens": 100_000}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        wait_for(lambda: metric(get(server.url + "/metrics")[1], "zoo_slots_occupied") == 1,
                 what="the request to take a slot")
    wait_for(lambda: idle(server), what="the slot to be freed")
    assert metric(get(server.url + "/metrics")[1], "zoo_requests_total", reason="cancelled") == cancelled + 2
    time.sleep(0.1)
    assert completions(server, prompt=[1], max_tokens=1)[0] == 200
