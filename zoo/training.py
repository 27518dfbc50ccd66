"""A minimal training step for fine-tuning zoo models: next-token loss, optax AdamW, one jitted update.

It is not a trainer: there is no data pipeline, schedule or logging. On a mesh (params made by
``zoo.init_params`` with a multi-device ``config.parallel``, or restored with ``zoo.load(mesh=...)``)
the step runs sharded: the batch is split over dp × fsdp, parameters and optimizer state keep
their layout, and XLA inserts the collectives.

    optimizer = zoo.training.adamw(config, learning_rate=1e-4)
    state = zoo.training.init_train_state(config, params, optimizer)
    state, loss = zoo.training.train_step(config, optimizer, state, tokens)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import compiled, sharding
from zoo.checks import check_lengths, check_tokens
from zoo.config import ModelConfig
from zoo.model import Params, param_shapes
from zoo.runtime import apply


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimizer state and the number of steps taken."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


def loss_fn(config: ModelConfig, params: Params, tokens: jax.Array, mesh: Mesh | None = None,
            dropout_rng: jax.Array | None = None, lengths: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens (B, S)``: position t predicts token t+1.

    With ``dropout_rng`` the model runs in training mode (the config's dropout applies). With ``lengths``
    int32 ``(B,)`` the rows are right-padded, as for ``zoo.prefill``: only the targets ``t + 1 < lengths[b]``
    count, and the loss is their mean (0 when there are none). The model is causal, so the padding never
    reaches the logits of real positions.
    """
    logits = apply(config, params, tokens[:, :-1], mesh=mesh, dropout_rng=dropout_rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if lengths is None:
        return losses.mean()
    real = jnp.arange(1, tokens.shape[1]) < lengths[:, None]  # (B, S-1): the target token is a real one
    return jnp.where(real, losses, 0.0).sum() / jnp.maximum(real.sum(), 1)


def decay_mask(config: ModelConfig, params: Params) -> Params:
    """Weight decay on matrices only; the embedding only when ``config.weight_decay_on_embedding``."""
    def wanted(path: tuple, leaf: jax.Array) -> bool:
        if getattr(path[0], "key", None) == "token_embedding":
            return config.weight_decay_on_embedding
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(wanted, params)


def adamw(config: ModelConfig, learning_rate: float = 1e-4, weight_decay: float = 0.1, b1: float = 0.9,
          b2: float = 0.95, eps: float = 1e-8, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """optax AdamW (with optional global-norm clipping) and ``decay_mask`` for ``config``."""
    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=functools.partial(decay_mask, config))
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Where a ``TrainState`` lives on ``mesh``: moments like their params, counters replicated."""
    params = sharding.param_shardings(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, param_shapes(config)),
                                      params, transform_non_params=lambda _: replicated)
    return TrainState(params=params, opt_state=opt_state, step=replicated)


def init_train_state(config: ModelConfig, params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """A ``TrainState`` holding ``params`` (the step donates it), with moments laid out like the params."""
    opt_state = compiled.compiled(_make_optimizer_init, config, sharding.mesh_of(params), optimizer)(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32))


def _make_optimizer_init(config: ModelConfig, mesh: Mesh | None, optimizer: optax.GradientTransformation):
    out = None if mesh is None else state_shardings(config, optimizer, mesh).opt_state
    return jax.jit(optimizer.init, out_shardings=out)


def _prepare(config: ModelConfig, state: TrainState, tokens: Any, lengths: Any) -> tuple[Mesh | None, tuple]:
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=False)  # ids in the vocabulary, when on the host
    lengths = check_lengths(lengths, tokens.shape)
    mesh, batch = sharding.place_batch(config, state.params, tokens, lengths)
    return mesh, tuple(a for a in batch if a is not None)  # (tokens,) or (tokens, lengths)


def train_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any, lengths: Any = None) -> tuple[TrainState, jax.Array]:
    """One AdamW update on the next-token loss of ``tokens (B, S)``; returns the new state and the loss.

    The state keeps its layout; the input state is donated. Dropout (when configured) draws from a
    key folded with the step number. Host ``tokens`` (lists, NumPy) with an id outside ``[0, vocab_size)``
    raise ``zoo.TokenError``; device arrays are not read back (an out-of-range id gives a NaN loss).
    ``lengths`` (integers ``(B,)`` in ``[1, S]``, else ``zoo.TokenError``) masks the padding of right-padded
    rows out of the loss (see ``loss_fn``).
    """
    mesh, batch = _prepare(config, state, tokens, lengths)
    return compiled.compiled(_make_step, config, mesh, optimizer, len(batch) > 1)(state, *batch)


def lower_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any, lengths: Any = None) -> jax.stages.Lowered:
    """The lowered (not yet compiled) train step, e.g. to read its HLO."""
    mesh, batch = _prepare(config, state, tokens, lengths)
    return compiled.compiled(_make_step, config, mesh, optimizer, len(batch) > 1).lower(state, *batch)


def _make_step(config: ModelConfig, mesh: Mesh | None, optimizer: optax.GradientTransformation, ragged: bool):
    """The jitted ``step(state, tokens)``, or ``step(state, tokens, lengths)`` when ``ragged``."""

    def step(state: TrainState, tokens: jax.Array, *lengths: jax.Array) -> tuple[TrainState, jax.Array]:
        rng = jax.random.fold_in(jax.random.PRNGKey(0), state.step) if config.dropout > 0 else None
        loss, grads = jax.value_and_grad(lambda p: loss_fn(config, p, tokens, mesh, rng, *lengths))(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), loss

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    layout = state_shardings(config, optimizer, mesh)
    batch = NamedSharding(mesh, sharding.batch_spec(config))
    return jax.jit(step, donate_argnums=0, in_shardings=(layout, batch) + ((batch,) if ragged else ()),
                   out_shardings=(layout, NamedSharding(mesh, PartitionSpec())))


init_state = init_train_state  # the name before 0.2
