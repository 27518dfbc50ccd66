"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's compile time optimising the inlined threefry
PRNG of ``init``; the tests run hundreds of tiny compiles, so they use optimisation level 0.
The computation is the same; only the generated machine code is less tuned.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
