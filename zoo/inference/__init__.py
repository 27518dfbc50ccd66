"""Using a model to produce tokens and text: sampling (``sampling``), ragged prompts (``batch``), when a row stops
(``stopping``), and the one decode loop with ``generate`` (``decode``; ``artifact`` runs it on an export); ``engine``
serves many requests at once on a fixed table of state slots (continuous batching)."""

from zoo.inference.artifact import ArtifactRunner
from zoo.inference.decode import (
    Decoded, Generation, ModelRunner, Runner, decode_loop, generate, generate_with, step_fn)
from zoo.inference.engine import (
    Delta, Engine, EngineClosed, EngineError, EngineMetrics, EngineRequest, QueueFull, Ticket)
from zoo.inference.sampling import (
    GenerationError, Sampled, SamplerState, SamplingParams, check_sampling, sample, sampler_state)

__all__ = ["ArtifactRunner", "Decoded", "Delta", "Engine", "EngineClosed", "EngineError", "EngineMetrics",
           "EngineRequest", "Generation", "GenerationError", "ModelRunner", "QueueFull", "Runner", "Sampled",
           "SamplerState", "SamplingParams", "Ticket", "check_sampling", "decode_loop", "generate", "generate_with",
           "sample", "sampler_state", "step_fn"]
