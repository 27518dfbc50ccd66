"""CLI config handling: ``--set`` overrides, the device note of 8-device presets, ``presets --show``,
schema descriptions, and hostile config files (exit 2, one line)."""

from __future__ import annotations

import json

import pytest
from test_cli import invoke_zoo, run_zoo

import zoo
from zoo import presets

EIGHT_DEVICE_PRESETS = ["mlstm-7b", "mlstm_v1-2.7b", "mlstm_v1-7b"]


@pytest.mark.parametrize("name", EIGHT_DEVICE_PRESETS)
def test_validate_notes_a_layout_for_more_devices_and_how_to_override_it(name):
    proc = invoke_zoo("validate", name)
    assert proc.returncode == 0 and proc.stdout.startswith("valid"), proc.stderr
    note = " ".join(proc.stderr.split())  # one line; the in-process runner wraps it at 160 columns
    assert note.startswith(f"note: {name}: ") and note.count("note:") == 1
    assert "sizes = 8 must divide the 1 device(s)" in note and note.endswith("--set parallel.fsdp_axis_size=1")
    fixed = invoke_zoo("validate", name, "--set", "parallel.fsdp_axis_size=1")
    assert fixed.returncode == 0 and fixed.stderr == "", fixed.stderr


def test_validate_says_nothing_more_when_the_layout_fits():
    proc = invoke_zoo("validate", "mlstm-120m")  # a parallel section with all sizes 1
    assert proc.returncode == 0 and proc.stderr == ""


def test_build_refuses_a_layout_for_more_devices_naming_the_override(tmp_path):
    proc = invoke_zoo("build", "mlstm_v1-7b", "--out", str(tmp_path / "ck"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: mlstm_v1-7b: parallel:")
    assert " ".join(proc.stderr.split()).endswith("--set parallel.fsdp_axis_size=1") and not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_build_applies_the_overrides(tmp_path):
    proc = invoke_zoo("build", "tiny", "--out", str(tmp_path / "ck"), "--set", "context_length=16",
                      "--set", "parallel.remat=[\"mLSTMBlock\"]", "--set", "dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr
    config, _ = zoo.load(tmp_path / "ck")
    assert (config.context_length, config.layer.context_length) == (16, 16)
    assert config.cell.dtype == "bfloat16" and config.layer.parallel.remat == ["mLSTMBlock"]


@pytest.mark.parametrize("sets, expected", [
    (["parallel.fsdp_axis_size=true"], ["parallel.fsdp_axis_size", "valid integer"]),
    (["parallel.fsdp_axis_size=\"1\""], ["parallel.fsdp_axis_size", "valid integer"]),
    (["parallel.model_axis_size=3"], ["parallel.model_axis_size", "must divide"]),
    (["parallel.fsdp_axis_siz=1"], ["parallel.fsdp_axis_siz", "did you mean 'fsdp_axis_size'"]),
    (["context_length=0"], ["context_length", "-1 (no limit) or a positive"]),
    (["dtype.x=1"], ["dtype", "is not a section"]),
    (["mlstm_block.mlstm.dtype=bfloat16"], ["mlstm_block.mlstm.dtype", "conflicts with the model-level"]),
    (["num_blocks"], ["--set needs KEY=VALUE"]),
])
@pytest.mark.parametrize("command", ["validate", "build"])
def test_bad_overrides_exit_2_naming_the_field(command, sets, expected, tmp_path):
    args = [a for s in sets for a in ("--set", s)]
    extra = ["--abstract"] if command == "build" else []
    proc = invoke_zoo(command, "tiny", *args, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    flat = " ".join(proc.stderr.split())
    assert all(text in flat for text in expected), proc.stderr
    assert "Traceback" not in proc.stderr


def test_presets_show_prints_the_preset_json():
    for name in ("tiny", "mlstm_v1-7b"):
        proc = invoke_zoo("presets", "--show", name)
        assert proc.returncode == 0
        assert json.loads(proc.stdout) == json.loads(presets.path(name).read_text())
    typo = invoke_zoo("presets", "--show", "tiny_v1")
    assert typo.returncode == 2 and "did you mean 'tiny-v1'" in typo.stderr and typo.stdout == ""


def test_a_preset_typo_is_suggested_by_validate():
    proc = invoke_zoo("validate", "tiny_v1")
    assert proc.returncode == 2 and "did you mean 'tiny-v1'" in proc.stderr


def test_every_schema_field_has_a_one_line_description():
    schema = json.loads(invoke_zoo("schema").stdout)
    sections = {"ModelConfig": schema, **schema["$defs"]}
    assert {"LayerConfig", "CellConfig", "BackendConfig", "FeedForwardConfig", "ParallelConfig"} <= set(sections)
    fields = [(section, name, prop) for section, body in sections.items()
              for name, prop in body.get("properties", {}).items()]
    assert len(fields) > 80
    missing = [f"{section}.{name}" for section, name, prop in fields
               if not prop.get("description", "").strip() or "\n" in prop["description"]]
    assert missing == []


def test_hostile_files_exit_2_in_one_line(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"vocab_size": 16}) + " " * 2**20)
    proc = invoke_zoo("validate", str(big))
    assert proc.returncode == 2 and "over the 1,048,576-byte (1 MiB) limit" in proc.stderr
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    proc = run_zoo("validate", str(deep))  # the real executable
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {deep}: objects and lists nested more than 32 levels deep "
                                        f"(a config nests about 6)"]
