"""The xLSTM language model: token embedding, pre-norm residual blocks, final norm, LM head.

The layer, norm, init and cell implementations are resolved by name through the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from zoo.config import BlockConfig, FeedForwardConfig, ModelConfig
from zoo.parts import initializer, make_norm, partitioned
from zoo.registry import resolve
from zoo.sharding import batch_spec

MODES = ("forward", "prefill", "step")

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
    Block norms use the model ``norm_type`` and ``mlstm_cell.norm_eps`` (reference §2.8).
    """

    config: BlockConfig
    num_blocks: int
    remat: tuple[str, ...] = ()
    deterministic: bool = True
    mode: str = "forward"
    batch_sharding: NamedSharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, document_borders: jax.Array | None = None, state: Any = None):
        cfg, deterministic = self.config, self.deterministic
        if self.batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
        layer_cfg = cfg.mlstm
        eps, norm_type, dtype = layer_cfg.mlstm_cell.norm_eps, layer_cfg.norm_type, jnp.dtype(layer_cfg.dtype)
        layer_cls = resolve("layer", layer_cfg.layer_type)

        def residual(prefix: str, remat_name: str, sublayer: Callable) -> Callable:
            """``post_norm?(sublayer(norm(x)))`` as a function of ``(module, x, borders, state)``."""

            def branch(module: nn.Module, x: jax.Array, borders: jax.Array | None, state: Any):
                h = make_norm(norm_type, eps, dtype, name=f"{prefix}_norm", parent=module)(x)
                y, state = sublayer(module, h, borders, state)
                if cfg.add_post_norm:
                    y = make_norm(norm_type, eps, dtype, name=f"{prefix}_post_norm", parent=module)(y)
                return y, state

            return nn.remat(branch, prevent_cse=False) if remat_name in self.remat else branch

        def mlstm_layer(module: nn.Module, h: jax.Array, borders: jax.Array | None, state: Any):
            layer = layer_cls(layer_cfg, self.num_blocks, parent=module, name="xlstm")
            return layer(h, document_borders=borders, deterministic=deterministic, mode=self.mode, state=state)

        def feedforward(module: nn.Module, h: jax.Array, borders: jax.Array | None, state: Any):
            ffn = FeedForward(cfg.feedforward, self.num_blocks, parent=module, name="ffn")
            return ffn(h, deterministic=deterministic), None

        y, state = residual("xlstm", "xLSTMResBlock", mlstm_layer)(self, x, document_borders, state)
        x = x + y
        if cfg.feedforward is not None:
            x = x + residual("ffn", "FFNResBlock", feedforward)(self, x, document_borders, None)[0]
        return x, state


class LMModel(nn.Module):
    """``tokens (B, S) int32 -> logits (B, S, vocab_size) float32``.

    In ``prefill`` and ``step`` mode it also takes and returns the decoding state: a dict of
    arrays whose leading axis is the block (``c``, ``n``, ``m`` of every cell, plus ``conv`` for
    ``mlstm``); ``prefill`` starts from zeros when no state is given.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    """When set, the residual stream is constrained to the batch layout of ``config.parallel``."""

    @nn.compact
    def __call__(self, tokens: jax.Array, document_borders: jax.Array | None = None, deterministic: bool = True,
                 mode: str = "forward", state: Any = None):
        cfg = self.config
        batch_sharding = None if self.mesh is None else NamedSharding(self.mesh, batch_spec(cfg))
        S = tokens.shape[-1]
        if cfg.context_length > 0 and isinstance(S, int) and S > cfg.context_length:  # S is symbolic in exports
            raise ValueError(f"sequence length {S} exceeds context_length={cfg.context_length}")
        if mode not in MODES or (mode == "step" and state is None):
            raise ValueError(f"mode must be one of {MODES} (step needs a state), got {mode!r}")
        D, dtype = cfg.embedding_dim, jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, D, dtype=dtype, param_dtype=jnp.float32,
                         embedding_init=partitioned(initializer("small", cfg.init_distribution_embed, D), "vocab", "embed"),
                         name="token_embedding")
        x = embed(tokens)
        if cfg.add_embedding_dropout:
            x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        remat = tuple(cfg.parallel.remat) if cfg.parallel else ()
        block_cls = nn.remat(ResidualBlock, prevent_cse=False) if "mLSTMBlock" in remat else ResidualBlock
        block_args = (cfg.mlstm_block, cfg.num_blocks, remat, deterministic, mode, batch_sharding)
        if cfg.scan_blocks:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0), length=cfg.num_blocks,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_state = stack(*block_args, name="blocks")(x, document_borders, state)
        else:
            states = []
            for idx in range(cfg.num_blocks):
                block_state = None if state is None else jax.tree_util.tree_map(lambda a: a[idx], state)
                x, block_state = block_cls(*block_args, name=f"blocks_{idx}")(x, document_borders, block_state)
                states.append(block_state)
            new_state = None if mode == "forward" else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
        if batch_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, batch_sharding)
        if cfg.add_post_blocks_norm:
            x = make_norm(cfg.norm_type, cfg.norm_eps, dtype, name="out_norm")(x)
        head_dtype = jnp.dtype(cfg.lm_head_dtype)
        if cfg.tie_weights:  # in lm_head_dtype, as the untied head (Embed.attend would compute in dtype)
            logits = x.astype(head_dtype) @ embed.embedding.astype(head_dtype).T
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=head_dtype, param_dtype=jnp.float32,
                              kernel_init=partitioned(initializer("small", cfg.init_distribution_out, D), "embed", "vocab"),
                              name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.logits_soft_cap is not None:
            logits = cfg.logits_soft_cap * jnp.tanh(logits / cfg.logits_soft_cap)
        return logits if mode == "forward" else (logits, new_state)
