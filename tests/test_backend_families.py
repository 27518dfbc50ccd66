"""The three backends of a cell compute one function: a mix of numerics families is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import zoo
from zoo import presets
from zoo.testing import isolated_registry

CELL = "mlstm_block.mlstm.mlstm_cell"


@pytest.fixture(scope="module")
def sig():
    with isolated_registry("zoo-mlstm-sig") as registry:
        yield registry


def test_a_plugin_forward_backend_with_builtin_stateful_backends_is_refused(sig):
    tiny = zoo.load_config("tiny")
    with pytest.raises(ValidationError) as info:
        tiny.with_overrides({f"{CELL}.backend": {"name": "parallel_sig"}})
    errors = {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}
    assert set(errors) == {f"{CELL}.prefill_backend.name", f"{CELL}.step_backend.name"}
    for message in errors.values():
        assert "'parallel_sig'" in message and "chunkwise_sig, recurrent_sig" in message


def test_one_family_of_plugin_backends_validates(sig):
    config = zoo.load_config("tiny").with_overrides({
        f"{CELL}.backend": {"name": "parallel_sig"}, f"{CELL}.prefill_backend": {"name": "chunkwise_sig"},
        f"{CELL}.step_backend": {"name": "recurrent_sig"}})
    assert (config.cell.backend.name, config.cell.prefill_backend.name) == ("parallel_sig", "chunkwise_sig")
    with pytest.raises(ValidationError, match="step_backend"):  # a sig prefill with the plain mLSTM step
        config.with_overrides({f"{CELL}.step_backend": {"name": "recurrent"}})


def test_families_are_the_roots_of_the_reference_chains(sig):
    from zoo.config import backend_family

    # the plugin's registrations: the sig cells name parallel_sig; built-ins name no reference
    assert {n: backend_family(n) for n in ("parallel_sig", "chunkwise_sig", "recurrent_sig")} == dict.fromkeys(
        ("parallel_sig", "chunkwise_sig", "recurrent_sig"), "parallel_sig")
    assert {backend_family(n) for n in ("parallel_stabilized", "chunkwise", "recurrent")} == {"parallel_stabilized"}


def test_every_preset_and_shipped_config_still_validates():
    from zoo.config import backend_family

    sources = [*presets.names(), str(Path(__file__).parents[1] / "configs" / "demo.json")]
    for source in sources:
        cell = zoo.load_config(source).cell
        assert {backend_family(b.name) for b in (cell.backend, cell.prefill_backend, cell.step_backend)} == {
            "parallel_stabilized"}, source


def test_left_out_stateful_backends_follow_the_forward_backends_family(sig):
    config = zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 1, "dtype": "float32",
                              "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {
                                  "backend": {"name": "parallel_sig"}}}}})
    assert (config.cell.prefill_backend.name, config.cell.step_backend.name) == ("chunkwise_sig", "recurrent_sig")
    params = zoo.init_params(config)
    tokens = np.random.default_rng(0).integers(0, 61, (1, 6)).astype(np.int32)
    logits = np.asarray(zoo.forward(config, params, tokens))  # parallel_sig: the oracle of the sig family
    prefill_logits, _ = zoo.prefill(config, params, tokens)  # 0.64 apart when prefill ran the plain mLSTM
    np.testing.assert_allclose(np.asarray(prefill_logits), logits, atol=1e-4)
