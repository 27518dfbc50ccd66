"""Commands that run a model on a prompt: ``generate`` (a checkpoint) and ``run`` (an artifact or a checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zoo.cli.common import StepOption, bad_input_exits, err, fail, load_checkpoint, out, parse_ints


def parse_prompt(prompt_ids: str) -> list[int]:
    """Token ids from ``--prompt-ids``; the model or artifact checks them against its vocabulary and
    ``context_length`` (exit 2 with one line)."""
    ids = parse_ints(prompt_ids, "--prompt-ids", "1,2,3")
    too_big = next((i for i in ids if i >= 2**31), None)
    if too_big is not None:  # above int32: outside every vocabulary, and NumPy could not hold it as a token id
        fail(f"--prompt-ids: token id {too_big} is outside the vocabulary")
    return ids


PromptOption = Annotated[str, typer.Option("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3; at most "
                                           "context_length of them (generation may continue past it)")]
ShowLogitsOption = Annotated[int, typer.Option("--show-logits", min=0, metavar="N", help="print the N most likely "
                                               "next tokens after the prompt, with their logits (0: none)")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1, help="how many tokens to generate")]


def show_top_logits(logits: Any, count: int) -> None:
    """The ``count`` largest of the next-token ``logits (V,)``, most likely first."""
    import numpy as np

    logits = np.asarray(logits)
    if count:
        best = np.argsort(-logits, kind="stable")[:count]
        out.print(f"logits:    {'  '.join(f'{i}: {logits[i]:.4f}' for i in best)}")


def generate_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory written by `zoo build` or zoo.save")],
    prompt_ids: PromptOption,
    max_new_tokens: MaxNewTokensOption = 16,
    temperature: Annotated[float, typer.Option(help="sampling temperature, a finite number >= 0; 0 is greedy")
                           ] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="sample among the k most likely tokens "
                                       "(0: all)")] = 0,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="PRNG seed of the sampling")] = 0,
    show_logits: ShowLogitsOption = 5,
    step: StepOption = None,
) -> None:
    """Continue a prompt with a saved model: prefill once, then one jitted step per token."""
    from zoo.inference import check_sampling, generate

    try:
        check_sampling(max_new_tokens, temperature, top_k, seed)
    except ValueError as exc:
        fail(str(exc))
    prompt = parse_prompt(prompt_ids)
    config, params = load_checkpoint(checkpoint, step)
    with bad_input_exits(str(checkpoint)):
        result = generate(config, params, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    show_top_logits(result.prompt_logits[0], show_logits)
    out.print(f"generated: {' '.join(str(int(t)) for t in result.tokens[0])}")
    timings = [f"prefill {len(prompt)} tokens: {1000 * result.prefill_s:.1f} ms"]
    if max_new_tokens > 1:  # the first token comes from the prefill; each later one from a step
        timings.append(f"first step (with compile) {1000 * result.first_step_s:.1f} ms")
    if max_new_tokens > 2:
        timings.append(f"then {result.tokens_per_s:.1f} tokens/s")
    out.print("; ".join(timings))


def run_command(
    artifact: Annotated[Path, typer.Argument(help="a `zoo export` directory (stablehlo or savedmodel) "
                                             "or a `zoo build` checkpoint")],
    prompt_ids: PromptOption,
    max_new_tokens: MaxNewTokensOption = 8,
    show_logits: ShowLogitsOption = 5,
    step: Annotated[int | None, typer.Option("--step", min=0, help="with a checkpoint: the step to load "
                                             "(default: the latest)")] = None,
) -> None:
    """Smoke-test an artifact: its next-token logits for the prompt and a greedy continuation."""
    from zoo.checkpoint import find_step
    from zoo.export.runners import greedy, open_artifact

    prompt = parse_prompt(prompt_ids)
    with bad_input_exits(str(artifact)):
        loaded = open_artifact(artifact, step)
        if loaded.kind == "checkpoint":
            err.print(f"loaded {escape(str(find_step(artifact, step)))}")
    with bad_input_exits(str(artifact)):
        logits, tokens = greedy(loaded, prompt, max_new_tokens)
    out.print(f"artifact:  {loaded.kind} ({', '.join(sorted(loaded.entries))})")
    out.print(f"prompt:    {' '.join(map(str, prompt))}")
    show_top_logits(logits, show_logits)
    out.print(f"generated: {' '.join(map(str, tokens))}")
