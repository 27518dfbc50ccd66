"""Test-wide settings, for tests/ and the example plugins' tests alike.

XLA's CPU backend spends most of a tiny model's compile time optimising the inlined threefry
PRNG of ``init``; the tests run hundreds of tiny compiles, so they use optimisation level 0.
The computation is the same; only the generated machine code is less tuned.

Entry-point plugins are not autoloaded: the suite runs against the built-ins whatever else is
installed. Tests of third-party plugins load them explicitly (``zoo.testing.isolated_registry``)
or run ``zoo`` in a subprocess with autoload on.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["ZOO_DISABLE_PLUGIN_AUTOLOAD"] = "1"

pytest_plugins = ["zoo.testing.fixtures"]
