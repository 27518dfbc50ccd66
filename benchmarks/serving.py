"""Serving: a real ``zoo serve`` process on ``mlstm_v1-165m`` shapes (random float32 weights, no tokenizer), driven by
streaming HTTP clients in this process.

- total new tokens/s with 1, 4 and 16 concurrent clients over the same requests (1 client = one at a time), beside
  the decode ceilings of the machine (memory bandwidth and f32 matmul rate, measured in the same run);
- time to first token (TTFT) and inter-token latency (ITL) p50/p99, from the clients' clocks and from the server's
  ``/metrics`` histograms (bucket interpolation, as Prometheus' ``histogram_quantile``);
- the server's RSS with 1 and with 16 requests active, and while one request decodes at context 128 and at 4096
  (an xLSTM's state does not grow with the context: the target is under 5% growth).

Every prefill and slot-write shape is compiled at server start (``--compile-prompt-lengths``); the timed runs assert
that the server's ``zoo_xla_compiles_total`` does not move.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import numpy as np

import zoo
from benchmarks.common import fmt_bytes, median, no_compiles, spread
from benchmarks.generation import bandwidth_gbs, bytes_per_step, matmul_gflops
from benchmarks.models import zoo_config, zoo_params

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16)
MAX_BATCH = 16
PROMPT = 128
CONTEXTS = (128, 4096)
STARTUP_S = 900


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        return response.read().decode()


def _histogram(text: str, name: str) -> list[tuple[float, float]]:
    """``(upper bound, cumulative count)`` of a histogram in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name:
            return [(float(s.labels["le"]), s.value) for s in family.samples if s.name == name + "_bucket"]
    raise KeyError(name)


def _counter(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """The ``q`` quantile of the observations made between two scrapes, linear within a bucket (Prometheus'
    ``histogram_quantile``); nan without observations."""
    buckets = [(bound, a - b) for (bound, a), (_, b) in zip(after, before)]
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def _percentiles(xs: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))} if xs else \
        {"p50": float("nan"), "p99": float("nan")}


class _Clients:
    """Streaming completion requests over raw HTTP, with the server's RSS sampled against the number of requests
    that are decoding (first token received, not finished)."""

    def __init__(self, port: int, pid: int) -> None:
        import psutil

        self.port, self.process = port, psutil.Process(pid)
        self.active = 0
        self.lock = threading.Lock()
        self.rss: list[tuple[int, int]] = []  # (active requests, RSS bytes)

    def rss_now(self) -> int:
        return self.process.memory_info().rss

    def request(self, prompt: list[int], max_tokens: int, on_tokens: Any = None) -> dict[str, Any]:
        body = json.dumps({"model": "serve-bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True})
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"zoo serve answered {response.status}: {response.read()[:500]!r}")
        arrivals: list[tuple[float, int]] = []
        received = 0
        try:
            while True:
                line = response.readline()
                if not line or line.strip() == b"data: [DONE]":
                    break
                if not line.startswith(b"data: "):
                    continue
                count = len(json.loads(line[6:])["choices"][0]["token_ids"])
                if count:
                    arrivals.append((time.perf_counter(), count))
                    if received == 0:
                        with self.lock:
                            self.active += 1
                    received += count
                    if on_tokens is not None:
                        on_tokens(received)
        finally:
            if received:
                with self.lock:
                    self.active -= 1
            conn.close()
        itl = [(t - t0) / n for (t0, _), (t, n) in zip(arrivals, arrivals[1:]) for _ in range(n)]
        return {"tokens": received, "ttft_s": arrivals[0][0] - start, "itl_s": itl, "start": start,
                "end": arrivals[-1][0]}

    def run(self, requests: list[tuple[list[int], int]], clients: int) -> dict[str, Any]:
        """The requests through ``clients`` concurrent connections (each takes the next request when free)."""
        todo: Queue = Queue()
        for r in requests:
            todo.put(r)
        results: list[dict[str, Any]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def client() -> None:
            while True:
                try:
                    prompt, max_tokens = todo.get_nowait()
                except Empty:
                    return
                try:
                    results.append(self.request(prompt, max_tokens))
                except BaseException as exc:  # noqa: BLE001 - reported after the join
                    errors.append(exc)

        def sample() -> None:
            while not stop.is_set():
                self.rss.append((self.active, self.rss_now()))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if errors:
            raise errors[0]
        return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results), "results": results}


