"""The ``mlstm_v1`` layer: the mLSTM layer of xLSTM 7B (Beck et al., arXiv 2503.13427).

Dense q/k/v and output-gate projections of the block input, a sigmoid output gate and a multi-head
out-norm, as NX-AI's xlstm-jax implements it in ``mLSTMLayerV1``
(``xlstm_jax/models/xlstm_parallel/blocks/mlstm/layer_v1.py``).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import LayerConfig
from zoo.nn.cell import run_cell
from zoo.nn.factories import gate_bias_init, make_norm, partitioned
from zoo.nn.layers import GateProjection, preamble
from zoo.registry import hookimpl


def derived_sizes(cfg: LayerConfig) -> dict[str, int]:
    """Total and per-head q/k and v widths: ``int(embedding_dim·qk_dim_factor)`` and ``int(embedding_dim·v_dim_factor)``.

    As in NX-AI's xlstm-jax ``mLSTMLayerV1``, whose q/k/v projections are ``int(embedding_dim·scale)`` wide.
    """
    qk = int(cfg.embedding_dim * cfg.qk_dim_factor)
    v = int(cfg.embedding_dim * cfg.v_dim_factor)
    return {"qk_dim": qk, "v_dim": v, "qk_head_dim": qk // cfg.num_heads, "v_head_dim": v // cfg.num_heads}


def check_config(cfg: LayerConfig) -> list[tuple[str, str]]:
    """Size consistency of an ``mlstm_v1`` layer, as ``(field, message)`` pairs."""
    sizes = derived_sizes(cfg)
    return [("num_heads", f"num_heads={cfg.num_heads} must divide the {name.replace('_', ' ')} {sizes[name]}")
            for name in ("qk_dim", "v_dim") if sizes[name] == 0 or sizes[name] % cfg.num_heads]


class MLSTMv1Layer(nn.Module):
    """``x (B, S, D) -> (y (B, S, D), state)``; the input is already normed by the block.

    ``mode`` is ``forward`` (state is None in and out), ``prefill`` or ``step``; the state is the
    cell's ``c, n, m``. With ``lengths (B,)`` int32 (right-padded rows) each row's state is the one after
    its last real position.
    """

    config: LayerConfig
    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, document_borders: jax.Array | None = None, deterministic: bool = True,
                 mode: str = "forward", state: dict[str, jax.Array] | None = None,
                 lengths: jax.Array | None = None):
        cfg, cell = self.config, self.config.mlstm_cell
        sizes = derived_sizes(cfg)
        p = preamble(cfg, x)
        B, S, NH, dtype, dense = p.B, p.S, p.NH, p.dtype, p.dense
        q = dense(sizes["qk_dim"], name="dense_q")(x).reshape(B, S, NH, -1)
        k = dense(sizes["qk_dim"], name="dense_k")(x).reshape(B, S, NH, -1)
        v = dense(sizes["v_dim"], name="dense_v")(x).reshape(B, S, NH, -1)
        o = dense(sizes["v_dim"], kernel_init=partitioned(nn.initializers.zeros, "embed", "inner"), name="dense_o")(x)
        gate = partial(GateProjection, NH, False, dtype=jnp.dtype(cell.gate_dtype))
        i = gate(gate_bias_init(cell.igate_bias_init_range), name="igate")((x,))
        f = gate(gate_bias_init(cell.fgate_bias_init_range), name="fgate")((x,))
        if cell.add_qk_norm:
            q = make_norm(cfg.norm_type, cell.norm_eps, dtype, name="q_norm")(q)
            k = make_norm(cfg.norm_type, cell.norm_eps, dtype, name="k_norm")(k)
        h, new_state = run_cell(cell, q, k, v, i, f, document_borders, mode, state, lengths)
        h = make_norm(cell.norm_type_v1, cell.norm_eps, dtype, 2, name="outnorm")(h).reshape(B, S, -1)
        return p.project_down(nn.sigmoid(o) * h, self.num_blocks, deterministic), new_state


@hookimpl
def register_layers(register):
    register(
        "mlstm_v1",
        MLSTMv1Layer,
        derived_sizes=derived_sizes,
        check_config=check_config,
        unused_fields=("proj_factor", "round_proj_up_dim_up", "round_proj_up_to_multiple_of", "conv1d_kernel_size",
                       "qkv_proj_blocksize", "vmap_qk", "gate_input", "debug_cell",
                       "mlstm_cell.gate_linear_headwise"),
        description="xLSTM-7B layer: dense q/k/v/o, sigmoid output gate, gates read the block input",
    )
