"""Using a model to produce tokens and text: sampling (``sampling``), ragged prompts (``batch``), when a row stops
(``stopping``), and the one decode loop with ``generate`` (``decode``; ``artifact`` runs it on an export)."""

from zoo.inference.artifact import ArtifactRunner
from zoo.inference.decode import (
    Decoded, Generation, ModelRunner, Runner, decode_loop, generate, generate_with, step_fn)
from zoo.inference.sampling import (
    GenerationError, Sampled, SamplerState, SamplingParams, check_sampling, sample, sampler_state)

__all__ = ["ArtifactRunner", "Decoded", "Generation", "GenerationError", "ModelRunner", "Runner", "Sampled", "SamplerState",
           "SamplingParams", "check_sampling", "decode_loop", "generate", "generate_with", "sample", "sampler_state",
           "step_fn"]
