"""Decoding: tokens/s of ``zoo.generate`` vs the PyTorch ``xlstm_large`` step API, and latency vs context."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from benchmarks.common import best_of_threads, interleaved, median, no_compiles, torch_thread_variants
from benchmarks.models import replace_keys, torch_model, zoo_config, zoo_params
from zoo.inference import SamplingParams, decode_loop, generate, sampler_state, step_fn


def _torch_decode(model: Any, prompt: np.ndarray, new_tokens: int) -> float:
    """Seconds per token of greedy decoding with the step API after prefilling ``prompt`` (prefill untimed)."""
    import torch

    with torch.no_grad():
        logits, state = model(torch.from_numpy(prompt.astype(np.int64)))
        token = logits[:, -1].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, state = model(token[:, None], state)
            token = logits[:, -1].argmax(-1)
        return (time.perf_counter() - start) / new_tokens


def latency_vs_context(cfg: Any, params: Any, contexts: list[int], steps: int, rounds: int) -> list[dict[str, Any]]:
    """Per-token latency of ``generate``'s step function from the state after prefilling each context length.

    Each context is prefilled once; then in every round each context decodes ``steps`` tokens from a copy
    of its state, round-robin over the contexts, so machine load hits all of them alike.
    """
    rng = np.random.default_rng(1)
    fused = step_fn(cfg, params)
    states, prefill_s = {}, {}
    for context in contexts:
        prompt = rng.integers(0, cfg.vocab_size, (1, context)).astype(np.int32)
        t0 = time.perf_counter()
        logits, states[context] = jax.block_until_ready(zoo.prefill(cfg, params, prompt))
        prefill_s[context] = time.perf_counter() - t0

    def step(token: jax.Array, carry: tuple[Any, Any]) -> tuple[jax.Array, tuple[Any, Any]]:
        sampled, state, sampler = fused(params, token, *carry)
        return sampled.tokens, (state, sampler)

    def run(context):
        def go():
            state = jax.tree_util.tree_map(jnp.copy, states[context])  # donated by the step function
            sampler = sampler_state([SamplingParams()], [[0]], cfg.vocab_size)  # greedy
            jax.block_until_ready((state, sampler))
            out = decode_loop(step, jnp.zeros((1,), jnp.int32), (state, sampler), steps + 1)  # steps steps, all timed
            per_token[context].append((out.first_step_s + out.decode_s) / steps)
        return go

    per_token: dict[int, list[float]] = {c: [] for c in contexts}
    fns = {str(c): run(c) for c in contexts}
    interleaved(fns, 0)  # the warm-up call of each context: compiles; dropped below
    with no_compiles("the decode latency rounds"):
        interleaved(fns, rounds, warmup=0)
    rows = []
    for c in contexts:
        ts = per_token[c][1:]  # the first call is the warm-up
        rows.append({"context": c, "zoo_ms_per_token": 1e3 * median(ts), "ms_per_token_rounds": [1e3 * t for t in ts],
                     "prefill_s": prefill_s[c]})
        print(f"  decode context {c}: {rows[-1]['zoo_ms_per_token']:.1f} ms/token", flush=True)
    return rows


def run(quick: bool) -> dict[str, Any]:
    """The ``decode`` section of ``bench.json``."""
    import torch

    cfg = zoo_config(quick)
    params = zoo_params(cfg)
    tmodel, _ = torch_model(cfg)
    zoo_tokens, torch_tokens, repeats = (18, 16, 2) if quick else (34, 16, 3)
    contexts = [128, 512] if quick else [128, 512, 2048, 8192]
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, contexts[0])).astype(np.int32)
    per_token: dict[str, list[float]] = {}

    def zoo_run():
        g = generate(cfg, params, prompt, zoo_tokens)
        per_token.setdefault("zoo generate", []).append(g.decode_s / (g.steps - 1))  # all steps but the first

    def torch_run():
        per_token.setdefault(f"torch step @{torch.get_num_threads()}t", []).append(
            _torch_decode(tmodel, prompt, torch_tokens))

    fns = {"zoo generate": zoo_run, **torch_thread_variants({"torch step": torch_run})}
    interleaved(fns, 0)  # the warm-up call of each: compiles; dropped below
    with no_compiles("the decode rounds"):
        interleaved(fns, repeats, warmup=0)
    per_token = {name: ts[1:] for name, ts in per_token.items()}  # drop the warm-up call
    med, chosen = best_of_threads({name: median(ts) for name, ts in per_token.items()})
    print("  decode: " + ", ".join(f"{n} {1 / t:.1f} tok/s" for n, t in med.items()), flush=True)
    # the preset's context_length (8192) would refuse the longest prompt plus its new tokens
    unlimited = zoo.load_config(replace_keys(cfg.model_dump(mode="json"), {"context_length": -1}))
    latency = latency_vs_context(unlimited, params, contexts, 16, repeats)
    return {"context": contexts[0], "zoo_new_tokens": zoo_tokens, "torch_steps": torch_tokens, "batch": 1,
            "dtype": "float32", "seconds_per_token": per_token, "median_s_per_token": med, "torch_threads_chosen": chosen,
            "tokens_per_s": {name: 1 / t for name, t in med.items()}, "latency_vs_context": latency}
