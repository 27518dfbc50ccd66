"""Every command's code path against every parameter layout the zoo produces (issue 14, section 3).

A layout is scanned or per-block params (``scan_blocks``), a tied or separate head (``tie_weights``), the
layer type (``mlstm``, ``mlstm_v1``), the params' stored dtype and the compute ``dtype``. The six rows of
``LAYOUTS`` cover every pair of values of those five factors. Each row is saved as a checkpoint and run,
in-process, through what ``generate``, ``export`` (StableHLO; SavedModel on one row), ``run``, ``info`` and a
sharded load call. The oracle is each row's twin: the same values as float32 params, per block (unstacked
here with NumPy indexing) and with a separate head (a copy of the transposed embedding when tied), in the
same compute dtype, run through ``zoo.forward``; decoding (generate, run, an artifact's prefill and step) computes in
the decode layout's dtype (float32 on a CPU, docs/decoding.md), so its twin computes in that dtype. One real-CLI run per command uses the scanned, tied,
bfloat16 mlstm_v1 row. ``convert`` has its own layout matrix in test_convert_torch.py.
"""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

import zoo
from helpers import by_path, nested
from zoo.decode_layout import decode_config
from zoo.export.runners import greedy, open_artifact
from zoo.export.stablehlo import export_stablehlo
from zoo.inference import generate
from zoo.info import describe_path

LAYERS = {
    "mlstm": {"mlstm": {"layer_type": "mlstm", "num_heads": 2, "mlstm_cell": {"gate_soft_cap": 15.0}}},
    "mlstm_v1": {"mlstm": {"layer_type": "mlstm_v1", "num_heads": 2, "qk_dim_factor": 0.5,
                           "mlstm_cell": {"gate_soft_cap": 15.0}},
                 "feedforward": {"act_fn": "swish", "proj_factor": 2.0}},
}
# name: (scan_blocks, tie_weights, layer type, stored param dtype, compute dtype). The first two rows take one
# value throughout; in the last four each factor's column is another 2-of-4 pattern, so every pair of
# factors takes all four pairs of values.
LAYOUTS = {
    "plain": (False, False, "mlstm", "float32", "float32"),
    "scan-tied-v1-bf16": (True, True, "mlstm_v1", "bfloat16", "bfloat16"),
    "scan-tied-v1": (True, True, "mlstm_v1", "float32", "float32"),
    "scan-bf16params": (True, False, "mlstm", "bfloat16", "float32"),
    "tied-bf16": (False, True, "mlstm", "bfloat16", "bfloat16"),
    "v1-bf16compute": (False, False, "mlstm_v1", "float32", "bfloat16"),
}
CLI_LAYOUT = "scan-tied-v1-bf16"
PROMPTS = np.random.default_rng(0).integers(0, 61, (2, 5)).astype(np.int32)
NEW_TOKENS = 6
# max |logits - twin| / max |twin| for the same computation as the twin's. Run op by op, a layout and its twin
# agree bitwise; compiled, XLA fuses a scanned body otherwise than unrolled blocks and, in bfloat16, rounds
# other intermediates (5.8e-3 measured), so scanned bfloat16 rows get bfloat16's tolerance.
SAME_PATH = 1e-5
SCANNED_BFLOAT16 = 2e-2
# ... and for prefill + step (the decoding path) against the twin's forward, which round differently. Decoding
# computes in the decode layout's dtype (float32 on a CPU, docs/decoding.md), so its twin is the twin in that dtype.
ACROSS_PATHS = {"float32": 1e-5, "bfloat16": 3e-2}


def config_of(scan: bool, tie: bool, layer: str, dtype: str) -> zoo.ModelConfig:
    return zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "context_length": 16,
                            "dtype": dtype, "scan_blocks": scan, "tie_weights": tie, "mlstm_block": LAYERS[layer]})


