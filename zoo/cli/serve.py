"""``zoo serve``: an OpenAI-compatible HTTP server (``/v1/completions``) with continuous batching (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from zoo.cli.common import bad_input_exits, err, fail, parse_ints
from zoo.cli.inference import StepOption, TokenizerOption

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DTYPES = ("float32", "bfloat16", "float16")


def serve_command(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="a checkpoint folder, a `zoo train` run folder or a "
                                         "`zoo export` StableHLO artifact folder")],
    host: Annotated[str, typer.Option("--host", help="the address to listen on (0.0.0.0: every interface; "
                                      "then set --api-key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="the TCP port (0: any free one)")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="state slots: requests decoded together in "
                                           "each step")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="requests that may wait for a slot; more get "
                                           "429")] = 256,
    max_prompt_tokens: Annotated[int | None, typer.Option("--max-prompt-tokens", min=1, metavar="N", help="the "
                                                          "longest prompt taken, in tokens (default: the model's "
                                                          "context_length; longer prompts get 400)")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", metavar="KEY", envvar="ZOO_API_KEY", help="require "
                                                "Authorization: Bearer KEY on /v1 routes (or set ZOO_API_KEY)")] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", metavar="NAME", help="the model id clients "
                                                   "name (default: PATH's folder name)")] = None,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0, metavar="SECONDS", help="on SIGTERM, "
                                                 "how long requests in flight may take to finish")] = 30.0,
    compile_prompt_lengths: Annotated[str | None, typer.Option("--compile-prompt-lengths", metavar="N,N,...",
                                                               help="compile the prefill of these prompt lengths "
                                                               "at every batch size before serving (one per "
                                                               "power-of-two bucket is enough)")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="cast a checkpoint's weights: float32, bfloat16 or "
                                              "float16")] = None,
    tokenizer: TokenizerOption = None,
    step: StepOption = None,
    log_level: Annotated[str, typer.Option("--log-level", help=f"uvicorn's log level: {', '.join(LOG_LEVELS)}")]
    = "warning",
) -> None:
    """Serve a model over HTTP with OpenAI's completions API; SIGTERM drains it (new requests 503, running ones end)."""
    from zoo.serve.server import bind, open_model, serve

    if api_key is not None and not api_key.strip():
        fail("--api-key: an empty key; give a key, or leave the option out to serve without one")
    if model_name is not None and not model_name.strip():
        fail("--model-name: an empty name")
    if dtype is not None and dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if log_level not in LOG_LEVELS:
        fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}; got {log_level!r}")
    lengths = tuple(parse_ints(compile_prompt_lengths, "--compile-prompt-lengths", "16,64,256")) \
        if compile_prompt_lengths else ()
    if any(n < 1 for n in lengths):
        fail(f"--compile-prompt-lengths needs lengths >= 1; got {compile_prompt_lengths!r}")
    with bad_input_exits(str(path)):
        sock = bind(host, port)  # first: a busy port fails before minutes of loading
        loaded = open_model(path, step, tokenizer, dtype)
    err.print(f"loaded {escape(loaded.what)}")
    url_host = f"[{host}]" if ":" in host else host

    def ready(service: object) -> None:
        err.print(f"serving {escape(service.model_name)} on http://{escape(url_host)}:{sock.getsockname()[1]} "
                  f"(max batch {max_batch}, queue {max_queue}; SIGTERM drains)")

    with bad_input_exits(str(path)):
        serve(loaded, sock, model_name=model_name, max_batch=max_batch, max_queue=max_queue,
              max_prompt_tokens=max_prompt_tokens, api_key=api_key, drain_timeout=drain_timeout,
              compile_prompt_lengths=lengths, log_level=log_level, on_ready=ready)
