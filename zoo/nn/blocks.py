"""The residual block of every xLSTM model and its feed-forward sub-layer.

``ResidualBlock`` wraps the configured layer plugin (resolved by name) and the FFN in pre-norm
residual branches; the residual stream ``(B, S, D)`` is tagged with the logical axis names
``("batch", None, "embed")`` and never with a mesh (``zoo.sharding.logical_context`` maps the names).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.config import BlockConfig, FeedForwardConfig
from zoo.nn.factories import initializer, make_norm, partitioned
from zoo.registry import entry, resolve
from zoo.registry.contracts import ContractError, cannot_take

RESIDUAL_AXES = ("batch", None, "embed")
"""Logical axis names of the residual stream ``(B, S, D)``."""

ACTIVATIONS = {
    "gelu": nn.gelu,  # tanh approximation, as in the reference
    "relu": nn.relu,
    "relu^2": lambda x: jnp.square(nn.relu(x)),
    "sigmoid": nn.sigmoid,
    "swish": nn.silu,
    "selu": nn.selu,
}


class FeedForward(nn.Module):
    """``ffn_gated``: ``proj_down(act(proj_up_gate(x)) * proj_up(x))``; ``ffn``: ``proj_down(act(proj_up(x)))``."""

    config: FeedForwardConfig
    num_blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        D, P = x.shape[-1], cfg.proj_up_dim
        dense = partial(nn.Dense, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                        kernel_init=partitioned(initializer("small", cfg.init_distribution, D), "embed", "mlp"))
        act = ACTIVATIONS[cfg.act_fn]
        if cfg.ff_type == "ffn_gated":
            h = act(dense(P, name="proj_up_gate")(x)) * dense(P, name="proj_up")(x)
        else:
            h = act(dense(P, name="proj_up")(x))
        out_init = initializer(cfg.output_init_fn, cfg.init_distribution, D, self.num_blocks)
        y = dense(D, kernel_init=partitioned(out_init, "mlp", "embed"), name="proj_down")(h)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class ResidualBlock(nn.Module):
    """``x + post_norm?(layer(norm(x)))``, then ``x + post_norm?(ffn(norm(x)))`` when an FFN is configured.

    Returns ``(x, state)``: the layer's new state in ``prefill``/``step`` mode, None in ``forward``.
    Block norms use the model ``norm_type`` and ``mlstm_cell.norm_eps`` (as in NX-AI's xlstm-jax).
    ``lengths (B,)`` int32 (a right-padded ragged batch) reaches the layer as the keyword ``lengths``, only
    when given; a layer type whose ``__call__`` does not take it is refused then (``ContractError``).
    """

    config: BlockConfig
    num_blocks: int
    remat: tuple[str, ...] = ()
    deterministic: bool = True
    mode: str = "forward"

    @nn.compact
    def __call__(self, x: jax.Array, document_borders: jax.Array | None = None, state: Any = None,
                 lengths: jax.Array | None = None):
        cfg, deterministic = self.config, self.deterministic
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        layer_cfg = cfg.mlstm
        eps, norm_type, dtype = layer_cfg.mlstm_cell.norm_eps, layer_cfg.norm_type, jnp.dtype(layer_cfg.dtype)
        layer_cls = resolve("layer", layer_cfg.layer_type)
        if lengths is not None and "lengths" in cannot_take(layer_cls.__call__, "self", "x", keywords=("lengths",)):
            name = layer_cfg.layer_type
            raise ContractError(f"layer type {name!r} from {entry('layer', name).origin} does not take the keyword "
                                f"lengths, which ragged batches need: add `lengths=None` to its __call__ "
                                f"(docs/plugins.md)")

        def residual(prefix: str, remat_name: str, sublayer: Callable) -> Callable:
            """``post_norm?(sublayer(norm(x)))`` as a function of ``(module, x, borders, state, lengths)``."""

            def branch(module: nn.Module, x: jax.Array, borders: jax.Array | None, state: Any,
                       lengths: jax.Array | None):
                h = make_norm(norm_type, eps, dtype, name=f"{prefix}_norm", parent=module)(x)
                y, state = sublayer(module, h, borders, state, lengths)
                if cfg.add_post_norm:
                    y = make_norm(norm_type, eps, dtype, name=f"{prefix}_post_norm", parent=module)(y)
                return y, state

            return nn.remat(branch, prevent_cse=False) if remat_name in self.remat else branch

        def mlstm_layer(module: nn.Module, h: jax.Array, borders: jax.Array | None, state: Any,
                        lengths: jax.Array | None):
            layer = layer_cls(layer_cfg, self.num_blocks, parent=module, name="xlstm")
            ragged = {} if lengths is None else {"lengths": lengths}  # older layers do not take the keyword
            return layer(h, document_borders=borders, deterministic=deterministic, mode=self.mode, state=state,
                         **ragged)

        def feedforward(module: nn.Module, h: jax.Array, borders: jax.Array | None, state: Any,
                        lengths: jax.Array | None):
            ffn = FeedForward(cfg.feedforward, self.num_blocks, parent=module, name="ffn")
            return ffn(h, deterministic=deterministic), None

        y, state = residual("xlstm", "xLSTMResBlock", mlstm_layer)(self, x, document_borders, state, lengths)
        x = x + y
        if cfg.feedforward is not None:
            x = x + residual("ffn", "FFNResBlock", feedforward)(self, x, document_borders, None, None)[0]
        return x, state
