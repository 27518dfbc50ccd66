"""Native kernels with a pure-JAX fallback. Imports nothing from the zoo but ``zoo.errors``.

``int8_matmul(x, q, scale)``: float activations times int8 weights with per-output-channel or group-wise
scales; a native CPU kernel (``int8_matmul.cc`` via ``jax.ffi``) for decode-sized inputs, the pure-JAX path elsewhere.
``python -m zoo.kernels.build`` compiles the library (the Makefile's install rules run it); without it the
first use builds it into a cache folder when a C++ compiler is present, else the pure-JAX path runs and
``native_reason()`` says why.
"""

from zoo.kernels.int8 import (
    MAX_NATIVE_ROWS,
    KernelError,
    int8_matmul,
    native_available,
    native_int8_matmul,
    native_reason,
    pure_int8_matmul,
    set_native,
)

__all__ = ["MAX_NATIVE_ROWS", "KernelError", "int8_matmul", "native_available", "native_int8_matmul",
           "native_reason", "pure_int8_matmul", "set_native"]
