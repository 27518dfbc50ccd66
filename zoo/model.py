"""The xLSTM language model: token embedding, pre-norm residual blocks, final norm, LM head.

The layer, norm, init and cell implementations are resolved by name through the registry. The model
names the logical axes of its parameters and activations (see ``zoo.sharding``) and knows nothing of
devices: the caller maps the names onto a mesh. This module also holds what can be known of a model
without running it: ``build``, the abstract parameter tree and the abstract decoding state.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import compiled
from zoo.config import ModelConfig, check_config
from zoo.nn.blocks import RESIDUAL_AXES, ResidualBlock
from zoo.nn.factories import initializer, make_norm, partitioned
from zoo.nn.quant import quantized

Params = dict[str, Any]
"""A parameter tree: nested dicts of float arrays, as ``zoo.init_params`` and ``zoo.load`` return it (with
``quantization``, a quantised weight is a dict of arrays in its place, such as int8's values and scale)."""
State = dict[str, jax.Array]
"""The decoding state: float32 arrays whose leading axis is the block (``c``, ``n``, ``m``, and ``conv``
for ``mlstm``)."""

MODES = ("forward", "prefill", "step")


class LMModel(nn.Module):
    """``tokens (B, S) int32 -> logits (B, S, vocab_size) float32``.

    In ``prefill`` and ``step`` mode it also takes and returns the decoding state: a dict of
    arrays whose leading axis is the block (``c``, ``n``, ``m`` of every cell, plus ``conv`` for
    ``mlstm``); ``prefill`` starts from zeros when no state is given. Unscanned configs also take a list of one
    such dict per block, without the block axis (``zoo.decode_layout.per_block_state``), and return the new
    state in that form. ``lengths (B,)`` int32 marks a right-padded ragged batch: row b's real tokens are its
    first ``lengths[b]``, every later position leaves the state untouched (its logits are finite and
    meaningless), and the returned state of row b is the one after its last real token. ``logits_at (B,)`` int32 runs the head at one position per row only:
    logits ``(B, 1, vocab_size)``.
    """

    config: ModelConfig

    def __call__(self, tokens: jax.Array, document_borders: jax.Array | None = None, deterministic: bool = True,
                 mode: str = "forward", state: Any = None, lengths: jax.Array | None = None,
                 logits_at: jax.Array | None = None):
        with quantized(self.config.quantization):  # the selected weights in the quantizer's form
            return self._layers(tokens, document_borders, deterministic, mode, state, lengths, logits_at)

    @nn.compact
    def _layers(self, tokens: jax.Array, document_borders: jax.Array | None, deterministic: bool, mode: str,
                state: Any, lengths: jax.Array | None, logits_at: jax.Array | None = None):
        cfg = self.config
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
        block_args = (cfg.mlstm_block, cfg.num_blocks, remat, deterministic, mode)
        if cfg.scan_blocks:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast), length=cfg.num_blocks,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_state = stack(*block_args, name="blocks")(x, document_borders, state, lengths)
        else:
            per_block = isinstance(state, (list, tuple))
            states = []
            for idx in range(cfg.num_blocks):
                block_state = state[idx] if per_block else (
                    None if state is None else jax.tree_util.tree_map(lambda a: a[idx], state))
                x, block_state = block_cls(*block_args, name=f"blocks_{idx}")(x, document_borders, block_state,
                                                                              lengths)
                states.append(block_state)
            if mode == "forward":
                new_state = None
            elif per_block:  # each block's state in its own buffers: a donated state is updated in place
                new_state = states
            else:
                new_state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
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


def build(config: ModelConfig) -> LMModel:
    """The Flax module for ``config``; ``TypeError`` when ``config`` is not a ``ModelConfig``."""
    return LMModel(check_config(config))


def init_fn(config: ModelConfig):
    """``key -> boxed params``: the model's initialiser on a dummy ``(1, 1)`` batch (the shapes do not depend on it)."""
    model = build(config)
    return lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def _boxed_param_shapes(config: ModelConfig) -> Params:
    return jax.eval_shape(init_fn(config), jax.ShapeDtypeStruct((2,), jnp.uint32))  # a key's shape: nothing is placed


def boxed_param_shapes(config: ModelConfig) -> Params:
    """The parameter tree with its logical partitioning boxes (``nn.Partitioned``) around
    ``jax.ShapeDtypeStruct`` leaves; nothing is allocated. Cached per config."""
    return compiled.per_config(_boxed_param_shapes, check_config(config))


def param_shapes(config: ModelConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated (``TypeError`` for a
    ``config`` that is not a ``ModelConfig``)."""
    return nn.unbox(boxed_param_shapes(config))


def param_count(config: ModelConfig) -> int:
    """Number of parameters, computed abstractly (``TypeError`` for a ``config`` that is not a ``ModelConfig``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(param_shapes(config)))


def _paths(tree: Any) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _quantized_weights(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    if config.quantization is None:
        return ()
    stored = set(_paths(param_shapes(config)))
    return tuple(p for p in _paths(param_shapes(config.model_copy(update={"quantization": None}))) if p not in stored)


def quantized_weights(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    """The paths (tuples of keys, e.g. ``("blocks_0", "xlstm", "proj_up", "kernel")``) of the weights that
    ``config.quantization`` stores in its quantizer's form: in ``param_shapes(config)`` each is a dict of arrays
    where the float model has one array. Empty without quantisation; computed abstractly, cached per config."""
    return compiled.per_config(_quantized_weights, check_config(config))


def _decode_state_shapes(config: ModelConfig, batch_size: int) -> State:
    model = build(config)
    return jax.eval_shape(lambda: model.init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32), mode="prefill")[0][1])


def decode_state_shapes(config: ModelConfig | str, batch_size: int) -> State:
    """The decoding state for ``batch_size`` sequences as ``jax.ShapeDtypeStruct`` leaves: ``c (NB, B, NH, DQK,
    DV)``, ``n (NB, B, NH, DQK)``, ``m (NB, B, NH)`` and, for ``mlstm``, ``conv (NB, B, K-1, Di)``; all float32.
    Nothing is allocated; cached per config (or its JSON) and batch size."""
    return compiled.per_config(_decode_state_shapes, config, batch_size)
