"""Sharding: the layout rules (here, on one device), and sharded runs on 8 simulated devices (in subprocesses).

The subprocess runs compare every mesh with the same model computed on one device; the
multi-process run is compared with a single-process run made in this process.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import zoo
import zoo.train as T
from zoo import sharding
from zoo.config import ParallelConfig

HERE = Path(__file__).parent
TOL = 1e-4  # rtol and atol of the issue, at float32


def tiny_v1(dropout: float = 0.0, **parallel) -> zoo.ModelConfig:
    return zoo.load_config({"vocab_size": 64, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "dropout": dropout,
                            "mlstm_block": {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 4, "qk_dim_factor": 0.5},
                                            "feedforward": {}},
                            "parallel": parallel or None})


# --- layout rules -----------------------------------------------------------------------------------

def test_mesh_sizes_are_inferred_or_refused_with_the_device_count():
    assert sharding.axis_sizes(ParallelConfig(fsdp_axis_size=2, model_axis_size=2), 8) == (2, 2, 1, 2)
    assert sharding.axis_sizes(ParallelConfig(), 1) == (1, 1, 1, 1)
    with pytest.raises(sharding.ShardingError, match="= 4 must divide the 6 device"):
        sharding.axis_sizes(ParallelConfig(fsdp_axis_size=4), 6)
    with pytest.raises(sharding.ShardingError, match="= 4 but 8 device"):
        sharding.axis_sizes(ParallelConfig(data_axis_size=2, model_axis_size=2), 8)


def specs(config, sizes):
    placements = sharding.param_placements(config, sizes)
    return {jax.tree_util.keystr(path): p.spec for path, p in jax.tree_util.tree_flatten_with_path(
        placements, is_leaf=lambda x: isinstance(x, sharding.Placement))[0]}


def test_tensor_parallel_layout_is_megatron():
    got = specs(tiny_v1(model_axis_size=2), (1, 1, 1, 2))
    block = "['blocks_0']"
    for up in ("dense_q", "dense_k", "dense_v", "dense_o"):  # column-parallel
        assert got[f"{block}['xlstm']['{up}']['kernel']"] == P(None, "tp")
    assert got[f"{block}['xlstm']['proj_down']['kernel']"] == P("tp", None)  # row-parallel
    assert got[f"{block}['ffn']['proj_up']['kernel']"] == got[f"{block}['ffn']['proj_up_gate']['kernel']"] == P(None, "tp")
    assert got[f"{block}['ffn']['proj_down']['kernel']"] == P("tp", None)
    assert got["['token_embedding']['embedding']"] == P("tp", None)
    assert got["['lm_head']['kernel']"] == P(None, "tp")
    assert got[f"{block}['xlstm_norm']['scale']"] == P(None)  # small params stay whole


def test_fsdp_splits_the_largest_free_axis_of_large_params_in_listed_modules():
    config = tiny_v1(fsdp_axis_size=4, model_axis_size=2, fsdp_modules=["mLSTMBlock"], fsdp_min_weight_size=1000)
    got = specs(config, (1, 4, 1, 2))
    block = "['blocks_1']"
    # ffn proj_up (32, 96): tp takes the columns, fsdp the rows; proj_down (96, 32) the other way round
    assert got[f"{block}['ffn']['proj_up']['kernel']"] == P("fsdp", "tp")
    assert got[f"{block}['ffn']['proj_down']['kernel']"] == P("tp", "fsdp")
    assert got[f"{block}['xlstm']['dense_q']['kernel']"] == P(None, "tp")  # 32 x 16 = 512 <= 1000: not FSDP
    assert got["['token_embedding']['embedding']"] == P("tp", None)  # Embed is not listed
    config = tiny_v1(fsdp_axis_size=4, fsdp_modules=["Embed"], fsdp_min_weight_size=0)
    assert specs(config, (1, 4, 1, 1))["['token_embedding']['embedding']"] == P("fsdp", None)  # 64 > 32


def test_fsdp_bytes_per_device_at_the_13b_preset():
    preset = zoo.load_config("mlstm-1.3b")
    config = preset.with_parallel(ParallelConfig(fsdp_axis_size=8, fsdp_modules=["Embed", "LMHead", "mLSTMBlock"]))
    replicated = sharding.bytes_per_device(config, (1, 1, 1, 1))
    fsdp = sharding.bytes_per_device(config, (1, 8, 1, 1))
    assert replicated == 4 * 1_422_559_616  # the published parameter count of the 1.3B model, float32
    assert replicated / 8 <= fsdp < replicated / 7.9  # only norms and small vectors stay whole


def test_abstract_build_plans_the_layout_for_a_given_device_count():
    from typer.testing import CliRunner

    from zoo.cli import app, out
    out.width = 200
    result = CliRunner().invoke(app, ["build", "mlstm-7b", "--abstract", "--devices", "64"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dp=8 × fsdp=8 × pp=1 × tp=1, 64 devices" in text
    assert "parameters split over fsdp │ 14 of 18" in text
    assert "3.2 GiB" in text and "25.7 GiB" in text


def test_distributed_start_is_requested_only_by_a_launcher(monkeypatch):
    from zoo.distributed import requested

    for name in ("JAX_COORDINATOR_ADDRESS", "ZOO_DISTRIBUTED", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not requested()
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not requested()  # an allocation, not a step launched by srun
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert requested()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not requested()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert requested()


def test_with_parallel_replaces_the_section_everywhere():
    config = tiny_v1().with_parallel(ParallelConfig(model_axis_size=2))
    assert config.parallel.model_axis_size == config.layer.parallel.model_axis_size == 2
    assert config.mlstm_block.feedforward.parallel.model_axis_size == 2


def test_training_loss_mask_and_dropout_on_one_device():
    config = tiny_v1()
    params = zoo.init_params(config)
    tokens = np.random.default_rng(3).integers(0, 64, (2, 9)).astype(np.int32)
    logits = np.asarray(zoo.forward(config, params, tokens[:, :-1]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean()
    assert abs(float(T.loss_fn(config, params, jnp.asarray(tokens))) - expected) < 1e-5
    mask = T.decay_mask(config, params)
    assert not mask["token_embedding"]["embedding"] and mask["lm_head"]["kernel"]
    assert not mask["blocks_0"]["xlstm_norm"]["scale"]
    assert T.decay_mask(config.model_copy(update={"weight_decay_on_embedding": True}), params)["token_embedding"]["embedding"]
    rng = jax.random.PRNGKey(0)
    assert float(T.loss_fn(config, params, jnp.asarray(tokens), dropout_rng=rng)) == float(T.loss_fn(config, params, jnp.asarray(tokens)))
    dropped = tiny_v1(dropout=0.3)
    assert float(T.loss_fn(dropped, params, jnp.asarray(tokens), dropout_rng=rng)) != float(T.loss_fn(dropped, params, jnp.asarray(tokens)))


# --- sharded runs on 8 devices ------------------------------------------------------------------------

def run_worker(script: str, *args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, **popen)


def shape_of(results: dict, path: str) -> list[int]:
    return next(iter(results["meshes"].values()))["shapes"][path]


def local(shape: list[int], spec: list, mesh: dict, skip: str = "") -> list[int]:
    """The shape of one device's piece of a parameter (not splitting over ``skip``)."""
    out = list(shape)
    for d, axes in enumerate(spec):
        for axis in [axes] if isinstance(axes, str) else axes or []:
            if axis != skip:
                out[d] //= mesh[axis]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layer_type", ["mlstm", "mlstm_v1"])
