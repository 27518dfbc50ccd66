"""zoo convert torch: every file it reads (config, index, shards, zoo_config.json) fails as one line naming
the file and what is wrong, exit 2 from the CLI, with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from zoo.convert.torch import ConvertError, from_torch, to_torch

pytest.importorskip("torch")
pytest.importorskip("xlstm")
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_convert_torch import large_model, neurips_model, save_torch  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid xlstm_large folder (embedding_dim 32, 2 heads, qk_dim_factor 0.5: qk dim 16, v dim 32)."""
    model, cfg = large_model()
    return save_torch(tmp_path_factory.mktemp("good") / "src", model, cfg)


def cut(src, size):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:size if size > 0 else len(data) + size])


def write_config(src, text):
    (src / "config.yaml").write_text(text) if isinstance(text, str) else (src / "config.yaml").write_bytes(text)


def edit_config(src, **fields):
    write_config(src, yaml.safe_dump({**yaml.safe_load((src / "config.yaml").read_text()), **fields}))


def as_shards(src, place):
    """model.safetensors split into model-00001/2 and an index whose weight_map ``place(key, file)`` writes."""
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001.safetensors": keys[: len(keys) // 2], "model-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(src / name))
        weight_map |= {k: name for k in part}
    (src / "model.safetensors.index.json").write_text(place(weight_map))


def extra_shard(src):
    """model_0 holds the model; model_extra one more tensor (the names once broke the shard sort)."""
    (src / "model.safetensors").rename(src / "model_0.safetensors")
    save_file({"stray.weight": np.zeros(2, np.float32)}, str(src / "model_extra.safetensors"))


def float64_tensor(src):
    state = load_file(str(src / "model.safetensors"))
    state["embedding.weight"] = state["embedding.weight"].astype(np.float64)
    save_file(state, str(src / "model.safetensors"))


CASES = {  # how to spoil a copy of the good folder -> what the one line must say ({src}: the folder)
    "header cut": (lambda s: cut(s, 1000), "{src}/model.safetensors is not a readable safetensors file: Error "
                                           "while deserializing header: invalid header length"),
    "data cut": (lambda s: cut(s, -100), "{src}/model.safetensors is not a readable safetensors file: Error while "
                                         "deserializing header: incomplete metadata, file not fully covered"),
    "not safetensors": (lambda s: (s / "model.safetensors").write_bytes(b"PK\x03\x04 a zip file"),
                        "{src}/model.safetensors is not a readable safetensors file: "),
    "yaml malformed": (lambda s: write_config(s, "num_heads: [2\n"), "{src}/config.yaml cannot be parsed: while "
                                                                     "parsing a flow sequence"),
    "yaml not utf-8": (lambda s: write_config(s, b"num_heads: \xff\n"), "{src}/config.yaml cannot be parsed: 'utf-8' "
                                                                        "codec can't decode byte 0xff"),
    "yaml too deep": (lambda s: write_config(s, "num_heads: " + "[" * 40 + "]" * 40 + "\n"),
                      "{src}/config.yaml: objects and lists nested more than 32 levels deep"),
    "yaml too big": (lambda s: write_config(s, "num_heads: 2\n" + "#" * 2**20 + "\n"),
                     "{src}/config.yaml: 1,048,590 bytes is over the 1,048,576-byte limit of a config file"),
    "index malformed": (lambda s: as_shards(s, lambda m: "{"), "{src}/model.safetensors.index.json cannot be read "
                                                               "as a safetensors index: JSONDecodeError: Expecting "
                                                               "property name enclosed in double quotes"),
    "index without weight_map": (lambda s: as_shards(s, lambda m: json.dumps({"metadata": {}})),
                                 "{src}/model.safetensors.index.json cannot be read as a safetensors index: "
                                 "KeyError: 'weight_map'"),
    "index names a missing shard": (lambda s: as_shards(s, lambda m: json.dumps({"weight_map": {
        **m, "embedding.weight": "model-00003.safetensors"}})), "{src}/model.safetensors.index.json names shard "
                                                                "file(s) that {src} does not hold: "
                                                                "model-00003.safetensors"),
    "index misplaces a tensor": (lambda s: as_shards(s, lambda m: json.dumps({"weight_map": {
        **m, "lm_head.weight": "model-00001.safetensors"}})), "tensor 'lm_head.weight' is in "
                                                              "model-00002.safetensors, but the index places it in "
                                                              "model-00001.safetensors"),
    "shard names that do not sort as numbers": (extra_shard, "unexpected tensor(s) the model has no place for: "
                                                             "stray.weight"),
    "a float64 tensor": (float64_tensor, "tensor(s) embedding.weight (F64) have a dtype params cannot keep exactly"),
    "zoo_config.json malformed": (lambda s: (s / "zoo_config.json").write_text("{"),
                                  "{src}/zoo_config.json: malformed JSON at line 1, column 2"),
    "config gives an invalid zoo config": (lambda s: edit_config(s, num_heads=3), (
        "config.yaml: num_heads=3 gives an invalid zoo config: mlstm_block.mlstm.num_heads: num_heads=3 must divide "
        "the qk dim 16; mlstm_block.mlstm.num_heads: num_heads=3 must divide the v dim 32")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_unreadable_source_file_is_one_line_naming_it(tmp_path, good, case):
    import shutil

    spoil, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    spoil(src)
    with pytest.raises(ConvertError) as info:
        from_torch(src, tmp_path / "ck")
    text = str(info.value)
    assert message.format(src=src) in text and "\n" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, nothing staged


@pytest.fixture(scope="module")
def exported(tmp_path_factory, good):
    root = tmp_path_factory.mktemp("exported")
    from_torch(good, root / "ck")
    to_torch(root / "ck", root / "torch")
    return root / "torch"


def test_zoo_config_json_must_describe_the_model_of_config_yaml(tmp_path, exported):
    import shutil

    shutil.copytree(exported, tmp_path / "edited")
    edit_config(tmp_path / "edited", gate_soft_cap=20.0, num_blocks=2)
    with pytest.raises(ConvertError) as info:
        from_torch(tmp_path / "edited", tmp_path / "ck")
    assert str(info.value) == ("config.yaml and zoo_config.json describe different models: gate_soft_cap=20.0 in "
                               "config.yaml but 15.0 in zoo_config.json; remove zoo_config.json to convert from "
                               "config.yaml alone")
    model, cfg = neurips_model()
    src = save_torch(tmp_path / "neurips", model, cfg)
    shutil.copy(exported / "zoo_config.json", src)
    with pytest.raises(ConvertError, match=r"zoo_config.json: `zoo convert to-torch` writes it beside an "
                                           r"xlstm_large config.yaml; found it beside a neurips config"):
        from_torch(src, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_cli_bad_safetensors_and_success_print_one_line_each(tmp_path, exported):
    import shutil

    from test_cli import invoke_zoo

    shutil.copytree(exported, tmp_path / "bad")
    cut(tmp_path / "bad", 1000)
    refused = invoke_zoo("convert", "torch", str(tmp_path / "bad"), "--out", str(tmp_path / "none"))
    assert refused.returncode == 2
    assert " ".join(refused.stderr.split()) == (f"error: {tmp_path}/bad/model.safetensors is not a readable "
                                                f"safetensors file: Error while deserializing header: invalid header "
                                                f"length")  # the test console wraps at 160 columns
    assert refused.stderr.startswith("error: ") and refused.stderr.endswith("length\n")  # no empty line
    done = invoke_zoo("convert", "torch", str(exported), "--out", str(tmp_path / "ck"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("converted xlstm_large (33 tensors, ")
    assert " with zoo_config.json into " in done.stdout
