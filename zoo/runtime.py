"""The model's calls on arrays: ``init_params``, ``forward``, ``prefill``, ``step`` and ``init_decode_state``.

Each call checks its inputs on the host (``zoo.checks``), places the batch on the mesh the params live
on (``zoo.sharding``) and runs one function from the compiled-function cache (``zoo.compiled``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from zoo import compiled, sharding
from zoo.checks import (
    check_borders, check_int, check_lengths, check_params, check_seed, check_state, check_tokens)
from zoo.config import ModelConfig, check_config
from zoo.decode_layout import decode_layout, prefill_config
from zoo.model import Params, State, build, decode_state_shapes, init_fn


def _make_init(config: ModelConfig, mesh: Mesh | None):
    init = init_fn(config)
    shardings = None if mesh is None else sharding.param_shardings(config, mesh)
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)


def init_params(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> Params:
    """Freshly initialised float32 parameters; ``seed`` an integer in ``[0, 2**32)`` (else ``TypeError`` or
    ``ValueError``; ``TypeError`` too when ``config`` is not a ``ModelConfig``).

    With a ``mesh`` (by default the one ``config.parallel`` asks for, see ``zoo.sharding.make_mesh``)
    every device initialises only its own shards; the values equal a single-device init.
    """
    check_config(config)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    key = jax.random.PRNGKey(check_seed(seed))
    mesh = sharding.make_mesh(config) if mesh is None else mesh
    return compiled.compiled(_make_init, config, mesh)(key)


def apply(config: ModelConfig, params: Params, tokens: jax.Array, document_borders: jax.Array | None = None, *,
          mode: str = "forward", state: State | None = None, mesh: Mesh | None = None,
          dropout_rng: jax.Array | None = None, lengths: jax.Array | None = None,
          logits_at: jax.Array | None = None) -> Any:
    """The model's one call, to be traced inside ``jax.jit`` or ``jax.export`` (no input checks here).

    ``tokens`` are int32 ``(B, S)``, or ``(B,)`` in ``step`` mode. Returns logits ``(B, S, V)`` float32 in
    ``forward`` mode, ``(logits (B, S, V), state)`` in ``prefill`` and ``(logits (B, V), state)`` in ``step``,
    the contract of ``zoo.forward``, ``zoo.prefill`` and ``zoo.step``. On a ``mesh`` the logical axes are
    mapped onto it and FSDP shards are cast to ``fsdp_gather_dtype``. With ``dropout_rng`` the model runs in
    training mode (the config's dropout applies); otherwise it is deterministic. ``lengths (B,)`` int32 makes
    ``tokens`` a right-padded ragged batch (see ``prefill``); None traces exactly the call without it.
    ``logits_at (B,)`` int32 (``forward``/``prefill``) runs the head at that position of each row only: logits
    ``(B, 1, V)``.
    """
    model = build(config)
    train = dropout_rng is not None
    with sharding.logical_context(config, mesh):
        params = sharding.cast_for_gather(config, mesh, params)
        out = model.apply({"params": params}, tokens[:, None] if mode == "step" else tokens, document_borders,
                          deterministic=not train, mode=mode, state=state, lengths=lengths,
                          rngs={"dropout": dropout_rng} if train else None,
                          **({} if logits_at is None else {"logits_at": logits_at}))
    if mode == "step":
        logits, state = out
        return logits[:, 0], state
    return out


def _make_apply(config: ModelConfig, mesh: Mesh | None, mode: str):
    # jit keys its compilations on the arguments' tree structure: lengths=None (no leaves) traces and compiles
    # exactly the call without lengths, and a ragged batch gets an executable of its own.
    return jax.jit(lambda params, tokens, document_borders, state, lengths: apply(
        config, params, tokens, document_borders, mode=mode, state=state, mesh=mesh, lengths=lengths))


def _run(config: ModelConfig, key: str, mode: str, params: Params, tokens: jax.Array,
         document_borders: jax.Array | None, state: Any, lengths: jax.Array | None = None):
    """Run ``mode`` on the mesh the params live on, with the batch split over dp × fsdp (``key``: the config JSON)."""
    mesh, (tokens, document_borders, lengths) = sharding.place_batch(config, params, tokens, document_borders,
                                                                     lengths)
    return compiled.compiled(_make_apply, key, mesh, mode)(params, tokens, document_borders, state, lengths)


def forward(config: ModelConfig, params: Params, tokens: Any, document_borders: Any = None) -> jax.Array:
    """Logits ``(B, S, vocab_size)`` float32 for integer ``tokens (B, S)``, in eval mode (no dropout).

    ``document_borders`` (bool ``(B, S)``, True at each document's first token) resets the
    memory there when ``mlstm_cell.reset_at_document_boundaries`` is set.

    Raises ``TokenError`` (a ``ValueError``) on the host, before dispatch, when ``tokens`` is not a
    non-empty integer ``(B, S)`` array, when ``S`` exceeds ``context_length`` (when it is set, i.e. > 0),
    or when an id lies outside ``[0, vocab_size)``. Ids are checked whenever they are concrete (lists,
    NumPy, jax.Array); under a caller's own ``jax.jit`` they are tracers and are not checked: there an id
    in ``[-vocab_size, 0)`` counts from the end of the vocabulary (NumPy indexing) and any other
    out-of-range id gives NaN logits for its sequence.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    key = compiled.config_json(check_config(config))  # serialised once per call
    check_params(key, params)
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=True)
    return _run(config, key, "forward", params, tokens, check_borders(document_borders, tokens.shape), None)


def prefill(config: ModelConfig, params: Params, tokens: Any, state: State | None = None,
            document_borders: Any = None, lengths: Any = None) -> tuple[jax.Array, State]:
    """Run a prompt ``(B, S)`` through ``mlstm_cell.prefill_backend``; returns logits and the decoding state.

    The state is a dict of float32 arrays with the block as leading axis: ``c (NB, B, NH, DQK, DV)``,
    ``n (NB, B, NH, DQK)``, ``m (NB, B, NH)`` and, for ``mlstm``, ``conv (NB, B, K-1, Di)``.
    Pass ``state`` to continue from an earlier prefill or step; it starts from zeros otherwise.

    Ragged batches: with ``lengths``, integers ``(B,)`` with ``1 <= lengths[b] <= S``, ``tokens`` is
    right-padded: row b's prompt is ``tokens[b, :lengths[b]]``. The returned state of row b is its state
    after its own last real token, and ``logits[b, lengths[b] - 1]`` its next-token distribution; logits at
    later positions are finite and meaningless. The padding ids must still be ids in ``[0, vocab_size)``
    (0 will do). Each row matches its prompt run alone up to float rounding (about 1e-6 relative).
    ``lengths=None`` runs the rectangular batch exactly as before.

    On a CPU it computes in float32 where the config says bfloat16 or float16, as ``step`` does (decoding
    runs the decode layout's dtypes, docs/decoding.md; ``forward`` computes as the config says).

    ``context_length`` (when > 0) bounds the prompt: each call takes at most ``context_length`` tokens,
    while decoding with ``step`` (or a further ``prefill`` from the returned state) may continue past it,
    since the state has a fixed size. Raises ``TokenError`` (a ``ValueError``) as ``forward`` does: a
    longer prompt, a bad shape or dtype, or an id outside ``[0, vocab_size)``; ``ValueError`` for a
    ``state`` whose keys or shapes do not fit the config and batch size; ``TokenError`` naming ``lengths`` for
    lengths that are not integers of shape ``(B,)`` in ``[1, S]``.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    key = compiled.config_json(check_config(config))  # serialised once per call
    check_params(key, params)
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=True)
    lengths = check_lengths(lengths, tokens.shape)
    if state is not None:
        check_state(key, state, tokens.shape[0])
    borders = check_borders(document_borders, tokens.shape)
    run_as = prefill_config(config, params)
    return _run(run_as, key if run_as is config else compiled.config_json(run_as), "prefill", params, tokens,
                borders, state, lengths)


def step(config: ModelConfig, params: Params, token: Any, state: State) -> tuple[jax.Array, State]:
    """Decode one token per sequence (``token (B,)``) through ``mlstm_cell.step_backend``.

    Returns logits ``(B, vocab_size)`` and the new state. ``context_length`` does not limit ``step``.
    It runs in the decode layout (``zoo.decode_layout``, docs/decoding.md): on a CPU in float32 compute and per
    block whatever the config's ``dtype`` and ``scan_blocks``, within the tolerances of docs/numerics.md §9.

    Raises ``TokenError`` (a ``ValueError``) for a token that is not a non-empty integer ``(B,)`` array, and
    for an id outside ``[0, vocab_size)`` when the token is host data (a list or NumPy array). A jax.Array
    token is not read back to check its values: that would make every decoding step wait for a
    device-to-host copy. An out-of-range id on the device gives NaN logits (an id in ``[-vocab_size, 0)``
    counts from the end of the vocabulary). A ``state`` whose keys or shapes do not fit the config and
    batch size is a ``ValueError``.
    ``TypeError`` for a ``config`` that is not a ``ModelConfig``; ``TypeError``/``ValueError`` naming the first
    path of ``params`` that does not fit the config (see ``check_params``).
    """
    key = compiled.config_json(check_config(config))  # serialised once per call
    check_params(key, params)
    token = check_tokens(config, token, 1, "token", prompt=False)
    check_state(key, state, token.shape[0])
    target, params = decode_layout(config, params)
    return _run(target, key if target is config else compiled.config_json(target), "step", params, token, None, state)


def _make_prefill_next(config: ModelConfig, mesh: Mesh | None):
    def run(params, tokens, state, lengths):
        last = (jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32) if lengths is None else lengths) - 1
        logits, state = apply(config, params, tokens, mode="prefill", state=state, mesh=mesh, lengths=lengths,
                              logits_at=last)
        return logits[:, 0], state

    return jax.jit(run)


def prefill_next(config: ModelConfig, params: Params, tokens: Any, lengths: Any = None,
                 state: State | None = None) -> tuple[jax.Array, State]:
    """``prefill`` for decoding: each row's next-token logits ``(B, vocab_size)`` float32 (at position
    ``lengths[b] - 1``, or the last one) and the decoding state. The same as ``prefill`` there, but the LM head
    runs at those positions only (it costs ``2·S·D·V`` FLOPs over the whole prompt, a third of a 165M model's
    prefill at S=128). Arguments and errors as ``prefill``'s."""
    key = compiled.config_json(check_config(config))
    check_params(key, params)
    tokens = check_tokens(config, tokens, 2, "tokens", prompt=True)
    lengths = check_lengths(lengths, tokens.shape)
    if state is not None:
        check_state(key, state, tokens.shape[0])
    mesh, (tokens, lengths) = sharding.place_batch(config, params, tokens, lengths)
    run_as = prefill_config(config, params)
    return compiled.compiled(_make_prefill_next, run_as, mesh)(params, tokens, state, lengths)


def init_decode_state(config: ModelConfig, batch_size: int) -> State:
    """An all-zero decoding state for ``batch_size`` sequences (what ``prefill`` starts from).

    Raises ``TypeError`` for a ``config`` that is not a ``ModelConfig`` or a ``batch_size`` that is not an
    integer, ``ValueError`` for ``batch_size < 1``."""
    shapes = decode_state_shapes(check_config(config), check_int(batch_size, "batch_size", 1))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
