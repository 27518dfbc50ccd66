"""Using a model to produce text: sampling (``sampling``) and the one decode loop with ``generate`` (``decode``)."""

from zoo.inference.decode import Decoded, Generation, decode_loop, generate, step_fn
from zoo.inference.sampling import check_sampling, sample

__all__ = ["Decoded", "Generation", "check_sampling", "decode_loop", "generate", "sample", "step_fn"]
