"""Quantisation (issue 20): the ``quantizer`` plugin kind, the built-in ``int8``, ``ModelConfig.quantization`` and
``zoo quantize``, checked against a float64 NumPy reference, the dequantised float model and the float original."""

from __future__ import annotations

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from pydantic import BaseModel, ConfigDict, ValidationError

import zoo
from helpers import by_path, export_config, invoke_cli, perturbed
from zoo.checkpoint import read_metadata
from zoo.model import quantized_weights
from zoo.plugins.quantizers.int8 import Int8
from zoo.quantization import QuantizationError, dequantize, quantize
from zoo.registry import PluginRegistry, hookimpl
from zoo.testing import isolated_registry

TOKENS = np.random.default_rng(3).integers(0, 61, (2, 9)).astype(np.int32)


def tiny(layer_type: str = "mlstm_v1", **fields):
    """A tiny float32 model of ``layer_type`` (an FFN for mlstm_v1) with ``fields`` set at the top level."""
    data = export_config(layer_type).model_dump(mode="json")
    if layer_type == "mlstm_v1":
        data["mlstm_block"]["feedforward"] = {"proj_factor": 2.0, "round_proj_up_to_multiple_of": 16}
    return zoo.load_config({**data, **fields})


def model(layer_type: str = "mlstm_v1", seed: int = 0, **fields):
    """``(config, params)``: params perturbed so that no weight is all zeros (mlstm_v1's dense_o starts at 0)."""
    config = tiny(layer_type, **fields)
    return config, perturbed(zoo.init_params(config, seed), seed + 1, 0.05)