def _start_server(checkpoint: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "serve", str(checkpoint), "--port", str(port),
                                 "--max-batch", str(MAX_BATCH), "--model-name", "serve-bench",
                                 "--compile-prompt-lengths", str(PROMPT)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zoo serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if json.loads(_get(port, "/health"))["status"] == "ok":
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"zoo serve did not start within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(quick: bool) -> dict[str, Any]:
    """The ``serving`` section of ``bench.json``."""
    cfg = zoo_config(quick)
    count, new_tokens, rounds = (16, 24, 1) if quick else (32, 64, 2)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, cfg.vocab_size, PROMPT).tolist(), new_tokens) for _ in range(count)]
    load_start = list(os.getloadavg())
    bandwidth, gflops = bandwidth_gbs(), matmul_gflops()
    table = zoo.param_shapes(cfg)["token_embedding"]["embedding"]
    compute_ceiling = gflops * 1e9 / (2 * (zoo.param_count(cfg) - table.size))  # 2 FLOPs per weight, per token
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "serve-bench"
        zoo.save(checkpoint, cfg, zoo_params(cfg))
        port, log = _free_port(), Path(tmp) / "server.log"
        t0 = time.perf_counter()
        proc = _start_server(checkpoint, port, log)
        startup_s = time.perf_counter() - t0
        try:
            out = _measure(cfg, port, proc.pid, requests, rounds, bandwidth, compute_ceiling)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
    load_end = list(os.getloadavg())
    print(f"  server start (load + compile): {startup_s:.1f} s; exit after SIGTERM: {exit_code}; load average "
          f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end", flush=True)
    return {"preset": "tiny --quick variant of mlstm_v1-165m" if quick else "mlstm_v1-165m", "dtype": "float32",
            "weights": "random (zoo.init_params seed 0), no tokenizer", "params": zoo.param_count(cfg),
            "max_batch": MAX_BATCH, "prompt_tokens": PROMPT, "new_tokens": new_tokens, "requests": count,
            "rounds": rounds, "sampling": "greedy, streamed", "server_startup_s": startup_s,
            "server_exit_code": exit_code, "bandwidth_gbs": bandwidth, "matmul_gflops": gflops,
            "compute_ceiling_tokens_per_s": compute_ceiling, "load_avg_start": load_start, "load_avg_end": load_end,
            **out}


def _measure(cfg: Any, port: int, pid: int, requests: list[tuple[list[int], int]], rounds: int, bandwidth: float,
             compute_ceiling: float) -> dict[str, Any]:
    clients = _Clients(port, pid)
    clients.run(requests[:MAX_BATCH], MAX_BATCH)  # warm-up: every shape is compiled at start; this warms caches
    clients.run(requests[:2], 1)
    compiles = _counter(_get(port, "/metrics"), "zoo_xla_compiles_total")
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}
    with no_compiles("the serving rounds (client side)"):
        for _ in range(rounds):
            for c in CONCURRENCY:  # round-robin: machine load hits every concurrency alike
                before = _get(port, "/metrics")
                clients.rss.clear()
                run = clients.run(requests, c)
                after = _get(port, "/metrics")
                run["server"] = {name: {f"p{int(q * 100)}": histogram_quantile(q, _histogram(before, metric),
                                                                                _histogram(after, metric))
                                        for q in (0.5, 0.99)}
                                 for name, metric in (("ttft_s", "zoo_time_to_first_token_seconds"),
                                                      ("itl_s", "zoo_inter_token_latency_seconds"))}
                most = max(n for n, _ in clients.rss)  # c requests decoding at once, unless one ended first
                run["rss_at_full_occupancy"] = (most, max(rss for n, rss in clients.rss if n == most))
                runs[c].append(run)
        context = _context_rss(clients, requests[0][0])
        compiled = _counter(_get(port, "/metrics"), "zoo_xla_compiles_total") - compiles
    if compiled:
        raise RuntimeError(f"{compiled:.0f} XLA compiles happened in the server during the timed runs: the figures "
                           "would count compile time")
    out: dict[str, Any] = {"concurrency": {}}
    sequential = None
    for c, rs in runs.items():
        tps = [r["tokens"] / r["wall_s"] for r in rs]
        ttft = [x["ttft_s"] for r in rs for x in r["results"]]
        itl = [v for r in rs for x in r["results"] for v in x["itl_s"]]
        batch = min(c, MAX_BATCH)
        ceiling = batch * bandwidth * 1e9 / bytes_per_step(cfg, batch)
        row = {"clients": c, "tokens_per_s": median(tps), "tokens_per_s_rounds": tps, "spread": spread(tps),
               "decode_ceiling_tokens_per_s": ceiling, "fraction_of_ceiling": median(tps) / min(ceiling,
                                                                                                 compute_ceiling),
               "client": {"ttft_s": _percentiles(ttft), "itl_s": _percentiles(itl)},
               "server": {k: {p: median([r["server"][k][p] for r in rs]) for p in ("p50", "p99")}
                          for k in ("ttft_s", "itl_s")},
               "most_active": max(r["rss_at_full_occupancy"][0] for r in rs),
               "rss_bytes_at_full_occupancy": max(r["rss_at_full_occupancy"][1] for r in rs)}
        sequential = sequential or row["tokens_per_s"]
        row["speedup_vs_one_at_a_time"] = row["tokens_per_s"] / sequential
        out["concurrency"][str(c)] = row
        print(f"  {c:>2} clients: {row['tokens_per_s']:7.1f} tok/s (rounds spread {100 * row['spread']:.0f}%; "
              f"{row['speedup_vs_one_at_a_time']:.2f}x one at a "
              f"time; ceiling {min(ceiling, compute_ceiling):.0f} tok/s); TTFT p50/p99 client "
              f"{1e3 * row['client']['ttft_s']['p50']:.0f}/{1e3 * row['client']['ttft_s']['p99']:.0f} ms, server "
              f"{1e3 * row['server']['ttft_s']['p50']:.0f}/{1e3 * row['server']['ttft_s']['p99']:.0f} ms; ITL p50/p99 "
              f"client {1e3 * row['client']['itl_s']['p50']:.1f}/{1e3 * row['client']['itl_s']['p99']:.1f} ms, server "
              f"{1e3 * row['server']['itl_s']['p50']:.1f}/{1e3 * row['server']['itl_s']['p99']:.1f} ms; RSS "
              f"{fmt_bytes(row['rss_bytes_at_full_occupancy'])} with {row['most_active']} active", flush=True)
    one, full = (out["concurrency"][str(c)]["rss_bytes_at_full_occupancy"] for c in (1, MAX_BATCH))
    most = out["concurrency"][str(MAX_BATCH)]["most_active"]
    out["rss_bytes"] = {"active_1": one, f"active_{most}": full, **{f"context_{k}": v for k, v in context.items()}}
    out["rss_growth_context"] = context[CONTEXTS[1]] / context[CONTEXTS[0]] - 1
    print(f"  RSS: {fmt_bytes(one)} with 1 active, {fmt_bytes(full)} with {most}; at context {CONTEXTS[0]} "
          f"{fmt_bytes(context[CONTEXTS[0]])}, at {CONTEXTS[1]} {fmt_bytes(context[CONTEXTS[1]])} "
          f"({100 * out['rss_growth_context']:+.1f}%)", flush=True)
    return out


