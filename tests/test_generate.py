"""zoo.generate on ragged batches, per-prompt budgets, EOS and stop sequences, text with a tokenizer and its
streaming, compile counts with loaded params, and the `zoo generate` / `zoo run` commands.

Expected values come from each prompt run alone (the issue's exactness rule: tokens equal wherever the alone
run's top-2 margin exceeds 1e-4), from the tokenizer itself, and from literal settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import zoo
import zoo.inference
from helpers import COMPILES, TOP2_MARGIN as MARGIN, byte_bpe_codec, generation_model, invoke_cli as invoke

PROMPTS = [[5, 17, 3], list(range(20, 31)), [7], list(range(40, 58))]  # lengths 3, 11, 1, 18: across chunks of 8


@pytest.fixture(scope="module")
def model():
    return generation_model()


@pytest.fixture(scope="module")
def codec():
    return byte_bpe_codec(eos_ids=(0,))


def agree(alone, batched):
    """The alone run's tokens equal the batched ones up to the first step with a top-2 margin under MARGIN."""
    for token, other, top in zip(alone.tokens[0], batched, alone.top_logprobs[0]):
        first, second = sorted(top.values(), reverse=True)[:2]
        if first - second <= MARGIN:
            return True
        if token != other:
            return False
    return True


def test_a_ragged_batch_decodes_each_prompt_as_if_alone(model):
    config, params = model
    batched = zoo.generate(config, params, PROMPTS, 8)
    assert [len(t) for t in batched.tokens] == [8] * 4 and batched.finish_reasons == ["length"] * 4
    for b, prompt in enumerate(PROMPTS):
        alone = zoo.generate(config, params, [prompt], 8, logprobs=2)
        assert agree(alone, batched.tokens[b]), (b, alone.tokens[0], batched.tokens[b])
        scale = float(np.max(np.abs(alone.prompt_logits)))
        np.testing.assert_allclose(batched.prompt_logits[b], alone.prompt_logits[0], atol=1e-5 * scale, rtol=0)


def test_budgets_eos_and_stop_sequences_per_prompt(model):
    config, params = model
    free = zoo.generate(config, params, PROMPTS[:3], 6).tokens
    budgets = zoo.generate(config, params, PROMPTS[:3], [2, 6, 4])
    assert budgets.tokens == [free[0][:2], free[1], free[2][:4]]
    assert budgets.finish_reasons == ["length"] * 3
    eos = free[0][3]
    cut = free[0].index(eos)
    stopped = zoo.generate(config, params, PROMPTS[:1], 6, eos_ids=[eos])
    assert stopped.tokens == [free[0][:cut]] and stopped.finish_reasons == ["stop"]
    pair = free[1][2:4]
    at = next(i for i in range(5) if free[1][i:i + 2] == pair)
    by_ids = zoo.generate(config, params, [PROMPTS[1]], 6, stop=[pair])
    assert by_ids.tokens == [free[1][:at]] and by_ids.finish_reasons == ["stop"]


def test_text_prompts_return_text_and_stream_it_piece_by_piece(model, codec):
    config, params = model
    pieces: dict[int, list[str]] = {0: [], 1: []}
    out = zoo.generate(config, params, ["the quick brown", "café 日本"], 12, tokenizer=codec, temperature=0.9,
                       seed=[3, 4], on_text=lambda row, piece: pieces[row].append(piece))
    for b in range(2):
        assert out.text[b] == codec.decode(out.tokens[b])
        assert "".join(pieces[b]) == out.text[b]  # random bytes may decode to U+FFFD: test_tokenizers streams a split character
    ids = zoo.generate(config, params, [codec.encode("the quick brown")], 12, temperature=0.9, seed=3)
    assert ids.tokens[0] == out.tokens[0] and ids.text is None  # text in, the same ids out


def test_a_text_stop_sequence_cuts_the_text(model, codec):
    config, params = model
    free = zoo.generate(config, params, ["the lazy"], 12, tokenizer=codec, temperature=1.0, seed=5)
    text = free.text[0]
    assert len(text) >= 4, text  # seed 5 gives a long enough text to cut
    stop = text[2:4]
    cut = zoo.generate(config, params, ["the lazy"], 12, tokenizer=codec, temperature=1.0, seed=5, stop=[stop])
    assert cut.text[0] == text[:text.index(stop)] and cut.finish_reasons == ["stop"]
    assert codec.decode(cut.tokens[0]) == text[:len(codec.decode(cut.tokens[0]))]


def test_loaded_params_compile_each_function_once(model, tmp_path):
    config, params = model
    zoo.save(tmp_path / "ck", config, params)
    _, loaded = zoo.load(tmp_path / "ck")
    prompts = [[9, 8, 7], [1, 2]]
    zoo.generate(config, loaded, prompts, 5)  # compiles what this shape needs (or finds it from other tests)
    before = COMPILES.count
    again = zoo.generate(config, loaded, prompts, 5)
    fresh = zoo.generate(config, params, prompts, 5)
    assert COMPILES.count == before  # neither the second call nor params from init_params compile again
    assert again.tokens == fresh.tokens