def test_sharded_runs_equal_one_device(layer_type, tmp_path):
    extras = layer_type == "mlstm"
    proc = run_worker("sharded_worker.py", layer_type, str(tmp_path), *(["--extras"] if extras else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["update"] > 5 * TOL  # the step moves parameters by far more than the tolerance
    for name, mesh in results["meshes"].items():
        assert mesh["logits"] <= TOL + TOL * mesh["logits_scale"], name
        assert mesh["loss"] <= TOL, name
        assert mesh["params"] <= TOL and mesh["rel_params"] <= TOL, name
        assert mesh["layout_kept"], name
    spec = results["meshes"]["dp2_fsdp2_tp2"]["specs"]
    assert any("fsdp" in str(s) for s in spec.values()) and any("tp" in str(s) for s in spec.values())

    for name in ("tp4", "dp2_fsdp2_tp2"):  # tensor parallel: one reduction per sub-layer
        found = results["meshes"][name]["collectives"]
        assert found.get("all-reduce") or found.get("reduce-scatter"), name
    tp4 = results["meshes"]["tp4"]  # and weights split over tp are never gathered whole
    gathered = {tuple(op["shape"]) for op in tp4["collectives"].get("all-gather", [])}
    for path, s in tp4["specs"].items():
        if "tp" in str(s):
            whole = shape_of(results, path)
            assert tuple(whole) not in gathered, path
            if path.startswith("['blocks']"):  # nor one block's slice of the stack
                assert tuple(whole[1:]) not in gathered, path

    if layer_type == "mlstm":  # blocks under nn.scan: FSDP gathers happen per block, inside the loop
        fsdp = results["meshes"]["fsdp8"]
        gathers = fsdp["collectives"]["all-gather"]
        entry = {tuple(op["shape"]) for op in gathers if op["where"] == "entry"}
        nested = {tuple(op["shape"]) for op in gathers if op["where"] == "nested"}
        stacked = {path: s for path, s in fsdp["specs"].items() if path.startswith("['blocks']") and "fsdp" in str(s)}
        assert stacked
        for path, s in stacked.items():
            whole = local(shape_of(results, path), s, fsdp["mesh"], skip="fsdp")
            assert tuple(whole) not in entry, path  # never the whole stack at once
        per_block = {tuple(local(shape_of(results, p), s, fsdp["mesh"], skip="fsdp")[1:]) for p, s in stacked.items()}
        assert per_block & nested

    if extras:
        assert results["init_equal"] and results["init_sharded"]
        restore = results["restore"]
        assert restore["bitwise"] and restore["mesh"] == {"dp": 1, "fsdp": 4, "pp": 1, "tp": 2}
        assert {"fsdp", "tp"} <= {axis for s in restore["specs"] for axis in ("fsdp", "tp") if axis in s}
        assert restore["config_parallel"]["fsdp_axis_size"] == 4 and restore["config_parallel"]["model_axis_size"] == 2
        assert restore["logits"] <= TOL
        config, params = zoo.load(tmp_path / "ckpt")  # and onto this process's single device
        assert config.parallel.model_axis_size == 2 and jax.tree_util.tree_leaves(params)[0].sharding.num_devices == 1
        logits = zoo.forward(config, params, np.zeros((1, 3), np.int32))
        assert bool(jnp.isfinite(logits).all())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    config = {"vocab_size": 64, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "scan_blocks": True,
              "mlstm_block": {"mlstm": {"layer_type": "mlstm", "num_heads": 4}},
              "parallel": {"data_axis_size": 2, "fsdp_axis_size": 2, "model_axis_size": 2,
                           "fsdp_modules": ["mLSTMBlock"], "fsdp_min_weight_size": 0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)
    np.save(tmp_path / "tokens.npy", tokens)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(tmp_path / "config.json"),
                               str(tmp_path / "tokens.npy"), str(tmp_path / "out.npz")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)

    got = np.load(tmp_path / "out.npz")
    assert (int(got["processes"]), int(got["devices"]), int(got["local"])) == (2, 8, 4)
    single = zoo.load_config({k: v for k, v in config.items() if k != "parallel"})
    params = zoo.init_params(single)
    np.testing.assert_allclose(got["['logits']"], np.asarray(zoo.forward(single, params, tokens)), rtol=TOL, atol=TOL)
    optimizer = T.adamw(single, 1e-3, eps=1e-3)
    state, loss = T.train_step(single, optimizer, T.init_train_state(single, jax.tree_util.tree_map(jnp.copy, params),
                                                                 optimizer), tokens)
    assert abs(float(got["loss"]) - float(loss)) <= TOL
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        np.testing.assert_allclose(got["['params']" + jax.tree_util.keystr(path)], np.asarray(leaf),
                                   rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)))
    assert moved > 5 * TOL
    assert math.isfinite(float(loss))