def reference(layer: str) -> dict[tuple[str, ...], np.ndarray]:
    """Per-block float32 params of an untied model whose values bfloat16 holds exactly (norm scales near 1)."""
    rng = np.random.default_rng(7)
    shapes = by_path(zoo.param_shapes(config_of(False, False, layer, "float32")))
    values = {p: (float(p[-1] == "scale") + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
              for p, s in shapes.items()}
    return {p: x.astype(ml_dtypes.bfloat16).astype(np.float32) for p, x in values.items()}


def in_layout(per_block: dict, scan: bool, tie: bool, num_blocks: int, dtype: str) -> dict:
    """The reference as the zoo lays it out: blocks stacked on a leading axis when scanned, no head when tied."""
    out = {p: x for p, x in per_block.items() if not (tie and p[0] == "lm_head")}
    if scan:
        inner = {p[1:] for p in out if p[0].startswith("blocks_")}
        out = {p: x for p, x in out.items() if not p[0].startswith("blocks_")} | {
            ("blocks", *p): np.stack([per_block[(f"blocks_{i}", *p)] for i in range(num_blocks)]) for p in inner}
    return nested({p: x.astype(getattr(ml_dtypes, dtype, np.float32)) for p, x in out.items()})


def twin_params(config: zoo.ModelConfig, params) -> dict:
    """``params`` as float32, per block and untied: block ``i`` of a stacked leaf is its row ``i``, and a tied
    head becomes a separate copy of the transposed embedding."""
    out = {}
    for path, leaf in by_path(params).items():
        leaf = np.asarray(leaf, np.float32)
        if path[0] == "blocks":
            out |= {(f"blocks_{i}", *path[1:]): leaf[i] for i in range(config.num_blocks)}
        else:
            out[path] = leaf
    if config.tie_weights:
        out[("lm_head", "kernel")] = out[("token_embedding", "embedding")].T.copy()
    return nested(out)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / np.abs(expected).max())


class Layout:
    """One row of ``LAYOUTS``: its config, the params as saved, a checkpoint of them, and the twin."""

    def __init__(self, name: str, folder):
        self.name = name
        self.scan, self.tie, self.layer, self.param_dtype, self.dtype = LAYOUTS[name]
        self.config = config_of(self.scan, self.tie, self.layer, self.dtype)
        self.params = in_layout(reference(self.layer), self.scan, self.tie, 2, self.param_dtype)
        self.checkpoint = folder / "ck"
        zoo.save(self.checkpoint, self.config, self.params)
        self.twin_config = config_of(False, False, self.layer, self.dtype)
        self.twin_params = twin_params(self.config, self.params)
        self.twin_logits = np.asarray(zoo.forward(self.twin_config, self.twin_params, PROMPTS))
        self.decode_dtype = decode_config(self.config, jax.default_backend()).dtype
        self.decode_twin_config = config_of(False, False, self.layer, self.decode_dtype)

    def assert_close(self, actual, expected, what: str, tolerances: dict[str, float] | None = None):
        """Within ``tolerances[dtype]``; by default, the same computation's (``SAME_PATH``)."""
        same = SCANNED_BFLOAT16 if self.scan and self.dtype == "bfloat16" else SAME_PATH
        error, tolerance = relative_error(actual, expected), (tolerances or {}).get(self.dtype, same)
        assert error <= tolerance, f"{self.name}: {what} differ by {error:.2e} > {tolerance:.0e}"

    def assert_decoded_close(self, actual, expected, what: str):
        """Decoded logits against the twin in the decode dtype, within ``ACROSS_PATHS`` of that dtype."""
        error, tolerance = relative_error(actual, expected), ACROSS_PATHS[self.decode_dtype]
        assert error <= tolerance, f"{self.name}: {what} differ by {error:.2e} > {tolerance:.0e}"

    def assert_greedy(self, prompts, prompt_logits, tokens) -> np.ndarray:
        """``tokens (B, N)`` continue ``prompts (B, S)`` as the twin in the decode dtype would, fed the same tokens:
        in float32 each is the twin's argmax; in bfloat16 each has the twin's largest logit, up to rounding.
        ``prompt_logits (B, V)`` (unless None) are the twin's after the prompt. Returns the twin's logits
        ``(B, N, V)`` that each new token was chosen from."""
        tokens = np.asarray(tokens)
        fed = np.concatenate([prompts, tokens], 1)
        # the twin always runs on PROMPTS' batch size: one compile serves every caller
        twin = np.asarray(zoo.forward(self.decode_twin_config, self.twin_params,
                                      np.resize(fed, (len(PROMPTS), fed.shape[1]))))
        after = twin[:len(fed), prompts.shape[1] - 1:-1]
        if prompt_logits is not None:
            self.assert_decoded_close(prompt_logits, after[:, 0], "next-token logits after the prompt")
        if self.decode_dtype == "float32":
            np.testing.assert_array_equal(tokens, after.argmax(-1))
        chosen = np.take_along_axis(after, tokens[..., None], -1)[..., 0]
        gap = (after.max(-1) - chosen) / np.abs(after).max()
        assert (gap <= ACROSS_PATHS[self.decode_dtype]).all(), (self.name, gap)
        return after


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``made(name)``: the ``Layout`` of a row, made once per module (the CLI tests share the matrix's)."""
    cache: dict[str, Layout] = {}

    def get(name: str) -> Layout:
        if name not in cache:
            cache[name] = Layout(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, made) -> Layout:
    return made(request.param)


def test_the_rows_cover_every_pair_of_factor_values():
    columns = list(zip(*LAYOUTS.values()))
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            assert len(set(zip(columns[i], columns[j]))) == 4, (i, j)


def test_sharded_load_restores_the_saved_arrays_bitwise(layout):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("dp", "fsdp", "pp", "tp"))
    config, params = zoo.load(layout.checkpoint, mesh=mesh)
    assert config.parallel is not None and (config.scan_blocks, config.tie_weights) == (layout.scan, layout.tie)
    loaded, saved = by_path(params), by_path(layout.params)
    assert loaded.keys() == saved.keys()
    for path, value in saved.items():
        assert loaded[path].dtype == value.dtype, path
        assert isinstance(loaded[path].sharding, NamedSharding) and loaded[path].sharding.mesh == mesh, path
        np.testing.assert_array_equal(np.asarray(loaded[path]), value, err_msg=str(path))
    # a cast on load, as a float32 checkpoint is read into bfloat16: the values rounded (exact here)
    _, cast = zoo.load(layout.checkpoint, mesh=mesh, dtype="bfloat16")
    for path, value in by_path(cast).items():
        assert value.dtype == ml_dtypes.bfloat16, path
        np.testing.assert_array_equal(np.asarray(value, np.float32), saved[path].astype(np.float32))
    layout.assert_close(zoo.forward(config, params, PROMPTS), layout.twin_logits, "logits after a sharded load")


