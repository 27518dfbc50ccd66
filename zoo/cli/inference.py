"""Commands that run a model on prompts: ``generate`` and ``run`` (both take a checkpoint or an export artifact).

They share their flags and their output. ``generate`` prints the prompts' continuations with sampling;
``run`` is the same with a shorter default length and a first line naming the artifact (a smoke test).
Exactly one prompt source: ``--prompt TEXT`` (repeatable, needs a tokenizer), ``--prompt-file FILE`` (one
prompt per line, or JSON lines) or ``--prompt-ids 1,2,3`` (repeatable).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zoo.cli.common import bad_input_exits, err, fail, out, parse_ints


def parse_prompt(prompt_ids: str) -> list[int]:
    """Token ids from ``--prompt-ids``; the model or artifact checks them against its vocabulary and
    ``context_length`` (exit 2 with one line)."""
    ids = parse_ints(prompt_ids, "--prompt-ids", "1,2,3")
    too_big = next((i for i in ids if i >= 2**31), None)
    if too_big is not None:  # above int32: outside every vocabulary, and NumPy could not hold it as a token id
        fail(f"--prompt-ids: token id {too_big} is outside the vocabulary")
    return ids


def read_prompt_file(path: Path) -> list[str | list[int]]:
    """Prompts from a file: one text prompt per non-empty line, or JSON lines (``.jsonl``, or every line starting
    with ``{``, ``[`` or ``"``), each a string, a list of token ids or ``{"prompt": ...}`` with either."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--prompt-file {path}: unreadable ({getattr(exc, 'strerror', None) or exc})")
    if not lines:
        fail(f"--prompt-file {path}: no prompts (the file has no non-empty line)")
    if not (path.suffix == ".jsonl" or all(line.lstrip()[:1] in '{["' for line in lines)):
        return lines
    prompts: list[str | list[int]] = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            fail(f"--prompt-file {path}, line {number}: malformed JSON ({exc.msg})")
        item = item.get("prompt") if isinstance(item, dict) else item
        if isinstance(item, str) or (isinstance(item, list) and item and all(
                isinstance(i, int) and not isinstance(i, bool) for i in item)):
            prompts.append(item)
        else:
            fail(f"--prompt-file {path}, line {number}: expected a string, a list of token ids or "
                 f'{{"prompt": ...}} with one of them')
    return prompts


PromptOption = Annotated[list[str] | None, typer.Option(
    "--prompt", metavar="TEXT", help="a text prompt (repeatable; needs a tokenizer stored with the model or --tokenizer)")]
PromptFileOption = Annotated[Path | None, typer.Option(
    "--prompt-file", metavar="FILE", help="prompts, one per line, or JSON lines (strings, token-id lists or "
    '{"prompt": ...})')]
PromptIdsOption = Annotated[list[str] | None, typer.Option(
    "--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3 (repeatable: one prompt each); at "
    "most context_length of them (generation may continue past it)")]
TokenizerOption = Annotated[Path | None, typer.Option(
    "--tokenizer", metavar="FILE", help="a tokenizer.json to use instead of the one stored with the model")]
ShowLogitsOption = Annotated[int, typer.Option("--show-logits", min=0, metavar="N", help="print the N most likely "
                                               "next tokens after each prompt, with their logits (0: none)")]
TemperatureOption = Annotated[float, typer.Option(help="sampling temperature, a finite number >= 0; 0 is greedy")]
TopKOption = Annotated[int, typer.Option("--top-k", min=0, help="sample among the k most likely tokens (0: all)")]
TopPOption = Annotated[float, typer.Option("--top-p", help="nucleus sampling: the most likely tokens up to this "
                                           "probability mass, in (0, 1]")]
MinPOption = Annotated[float, typer.Option("--min-p", help="drop tokens less likely than min-p times the most "
                                           "likely one, in [0, 1]")]
PenaltyOption = Annotated[float, typer.Option("--repetition-penalty", help="> 0; above 1 discourages tokens already "
                                              "in the prompt or output")]
SeedOption = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="PRNG seed of the sampling (each prompt's "
                                         "draws depend only on it, not on the other prompts)")]
StopOption = Annotated[list[str] | None, typer.Option("--stop", metavar="TEXT", help="stop a prompt's output "
                                                      "before this text (repeatable; needs a tokenizer)")]
LogprobsOption = Annotated[int | None, typer.Option("--logprobs", min=0, max=20, metavar="N", help="report each "
                                                    "new token's log-probability and the N most likely alternatives")]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object: per prompt its ids, text, finish "
                                          "reason and log-probabilities, and the timings")]
StepOption = Annotated[int | None, typer.Option("--step", min=0, help="with a checkpoint: the step to load "
                                                "(default: the latest)")]


@dataclass
class Source:
    """What the prompts run on: a ``Runner`` (zoo.inference), or an artifact without a stateful entry (``greedy``)."""

    kind: str
    runner: Any
    artifact: Any = None


