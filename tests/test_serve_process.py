"""The `zoo serve` process: SIGTERM drains it (new requests 503, the request in flight finishes, exit 0), and bad
command lines are one line and exit 2 before anything is served."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from helpers import invoke_cli
from serve_support import Server, assert_error, get, open_stream, post, tiny_model, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory)


def test_sigterm_drains_then_exits_0(model, tmp_path):
    server = Server(model.checkpoint, tmp_path / "server.log", "--max-batch", "2").start()
    try:
        conn, response = open_stream(server.url, {"model": "tiny-ck", "prompt": [1, 2, 3], "max_tokens": 4000,
                                                  "stream": True, "temperature": 0}, key=None)
        first = response.readline()
        assert first.startswith(b"data: "), first
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: get(server.url + "/health")[0] == 503, what="/health to say draining")
        status, body = post(server.url + "/v1/completions", {"model": "tiny-ck", "prompt": [1], "max_tokens": 1},
                            key=None)
        assert_error(status, body, 503, code="draining")
        assert_error(*get(server.url + "/v1/models"), 503, code="draining")
        rest = (first + response.read()).decode().split("\n\n")
        events = [line.removeprefix("data: ") for line in rest if line.strip()]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 4000  # the request in flight finished
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        conn.close()
        assert server.proc.wait(60) == 0, server.output()
        assert "draining" in server.output()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def refused(result, *texts):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in result.stderr, result.stderr
    for text in texts:
        assert text in errors[0], errors[0]


def test_bad_command_lines_are_one_line_and_exit_2(model, tmp_path):
    refused(invoke_cli("serve", tmp_path / "nothing"), "no such file or folder")
    (tmp_path / "config.json").write_text("{}")
    refused(invoke_cli("serve", tmp_path / "config.json"), "expected a checkpoint folder")
    refused(invoke_cli("serve", model.checkpoint, "--port", "70000"), "--port")
    refused(invoke_cli("serve", model.checkpoint, "--api-key", " "), "--api-key")
    refused(invoke_cli("serve", model.checkpoint, "--max-batch", "0"), "--max-batch")
    refused(invoke_cli("serve", model.checkpoint, "--dtype", "int8"), "--dtype")
    refused(invoke_cli("serve", model.checkpoint, "--compile-prompt-lengths", "16,x"), "--compile-prompt-lengths")
    savedmodel = tmp_path / "sm"
    savedmodel.mkdir()
    (savedmodel / "manifest.json").write_text(json.dumps({"format": "savedmodel"}))
    refused(invoke_cli("serve", savedmodel, "--port", "0"), "savedmodel artifact")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused(invoke_cli("serve", model.checkpoint, "--port", str(busy.getsockname()[1])), "cannot listen on")
    refused(invoke_cli("serve", model.checkpoint, "--port", "0", "--max-prompt-tokens", "65"),
            "over the model's context_length 64")