def test_bad_arguments_are_named(model, codec):
    config, params = model
    with pytest.raises(ValueError, match="max_new_tokens has 2 values for 3 prompts"):
        zoo.generate(config, params, PROMPTS[:3], [1, 2])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        zoo.generate(config, params, PROMPTS[:1], 0)
    with pytest.raises(zoo.TokenError, match=r"prompts\[1\] is text, but no tokenizer"):
        zoo.generate(config, params, [[1], "text"], 2)
    with pytest.raises(zoo.TokenError, match=r"tokens: sequence length 65 exceeds context_length=64"):
        zoo.generate(config, params, [[1] * 65], 2)
    with pytest.raises(zoo.inference.GenerationError, match=r"top_p must be in \(0, 1\], got 2"):
        zoo.generate(config, params, PROMPTS[:1], 2, top_p=2.0)
    with pytest.raises(ValueError, match="text stop sequences and on_text need a tokenizer"):
        zoo.generate(config, params, PROMPTS[:1], 2, stop=["x"])




@pytest.fixture(scope="module")
def saved(model, codec, tmp_path_factory):
    config, params = model
    root = tmp_path_factory.mktemp("gen")
    zoo.save(root / "ck", config, params, tokenizer=codec)
    bare = root / "bare"
    zoo.save(bare, config, params)
    return root / "ck", bare


def test_cli_text_prompts_json_and_prompt_files(model, codec, saved, tmp_path):
    config, params = model
    checkpoint, bare = saved
    result = invoke("generate", checkpoint, "--prompt", "the quick", "--prompt", "café", "--max-new-tokens", 5,
                    "--json", "--logprobs", 2)
    assert result.exit_code == 0, result.stderr
    outputs = json.loads(result.stdout)["outputs"]
    library = zoo.generate(config, params, ["the quick", "café"], 5, tokenizer=codec, logprobs=2)
    assert [o["ids"] for o in outputs] == library.tokens and [o["text"] for o in outputs] == library.text
    assert all(len(o["top_logprobs"][0]) == 2 for o in outputs)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('"the quick"\n{"prompt": [5, 17, 3]}\n')
    from_file = invoke("generate", checkpoint, "--prompt-file", lines, "--max-new-tokens", 5, "--json")
    ids = [o["ids"] for o in json.loads(from_file.stdout)["outputs"]]
    assert ids == [library.tokens[0], zoo.generate(config, params, [[5, 17, 3]], 5).tokens[0]]
    refused = invoke("generate", bare, "--prompt", "the quick")
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        "error: text prompts need a tokenizer: this model stores none; pass --tokenizer tokenizer.json, or use "
        "--prompt-ids"]
    both = invoke("generate", checkpoint, "--prompt", "a", "--prompt-ids", "1")
    assert both.exit_code == 2 and "give exactly one of --prompt, --prompt-file, --prompt-ids" in both.stderr
    for args, message in ((["--top-p", "2"], "error: top_p must be in (0, 1], got 2.0"),
                          (["--stop", ""], "error: stop sequences must not be empty")):
        bad = invoke("generate", checkpoint, "--prompt", "the quick", *args)
        assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1] == message, bad.output
        assert "prompt:" not in bad.stdout  # nothing is printed for a refused run


def test_cli_streams_one_text_prompt_and_run_matches_generate(model, codec, saved, tmp_path):
    config, params = model
    checkpoint, _ = saved
    streamed = invoke("generate", checkpoint, "--prompt", "the lazy dog", "--max-new-tokens", 8)
    library = zoo.generate(config, params, ["the lazy dog"], 8, tokenizer=codec)
    assert streamed.exit_code == 0, streamed.stderr
    assert f"text:      {library.text[0]}" in streamed.stdout.splitlines()
    assert f"generated: {' '.join(map(str, library.tokens[0]))}" in streamed.stdout.splitlines()
    exported = invoke("export", checkpoint, "--out", tmp_path / "hlo", "--platforms", "cpu")
    assert exported.exit_code == 0, exported.stderr
    ran = invoke("run", tmp_path / "hlo", "--prompt", "the lazy dog", "--max-new-tokens", 8)
    assert ran.exit_code == 0, ran.stderr
    assert f"generated: {' '.join(map(str, library.tokens[0]))}" in ran.stdout.splitlines()
    assert ran.stdout.splitlines()[0] == "artifact:  stablehlo (forward, prefill, step)"


def test_the_cli_reuses_compiled_functions_across_processes(saved, tmp_path):
    checkpoint, _ = saved
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    run = [sys.executable, "-m", "zoo.cli", "generate", str(checkpoint), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]

    def call(**extra):
        proc = subprocess.run(run, capture_output=True, text=True, env=env | extra, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr

    call(XDG_CACHE_HOME=str(tmp_path / "xdg"))  # the default folder: $XDG_CACHE_HOME/xlstm-zoo/jax
    folder = tmp_path / "xdg" / "xlstm-zoo" / "jax"
    cached = sorted(folder.iterdir())
    assert cached  # every compile of the first call was written
    call(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert sorted(folder.iterdir()) == cached  # the second call compiled nothing new
    call(XDG_CACHE_HOME=str(tmp_path / "off"), ZOO_COMPILATION_CACHE="0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xdg"]  # off: no folder "off", nor one named "0"
