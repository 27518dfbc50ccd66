"""Built-in weight quantizers: ``int8`` (weight-only, symmetric, scales per output channel and group of input rows).

The quantizer contract (what ``select``, ``quantize``, ``dequantize``, ``axes``, ``matmul`` and ``columns``
take and return) is in :mod:`zoo.nn.quant`.
"""
