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
from zoo.checks import check_tokens
from zoo.config import ModelConfig
from zoo.model import Params, param_shapes
from zoo.runtime import apply


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimizer state and the number of steps taken."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


def loss_fn(config: ModelConfig, params: Params, tokens: jax.Array, mesh: Mesh | None = None,
            dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens (B, S)``: position t predicts token t+1.

    With ``dropout_rng`` the model runs in training mode (the config's dropout applies).
    """
    logits = apply(config, params, tokens[:, :-1], mesh=mesh, dropout_rng=dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


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


def _prepare(config: ModelConfig, state: TrainState, tokens: Any) -> tuple[Mesh | None, jax.Array]:
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=False)  # ids in the vocabulary, when on the host
    mesh, (tokens,) = sharding.place_batch(config, state.params, tokens)
    return mesh, tokens


def train_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any) -> tuple[TrainState, jax.Array]:
    """One AdamW update on the next-token loss of ``tokens (B, S)``; returns the new state and the loss.

    The state keeps its layout; the input state is donated. Dropout (when configured) draws from a
    key folded with the step number. Host ``tokens`` (lists, NumPy) with an id outside ``[0, vocab_size)``
    raise ``zoo.TokenError``; device arrays are not read back (an out-of-range id gives a NaN loss).
    """
    mesh, tokens = _prepare(config, state, tokens)
    return compiled.compiled(_make_step, config, mesh, optimizer)(state, tokens)


def lower_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any) -> jax.stages.Lowered:
    """The lowered (not yet compiled) train step, e.g. to read its HLO."""
    mesh, tokens = _prepare(config, state, tokens)
    return compiled.compiled(_make_step, config, mesh, optimizer).lower(state, tokens)


def _make_step(config: ModelConfig, mesh: Mesh | None, optimizer: optax.GradientTransformation):

    def step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, jax.Array]:
        rng = jax.random.fold_in(jax.random.PRNGKey(0), state.step) if config.dropout > 0 else None
        loss, grads = jax.value_and_grad(lambda p: loss_fn(config, p, tokens, mesh, rng))(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), loss

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    layout = state_shardings(config, optimizer, mesh)
    return jax.jit(step, donate_argnums=0, in_shardings=(layout, NamedSharding(mesh, sharding.batch_spec(config))),
                   out_shardings=(layout, NamedSharding(mesh, PartitionSpec())))


init_state = init_train_state  # the name before 0.2
