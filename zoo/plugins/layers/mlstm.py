"""The ``mlstm`` layer: the mLSTM block with pre up-projection of the xLSTM paper (Beck et al., arXiv 2405.04517).

Causal conv, headwise (block-diagonal) q/k/v, learnable skip and a swish(z) output gate, as NX-AI's
xlstm-jax implements it in ``mLSTMLayer`` (``xlstm_jax/models/xlstm_parallel/blocks/mlstm/layer.py``).
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import LayerConfig
from zoo.nn.cell import run_cell
from zoo.nn.factories import gate_bias_init, make_norm, partitioned
from zoo.nn.layers import CausalConv1d, GateProjection, LinearHeadwiseExpand, is_integer, preamble
from zoo.registry import hookimpl


def derived_sizes(cfg: LayerConfig) -> dict[str, int]:
    """Inner width, projection blocks and per-head q/k and v widths.

    As in NX-AI's xlstm-jax: the inner width Di is ``proj_factor·embedding_dim`` rounded to a multiple
    of ``round_proj_up_to_multiple_of`` (``UpProjConfigMixin``) and the projection blocks number
    ``Di // qkv_proj_blocksize`` (``num_proj_heads`` of ``mLSTMInnerLayer``). The q/k and v widths are
    Di scaled by ``qk_dim_factor`` and ``v_dim_factor`` (1.0, xlstm-jax's Di, by default).
    """
    inner = cfg.proj_up_dim
    blocks = inner // cfg.qkv_proj_blocksize
    qk = blocks * (round(cfg.qk_dim_factor * inner) // blocks) if blocks else 0
    v = int(inner * cfg.v_dim_factor)
    gate_in = 2 * qk + v if cfg.gate_input == "qkv" else inner
    return {"inner_dim": inner, "num_proj_blocks": blocks, "qk_dim": qk, "v_dim": v,
            "qk_head_dim": qk // cfg.num_heads, "v_head_dim": v // cfg.num_heads, "gate_input_dim": gate_in}


def check_config(cfg: LayerConfig) -> list[tuple[str, str]]:
    """Size consistency of an ``mlstm`` layer, as ``(field, message)`` pairs."""
    b, nh = cfg.qkv_proj_blocksize, cfg.num_heads
    inner = cfg.proj_up_dim
    if inner % b:
        return [("qkv_proj_blocksize", f"must divide the inner width Di={inner} (proj_factor·embedding_dim "
                                       f"rounded to {cfg.round_proj_up_to_multiple_of})")]
    errors = []
    for field in ("qk_dim_factor", "v_dim_factor"):
        product = getattr(cfg, field) * b
        if not is_integer(product):
            errors.append((field, f"{field}·qkv_proj_blocksize = {product:g} must be an integer"))
    if errors:
        return errors
    sizes = derived_sizes(cfg)
    for name in ("qk_dim", "v_dim"):
        if sizes[name] == 0 or sizes[name] % nh:
            errors.append(("num_heads", f"num_heads={nh} must divide the {name.replace('_', ' ')} {sizes[name]}"))
    if not errors and cfg.mlstm_cell.gate_linear_headwise and sizes["gate_input_dim"] % nh:
        errors.append(("num_heads", f"num_heads={nh} must divide the gate input width {sizes['gate_input_dim']} "
                                    f"for headwise gates"))
    return errors


class MLSTMCell(nn.Module):
    """Gates, the configured cell backend and the multi-head out-norm of an ``mlstm`` layer."""

    config: LayerConfig

    @nn.compact
    def __call__(self, q, k, v, gate_inputs, document_borders, mode, state, lengths=None):
        cell = self.config.mlstm_cell
        gate = partial(GateProjection, self.config.num_heads, cell.gate_linear_headwise,
                       dtype=jnp.dtype(cell.gate_dtype))
        i = gate(gate_bias_init(cell.igate_bias_init_range), name="igate")(gate_inputs)
        f = gate(gate_bias_init(cell.fgate_bias_init_range), name="fgate")(gate_inputs)
        h, state = run_cell(cell, q, k, v, i, f, document_borders, mode, state, lengths)
        return make_norm(cell.norm_type, cell.norm_eps, jnp.dtype(self.config.dtype), 2, name="outnorm")(h), state


class MLSTMLayer(nn.Module):
    """``x (B, S, D) -> (y (B, S, D), state)``; the input is already normed by the block.

    ``mode`` is ``forward`` (state is None in and out), ``prefill`` or ``step``; the state is the
    cell's ``c, n, m`` plus ``conv``, the last ``conv1d_kernel_size - 1`` conv inputs. With ``lengths (B,)``
    int32 (right-padded rows) each row's state is the one after its last real position.
    """

    config: LayerConfig
    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, document_borders: jax.Array | None = None, deterministic: bool = True,
                 mode: str = "forward", state: dict[str, jax.Array] | None = None,
                 lengths: jax.Array | None = None):
        cfg = self.config
        sizes = derived_sizes(cfg)
        p = preamble(cfg, x)
        B, S, NH, dtype, small, dense = p.B, p.S, p.NH, p.dtype, p.small_init, p.dense
        x_m = dense(sizes["inner_dim"], name="proj_up_mlstm")(x)
        z = dense(sizes["v_dim"], name="proj_up_z")(x)
        new_state = None if mode == "forward" else {}
        if cfg.debug_cell:
            y = z
        else:
            K = cfg.conv1d_kernel_size
            if K > 0:
                x_c, conv_state = CausalConv1d(K, dtype, name="conv1d")(
                    x_m, None if state is None else state["conv"], lengths)
            else:
                x_c, conv_state = x_m, jnp.zeros((B, 0, x_m.shape[-1]), jnp.float32)
            x_a = nn.silu(x_c)
            blocks = sizes["num_proj_blocks"]
            lhe = partial(LinearHeadwiseExpand, blocks, use_bias=cfg.bias, kernel_init=small, dtype=dtype)
            qk_per_block = sizes["qk_dim"] // blocks
            if cfg.vmap_qk:
                stacked = nn.vmap(LinearHeadwiseExpand, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=None, out_axes=0, axis_size=2, metadata_params={nn.PARTITION_NAME: None})
                q, k = stacked(blocks, qk_per_block, cfg.bias, small, dtype, name="qk_proj")(x_a)
            else:
                q = lhe(qk_per_block, name="q_proj")(x_a)
                k = lhe(qk_per_block, name="k_proj")(x_a)
            v = lhe(sizes["v_dim"] // blocks, name="v_proj")(x_m)
            gate_inputs = {"qkv": (q, k, v), "x_mlstm": (x_m,), "x_mlstm_conv": (x_c,),
                           "x_mlstm_conv_act": (x_a,)}[cfg.gate_input]
            q = q.reshape(B, S, NH, -1)
            k = k.reshape(B, S, NH, -1)
            if cfg.mlstm_cell.add_qk_norm:
                q = make_norm(cfg.norm_type, cfg.mlstm_cell.norm_eps, dtype, name="q_norm")(q)
                k = make_norm(cfg.norm_type, cfg.mlstm_cell.norm_eps, dtype, name="k_norm")(k)
            h, new_state = MLSTMCell(cfg, name="mlstm_cell")(q, k, v.reshape(B, S, NH, -1), gate_inputs,
                                                             document_borders, mode, state, lengths)
            if new_state is not None:
                new_state["conv"] = conv_state
            h = h.reshape(B, S, -1)
            skip = x_a if sizes["v_dim"] == sizes["inner_dim"] else lhe(
                sizes["v_dim"] // blocks, name="x_mlstm_conv_scaling")(x_a)
            learnable_skip = self.param("learnable_skip", partitioned(nn.initializers.ones, "inner"),
                                        (sizes["v_dim"],), jnp.float32)
            y = (h + learnable_skip.astype(dtype) * skip) * nn.silu(z)
        return p.project_down(y, self.num_blocks, deterministic), new_state


@hookimpl
def register_layers(register):
    register(
        "mlstm",
        MLSTMLayer,
        derived_sizes=derived_sizes,
        check_config=check_config,
        unused_fields=("mlstm_cell.norm_type_v1",),
        description="NeurIPS xLSTM mLSTM block: conv, headwise q/k/v, learnable skip, swish(z) output gate",
    )