def gather_prompts(prompt: list[str] | None, prompt_file: Path | None,
                   prompt_ids: list[str] | None) -> list[str | list[int]]:
    """The prompts of exactly one of ``--prompt``, ``--prompt-file``, ``--prompt-ids``; exit 2 otherwise."""
    given = [name for name, value in (("--prompt", prompt), ("--prompt-file", prompt_file),
                                      ("--prompt-ids", prompt_ids)) if value]
    if len(given) != 1:
        fail(f"give exactly one of --prompt, --prompt-file, --prompt-ids (got {', '.join(given) or 'none'})")
    if prompt:
        return list(prompt)
    return read_prompt_file(prompt_file) if prompt_file else [parse_prompt(ids) for ids in prompt_ids]


def load_codec_for(path: Path, step: int | None, tokenizer: Path | None, prompts: list, stop: list[str] | None) -> Any:
    """The tokenizer stored at ``path`` (``--tokenizer`` overrides it); exit 2 when text needs one and there is none,
    before any weights are read."""
    from zoo.checkpoint import CHECKPOINT, classify_path
    from zoo.tokenizers import load_codec

    with bad_input_exits(str(path)):
        found = classify_path(path)
        if found.kind not in ("checkpoint", "artifact"):
            raise found.refuse(f"a `zoo export` artifact folder or {CHECKPOINT}")
        codec = load_codec(path, step=step, file=tokenizer)
    if codec is None and any(isinstance(p, str) for p in prompts):
        fail("text prompts need a tokenizer: this model stores none; pass --tokenizer tokenizer.json, or use "
             "--prompt-ids")
    if codec is None and stop:
        fail("--stop needs a tokenizer: this model stores none; pass --tokenizer tokenizer.json")
    return codec


def open_source(path: Path, step: int | None) -> Source:
    """The checkpoint (its step) or export artifact at ``path``."""
    from zoo.checkpoint import classify_path, find_step, load
    from zoo.export.runners import open_artifact
    from zoo.inference import ArtifactRunner, ModelRunner

    with bad_input_exits(str(path)):
        if classify_path(path).kind == "checkpoint":
            where = find_step(path, step)
            config, params = load(where.root, where.step)
            err.print(f"loaded {escape(str(where))}")
            return Source("checkpoint", ModelRunner(config, params))
        artifact = open_artifact(path, step)
    stateful = {"prefill", "step"} <= artifact.entries and artifact.static is None
    return Source(artifact.kind, ArtifactRunner(artifact) if stateful else None, artifact)


def show_top_logits(logits: Any, count: int) -> None:
    """The ``count`` largest of the next-token ``logits (V,)``, most likely first."""
    import numpy as np

    logits = np.asarray(logits)
    if count:
        best = np.argsort(-logits, kind="stable")[:count]
        out.print(f"logits:    {'  '.join(f'{i}: {logits[i]:.4f}' for i in best)}")