def _context_rss(clients: _Clients, prompt: list[int]) -> dict[int, int]:
    """The server's RSS while one request decodes, when its context (prompt + output) reaches each of ``CONTEXTS``."""
    seen: dict[int, int] = {}

    def on_tokens(received: int) -> None:
        for context in CONTEXTS:
            if context not in seen and PROMPT + received >= context:
                seen[context] = clients.rss_now()

    clients.request(prompt, CONTEXTS[-1] - PROMPT, on_tokens)
    return seen


def targets(serving: dict[str, Any]) -> list[Any]:
    """The serving target: server RSS grows under 5% from context 128 to 4096."""
    from benchmarks.targets import Target

    rss = serving["rss_bytes"]
    return [Target(f"serve RSS growth, context {CONTEXTS[0]} -> {CONTEXTS[1]}", serving["rss_growth_context"], 0.05,
                   False, f"{fmt_bytes(rss[f'context_{CONTEXTS[0]}'])} -> {fmt_bytes(rss[f'context_{CONTEXTS[1]}'])} "
                   f"({serving['preset']}, {serving['dtype']})")]


def plot(serving: dict[str, Any], path: Path) -> Path:
    """Total tokens/s against concurrent clients, with the decode ceilings; latency percentiles beside it."""
    from benchmarks.plots import _pyplot, _save

    plt = _pyplot()
    rows = [serving["concurrency"][str(c)] for c in CONCURRENCY]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    clients = [r["clients"] for r in rows]
    axes[0].plot(clients, [r["tokens_per_s"] for r in rows], "-o", label="zoo serve (streamed, greedy)")
    for r in rows:
        axes[0].plot([r["clients"]] * len(r["tokens_per_s_rounds"]), r["tokens_per_s_rounds"], "k.")
    axes[0].plot(clients, [r["decode_ceiling_tokens_per_s"] for r in rows], "k--",
                 label=f"bandwidth ceiling ({serving['bandwidth_gbs']:.0f} GB/s, batch = clients)")
    axes[0].axhline(serving["compute_ceiling_tokens_per_s"], color="k", ls=":",
                    label=f"compute ceiling ({serving['matmul_gflops']:.0f} GFLOP/s f32 matmul)")
    axes[0].set(xscale="log", yscale="log", xlabel="concurrent clients (1 = one request at a time)",
                ylabel="new tokens / s (all clients)", title=f"throughput vs concurrency, {serving['preset']}\n"
                f"{serving['requests']} requests of {serving['prompt_tokens']}+{serving['new_tokens']} tokens, "
                f"--max-batch {serving['max_batch']}")
    axes[0].set_xscale("log", base=2)
    for key, style in (("ttft_s", "o"), ("itl_s", "s")):
        for side, line in (("client", "-"), ("server", "--")):
            for p in ("p50", "p99"):
                axes[1].plot(clients, [1e3 * r[side][key][p] for r in rows], line + style,
                             label=f"{key.removesuffix('_s').upper()} {p} ({side})")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms",
                title="latency: clients' clocks and the server's /metrics")
    axes[1].set_xscale("log", base=2)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