@pytest.mark.slow
def test_generate_continues_as_the_twin(layout):
    config, params = zoo.load(layout.checkpoint)
    result = generate(config, params, PROMPTS, NEW_TOKENS)
    assert np.shape(result.tokens) == (2, NEW_TOKENS) and result.prompt_logits.shape == (2, 61)
    layout.assert_greedy(PROMPTS, result.prompt_logits, result.tokens)


@pytest.mark.slow
def test_stablehlo_artifact_and_zoo_run_match_the_twin(layout, tmp_path):
    config, params = zoo.load(layout.checkpoint)
    export_stablehlo(config, params, tmp_path / "hlo", platforms=["cpu"])
    manifest = json.loads((tmp_path / "hlo" / "manifest.json").read_text())
    assert {p["dtype"] for p in manifest["weights_file"]["params"]} == {layout.param_dtype}
    assert_artifact_matches(layout, open_artifact(tmp_path / "hlo"))


def assert_artifact_matches(layout: Layout, artifact):
    """Forward logits as the twin's; `zoo run`'s greedy continuation, and the prefill and step logits ``(B, V)``
    it is made of, as the twin's (batch 1 for prefill and step, as `zoo run` calls them: compiled once)."""
    layout.assert_close(artifact.forward(PROMPTS), layout.twin_logits, "artifact forward and twin logits")
    prompt = PROMPTS[1:]
    first, tokens = greedy(artifact, [int(t) for t in prompt[0]], NEW_TOKENS)  # what `zoo run` prints
    twin = layout.assert_greedy(prompt, first[None], [tokens])
    _, state = artifact.prefill(prompt)
    step_logits, _ = artifact.step(np.array(tokens[:1], np.int32), state)
    assert step_logits.shape == (1, 61)
    layout.assert_decoded_close(step_logits, twin[:, 1], "step and twin logits")


@pytest.mark.slow
def test_savedmodel_artifact_matches_the_twin(made, tmp_path):
    """One row: scanned params (stacked variables) stored in bfloat16, a separate head, mlstm (a conv state)."""
    from zoo.export.savedmodel import export_savedmodel

    layout = made("scan-bf16params")
    config, params = zoo.load(layout.checkpoint)
    export_savedmodel(config, params, tmp_path / "tf", platforms=["cpu"])
    assert_artifact_matches(layout, open_artifact(tmp_path / "tf"))


