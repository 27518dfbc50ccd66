"""The HTTP routes (starlette) on the engine: OpenAI's ``/v1/completions`` and ``/v1/models``, ``/health`` and
``/metrics``; every refusal is an OpenAI error object.

The engine runs on its own thread and hands each request's output (``zoo.inference.engine.Delta``) to a callback;
the callback moves it onto the event loop, where the request's handler turns it into a response or a stream of
server-sent events. A request whose client goes away is cancelled in the engine, which frees its slot at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zoo.errors import ZooError
from zoo.inference.engine import Delta, EngineClosed, EngineRequest, QueueFull
from zoo.inference.sampling import SamplingParams
from zoo.serve.metrics import ServeMetrics
from zoo.serve.protocol import (ApiError, CompletionRequest, choice_body, completion_body, completion_id,
                                logprobs_body, now, parse_completion, sse, usage_body)
from zoo.tokenizers import Codec

log = logging.getLogger("zoo.serve")

MAX_BODY_BYTES = 16 * 2**20
"""The largest request body accepted (413 above)."""
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
"""The paths counted by name in ``zoo_http_requests_total``; any other counts as ``other``."""


@dataclass
class Service:
    """What the routes serve: an engine (``zoo.inference.engine.Engine``, started) and its settings.

    ``max_prompt_tokens`` bounds each prompt's length (None: the engine's own ``context_length`` check only);
    ``api_key``, when set, is required on every ``/v1`` route as ``Authorization: Bearer KEY``; ``draining`` (set on
    SIGTERM) answers new ``/v1`` requests 503; ``poll_s`` is how often a waiting non-streaming request checks that
    its client is still connected.
    """

    engine: Any
    model_name: str
    codec: Codec | None = None
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    max_prompt_tokens: int | None = None
    api_key: str | None = None
    draining: bool = False
    poll_s: float = 0.1
    created: int = field(default_factory=now)

    def token_text(self, token_id: int) -> str:
        """A token's name in ``logprobs``: its text alone; ``token_id:N`` without a tokenizer, for a token whose text
        alone is empty (a special token) or not whole characters (part of a character's UTF-8 bytes)."""
        if self.codec is not None:
            text = self.codec.decode([token_id])
            if text and "\ufffd" not in text:
                return text
        return f"token_id:{token_id}"


class _Choice:
    """One choice's output so far, from the engine's deltas."""

    def __init__(self, index: int, echo: str, service: Service) -> None:
        self.index, self.service = index, service
        self.ids: list[int] = []
        self.text: list[str] = [echo]
        self.offset = len(echo)  # characters of text before the next token: its text_offset
        self.logprobs: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                               "text_offset": []}
        self.finish_reason: str | None = None
        self.error: str | None = None

    def add(self, delta: Delta) -> dict[str, Any] | None:
        """Record ``delta``; returns its part of the logprobs object (None when not asked for)."""
        self.ids += delta.token_ids
        self.text.append(delta.text)
        self.finish_reason, self.error = delta.finish_reason, delta.error
        if delta.logprobs is None:
            return None
        name, codec = self.service.token_text, self.service.codec
        # each token's text starts after the text of the tokens before it in this delta (bounded by the delta's text)
        offsets = [self.offset + min(len(codec.decode(delta.token_ids[:j])) if codec is not None and j else 0,
                                     len(delta.text)) for j in range(len(delta.token_ids))]
        self.offset += len(delta.text)
        top = delta.top_logprobs or [{} for _ in delta.token_ids]
        part = logprobs_body([name(t) for t in delta.token_ids], list(delta.logprobs),
                             [{name(t): lp for t, lp in alternatives.items()} for alternatives in top], offsets)
        for key, values in part.items():
            self.logprobs[key] += values
        return part

    def body(self, asked_logprobs: bool) -> dict[str, Any]:
        return choice_body(self.index, "".join(self.text), self.ids, self.finish_reason,
                           self.logprobs if asked_logprobs else None)


