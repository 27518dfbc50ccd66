"""Built-in mLSTM cell backends: ``parallel_stabilized``, ``chunkwise`` and ``recurrent``.

The cell contract they follow (call signature, shapes, dtypes, the state convention and the
registration metadata) is in :mod:`zoo.nn.cell`.
"""