def test_info_describes_the_layout_as_stored(layout):
    info = describe_path(layout.checkpoint)
    saved = by_path(layout.params)
    count = sum(x.size for x in saved.values())
    nbytes = count * {"float32": 4, "bfloat16": 2}[layout.param_dtype]
    assert info["parameters"] == {"source": "stored", "count": count, "bytes": nbytes,
                                  "by_dtype": {layout.param_dtype: {"count": count, "bytes": nbytes}}}
    arch = info["architecture"]
    assert (arch["scan_blocks"], arch["tie_weights"], arch["layer_type"], arch["dtype"]) == (
        layout.scan, layout.tie, layout.layer, layout.dtype)


# One real-CLI run per command, on the scanned, tied, bfloat16 mlstm_v1 row.


def cli(*args) -> str:
    from test_cli import run_zoo

    proc = run_zoo(*map(str, args))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def assert_printed(layout: Layout, stdout: str):
    """The generated ids and the logits of the most likely next tokens that `zoo generate` or `zoo run` printed
    for ``PROMPTS[0]`` are the twin's."""
    lines = {line.split(":")[0]: line.split(None, 1)[1] for line in stdout.splitlines() if ":" in line}
    tokens = [int(t) for t in lines["generated"].split()]
    assert len(tokens) == NEW_TOKENS
    twin = layout.assert_greedy(PROMPTS[:1], None, [tokens])[0, 0]
    shown = {int(i): float(v) for i, v in (pair.split(": ") for pair in lines["logits"].split("  "))}
    assert len(shown) == 5 and list(shown)[0] == tokens[0]
    for i, value in shown.items():
        assert abs(value - twin[i]) <= ACROSS_PATHS[layout.decode_dtype] * np.abs(twin).max() + 5e-5, (i, value,
                                                                                                      twin[i])


@pytest.mark.slow
def test_cli_generate(made):
    layout = made(CLI_LAYOUT)
    assert_printed(layout, cli("generate", layout.checkpoint, "--prompt-ids", ",".join(map(str, PROMPTS[0])),
                               "--max-new-tokens", NEW_TOKENS))


@pytest.mark.slow
def test_cli_export_and_run(made, tmp_path):
    layout = made(CLI_LAYOUT)
    assert "exported stablehlo" in cli("export", layout.checkpoint, "--out", tmp_path / "hlo", "--platforms", "cpu")
    manifest = json.loads((tmp_path / "hlo" / "manifest.json").read_text())
    assert {p["dtype"] for p in manifest["weights_file"]["params"]} == {"bfloat16"}
    ran = cli("run", tmp_path / "hlo", "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", NEW_TOKENS)
    assert "artifact:  stablehlo (forward, prefill, step)" in ran
    assert_printed(layout, ran)


@pytest.mark.slow
def test_cli_info(made):
    layout = made(CLI_LAYOUT)
    info = json.loads(cli("info", layout.checkpoint, "--json"))
    count = sum(x.size for x in by_path(layout.params).values())
    assert info["parameters"]["by_dtype"] == {"bfloat16": {"count": count, "bytes": 2 * count}}
    assert {k: info["architecture"][k] for k in ("scan_blocks", "tie_weights", "layer_type", "dtype")} == {
        "scan_blocks": True, "tie_weights": True, "layer_type": "mlstm_v1", "dtype": "bfloat16"}


@pytest.mark.slow
def test_cli_check_backends_at_the_mlstm_v1_head_sizes(made, tmp_path):
    """``check-backends`` needs one row: ``cell_parity`` takes only the head count and sizes (and a backend's
    kwargs) from ``--config``. Scan, tie and the params' dtype never reach a cell, and the layer types differ
    only in head sizes; this row's are mlstm_v1's (2 heads, dqk 8, dv 16)."""
    layout = made(CLI_LAYOUT)
    (tmp_path / "config.json").write_text(layout.config.model_dump_json())
    table = cli("check-backends", "--config", tmp_path / "config.json", "--seq-lens", "1,7")
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.count("│") >= 8]
    checked = {(r[0], r[1], r[3]) for r in rows if r[0] in ("chunkwise", "recurrent")}
    assert {("chunkwise", "output", "1"), ("chunkwise", "output", "7"), ("recurrent", "states", "7")} <= checked
    assert rows and all(r[-1] == "pass" for r in rows), table
