"""Bad values on the command line give one line on stderr and exit code 2, never a traceback; ``generate`` and
``run`` share one vocabulary of flags. In-process (Typer's runner), on a tiny saved checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import zoo
import zoo.inference
from test_prompt_rules import CONTEXT, SPEC, V
from zoo import cli


def invoke(*args: str):
    widths = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = cli.UNBOUNDED_WIDTH  # fixed when zoo.cli was imported; pytest -s may be a tty
    try:
        result = CliRunner().invoke(cli.app, [str(a) for a in args], prog_name="zoo")
    finally:
        cli.out.width, cli.err.width = widths
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def refused(result, *texts: str) -> None:
    """Exit 2 with exactly one line on stderr that holds every one of ``texts``."""
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len([line for line in lines if not line.startswith("loaded step")]) == 1, result.stderr
    for text in texts:
        assert text in lines[-1], result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = zoo.load_config(SPEC)
    params = zoo.init_params(config)
    path = tmp_path_factory.mktemp("prompt") / "ck"
    zoo.save(path, config, params)
    return path, config, params


def top_logits(config, params, prompt, count):
    """The next-token logits after ``prompt`` by the parallel forward (generate and run decode with other backends)."""
    last = np.asarray(zoo.forward(config, params, [prompt]))[0, -1]
    best = np.argsort(-last, kind="stable")[:count]
    return "logits:    " + "  ".join(f"{i}: {last[i]:.4f}" for i in best)


@pytest.mark.slow
def test_generate_and_run_take_a_prompt_of_context_length_and_refuse_one_more(checkpoint):
    path, config, params = checkpoint
    prompt = [3, 1, 4, 1, 5, 9][:CONTEXT]
    ids = ",".join(map(str, prompt))
    expected = top_logits(config, params, prompt, 2)
    for command in ("generate", "run"):
        ok = invoke(command, path, "--prompt-ids", ids, "--max-new-tokens", "3", "--show-logits", "2")
        assert ok.exit_code == 0, ok.stderr
        assert expected in ok.stdout.splitlines(), (command, ok.stdout)
        generated = next(line for line in ok.stdout.splitlines() if line.startswith("generated:"))
        assert len(generated.split()) == 4
        refused(invoke(command, path, "--prompt-ids", ids + ",2"), f"context_length={CONTEXT}")


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize("ids, texts", [
    (f"1,{V}", [f"id {V}", f"0 to {V - 1}"]),
    ("1,-1", ["id -1", f"0 to {V - 1}"]),
    ("", ["--prompt-ids needs comma-separated integers"]),
    ("1,,2", ["--prompt-ids needs comma-separated integers", "'1,,2'"]),
    ("1.5", ["--prompt-ids needs comma-separated integers"]),
    ("\u0661,\u0662", ["--prompt-ids needs comma-separated integers (ASCII digits)"]),  # Arabic-Indic 1, 2
    ("1,99999999999999999999", ["--prompt-ids: token id 99999999999999999999 is outside the vocabulary"]),
])
def test_bad_prompt_ids_are_one_line(checkpoint, command, ids, texts):
    refused(invoke(command, checkpoint[0], "--prompt-ids", ids), *texts)


def test_bad_sampling_values_and_the_renamed_flag(checkpoint):
    path = checkpoint[0]
    for bad in ("inf", "nan", "-0.5"):
        refused(invoke("generate", path, "--prompt-ids", "1", "--temperature", bad),
                f"temperature must be a finite number >= 0 (0 is greedy), got {float(bad)}")
    for args in (("generate", path, "--prompt-ids", "1", "--seed", 2**32), ("build", "tiny", "--seed", -1),
                 ("run", path, "--prompt-ids", "1", "--top", "3")):  # `run --top N` is now `--show-logits N`
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        assert ("--seed" if "--seed" in args else "No such option: --top") in result.stderr


@pytest.mark.parametrize("lengths, text", [
    ("abc", "--seq-lens needs comma-separated integers"), ("", "--seq-lens needs comma-separated integers"),
    ("1,,7", "--seq-lens needs comma-separated integers"), ("0", "between 1 and 4096, got 0"),
    ("7,-3", "between 1 and 4096, got -3"), ("\u0661", "--seq-lens needs comma-separated integers (ASCII digits)"),
    ("7,100000000", "between 1 and 4096, got 100000000"),  # the (S, S) references would run out of memory
])
def test_check_backends_refuses_bad_sequence_lengths(lengths, text):
    refused(invoke("check-backends", "--seq-lens", lengths), text)


def test_a_static_export_longer_than_context_length_is_refused(checkpoint, tmp_path):
    refused(invoke("export", checkpoint[0], "--out", tmp_path / "x", "--static", f"1,{CONTEXT + 1}"),
            f"static sequence size {CONTEXT + 1} exceeds context_length={CONTEXT}")
    assert not (tmp_path / "x").exists()
    from zoo.export.entries import ExportError
    from zoo.export.stablehlo import export_stablehlo

    config, params = zoo.load(checkpoint[0])  # the library refuses it too, before writing anything
    with pytest.raises(ExportError, match=f"static sequence size {CONTEXT + 1} exceeds context_length={CONTEXT}"):
        export_stablehlo(config, params, tmp_path / "y", static=(1, CONTEXT + 1))
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_that_would_alias_or_overflow_are_refused(seed):
    # jax.random.PRNGKey(2**32) is the key of seed 0, and 2**64 overflows
    config = zoo.load_config(SPEC)
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\), got {seed}"):
        zoo.init_params(config, seed=seed)
    with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\), got {seed}"):
        zoo.inference.generate(config, {}, [[1]], 1, seed=seed)


@pytest.mark.parametrize("manifest, text", [
    ("{not json", "manifest.json: unreadable (JSONDecodeError"),
    ("[1]", "manifest.json: the top level must be a JSON object, got list"),
    ('{"format": "stablehlo"}', "manifest.json: a field is missing or malformed (KeyError"),
    ('{"format": "savedmodel", "entries": {}, "vocab_size": 61}', "SavedModel file does not exist at"),
])
def test_a_damaged_manifest_is_one_line_from_run_and_info(tmp_path, manifest, text):
    (tmp_path / "manifest.json").write_text(manifest)
    refused(invoke("run", tmp_path, "--prompt-ids", "1,2"), text)
    if "manifest.json" in text and "a field" not in text:  # info reads only the fields it describes
        refused(invoke("info", tmp_path), text)


@pytest.mark.parametrize("args, texts", [
    (("generate", "CK", "--prompt-ids", "1", "--max-new-tokens", "0"), ["zoo generate: ", "'--max-new-tokens'"]),
    (("export", "CK", "--out", "OUT", "--static", "0,0"), ["zoo export: ", "--static needs two positive integers"]),
    (("export", "CK", "--out", "OUT", "--static", "1,\u00b2"), ["zoo export: ", "--static needs two positive"]),
    (("convert", "torch", "CK", "--out", "OUT", "--dtype", "float8"), ["zoo convert torch: ", "--dtype", "float8"]),
    (("build", "tiny", "--devices", "4"), ["zoo build: ", "--devices", "--abstract"]),
    (("generate",), ["zoo generate: ", "Missing argument 'checkpoint'"]),
    (("generate", "CK", "--prompt-ids", "1", "--bogus"), ["zoo generate: ", "No such option: --bogus"]),
    (("nocommand",), ["zoo: ", "No such command 'nocommand'"]),
    (("convert", "nocommand"), ["zoo convert: ", "No such command 'nocommand'"]),
    (("--bogus",), ["zoo: ", "No such option: --bogus"]),
])
def test_usage_errors_are_one_line_naming_the_option(checkpoint, tmp_path, args, texts):
    args = [checkpoint[0] if a == "CK" else tmp_path / "out" if a == "OUT" else a for a in args]
    result = invoke(*args)
    refused(result, *texts)
    assert result.stderr.startswith("error: ") and "Usage:" not in result.stderr and "{" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_build_plans_for_a_device_count_that_does_not_fit_and_says_how_to_fit(tmp_path):
    # mlstm-7b sets fsdp_axis_size 8 (zoo/presets/mlstm-7b.json): 8 does not divide 3 devices
    refused(invoke("build", "mlstm-7b", "--abstract", "--devices", "3"), "3 device(s)",
            "--set parallel.fsdp_axis_size=1")


@pytest.mark.parametrize("new_tokens, timings", [
    (1, "prefill 1 tokens: 100.0 ms"),
    (2, "prefill 1 tokens: 100.0 ms; first step (with compile) 20.0 ms"),
    (4, "prefill 1 tokens: 100.0 ms; first step (with compile) 20.0 ms; then 400.0 tokens/s"),
])
def test_generate_prints_only_the_timings_it_measured(checkpoint, monkeypatch, new_tokens, timings):
    def timed(runner, prompts, max_new_tokens, **_):
        # 2 steady-state steps (the first token comes from the prefill, the second from the first step) in 5 ms
        return zoo.inference.Generation([[0] * max_new_tokens], ["length"], None, None, None,
                                        np.zeros((1, V), np.float32), 0.1, 0.02, 0.005, max_new_tokens - 1)

    monkeypatch.setattr(zoo.inference, "generate_with", timed)
    result = invoke("generate", checkpoint[0], "--prompt-ids", "1", "--max-new-tokens", new_tokens)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == timings


def test_a_savedmodel_without_its_variables_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "savedmodel", "entries": {}, "vocab_size": 61}')
    (tmp_path / "saved_model.pb").write_bytes(b"")
    refused(invoke("run", tmp_path, "--prompt-ids", "1"), "a SavedModel needs its variables/ folder, which is missing")


def test_building_into_a_step_folder_says_to_build_into_the_checkpoint(checkpoint):
    path = checkpoint[0]
    refused(invoke("build", "tiny", "--out", path / "0"), f"pass {path} with --step 0 (step=0 in Python) to read it, "
            f"or build or save into {path} to add a step")