class _Job:
    """The engine tickets of one HTTP request and the queue their deltas arrive on, as ``(choice index, delta)``."""

    def __init__(self, count: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Delta] | None] = asyncio.Queue()  # None: the client is gone
        self.tickets: list[Any] = []
        self.running = [True] * count

    def callback(self, index: int) -> Callable[[Delta], None]:
        def on_output(delta: Delta) -> None:  # on the engine's thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, delta))

        return on_output

    async def next(self) -> tuple[int, Delta] | None:
        item = await self.queue.get()
        if item is not None and item[1].finish_reason is not None:
            self.running[item[0]] = False
        return item

    def cancel(self) -> None:
        """Cancel every ticket still running (the engine frees their slots before its next step)."""
        for ticket, running in zip(self.tickets, self.running):
            if running:
                ticket.cancel()

    @property
    def done(self) -> bool:
        return not any(self.running)


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _check_access(service: Service, request: Request) -> None:
    if service.api_key is not None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), service.api_key.encode()):
            why = "missing" if not key.strip() else "incorrect"
            raise ApiError(401, f"{why} API key: send Authorization: Bearer KEY with the key the server was started "
                           f"with (--api-key)", code="invalid_api_key")
    if service.draining:
        raise ApiError(503, "the server is shutting down: it finishes the requests it has and takes no new ones",
                       code="draining")


def _check_model(service: Service, model: str, param: str | None = "model") -> None:
    if model != service.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                       param, "model_not_found")


