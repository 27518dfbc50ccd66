"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own: the engine reports into them
(``zoo.inference.engine.EngineMetrics``), the HTTP layer counts responses.

=====================================  =========  ===============================================================
name                                   type       meaning
=====================================  =========  ===============================================================
``zoo_http_requests_total``            counter    HTTP responses, by ``route`` and ``status``
``zoo_requests_total``                 counter    engine requests finished (one per choice), by ``reason``
``zoo_prompt_tokens_total``            counter    prompt tokens prefilled (a prompt with ``n`` choices counts n x)
``zoo_completion_tokens_total``        counter    tokens generated (EOS and stop sequences excluded)
``zoo_time_to_first_token_seconds``    histogram  from submission to the engine to the first token drawn
``zoo_inter_token_latency_seconds``    histogram  between consecutive tokens of one request
``zoo_slots_occupied``                 gauge      state slots holding a request
``zoo_slots_total``                    gauge      state slots (``--max-batch``)
``zoo_queue_depth``                    gauge      requests waiting for a slot
``zoo_xla_compiles_total``             counter    XLA compilations in the server process (none expected once warm)
=====================================  =========  ===============================================================
"""

from __future__ import annotations

import threading
import weakref

from jax import monitoring
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LIVE: weakref.WeakSet = weakref.WeakSet()
_LISTENING = threading.Lock()
_listener_added = False


def _count_compiles(event: str, duration: float, **kwargs: object) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        for metrics in list(_LIVE):
            metrics.compiles.inc()


def _listen() -> None:
    global _listener_added
    with _LISTENING:
        if not _listener_added:
            monitoring.register_event_duration_secs_listener(_count_compiles)
            _listener_added = True

TTFT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
"""Upper bounds (seconds) of the time-to-first-token buckets."""
ITL_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
               0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
"""Upper bounds (seconds) of the inter-token-latency buckets."""


class ServeMetrics:
    """The server's metrics; implements ``zoo.inference.engine.EngineMetrics`` (every method is thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter("zoo_http_requests", "HTTP responses by route and status code", ["route", "status"],
                            registry=r)
        self.requests = Counter("zoo_requests", "engine requests finished (one per choice), by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("zoo_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("zoo_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("zoo_time_to_first_token_seconds", "seconds from submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("zoo_inter_token_latency_seconds", "seconds between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.slots_occupied = Gauge("zoo_slots_occupied", "state slots holding a request", registry=r)
        self.slots_total = Gauge("zoo_slots_total", "state slots (--max-batch)", registry=r)
        self.queue_depth = Gauge("zoo_queue_depth", "requests waiting for a slot", registry=r)
        self.compiles = Counter("zoo_xla_compiles", "XLA compilations in this process", registry=r)
        _LIVE.add(self)
        _listen()

    # EngineMetrics
    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def slots(self, occupied: int, total: int) -> None:
        self.slots_occupied.set(occupied)
        self.slots_total.set(total)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    # HTTP
    def responded(self, route: str, status: int) -> None:
        """Count one HTTP response."""
        self.http.labels(route=route, status=str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