def _prompt_text(prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def _run_prompts(command: str, path: Path, prompts_given: tuple, max_new_tokens: int, settings: dict[str, Any],
                 stop: list[str] | None, logprobs: int | None, as_json: bool, show_logits: int, step: int | None,
                 tokenizer: Path | None) -> None:
    from zoo.inference import check_sampling, generate_with

    try:
        check_sampling(max_new_tokens, settings["temperature"], settings["top_k"], settings["seed"])
    except ValueError as exc:
        fail(str(exc))
    prompts = gather_prompts(*prompts_given)
    codec = load_codec_for(path, step, tokenizer, prompts, stop)
    source = open_source(path, step)
    if command == "run":
        entries = sorted(source.artifact.entries) if source.artifact is not None else ["forward", "prefill", "step"]
        out.print(f"artifact:  {source.kind} ({', '.join(entries)})")
    if source.runner is None:
        return _greedy_only(source, codec, prompts, max_new_tokens, settings, stop, logprobs, as_json, show_logits)
    stream = len(prompts) == 1 and codec is not None and not as_json
    streamed: list[str] = []

    def on_text(row: int, piece: str) -> None:
        if not streamed:  # the prompt and the label wait for the first piece: a refused run prints nothing here
            _print_prompt(prompts[0])
            out.print("text:      ", end="")
        streamed.append(piece)
        sys.stdout.write(piece)  # as it arrives, not through rich: a piece may be a lone space or newline
        sys.stdout.flush()

    with bad_input_exits(str(path)):
        result = generate_with(source.runner, prompts, max_new_tokens, stop=stop, logprobs=logprobs,
                               tokenizer=codec, on_text=on_text if stream else None, **settings)
    if as_json:
        return _print_json(prompts, result)
    if stream and streamed:
        out.print()
    for b, prompt in enumerate(prompts):
        if not (stream and streamed):
            _print_prompt(prompt, result.text[b] if result.text is not None else None)
        show_top_logits(result.prompt_logits[b], show_logits)
        out.print(f"generated: {' '.join(map(str, result.tokens[b]))}")
        out.print(f"finish:    {result.finish_reasons[b]}")
    _print_timings(result, max(len(p) if not isinstance(p, str) else 0 for p in prompts), len(prompts))


def _print_prompt(prompt: str | list[int], text: str | None = None) -> None:
    out.print(f"prompt:    {escape(_prompt_text(prompt))}")
    if text is not None:
        out.print(f"text:      {escape(text)}")


def _print_timings(result: Any, longest_ids: int, count: int) -> None:
    what = f"{count} prompts" if count > 1 else (f"{longest_ids} tokens" if longest_ids else "the prompt")
    timings = [f"prefill {what}: {1000 * result.prefill_s:.1f} ms"]
    if result.steps >= 1:  # the first token comes from the prefill; each later one from a step
        timings.append(f"first step (with compile) {1000 * result.first_step_s:.1f} ms")
    if result.steps >= 2:
        timings.append(f"then {result.tokens_per_s:.1f} tokens/s")
    out.print("; ".join(timings))


def _print_json(prompts: list[str | list[int]], result: Any) -> None:
    rows = []
    for b, prompt in enumerate(prompts):
        row = {"prompt": prompt, "ids": result.tokens[b], "finish_reason": result.finish_reasons[b]}
        if result.text is not None:
            row["text"] = result.text[b]
        if result.logprobs is not None:
            row["logprobs"] = result.logprobs[b]
        if result.top_logprobs is not None:
            row["top_logprobs"] = [{str(k): v for k, v in alternatives.items()}
                                   for alternatives in result.top_logprobs[b]]
        rows.append(row)
    timings = {"prefill_s": result.prefill_s, "first_step_s": result.first_step_s, "decode_s": result.decode_s,
               "steps": result.steps, "tokens_per_s": None if result.steps < 2 else result.tokens_per_s}
    print(json.dumps({"outputs": rows, "timings": timings}))


def _greedy_only(source: Source, codec: Any, prompts: list, max_new_tokens: int, settings: dict[str, Any], stop: Any,
                 logprobs: Any, as_json: bool, show_logits: int) -> None:
    """An artifact with static shapes or without prefill and step: one prompt of ids, greedy, through ``greedy``."""
    from zoo.export.runners import greedy

    why = "it has static shapes" if source.artifact.static is not None else "it has no prefill and step entries"
    if len(prompts) != 1:
        fail(f"{source.artifact.path}: {why}, so it runs one prompt at a time")
    if settings["temperature"] or stop or logprobs is not None or as_json or any(
            settings[k] != v for k, v in (("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0))):
        fail(f"{source.artifact.path}: {why}; it decodes greedily only (no sampling, --stop, --logprobs or --json)")
    ids = prompts[0] if not isinstance(prompts[0], str) else codec.encode(prompts[0])
    with bad_input_exits(str(source.artifact.path)):
        logits, tokens = greedy(source.artifact, ids, max_new_tokens)
    _print_prompt(prompts[0])
    show_top_logits(logits, show_logits)
    out.print(f"generated: {' '.join(map(str, tokens))}")
    if codec is not None:
        out.print(f"text:      {escape(codec.decode(tokens))}")


def _prompt_command(name: str, path_help: str, default_new_tokens: int, doc: str) -> Any:
    """The function of ``zoo generate`` or ``zoo run``: the same flags, a different default length and first line."""

    def command(
        path: Path,  # annotated below: its metavar and help depend on the command
        prompt: PromptOption = None,
        prompt_file: PromptFileOption = None,
        prompt_ids: PromptIdsOption = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="at most this many new tokens "
                                                    "per prompt")] = default_new_tokens,
        temperature: TemperatureOption = 0.0,
        top_k: TopKOption = 0,
        top_p: TopPOption = 1.0,
        min_p: MinPOption = 0.0,
        repetition_penalty: PenaltyOption = 1.0,
        seed: SeedOption = 0,
        stop: StopOption = None,
        logprobs: LogprobsOption = None,
        as_json: JsonOption = False,
        tokenizer: TokenizerOption = None,
        show_logits: ShowLogitsOption = 5,
        step: StepOption = None,
    ) -> None:
        _run_prompts(name, path, (prompt, prompt_file, prompt_ids), max_new_tokens,
                     dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed),
                     stop, logprobs, as_json, show_logits, step, tokenizer)

    command.__annotations__["path"] = Annotated[Path, typer.Argument(
        metavar="checkpoint" if name == "generate" else "artifact", help=path_help)]
    command.__name__ = command.__qualname__ = f"{name}_command"
    command.__doc__ = doc
    return command


generate_command = _prompt_command(
    "generate", "a checkpoint directory (`zoo build`, zoo.save) or a `zoo export` artifact folder", 16,
    "Continue prompts with a saved model or an artifact: one ragged prefill, then one compiled step per token.")
run_command = _prompt_command(
    "run", "a `zoo export` directory (stablehlo or savedmodel) or a `zoo build` checkpoint", 8,
    "Smoke-test an artifact: its next-token logits for the prompts and their continuations (greedy by default).")
