"""Every public function refuses bad arguments with one clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo

TOKENS = np.zeros((1, 3), np.int32)


@pytest.fixture(scope="module")
def tiny():
    config = zoo.load_config("tiny")
    return config, zoo.init_params(config)


@pytest.fixture(scope="module")
def tiny_v1_params():
    return zoo.init_params(zoo.load_config("tiny-v1"))


def refused(call, kind: type[Exception], *phrases: str) -> str:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.mark.parametrize("batch_size, kind, phrase", [(0, ValueError, "batch_size must be >= 1, got 0"),
                                                      (-1, ValueError, "batch_size must be >= 1, got -1"),
                                                      ("2", TypeError, "batch_size must be an integer"),
                                                      (True, TypeError, "batch_size must be an integer")])
def test_init_state_batch_size(tiny, batch_size, kind, phrase):
    refused(lambda: zoo.init_decode_state(tiny[0], batch_size), kind, phrase)


@pytest.mark.parametrize("seed", [1.5, "0", None])
def test_init_params_seed_must_be_an_integer(tiny, seed):
    refused(lambda: zoo.init_params(tiny[0], seed=seed), TypeError, "seed must be an integer, got")


@pytest.mark.parametrize("call", [
    lambda params: zoo.forward("tiny", params, TOKENS), lambda params: zoo.prefill("tiny", params, TOKENS),
    lambda params: zoo.step({}, params, TOKENS[:, 0], {}), lambda params: zoo.param_count("tiny"),
    lambda params: zoo.param_shapes(None), lambda params: zoo.build("tiny"),
    lambda params: zoo.init_params("tiny"), lambda params: zoo.init_decode_state("tiny", 1)])
def test_a_config_that_is_not_a_model_config(tiny, call):
    refused(lambda: call(tiny[1]), TypeError, "config must be a zoo.ModelConfig", "zoo.load_config")


@pytest.mark.parametrize("source, got", [(None, "NoneType"), (5, "int")])
def test_load_config_source_type(source, got):
    refused(lambda: zoo.load_config(source), TypeError, f"got {got}", "preset name")


def test_params_of_another_config_are_refused_by_path(tiny, tiny_v1_params):
    config, params = tiny
    # tiny (mlstm) has parameters, such as its causal conv, that tiny-v1 (mlstm_v1) lacks
    for call in (lambda: zoo.forward(config, tiny_v1_params, TOKENS),
                 lambda: zoo.prefill(config, tiny_v1_params, TOKENS),
                 lambda: zoo.step(config, tiny_v1_params, TOKENS[:, 0], zoo.init_decode_state(config, 1))):
        refused(call, ValueError, "params['blocks_0']", "is missing")


def test_params_with_an_extra_path_a_wrong_shape_or_a_non_float_dtype(tiny):
    config, params = tiny
    refused(lambda: zoo.forward(config, {**params, "extra": np.ones(2, np.float32)}, TOKENS), ValueError,
            "params['extra'] is not a parameter of this config")
    shrunk = jax.tree_util.tree_map(lambda x: x, params)
    shrunk["lm_head"] = jax.tree_util.tree_map(lambda x: x[..., :1], shrunk["lm_head"])
    refused(lambda: zoo.forward(config, shrunk, TOKENS), ValueError, "params['lm_head']", "has shape")
    ints = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.int32), params)
    refused(lambda: zoo.forward(config, ints, TOKENS), ValueError, "has dtype int32")
    refused(lambda: zoo.forward(config, None, TOKENS), TypeError, "params must be the dict of arrays")
    halves = jax.tree_util.tree_map(lambda x: x.astype(np.float16), params)  # any float dtype is accepted
    assert zoo.forward(config, halves, TOKENS).shape == (1, 3, config.vocab_size)


def test_save_refuses_a_dict_config_and_foreign_params_before_writing(tiny, tmp_path):
    config, params = tiny
    refused(lambda: zoo.save(tmp_path / "a", config.model_dump(), params), TypeError, "zoo.ModelConfig")
    refused(lambda: zoo.save(tmp_path / "b", config, {"a": np.ones(3)}), ValueError, "is missing")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_refuses_a_dtype_that_is_not_float(tiny, tmp_path):
    config, params = tiny
    zoo.save(tmp_path / "ck", config, params)
    for dtype in ("float8", "int32", object()):
        refused(lambda: zoo.load(tmp_path / "ck", dtype=dtype), TypeError, "dtype must be a float dtype")
    assert zoo.load(tmp_path / "ck", dtype="bfloat16")[1]["lm_head"]["kernel"].dtype == jax.numpy.bfloat16


def test_checkpoint_paths_steps_and_meshes_of_the_wrong_type(tiny, tmp_path):
    config, params = tiny
    refused(lambda: zoo.save(None, config, params), TypeError, "directory must be a path")
    refused(lambda: zoo.load(None), TypeError, "directory must be a path")
    refused(lambda: zoo.load(tmp_path, step="0"), TypeError, "step must be an integer or None, got str")
    refused(lambda: zoo.init_params(config, mesh="x"), TypeError, "mesh must be a jax.sharding.Mesh")
