"""One training update: next-token loss with document borders and a loss mask, optax AdamW, gradient accumulation.

On a mesh (params made by ``zoo.init_params`` with a multi-device ``config.parallel``, or restored with
``zoo.load(mesh=...)``) the step runs sharded: the batch is split over dp × fsdp, parameters and optimizer state
keep their layout, and XLA inserts the collectives. ``zoo.train.train`` runs the whole loop around it.

    optimizer = zoo.train.adamw(config, learning_rate=1e-4)
    state = zoo.train.init_train_state(config, params, optimizer)
    state, loss = zoo.train.train_step(config, optimizer, state, tokens)
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
from zoo.checks import check_borders, check_int, check_lengths, check_tokens
from zoo.config import ModelConfig
from zoo.model import Params, param_shapes
from zoo.runtime import apply


class TrainState(flax.struct.PyTreeNode):
    """Parameters, optimizer state, the number of updates done and the dropout key (``rng``, uint32 ``(2,)``)."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def _target_losses(config: ModelConfig, params: Params, tokens: jax.Array, document_borders: jax.Array | None,
                   mask: jax.Array | None, mesh: Mesh | None, dropout_rng: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
    """``(sum of the counted targets' cross-entropies, their count)`` for rows ``tokens (B, S)``."""
    borders = None if document_borders is None else document_borders[:, :-1]
    logits = apply(config, params, tokens[:, :-1], borders, mesh=mesh, dropout_rng=dropout_rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if mask is None:
        return losses.sum(), jnp.asarray(losses.size, jnp.float32)
    counted = mask[:, 1:]
    return jnp.where(counted, losses, 0.0).sum(), counted.sum().astype(jnp.float32)


def _lengths_mask(lengths: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.arange(shape[1])[None, :] < jnp.asarray(lengths)[:, None]


def loss_fn(config: ModelConfig, params: Params, tokens: jax.Array, mesh: Mesh | None = None,
            dropout_rng: jax.Array | None = None, lengths: jax.Array | None = None, *,
            document_borders: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of rows ``tokens (B, S)`` int32: position t predicts token t+1.

    The model reads ``tokens[:, :-1]`` with ``document_borders[:, :-1]`` (bool ``(B, S)``, True at each
    document's first token; resets the memory when ``mlstm_cell.reset_at_document_boundaries``) and predicts
    ``tokens[:, 1:]``. ``mask`` (bool ``(B, S)``) counts only the targets where ``mask[:, 1:]``; ``lengths``
    int32 ``(B,)`` (right-padded rows, as for ``zoo.prefill``) is the mask ``t < lengths[b]``. The loss is the
    mean over the counted targets (0 when there are none). With ``dropout_rng`` the model runs in training mode
    (the config's dropout applies).
    """
    if lengths is not None:
        mask = _lengths_mask(lengths, tokens.shape)
    total, count = _target_losses(config, params, tokens, document_borders, mask, mesh, dropout_rng)
    return total / jnp.maximum(count, 1.0)


def decay_mask(config: ModelConfig, params: Params) -> Params:
    """Weight decay on matrices only; the embedding only when ``config.weight_decay_on_embedding``."""
    def wanted(path: tuple, leaf: jax.Array) -> bool:
        if getattr(path[0], "key", None) == "token_embedding":
            return config.weight_decay_on_embedding
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(wanted, params)


def adamw(config: ModelConfig, learning_rate: float | optax.Schedule = 1e-4, weight_decay: float = 0.1,
          b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """optax AdamW (with optional global-norm clipping) and ``decay_mask`` for ``config``; ``learning_rate`` may be
    an optax schedule of the update count (see ``zoo.train.optim.schedule``)."""
    adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=functools.partial(decay_mask, config))
    return adam if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def state_shardings(config: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Where a ``TrainState`` lives on ``mesh``: moments like their params, counters and the key replicated."""
    params = sharding.param_shardings(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, param_shapes(config)),
                                      params, transform_non_params=lambda _: replicated)
    return TrainState(params=params, opt_state=opt_state, step=replicated, rng=replicated)


def init_train_state(config: ModelConfig, params: Params, optimizer: optax.GradientTransformation,
                     seed: int = 0) -> TrainState:
    """A ``TrainState`` holding ``params`` (the step donates it), with moments laid out like the params; the dropout
    key is ``jax.random.PRNGKey(seed)``."""
    opt_state = compiled.compiled(_make_optimizer_init, config, sharding.mesh_of(params), optimizer)(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(seed))


def _make_optimizer_init(config: ModelConfig, mesh: Mesh | None, optimizer: optax.GradientTransformation):
    out = None if mesh is None else state_shardings(config, optimizer, mesh).opt_state
    return jax.jit(optimizer.init, out_shardings=out)


def _prepare(config: ModelConfig, state: TrainState, tokens: Any, lengths: Any, document_borders: Any, mask: Any,
             grad_accum: int) -> tuple[Mesh | None, tuple]:
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=False)  # ids in the vocabulary, when on the host
    lengths = check_lengths(lengths, tokens.shape)
    if lengths is not None:
        if mask is not None:
            raise ValueError("give lengths or mask, not both")
        mask = _lengths_mask(lengths, tokens.shape)
    document_borders = check_borders(document_borders, tokens.shape)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    check_int(grad_accum, "grad_accum", 1)
    if tokens.shape[0] % grad_accum:
        raise ValueError(f"grad_accum {grad_accum} must divide the batch size {tokens.shape[0]}")
    return sharding.place_batch(config, state.params, tokens, document_borders, mask)


def update(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState, tokens: Any,
           document_borders: Any = None, mask: Any = None, *, grad_accum: int = 1
           ) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer update on rows ``tokens (B, S)`` (see ``loss_fn`` for ``document_borders`` and ``mask``):
    returns ``(new state, loss, gradient global norm)``, float32 scalars, the norm before clipping.

    ``grad_accum`` k splits the batch into k micro-batches of ``B / k`` rows (``ValueError`` unless k divides B)
    run one after the other inside one compiled update, so the memory is that of ``B / k`` rows; the loss and
    gradient are the mean over every counted target of the whole batch, as with k = 1 up to float rounding.
    The input state is donated. Dropout draws from ``state.rng`` folded with the step (and micro-batch) number.
    """
    mesh, batch = _prepare(config, state, tokens, None, document_borders, mask, grad_accum)
    return compiled.compiled(_make_step, config, mesh, optimizer, grad_accum)(state, *batch)


def train_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any, lengths: Any = None, *, document_borders: Any = None, mask: Any = None,
               grad_accum: int = 1) -> tuple[TrainState, jax.Array]:
    """One AdamW update on the next-token loss of ``tokens (B, S)``; returns the new state and the loss (``update``
    also returns the gradient norm).

    The state keeps its layout; the input state is donated. Host ``tokens`` (lists, NumPy) with an id outside
    ``[0, vocab_size)`` raise ``zoo.TokenError``; device arrays are not read back (an out-of-range id gives a NaN
    loss). ``lengths`` (integers ``(B,)`` in ``[1, S]``, else ``zoo.TokenError``) masks the padding of
    right-padded rows out of the loss; ``mask`` and ``document_borders`` as in ``loss_fn`` (``ValueError`` for
    another shape).
    """
    mesh, batch = _prepare(config, state, tokens, lengths, document_borders, mask, grad_accum)
    state, loss, _ = compiled.compiled(_make_step, config, mesh, optimizer, grad_accum)(state, *batch)
    return state, loss


def lower_step(config: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
               tokens: Any, lengths: Any = None, *, document_borders: Any = None, mask: Any = None,
               grad_accum: int = 1) -> jax.stages.Lowered:
    """The lowered (not yet compiled) train step, e.g. to read its HLO."""
    mesh, batch = _prepare(config, state, tokens, lengths, document_borders, mask, grad_accum)
    return compiled.compiled(_make_step, config, mesh, optimizer, grad_accum).lower(state, *batch)


def _make_step(config: ModelConfig, mesh: Mesh | None, optimizer: optax.GradientTransformation, grad_accum: int):
    """The jitted ``step(state, tokens, borders, mask) -> (state, loss, grad_norm)``; borders and mask may be None."""

    def step(state: TrainState, tokens: jax.Array, borders: jax.Array | None, mask: jax.Array | None):
        def split(x):
            return None if x is None else x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

        def micro(carry, inputs):
            index, (tokens, borders, mask) = inputs
            rng = (jax.random.fold_in(jax.random.fold_in(state.rng, state.step), index)
                   if config.dropout > 0 else None)
            (total, count), grads = jax.value_and_grad(
                lambda p: _target_losses(config, p, tokens, borders, mask, mesh, rng), has_aux=True)(state.params)
            sums = jax.tree_util.tree_map(jnp.add, carry, (total, count, grads))
            return sums, None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                 jax.tree_util.tree_map(jnp.zeros_like, state.params))
        (total, count, grads), _ = jax.lax.scan(
            micro, zeros, (jnp.arange(grad_accum), (split(tokens), split(borders), split(mask))))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng)
        return new, total / count, optax.tree.norm(grads)

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    layout = state_shardings(config, optimizer, mesh)
    batch = NamedSharding(mesh, sharding.batch_spec(config))
    scalar = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, donate_argnums=0, in_shardings=(layout, batch, batch, batch),
                   out_shardings=(layout, scalar, scalar))


def _make_eval(config: ModelConfig, mesh: Mesh | None):
    """The jitted ``losses(params, tokens, borders, mask) -> (sum of target losses, count)``, in eval mode."""
    return jax.jit(lambda params, tokens, borders, mask: _target_losses(config, params, tokens, borders, mask,
                                                                         mesh, None))


def eval_losses(config: ModelConfig, params: Params, tokens: Any, document_borders: Any = None,
                mask: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)`` float32 of the counted next-token losses of rows ``tokens (B, S)`` in eval mode (no
    dropout); ``sum / count`` is ``loss_fn``'s value. Summing both over batches gives a held-out mean."""
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=False)
    borders = check_borders(document_borders, tokens.shape)
    mask = None if mask is None else jnp.asarray(mask, bool)
    mesh, batch = sharding.place_batch(config, params, tokens, borders, mask)
    return compiled.compiled(_make_eval, config, mesh)(params, *batch)


init_state = init_train_state  # the name before 0.2
