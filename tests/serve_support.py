"""Shared by the `zoo serve` tests: a tiny model with a byte-level BPE tokenizer, a real server in a subprocess, raw
HTTP helpers (urllib and http.client, no client library between the test and the wire) and the exactness rule.

Server subprocesses use the persistent compilation cache (``ZOO_COMPILATION_CACHE``: the one set in the
environment, else ``.pytest_cache/zoo-jax`` in the repository), so a second run compiles nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zoo
from helpers import byte_bpe_codec
from zoo.tokenizers import Codec

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"vocab_size": 300, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "context_length": 64,
          "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {"prefill_backend": {
              "name": "chunkwise", "kwargs": {"chunk_size": 8}}}}}}
MARGIN = 1e-4
KEY = "test-key"
MAX_PROMPT_TOKENS = 40
STARTUP_S = 240


def make_codec() -> Codec:
    """A byte-level BPE of 300 tokens with no EOS id: requests end at max_tokens or a stop sequence."""
    return byte_bpe_codec()


@dataclass
class Model:
    """The tiny model every serve test uses: its config, params and codec, a checkpoint with the tokenizer and one
    without, and (once exported) a StableHLO artifact of the one without."""

    config: Any
    params: Any
    codec: Codec
    checkpoint: Path
    bare: Path
    artifact: Path | None = None


_MODELS: dict[Path, Model] = {}


def tiny_model(tmp_path_factory: Any) -> Model:
    """The session's ``Model`` (built once per test process, whichever test module asks first)."""
    root = tmp_path_factory.getbasetemp()
    if root not in _MODELS:
        folder = tmp_path_factory.mktemp("served")
        config = zoo.load_config(CONFIG)
        params, codec = zoo.init_params(config, seed=1), make_codec()
        zoo.save(folder / "tiny-ck", config, params, tokenizer=codec)
        zoo.save(folder / "bare-ck", config, params)
        _MODELS[root] = Model(config, params, codec, folder / "tiny-ck", folder / "bare-ck")
    return _MODELS[root]


def exported(model: Model) -> Path:
    """A StableHLO artifact (prefill and step entries, for the CPU) of ``model.bare``, exported once by the CLI."""
    if model.artifact is None:
        out = model.bare.parent / "tiny-artifact"
        proc = subprocess.run([sys.executable, "-m", "zoo.cli", "export", str(model.bare), "--out", str(out),
                               "--entry", "prefill,step", "--platforms", "cpu"], env=cache_env(), cwd=REPO,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        model.artifact = out
    return model.artifact


def cache_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ZOO_COMPILATION_CACHE", str(REPO / ".pytest_cache" / "zoo-jax"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``zoo serve PATH ARGS`` in a subprocess on a free localhost port; ``start`` waits for ``/health``."""

    def __init__(self, path: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "serve", str(path), "--port",
                                          str(self.port), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=cache_env(), cwd=REPO)

    def start(self) -> Server:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zoo serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"zoo serve did not answer /health within {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _request(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, data, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, data, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(data) if "json" in kind else data.decode()


def get(url: str, key: str | None = None) -> tuple[int, Any]:
    """``(status, JSON or text)`` of a GET."""
    return _request("GET", url, None, {"Authorization": f"Bearer {key}"} if key else {})


def post(url: str, body: Any, key: str | None = KEY) -> tuple[int, Any]:
    """``(status, JSON or text)`` of a POST; ``body`` as JSON, or bytes sent as they are."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return _request("POST", url, raw, headers)


def open_stream(url: str, body: dict[str, Any], key: str | None = KEY) -> tuple[http.client.HTTPConnection, Any]:
    """A streaming POST: the connection and its response, whose lines the caller reads (and may abandon)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {
        "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    return conn, conn.getresponse()


def stream_events(url: str, body: dict[str, Any], key: str | None = KEY) -> list[Any]:
    """Every ``data:`` event of a streamed completion, parsed (``[DONE]`` kept as the string)."""
    conn, response = open_stream(url, {**body, "stream": True}, key)
    try:
        assert response.status == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in response.read().decode().split("\n\n"):
            if line.strip():
                assert line.startswith("data: "), line
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
        return events
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
    return 0.0


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def agrees(expected: list[int], tops: list[dict[int, float]], tokens: list[int]) -> bool:
    """The exactness rule: ``tokens`` equal ``expected`` (the prompt run alone, ``generate(..., logprobs=2)``, cut to
    the request's ``max_tokens``) up to the first position where the reference's top-2 margin (``tops``) is at
    most ``MARGIN``; without such a position, all of them."""
    for position, (want, top) in enumerate(zip(expected, tops)):
        first, second = sorted(top.values(), reverse=True)[:2]
        if first - second <= MARGIN:
            return True
        if position >= len(tokens) or tokens[position] != want:
            return False
    return len(tokens) == len(expected)


def assert_error(status: int, body: Any, expected_status: int, param: str | None = None,
                 code: str | None = None) -> None:
    """An OpenAI error object with the status, and the ``param``/``code`` when given."""
    assert status == expected_status, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
