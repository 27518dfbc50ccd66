"""Small helpers shared by the tests."""

import os
import subprocess
import sys
import textwrap
from functools import partial

import flax.linen as nn
import jax
import numpy as np
from jax import monitoring

import zoo
from zoo.config import LayerConfig
from zoo.nn.cell import run_cell
from zoo.nn.factories import gate_bias_init
from zoo.nn.layers import GateProjection, preamble
from zoo.registry import hookimpl, resolve


def by_path(tree) -> dict[tuple[str, ...], np.ndarray]:
    """The leaves of a nested dict of params keyed by their path of keys (("blocks", "w", ...): leaf)."""
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nested(items: dict[tuple[str, ...], np.ndarray]) -> dict:
    """The nested dict that ``by_path`` flattens."""
    tree: dict = {}
    for path, value in items.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def perturbed(params, seed: int, scale: float):
    """``params`` with seeded Gaussian noise of std ``scale`` added to every leaf (zero-init leaves hide bugs)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# Two batch sizes and two sequence lengths, fed to one exported artifact.
EXPORT_TOKENS = {"small": np.random.default_rng(1).integers(0, 61, size=(1, 5)).astype(np.int32),
                 "large": np.random.default_rng(2).integers(0, 61, size=(3, 9)).astype(np.int32)}


def export_config(layer_type: str):
    """A tiny float32 config of ``layer_type`` with soft-capped gates, for export tests."""
    import zoo

    layer = {"layer_type": layer_type, "num_heads": 2, "mlstm_cell": {"gate_soft_cap": 15.0}}
    if layer_type == "mlstm_v1":
        layer["qk_dim_factor"] = 0.5
    return zoo.load_config({"vocab_size": 61, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32",
                            "context_length": 64, "mlstm_block": {"mlstm": layer}})


def assert_rel_close(actual, expected, rtol: float = 1e-5):
    """Max absolute difference within ``rtol`` of the largest magnitude of ``expected``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert float(np.abs(actual - expected).max()) <= rtol * float(np.abs(expected).max())


BLOCKER = """
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} must not be importable here")

sys.meta_path.insert(0, _Blocked())
"""


def run_without(blocked: tuple[str, ...], tmp_path, source: str, *args) -> None:
    """Run ``source`` as a script in a fresh interpreter where the ``blocked`` packages cannot be imported.

    The script fails if any of them ends up in ``sys.modules`` anyway (imported by something else).
    """
    check = f"\nassert not set(sys.modules) & {set(blocked)!r}, 'a blocked package was imported'\n"
    script = tmp_path / "runner.py"
    script.write_text(BLOCKER.format(blocked=tuple(blocked)) + textwrap.dedent(source) + check)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr


class UnitNormPlugin:
    """An in-code plugin registering norm "unitnorm" (RMSNorm under another name): a checkpoint saved with it
    needs a plugin that a fresh registry lacks."""

    @hookimpl
    def register_norms(self, register):
        register("unitnorm", resolve("norm", "rmsnorm"))


def invoke_cli(*args):
    """The CLI app in this process (typer's CliRunner), its consoles wide enough that one line of output is one line."""
    from typer.testing import CliRunner

    from zoo import cli

    widths = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = 1000
    try:
        return CliRunner().invoke(cli.app, [str(a) for a in args])
    finally:
        cli.out.width, cli.err.width = widths



class TinyLayer(nn.Module):
    """A third-party layer written against zoo.nn only: dense q/k/v of the input, the configured cell, and the shared
    down-projection. It takes no ``lengths`` keyword, like a layer written before ragged batches."""

    config: LayerConfig
    num_blocks: int = 1

    @nn.compact
    def __call__(self, x, *, document_borders=None, deterministic=True, mode="forward", state=None):
        p = preamble(self.config, x)
        cell = self.config.mlstm_cell
        q, k, v = (p.dense(p.D, name=f"dense_{n}")(x).reshape(p.B, p.S, p.NH, -1) for n in "qkv")
        gate = partial(GateProjection, p.NH, False)
        i = gate(gate_bias_init(cell.igate_bias_init_range), name="igate")((x,))
        f = gate(gate_bias_init(cell.fgate_bias_init_range), name="fgate")((x,))
        h, state = run_cell(cell, q, k, v, i, f, document_borders, mode, state)
        return p.project_down(h.reshape(p.B, p.S, -1), self.num_blocks, deterministic), state


class Compiles:
    """Counts XLA compilations in this process (JAX's own monitoring event)."""

    def __init__(self):
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._seen)

    def _seen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = Compiles()


CORPUS = [f"Line {i}: the quick brown fox jumps over the lazy dog; café, naïve, 日本語 {i * 7}.\n" for i in range(60)]
"""Text with multi-byte characters, for the small tokenizer of the generation, engine and server tests."""


def byte_bpe_codec(eos_ids: tuple[int, ...] = ()):
    """A byte-level BPE of 300 tokens trained on ``CORPUS`` (id 0 is ``<|endoftext|>``), as a ``zoo`` Codec."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from zoo.tokenizers import Codec

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Codec(tokenizer, eos_ids=eos_ids)


GENERATION_CONFIG = {"vocab_size": 300, "embedding_dim": 32, "num_blocks": 2, "dtype": "float32", "context_length": 64,
                     "mlstm_block": {"mlstm": {"num_heads": 2, "mlstm_cell": {"prefill_backend": {
                         "name": "chunkwise", "kwargs": {"chunk_size": 8}}}}}}
"""The small ``mlstm`` the generation and engine tests decode with (prefill chunks of 8 tokens)."""
TOP2_MARGIN = 1e-4
"""The exactness rule of batched decoding: greedy tokens equal the alone run's wherever its top-2 margin exceeds this."""


def generation_model():
    """``GENERATION_CONFIG`` loaded, with params from seed 1."""
    config = zoo.load_config(GENERATION_CONFIG)
    return config, zoo.init_params(config, seed=1)