def invoke_zoo(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, its consoles wide enough that one line of output is one line."""
    result = invoke_cli(*args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --- the plugin kind and the hook contract ---------------------------------------------------------------------

class HalfKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = "proj_down"


class Half:
    """A third-party quantizer: float16 copies of the weights whose path ends with ``pattern``; no ``matmul`` or
    ``columns`` of its own (the model's defaults dequantise)."""

    def __init__(self, pattern: str = "proj_down") -> None:
        self.pattern = pattern

    def select(self, path, shape):
        return path.endswith(self.pattern)

    def quantize(self, weight):
        return {"half": weight.astype(jnp.float16)}

    def dequantize(self, stored):
        return stored["half"].astype(jnp.float32)

    def axes(self, names):
        return {"half": tuple(names)}


class HalfPlugin:
    @hookimpl
    def register_quantizers(self, register):
        register("half", Half, kwargs_model=HalfKwargs, description="float16 copies of the down-projections")


def test_quantizer_is_a_kind_with_the_builtin_int8():
    from zoo.registry import KINDS, entry, hookspecs

    assert "quantizer" in KINDS
    assert "select(path, (K, N)) -> bool" in hookspecs.register_quantizers.__doc__
    int8 = entry("quantizer", "int8")
    assert int8.obj is Int8 and int8.builtin and int8.metadata["kwargs_model"].model_fields.keys() == {
        "lm_head", "embedding", "group_size", "exclude"}


@pytest.mark.slow
def test_a_third_party_quantizer_plugs_in_through_the_hook(tmp_path):
    with isolated_registry(HalfPlugin()):
        config, params = model("mlstm_v1")
        qconfig, qparams = quantize(config, params, "half", {"pattern": "ffn/proj_down"})
        paths = by_path(qparams)
        assert [p for p in paths if p[-1] == "half"] == [("blocks_0", "ffn", "proj_down", "kernel", "half"),
                                                         ("blocks_1", "ffn", "proj_down", "kernel", "half")]
        assert paths["blocks_0", "ffn", "proj_down", "kernel", "half"].dtype == jnp.float16
        assert ("blocks_0", "xlstm", "proj_down", "kernel") in paths  # not selected: float32, as it was
        expected = np.asarray(zoo.forward(config, params, TOKENS))
        got = np.asarray(zoo.forward(qconfig, qparams, TOKENS))
        assert 0 < rel(got, expected) < 2e-3  # float16 weights: rounding errors near 2^-11
        zoo.save(tmp_path / "ck", qconfig, qparams)
        recorded = read_metadata(tmp_path / "ck")["plugins"]["quantizer"]["half"]
        assert recorded["plugin"] == "HalfPlugin"
        loaded_config, loaded = zoo.load(tmp_path / "ck", dtype="bfloat16")
        assert loaded_config == qconfig
        leaves = by_path(loaded)
        assert leaves["blocks_1", "ffn", "proj_down", "kernel", "half"].dtype == jnp.float16  # never cast
        assert leaves["blocks_1", "xlstm", "proj_down", "kernel"].dtype == jnp.bfloat16
        with pytest.raises(ValidationError, match="quantizer 'half' has no option 'patern'"):
            zoo.load_config({**config.model_dump(mode="json"),
                             "quantization": {"method": "half", "kwargs": {"patern": "x"}}})


def test_a_quantizer_that_breaks_the_contract_is_refused():
    class NoAxes:
        def __init__(self, **kwargs):
            pass

        select = quantize = dequantize = staticmethod(lambda *a: None)

    class Strict:
        def __init__(self):
            pass

        select = quantize = dequantize = axes = staticmethod(lambda *a: None)

    cases = {"no-axes": (NoAxes, {}, "quantizer class must have the methods select, quantize, dequantize, "
                                     "axes; missing: axes"),
             "instance": (Half(), {}, "quantizer must be a class built as cls(**kwargs)"),
             "strict": (Strict, {"kwargs_model": HalfKwargs}, "it cannot take: pattern")}
    for name, (obj, metadata, message) in cases.items():
        plugin = type("P", (), {"register_quantizers": hookimpl(
            lambda self, register, obj=obj, metadata=metadata: register(name, obj, **metadata))})()
        info = PluginRegistry(autoload=False).add_plugin(plugin, f"bad-{name}")
        assert info.error.startswith(f"ContractError: quantizer {name!r} from bad-{name}: "), info.error
        assert message in info.error, info.error


# --- int8 numerics against a float64 NumPy reference -------------------------------------------------------------

def test_int8_per_channel_matches_a_float64_numpy_reference():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(37, 11)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column: scale 1, values 0
    w[:, 4] *= 1e-3
    w[:, 5] = rng.uniform(-1, 1, 37)
    w[[2, 9, 10], 5] = [127.0, 2.5, -3.5]  # scale 1 exactly: 2.5 and -3.5 are ties, rounded to even
    stored = Int8(group_size=None).quantize(jnp.asarray(w))
    values, scale = np.asarray(stored["values"]), np.asarray(stored["scale"], np.float64)
    assert values.dtype == np.int8 and scale.dtype == np.float64 and stored["scale"].dtype == jnp.float32

    w64 = w.astype(np.float64)
    amax = np.abs(w64).max(axis=0)
    ref_scale = np.where(amax > 0, amax / 127.0, 1.0)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-7)
    ratio = w64 / ref_scale
    ref_values = np.round(ratio)  # to nearest, ties to even
    near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4  # float32 division may land either side
    assert np.array_equal(values[~near_tie], ref_values[~near_tie])
    assert np.abs(values - ref_values).max() <= 1 and (values[9, 5], values[10, 5]) == (2, -4)
    assert np.abs(values).max() == 127 and np.all(values[:, 3] == 0)
    dequantized = np.asarray(Int8(group_size=None).dequantize(stored), np.float64)
    assert np.all(np.abs(w64 - dequantized) <= ref_scale / 2 * (1 + 1e-5))

    x = rng.normal(size=(3, 5, 37)).astype(np.float32)
    expected = x.astype(np.float64) @ (values * ref_scale)
    got = Int8(group_size=None).matmul(jnp.asarray(x), stored)
    assert got.dtype == jnp.float32 and got.shape == (3, 5, 11)
    assert rel(got, expected) < 1e-5
    got16 = Int8(group_size=None).matmul(jnp.asarray(x, jnp.bfloat16), stored)
    assert got16.dtype == jnp.bfloat16 and rel(got16, expected) < 1e-2
    ids = np.array([[0, 10, 5], [3, 3, 1]])
    rows = np.asarray(Int8(group_size=None).columns(stored, jnp.asarray(ids)))
    np.testing.assert_allclose(rows, (values * ref_scale).T[ids], rtol=1e-6)


def test_int8_group_scales_match_a_float64_numpy_reference():
    """``group_size=G``: one scale per column and group of G rows; values, scales, the dequantised weight, the
    matmul (native kernel and pure path) and embedding rows against float64 NumPy."""
    rng = np.random.default_rng(1)
    K, N, G = 96, 13, 32
    w = rng.normal(size=(K, N)).astype(np.float32)
    w[32:64, 2] = 0.0  # an all-zero group: scale 1, values 0
    w[:32, 3] *= 1e-3  # groups of one column with very different ranges
    w[64:, 4] *= 50.0
    quantizer = Int8(group_size=G)
    stored = quantizer.quantize(jnp.asarray(w))
    values, scale = np.asarray(stored["values"]), np.asarray(stored["scale"], np.float64)
    assert values.dtype == np.int8 and stored["scale"].dtype == jnp.float32 and scale.shape == (K // G, N)

    w64 = w.astype(np.float64)
    amax = np.abs(w64.reshape(K // G, G, N)).max(axis=1)
    ref_scale = np.where(amax > 0, amax / 127.0, 1.0)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-7)
    per_row = np.repeat(ref_scale, G, axis=0)  # (K, N): each row's scale
    ratio = w64 / per_row
    near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4
    assert np.array_equal(values[~near_tie], np.round(ratio)[~near_tie])
    assert np.all(np.abs(values.reshape(K // G, G, N)).max(axis=1)[amax > 0] == 127) and np.all(values[32:64, 2] == 0)
    dequantized = np.asarray(quantizer.dequantize(stored), np.float64)
    np.testing.assert_allclose(dequantized, values * per_row, rtol=1e-6)
    assert np.all(np.abs(w64 - dequantized) <= per_row / 2 * (1 + 1e-5))
    per_channel = np.asarray(Int8(group_size=None).dequantize(Int8(group_size=None).quantize(jnp.asarray(w))))
    assert np.abs(w64 - dequantized)[:32, 3].max() < np.abs(w64 - per_channel)[:32, 3].max() / 100

    x = rng.normal(size=(3, 5, K)).astype(np.float32)
    expected = x.astype(np.float64) @ (values * per_row)
    for rows in (x, x[:1, :1]):  # 15 rows: the pure path; 1 row: the native kernel where it is available
        got = quantizer.matmul(jnp.asarray(rows), stored)
        assert got.dtype == jnp.float32 and rel(got, expected[:rows.shape[0], :rows.shape[1]]) < 1e-5
    got16 = quantizer.matmul(jnp.asarray(x, jnp.bfloat16), stored)
    assert got16.dtype == jnp.bfloat16 and rel(got16, expected) < 1e-2
    ids = np.array([[0, 10, 4], [3, 3, 1]])
    np.testing.assert_allclose(np.asarray(quantizer.columns(stored, jnp.asarray(ids))), (values * per_row).T[ids],
                               rtol=1e-6)


# --- the quantised model -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layer_type, fields, options", [
    ("mlstm", {}, {}),
    ("mlstm_v1", {"scan_blocks": True}, {"embedding": True}),
    ("mlstm_v1", {"tie_weights": True, "dtype": "bfloat16"}, {"embedding": True}),
])
def test_the_quantised_model_computes_its_dequantised_weights(layer_type, fields, options):
    config, params = model(layer_type, **fields)
    qconfig, qparams = quantize(config, params, "int8", options)
    plain, dequantized = dequantize(qconfig, qparams)
    assert plain == config and jax.tree_util.tree_structure(dequantized) == jax.tree_util.tree_structure(params)
    logits = np.asarray(zoo.forward(qconfig, qparams, TOKENS))
    # bfloat16: the reference rounds the dequantised weights to bfloat16, the int8 paths scale in float32; the
    # float model itself moves by 1.3% from float32 to bfloat16 here
    tolerance = 3e-2 if config.dtype == "bfloat16" else 1e-5
    assert rel(logits, zoo.forward(plain, dequantized, TOKENS)) < tolerance
    assert 1e-4 < rel(logits, zoo.forward(config, params, TOKENS)) < 0.1  # int8 rounding shows, and stays small


@pytest.mark.slow
def test_prefill_step_and_generate_take_quantised_params():
    config, params = model("mlstm_v1", scan_blocks=True)
    qconfig, qparams = quantize(config, params)
    plain, dequantized = dequantize(qconfig, qparams)
    exact = np.asarray(zoo.forward(plain, dequantized, TOKENS))
    prefill_logits, state = zoo.prefill(qconfig, qparams, TOKENS[:, :5])
    step_logits, _ = zoo.step(qconfig, qparams, TOKENS[:, 5], state)
    assert rel(prefill_logits, exact[:, :5]) < 1e-5 and rel(step_logits, exact[:, 5]) < 1e-5
    generated = zoo.generate(qconfig, qparams, TOKENS[:1, :4], 3)
    reference = zoo.generate(plain, dequantized, TOKENS[:1, :4], 3)
    assert np.array_equal(np.asarray(generated.tokens), np.asarray(reference.tokens))


def test_by_default_int8_quantises_the_projections_and_the_head_only():
    config = tiny("mlstm_v1")
    q = config.model_copy(update={"quantization": zoo.config.QuantizationConfig(method="int8")})
    names = {p[1:] if p[0].startswith("blocks") else p for p in quantized_weights(q)}
    assert names == {("xlstm", n, "kernel") for n in ("dense_q", "dense_k", "dense_v", "dense_o", "proj_down")} | {
        ("ffn", n, "kernel") for n in ("proj_up", "proj_up_gate", "proj_down")} | {("lm_head", "kernel")}
    shapes = by_path(zoo.param_shapes(q))
    assert shapes["token_embedding", "embedding"].dtype == jnp.float32
    assert shapes["blocks_0", "xlstm", "igate", "kernel"].dtype == jnp.float32
    assert shapes["lm_head", "kernel", "values"].dtype == jnp.int8


def test_quantised_weights_keep_their_logical_axes():
    from zoo.model import boxed_param_shapes
    from zoo.sharding import logical_specs, param_placements

    config = tiny("mlstm_v1", scan_blocks=True)
    q = config.model_copy(update={"quantization": zoo.config.QuantizationConfig(method="int8", kwargs={
        "embedding": True})})
    specs = by_path(logical_specs(boxed_param_shapes(q)))
    assert specs["blocks", "xlstm", "dense_q", "kernel", "values"] == PartitionSpec("layers", "embed", "inner")
    assert specs["blocks", "xlstm", "dense_q", "kernel", "scale"] == PartitionSpec("layers", None, "inner")
    assert specs["token_embedding", "embedding", "values"] == PartitionSpec("embed", "vocab")
    assert specs["token_embedding", "embedding", "scale"] == PartitionSpec(None, "vocab")
    placed = by_path(param_placements(q, (1, 1, 1, 2)))  # tp = 2: columns split, with their scales
    assert placed["blocks", "xlstm", "dense_q", "kernel", "values"].spec == PartitionSpec(None, None, "tp")
    assert placed["blocks", "xlstm", "dense_q", "kernel", "scale"].spec == PartitionSpec(None, None, "tp")


# --- config ------------------------------------------------------------------------------------------------------

def test_the_config_validates_quantization_against_the_registry():
    data = tiny().model_dump(mode="json")
    assert data["quantization"] is None
    cases = {"int4": ("method", {}, "unknown quantizer 'int4'; registered: int8"),
             "int8": ("kwargs.lm_hed", {"lm_hed": False}, "quantizer 'int8' has no option 'lm_hed'"),
             "strict": ("kwargs.lm_head", {"lm_head": "no"}, "valid boolean")}
    for name, (field, kwargs, message) in cases.items():
        with pytest.raises(ValidationError) as caught:
            zoo.load_config({**data, "quantization": {"method": name if name != "strict" else "int8",
                                                      "kwargs": kwargs}})
        (error,) = caught.value.errors()
        assert ".".join(map(str, error["loc"])) == f"quantization.{field}" and message in error["msg"], error
    quantised = zoo.load_config({**data, "quantization": {"method": "int8", "kwargs": {"lm_head": False}}})
    assert quantised.quantization.kwargs == {"lm_head": False, "embedding": False, "group_size": 32,
                                             "exclude": ["*igate*", "*fgate*"]}
    assert zoo.load_config(json.loads(quantised.model_dump_json())) == quantised


def test_quantize_refuses_by_name():
    config, params = model("mlstm")
    qconfig, qparams = quantize(config, params)
    refusals = {
        "already quantised (quantization.method='int8')": lambda: quantize(qconfig, qparams),
        "--method: unknown quantizer 'fp4'": lambda: quantize(config, params, "fp4"),
        "quantization.kwargs.bits: quantizer 'int8' has no option 'bits'": lambda: quantize(config, params, "int8",
                                                                                          {"bits": 4}),
        "selects no weight of this model (layer_type 'mlstm'": lambda: quantize(
            config, params, "int8", {"exclude": ["*"]}),
        "quantization.kwargs.group_size: blocks_0/xlstm/proj_up_mlstm has 32 input rows (K), not a multiple of "
        "group_size=48": lambda: quantize(config, params, "int8", {"group_size": 48}),
        "group_size: Input should be greater than 0": lambda: quantize(config, params, "int8", {"group_size": 0}),
    }
    bad = dict(params, lm_head={"kernel": params["lm_head"]["kernel"].at[0, 0].set(jnp.nan)})
    refusals["params['lm_head']['kernel'] holds NaN"] = lambda: quantize(config, bad)
    for message, call in refusals.items():
        with pytest.raises(QuantizationError, match=None) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_load_with_a_dtype_never_casts_quantised_arrays(tmp_path):
    config, params = model("mlstm_v1")
    qconfig, qparams = quantize(config, params)
    zoo.save(tmp_path / "ck", qconfig, qparams)
    loaded_config, loaded = zoo.load(tmp_path / "ck", dtype="bfloat16")
    leaves = by_path(loaded)
    for path, leaf in leaves.items():
        quantised = path[-2] == "kernel" and path[-1] in ("values", "scale")
        want = {"values": jnp.int8, "scale": jnp.float32}[path[-1]] if quantised else jnp.bfloat16
        assert leaf.dtype == want, (path, leaf.dtype)
    assert np.array_equal(leaves["lm_head", "kernel", "values"], qparams["lm_head"]["kernel"]["values"])
    assert rel(zoo.forward(loaded_config, loaded, TOKENS), zoo.forward(qconfig, qparams, TOKENS)) < 2e-2


# --- zoo quantize -> save -> load -> export -> zoo run -----------------------------------------------------------

@pytest.mark.slow
def test_round_trip_through_quantize_export_and_run(tmp_path):
    from zoo.export.runners import open_artifact

    config, params = model("mlstm_v1")
    zoo.save(tmp_path / "float", config, params)
    done = invoke_zoo("quantize", str(tmp_path / "float"), "--out", str(tmp_path / "int8"))
    assert done.returncode == 0, done.stderr
    assert "quantised 17 weights with int8" in done.stdout  # 8 per block and the head
    qconfig, qparams = zoo.load(tmp_path / "int8")
    assert qconfig.quantization.method == "int8"
    assert by_path(qparams)["blocks_1", "xlstm", "dense_v", "kernel", "values"].dtype == jnp.int8
    assert read_metadata(tmp_path / "int8")["quantized_from"]["step"] == 0
    expected = np.asarray(zoo.forward(qconfig, qparams, TOKENS))
    assert 1e-4 < rel(expected, zoo.forward(config, params, TOKENS)) < 0.05

    runs = {}
    for fmt in ("stablehlo", "savedmodel"):
        out = tmp_path / fmt
        done = invoke_zoo("export", str(tmp_path / "int8"), "--out", str(out), "--format", fmt, "--platforms", "cpu")
        assert done.returncode == 0, done.stderr
        assert rel(open_artifact(out).forward(TOKENS), expected) < 1e-5
        done = invoke_zoo("run", str(out), "--prompt-ids", "5,7,11", "--max-new-tokens", "4", "--json")
        assert done.returncode == 0, done.stderr
        runs[fmt] = json.loads(done.stdout.splitlines()[-1])["outputs"][0]["ids"]  # after an "artifact:" line
    weights = json.loads((tmp_path / "stablehlo" / "manifest.json").read_text())["weights_file"]["params"]
    assert {"name": "lm_head/kernel/values", "shape": [32, 61], "dtype": "int8"} in weights
    done = invoke_zoo("run", str(tmp_path / "int8"), "--prompt-ids", "5,7,11", "--max-new-tokens", "4", "--json")
    assert runs["stablehlo"] == runs["savedmodel"] == json.loads(done.stdout.splitlines()[-1])["outputs"][0]["ids"]
    info = invoke_zoo("info", str(tmp_path / "int8"), "--json")
    assert json.loads(info.stdout)["architecture"]["quantization"]["method"] == "int8"


def test_zoo_quantize_refuses_in_one_line(tmp_path):
    config, params = model("mlstm")
    zoo.save(tmp_path / "float", config, params)
    qconfig, qparams = quantize(config, params)
    zoo.save(tmp_path / "int8", qconfig, qparams)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = {
        ("int8", "--out", "new"): "is already quantised (quantization.method='int8'); quantise its float original",
        ("float", "--out", "new", "--method", "int3"): "--method: unknown quantizer 'int3'",
        ("float", "--out", "new", "--option", "embeding=true"): "quantizer 'int8' has no option 'embeding'",
        ("float", "--out", "new", "--option", 'exclude=["*"]', "--option", "lm_head=false"): "selects no weight",
        ("float", "--out", "full"): "--out expected a new or empty folder",
        ("float", "--out", "new", "--option", "lm_head"): "--option needs KEY=VALUE",
    }
    for (source, *args), message in cases.items():
        args = [str(tmp_path / a) if a in ("new", "full") else a for a in args]
        done = invoke_zoo("quantize", str(tmp_path / source), *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "new").exists()
    # training needs float weights: a quantised checkpoint to fine-tune is refused before any step
    (tmp_path / "text.txt").write_text("some text to train on. " * 50)
    done = invoke_zoo("train", str(tmp_path / "int8"), "--data", str(tmp_path / "text.txt"), "--out",
                      str(tmp_path / "run"), "--steps", "1")
    assert done.returncode == 2 and "is quantised (int8); training needs float weights" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
