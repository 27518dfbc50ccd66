"""Running the server: open what PATH holds (a checkpoint, a ``zoo train`` run folder or a ``zoo export``
StableHLO artifact), start the engine on it, and serve the app with uvicorn until SIGTERM drains it.

SIGTERM (or a first Ctrl-C): new requests get 503, requests in flight finish (cancelled after ``drain_timeout``
seconds), then the process exits (0 for SIGTERM). A second signal ends it at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from zoo.checkpoint import classify_path, find_step, load
from zoo.errors import ZooError
from zoo.serve.app import Service, build_app
from zoo.serve.metrics import ServeMetrics

log = logging.getLogger("zoo.serve")

WHAT = "a checkpoint folder, a `zoo train` run folder or a `zoo export` StableHLO artifact folder"


class ServeError(ZooError, ValueError):
    """A model the server cannot serve (a SavedModel, a static-shape artifact, one without prefill and step), or
    a setting that does not fit it."""


@dataclass
class Loaded:
    """What PATH held: a ``zoo.inference.decode.Runner`` on it, its tokenizer, a default model name, and what it is."""

    runner: Any
    codec: Any
    name: str
    what: str


def open_model(path: str | os.PathLike, step: int | None = None, tokenizer: str | os.PathLike | None = None,
               dtype: str | None = None) -> Loaded:
    """Load a checkpoint (its ``step``, default the latest) or a StableHLO artifact for serving.

    ``tokenizer``: a ``tokenizer.json`` that replaces the stored one. ``dtype`` casts a checkpoint's weights (e.g.
    ``float32``). Raises ``CheckpointRefused`` for a path of another kind, ``ServeError`` for an artifact that
    cannot be served (a SavedModel, static shapes, no ``prefill`` and ``step`` entries, or ``dtype`` given),
    ``CheckpointError``/``ExportError``/``TokenizerError`` for damaged files."""
    from zoo.inference import ArtifactRunner, ModelRunner
    from zoo.tokenizers import load_codec

    found = classify_path(path)
    if found.kind == "checkpoint":
        where = find_step(path, step)
        codec = load_codec(path, where.step, file=tokenizer)
        config, params = load(where.root, where.step, dtype=dtype)
        return Loaded(ModelRunner(config, params), codec, Path(path).expanduser().resolve().name,
                      f"checkpoint {where}")
    if found.kind != "artifact":
        raise found.refuse(WHAT)
    if found.format != "stablehlo":
        raise ServeError(f"{found.path}: a {found.format} artifact; zoo serve runs StableHLO artifacts (zoo export "
                         f"--format stablehlo) and checkpoints")
    if dtype is not None:
        raise ServeError(f"--dtype casts a checkpoint's weights; {found.path} is an artifact, exported in its dtype")
    from zoo.export.runners import open_artifact

    codec = load_codec(path, step, file=tokenizer)
    artifact = open_artifact(found.path, step)
    if artifact.static is not None or not {"prefill", "step"} <= artifact.entries:
        why = "it has static shapes" if artifact.static is not None else "it has no prefill and step entries"
        raise ServeError(f"{found.path}: {why}; export it again with the default entries and symbolic shapes "
                         f"(zoo export CHECKPOINT --out DIR)")
    return Loaded(ArtifactRunner(artifact), codec, found.path.name, f"StableHLO artifact {found.path}")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), not yet listening. ``OSError`` (one line naming
    the address) when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"--host {host}: not an address this machine can bind ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains on SIGTERM or a first SIGINT: ``service.draining`` (new requests get 503), the
    engine finishes what it has (at most ``drain_timeout`` seconds), then the server stops. A second signal stops it
    at once."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float) -> None:
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            self._captured_signals.append(sig)  # re-raised after shutdown: the CLI reports an interrupt (exit 130)
        if self._drainer is not None:  # the second signal: now (the engine ends its current step off this thread)
            threading.Thread(target=self.service.engine.close, kwargs={"drain": False}, daemon=True).start()
            self.should_exit = self.force_exit = True
            return
        self.service.draining = True
        log.warning("draining: new requests get 503; waiting for %d running and %d queued requests (at most %g s)",
                    self.service.engine.occupied(), self.service.engine.queue_depth(), self.drain_timeout)
        self._drainer = threading.Thread(target=self._drain, name="zoo-drain", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        try:
            self.service.engine.close(drain=True, timeout=self.drain_timeout)
        finally:
            self.should_exit = True


def serve(loaded: Loaded, sock: socket.socket, *, model_name: str | None = None, max_batch: int = 8,
          max_queue: int = 256, max_prompt_tokens: int | None = None, api_key: str | None = None,
          drain_timeout: float = 30.0, compile_prompt_lengths: tuple[int, ...] = (),
          log_level: str = "warning", on_ready: Any = None) -> None:
    """Start the engine on ``loaded`` and serve HTTP on ``sock`` until drained (see the module docstring).

    ``max_prompt_tokens`` defaults to the model's ``context_length`` (no limit when it has none);
    ``compile_prompt_lengths`` compiles the prefill of these prompt lengths at every batch size before serving.
    ``on_ready(service)`` is called once the engine is ready, before the first request is taken. Raises
    ``ServeError`` for ``max_prompt_tokens`` over the model's ``context_length``, ``GenerationError`` for a bad
    ``max_batch`` or ``max_queue``."""
    from zoo.inference.engine import Engine

    limit = loaded.runner.context_length
    if max_prompt_tokens is not None and 0 < limit < max_prompt_tokens:
        raise ServeError(f"--max-prompt-tokens {max_prompt_tokens} is over the model's context_length {limit}")
    metrics = ServeMetrics()
    engine = Engine(loaded.runner, max_batch=max_batch, max_queue=max_queue, codec=loaded.codec, metrics=metrics)
    if 0 < limit:
        compile_prompt_lengths = tuple(n for n in compile_prompt_lengths if n <= limit)
    engine.start(prompt_lengths=compile_prompt_lengths)
    service = Service(engine, model_name or loaded.name, loaded.codec, metrics,
                      max_prompt_tokens if max_prompt_tokens is not None else (limit if limit > 0 else None), api_key)
    metrics.slots(0, engine.max_batch)
    config = uvicorn.Config(build_app(service), log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, loop="asyncio", http="h11", ws="none")
    server = DrainingServer(config, service, drain_timeout)
    if on_ready is not None:
        on_ready(service)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(drain=False)
        sock.close()
