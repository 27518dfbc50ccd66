"""`zoo serve` on the StableHLO artifact that `zoo export` writes of the tiny model (saved without a tokenizer): the
core checks of test_serve.py pass on what gets deployed.

Expected values come from ``zoo.generate`` of the checkpoint's params, each prompt alone (the exactness rule), and
from OpenAI's protocol. One server serves every test of this module.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import zoo
from serve_support import (Server, agrees, assert_error, exported, get, metric, open_stream, post, stream_events,
                           tiny_model, wait_for)

# one server per module: `make test` runs with --dist loadgroup, so one worker takes all of a group
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_artifact")]
NAME = "tiny-artifact"  # the artifact folder's name: no --model-name


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    artifact = exported(model)
    assert artifact.name == NAME
    server = Server(artifact, tmp_path_factory.mktemp("serve-artifact-log") / "server.log", "--max-batch", "4",
                    "--max-queue", "64", "--drain-timeout", "10").start()
    yield server
    server.stop()
    assert server.proc.returncode == 0, server.output()


def completions(server, **body):
    return post(server.url + "/v1/completions", {"model": NAME, **body}, key=None)


def test_the_artifact_folder_names_the_model(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    assert_error(*post(server.url + "/v1/completions", {"model": "tiny-ck", "prompt": [1]}, key=None), 404,
                 "model", "model_not_found")


def test_32_concurrent_requests_each_decode_as_if_alone(model, server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    rng = np.random.default_rng(1)
    lengths, budgets = [2, 5, 9, 16, 21, 30, 47, 64], [1, 3, 6, 11, 17]
    cases = [(rng.integers(0, 300, lengths[i % len(lengths)]).tolist(), budgets[i % len(budgets)], i % 3 == 1)
             for i in range(32)]

    def run(case):
        prompt, max_tokens, stream = case
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=stream)
        if not stream:
            return response.choices[0].token_ids, response.choices[0].finish_reason
        ids, finish = [], None
        for chunk in response:
            for choice in chunk.choices:
                ids += choice.token_ids
                finish = choice.finish_reason or finish
        return ids, finish

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    for (prompt, max_tokens, stream), (tokens, finish) in zip(cases, results):
        alone = zoo.generate(model.config, model.params, [prompt], max_tokens, logprobs=2)
        assert agrees(alone.tokens[0], alone.top_logprobs[0], tokens), (len(prompt), stream, alone.tokens[0], tokens)
        assert finish == "length" and len(tokens) == max_tokens
    wait_for(lambda: metric(get(server.url + "/metrics")[1], "zoo_slots_occupied") == 0, what="every slot free")


def test_streamed_and_not_streamed_are_identical(server):
    body = {"model": NAME, "prompt": [[3, 1, 4, 1, 5], [9, 2, 6]], "max_tokens": 9, "temperature": 0.7, "seed": 5,
            "logprobs": 2, "n": 2}
    status, whole = completions(server, **body)
    assert status == 200, whole
    events = stream_events(server.url, body, key=None)
    assert events[-1] == "[DONE]"
    for choice in whole["choices"]:
        parts = [c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert sum((p["token_ids"] for p in parts), []) == choice["token_ids"] and len(choice["token_ids"]) == 9
        assert "".join(p["text"] for p in parts) == choice["text"] == ""  # no tokenizer: ids only
        tokens = sum((p["logprobs"]["tokens"] for p in parts), [])
        assert tokens == choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
        assert sum((p["logprobs"]["token_logprobs"] for p in parts), []) == choice["logprobs"]["token_logprobs"]


BAD = {
    "text prompt": ({"prompt": "hello"}, "prompt", "no_tokenizer"),
    "list of texts": ({"prompt": ["hello", "world"]}, "prompt", "no_tokenizer"),
    "text stop": ({"prompt": [1, 2], "stop": "x"}, "stop", "no_tokenizer"),
    "over context_length": ({"prompt": list(range(65))}, "prompt", "context_length_exceeded"),
    "unknown field": ({"prompt": [1], "best_of": 2, "extra": 1}, "extra", "unknown_field"),
    "top_k negative": ({"prompt": [1], "top_k": -1}, "top_k", "invalid_value"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gets_a_400_and_the_server_keeps_serving(server, case):
    body, param, code = BAD[case]
    assert_error(*completions(server, **body), 400, param, code)
    status, good = completions(server, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert status == 200 and len(good["choices"][0]["token_ids"]) == 2


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = metric(get(server.url + "/metrics")[1], "zoo_requests_total", reason="cancelled")
    conn, response = open_stream(server.url, {"model": NAME, "prompt": [7, 7], "max_tokens": 100_000,
                                              "stream": True}, key=None)
    try:
        assert response.status == 200 and response.readline().startswith(b"data: ")
        wait_for(lambda: metric(get(server.url + "/metrics")[1], "zoo_slots_occupied") == 1,
                 what="/metrics to show the slot taken")
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    wait_for(lambda: metric(get(server.url + "/metrics")[1], "zoo_slots_occupied") == 0, what="the slot freed")
    assert metric(get(server.url + "/metrics")[1], "zoo_requests_total", reason="cancelled") == cancelled + 1