def _prompt_ids(service: Service, request: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and its text for ``echo``; ``ApiError`` 400 naming ``prompt`` when one cannot be
    served."""
    vocab_size, out = service.engine.vocab_size, []
    limit = service.max_prompt_tokens
    several = not (isinstance(request.prompt, str) or isinstance(request.prompt[0], int))
    for i, prompt in enumerate(request.prompts()):
        where = f"prompt[{i}]" if several else "prompt"
        if isinstance(prompt, str):
            if service.codec is None:
                raise ApiError(400, f"{where} is text, but this model has no tokenizer: send token ids (a list of "
                               f"integers) instead", "prompt", "no_tokenizer")
            ids, echo = service.codec.encode(prompt), prompt
            if not ids:
                raise ApiError(400, f"{where} encodes to no tokens", "prompt", "invalid_value")
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               "prompt", "invalid_value")
            echo = service.codec.decode(ids) if service.codec is not None else ""
        if limit is not None and len(ids) > limit:
            raise ApiError(400, f"{where} has {len(ids)} tokens; this server takes at most {limit} "
                           f"(--max-prompt-tokens)", "prompt", "context_length_exceeded")
        out.append((ids, echo))
    return out


def _submit(service: Service, request: CompletionRequest, prompts: list[tuple[list[int], str]]) -> _Job:
    """Submit ``n`` engine requests per prompt (choice ``i`` of a prompt with seed ``seed + i``); on a refusal
    cancel the ones already submitted and raise ``ApiError`` (429 queue full, 503 closed, 400 bad settings)."""
    stops = request.stops()
    if stops and service.codec is None:
        raise ApiError(400, "stop: text stop sequences need a tokenizer, and this model has none", "stop",
                       "no_tokenizer")
    n = request.value("n")
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32 - n + 1)
    settings = dict(temperature=float(request.value("temperature")), top_p=float(request.value("top_p")),
                    top_k=min(request.value("top_k"), service.engine.vocab_size),
                    min_p=float(request.value("min_p")), repetition_penalty=float(request.value("repetition_penalty")),
                    logprobs=request.logprobs)
    job = _Job(len(prompts) * n)
    try:
        for p, (ids, _) in enumerate(prompts):
            for i in range(n):
                sampling = SamplingParams(seed=seed + i, **settings)
                engine_request = EngineRequest(ids, request.value("max_tokens"), sampling, tuple(stops))
                job.tickets.append(service.engine.submit(engine_request, job.callback(p * n + i)))
    except QueueFull:
        job.cancel()
        raise ApiError(429, f"the server's queue is full ({service.engine.queue_depth()} requests wait for a slot); "
                       f"retry later", code="queue_full") from None
    except EngineClosed:
        job.cancel()
        raise ApiError(503, "the server is shutting down and takes no new requests", code="draining") from None
    except (ZooError, ValueError, TypeError) as exc:
        job.cancel()
        raise ApiError(400, str(exc), code="invalid_value") from None
    return job


def _finished_badly(choice: _Choice) -> ApiError | None:
    if choice.finish_reason == "error":
        return ApiError(500, f"generation failed: {choice.error or 'an error in the engine'}", code="engine_error")
    if choice.finish_reason in ("cancelled", "timeout"):
        return ApiError(503, "the request was ended before it finished (the server is shutting down)",
                        code="cancelled")
    return None


async def _collect(service: Service, request: Request, job: _Job, choices: list[_Choice]) -> bool:
    """Wait for every choice to finish; False when the client went away first (its tickets are then cancelled).
    A watcher checks the client every ``service.poll_s`` seconds and wakes the wait when it is gone."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(service.poll_s)
        job.queue.put_nowait(None)

    watcher = asyncio.create_task(watch())
    try:
        while not job.done:
            item = await job.next()
            if item is None:
                return False
            index, delta = item
            choices[index].add(delta)
        return True
    finally:
        watcher.cancel()
        job.cancel()


async def _stream(service: Service, job: _Job, choices: list[_Choice], cid: str, created: int,
                  request: CompletionRequest, prompt_tokens: int) -> AsyncIterator[bytes]:
    """The server-sent events of a streaming request: one chunk per delta, an error event if the engine fails, the
    usage chunk when asked for, and ``[DONE]``. Cancelled with the response when the client goes away; the
    ``finally`` then cancels the tickets still running."""
    model, asked_logprobs = service.model_name, request.logprobs is not None
    try:
        for choice in choices:
            if choice.text[0]:  # echo: the prompt comes first
                yield sse(completion_body(cid, created, model, [choice_body(
                    choice.index, choice.text[0], [], None, None)], None))
        while not job.done:
            index, delta = await job.next()  # never None: only a non-streaming request's watcher puts one
            choice = choices[index]
            part = choice.add(delta)
            failed = _finished_badly(choice)
            if failed is not None:
                yield sse(failed.body())
                break
            if delta.token_ids or delta.text or delta.finish_reason:
                yield sse(completion_body(cid, created, model, [choice_body(
                    index, delta.text, list(delta.token_ids), delta.finish_reason,
                    part if asked_logprobs else None)], None))
        else:
            if request.stream_options is not None and request.stream_options.include_usage:
                yield sse(completion_body(cid, created, model, [], usage_body(
                    prompt_tokens, sum(len(c.ids) for c in choices))))
        yield sse("[DONE]")
    finally:
        job.cancel()


def build_app(service: Service) -> Starlette:
    """The ASGI app serving ``service``."""

    async def health(request: Request) -> Response:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": service.model_name,
                             "slots": {"occupied": service.engine.occupied(), "total": service.engine.max_batch},
                             "queue_depth": service.engine.queue_depth()})

    async def metrics(request: Request) -> Response:
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "xlstm-zoo"}

    async def models(request: Request) -> Response:
        _check_access(service, request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        _check_access(service, request)
        _check_model(service, request.path_params["model"], None)
        return JSONResponse(model_card())

    async def chat(request: Request) -> Response:
        raise ApiError(404, "/v1/chat/completions is not served: this is a base model, which has no chat template; "
                       "use /v1/completions", code="not_found")

    async def completions(request: Request) -> Response:
        _check_access(service, request)
        body = await request.body()
        parsed = parse_completion(body)
        _check_model(service, parsed.model)
        prompts = _prompt_ids(service, parsed)
        n = parsed.value("n")
        choices = [_Choice(p * n + i, echo if parsed.value("echo") else "", service)
                   for p, (_, echo) in enumerate(prompts) for i in range(n)]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        job = _submit(service, parsed, prompts)
        cid, created = completion_id(), now()
        if parsed.value("stream"):
            return StreamingResponse(_stream(service, job, choices, cid, created, parsed, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await _collect(service, request, job, choices):
            return Response(status_code=499)  # nobody reads it: the client is gone
        for choice in choices:
            failed = _finished_badly(choice)
            if failed is not None:
                raise failed
        asked = parsed.logprobs is not None
        return JSONResponse(completion_body(cid, created, service.model_name, [c.body(asked) for c in choices],
                                            usage_body(prompt_tokens, sum(len(c.ids) for c in choices))))

    async def api_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                413: f"the request body is over {MAX_BODY_BYTES} bytes"}.get(status, exc.detail)
        return _error_response(ApiError(status, what, code={404: "not_found"}.get(status)))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("a request failed", exc_info=exc)
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_CountResponses, metrics=service.metrics)],
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
                     max_body_size=MAX_BODY_BYTES)


class _CountResponses:
    """ASGI middleware: counts each HTTP response in ``zoo_http_requests_total`` by route and status."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def counting(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self.metrics.responded(route, status)
