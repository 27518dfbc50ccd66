"""OpenAI's completions protocol as this server speaks it: the request body (pydantic, strict, unknown fields refused),
the response and stream-chunk bodies, and OpenAI-style error objects.

Extensions beyond OpenAI's API: request fields ``top_k``, ``min_p`` and ``repetition_penalty`` (the zoo sampler's,
``zoo.inference.SamplingParams``), and on every choice of a response or chunk ``token_ids``, the ids of the tokens
its text holds (the prompt's are not included, even with ``echo``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from zoo.errors import ZooError

MAX_LOGPROBS = 5
"""OpenAI's limit on ``logprobs`` for completions; the engine computes this many alternatives in every step."""
MAX_STOP = 4
"""OpenAI's limit on stop sequences."""
MAX_N = 128
"""OpenAI's limit on ``n``."""
DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for completions."""

TokenId = Annotated[int, Strict()]


class ApiError(ZooError, ValueError):
    """A request the server refuses, as an OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``.

    ``status`` is the HTTP status; ``param`` names the request field at fault (or None); ``code`` is a short
    machine-readable reason (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.kind, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "server_error"}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices. ``include_obfuscation``
    is accepted and has no effect (this server pads nothing)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``. ``None`` for a field means its default (the ``openai`` client may
    send explicit nulls). Types are strict (``"16"`` is not a number, ``true`` is not a token id)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)  # OpenAI's range and default; 0 is greedy
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(0, ge=0)  # extension; 0: no limit
    min_p: float | None = Field(0.0, ge=0, le=1)  # extension
    repetition_penalty: float | None = Field(1.0, gt=0)  # extension; 1: none
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    user: str | None = None  # accepted and ignored, as OpenAI's is for abuse monitoring
    # OpenAI fields this server does not implement: only their neutral values are accepted
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def value(self, name: str) -> Any:
        """The field's value, its default where it was sent as null."""
        given = getattr(self, name)
        return type(self).model_fields[name].default if given is None else given

    def prompts(self) -> list[str | list[int]]:
        """The prompts: a string or a list of token ids each."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def stops(self) -> list[str]:
        """The stop sequences (none, or one to ``MAX_STOP`` strings)."""
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


UNSUPPORTED = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": {}, "suffix": ""}
"""OpenAI fields this server does not implement, and the value of each that it accepts (it means "not used")."""


def parse_completion(body: bytes) -> CompletionRequest:
    """The request in a ``POST /v1/completions`` body; ``ApiError`` (400, naming the field) for malformed JSON, an
    unknown field, a value of the wrong type or out of range, or an OpenAI option this server does not implement."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc) from None
    _check_values(request)
    return request


def _one_line(exc: ValidationError) -> ApiError:
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    param = loc[0] if loc else None
    if error["type"] == "extra_forbidden":
        where = ".".join(loc)
        return ApiError(400, f"{where}: unknown field (not in OpenAI's completions API nor this server's "
                        f"extensions top_k, min_p, repetition_penalty)", where, "unknown_field")
    if error["type"] == "missing":
        return ApiError(400, f"{'.'.join(loc)}: a required field is missing", ".".join(loc), "missing")
    if param == "prompt":
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids (integers) or a list "
                        "of lists of token ids", "prompt", "invalid_type")
    if param == "stop":
        return ApiError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(400, f"{'.'.join(loc)}: {error['msg']} (got {shown})", ".".join(loc) or None, "invalid_value")


def _check_values(request: CompletionRequest) -> None:
    n, prompts, stops = request.value("n"), request.prompts(), request.stops()
    if not prompts:
        raise ApiError(400, "prompt: an empty list; give at least one prompt", "prompt", "invalid_value")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ApiError(400, f"prompt[{i}] is empty; give at least one token or character"
                           if len(prompts) > 1 else "prompt is empty; give at least one token or character",
                           "prompt", "invalid_value")
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise ApiError(400, f"stop: up to {MAX_STOP} non-empty strings, got {stops!r}", "stop", "invalid_value")
    if request.best_of is not None and request.best_of != n:
        raise ApiError(400, f"best_of: not supported by this server (only best_of = n = {n}), got {request.best_of}",
                       "best_of", "unsupported")
    for name, neutral in UNSUPPORTED.items():
        given = getattr(request, name)
        if given is not None and given != neutral:
            raise ApiError(400, f"{name}: not supported by this server (only {neutral!r}), got {given!r}", name,
                           "unsupported")
    seed = request.seed
    if seed is not None and seed + n - 1 >= 2**32:
        raise ApiError(400, f"seed: choice i uses seed + i, which must stay below 2**32; got seed {seed} with n {n}",
                       "seed", "invalid_value")
    if request.value("echo") and request.logprobs is not None:
        raise ApiError(400, "echo: not supported together with logprobs (this server reports no log-probabilities of "
                       "prompt tokens)", "echo", "unsupported")
    if request.stream_options is not None and not request.value("stream"):
        raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options", "invalid_value")


def completion_id() -> str:
    """A new ``cmpl-...`` id."""
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    """``created``: Unix seconds."""
    return int(time.time())


def logprobs_body(tokens: list[str], logprobs: list[float], top: list[dict[str, float]],
                  offsets: list[int]) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` object: ``tokens`` (each token's name), ``token_logprobs``,
    ``top_logprobs`` (``{name: logprob}`` per token) and ``text_offset`` (where each token's text starts in the
    choice's text, in characters)."""
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def choice_body(index: int, text: str, token_ids: list[int], finish_reason: str | None,
                logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One choice of a completion or of a stream chunk, with the ``token_ids`` extension."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, "token_ids": token_ids}


def completion_body(cid: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: dict[str, int] | None) -> dict[str, Any]:
    """A ``text_completion`` object (a whole response, or one stream chunk with ``usage`` None)."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None, "usage": usage}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``usage``: prompt tokens (each prompt once, whatever ``n``), completion tokens (every choice), their sum."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: {...}`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
