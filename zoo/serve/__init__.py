"""``zoo serve``: an OpenAI-compatible HTTP server on the continuous-batching engine (``zoo.inference.engine``).

``protocol`` (the completions request and response bodies, error objects), ``metrics`` (Prometheus), ``app``
(the starlette routes), ``server`` (loading a model, uvicorn, SIGTERM drain). See docs/serving.md.
"""
