"""Generation from an exported artifact (``zoo.export.runners.Artifact``): its ``prefill`` and ``step`` entries
on the host, with the same sampling as a model in memory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.inference.sampling import Sampled, SamplerState, sample

_sample = jax.jit(sample, static_argnums=2)  # one function for every artifact: it depends on no config


class ArtifactRunner:
    """``zoo.inference.decode.Runner`` of an artifact with ``prefill`` and ``step`` entries (the default export)."""

    def __init__(self, artifact: Any):
        self.artifact = artifact
        self.vocab_size, self.context_length = artifact.vocab_size, artifact.context_length

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, sampler: SamplerState,
                num_logprobs: int) -> tuple[Any, Sampled, Any, SamplerState]:
        self._check(tokens, lengths)
        logits, state = self.artifact.prefill(tokens, lengths)
        last = np.asarray(logits)[np.arange(len(lengths)), np.asarray(lengths) - 1]
        sampled, sampler = _sample(jnp.asarray(last), sampler, num_logprobs)
        return last, sampled, state, sampler

    def _check(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """``ExportError`` for a prompt over ``context_length``, which an artifact would take without complaint (ids were
        checked against the vocabulary before)."""
        from zoo.export.entries import ExportError

        where, limit = self.artifact.path, self.context_length
        if 0 < limit < int(lengths.max()):
            raise ExportError(f"{where}: context_length={limit} bounds each forward or prefill call (decoding with step "
                              f"may go past it); a prompt has {int(lengths.max())} tokens")

    def step(self, token: Any, state: Any, sampler: SamplerState, num_logprobs: int) -> tuple[Sampled, Any, SamplerState]:
        logits, state = self.artifact.step(np.asarray(token, np.int32), state)
        sampled, sampler = _sample(jnp.asarray(logits), sampler, num_logprobs)
        return sampled, state, sampler
