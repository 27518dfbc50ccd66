"""mLSTMsig cells (``parallel_sig``, ``chunkwise_sig``, ``recurrent_sig``) and the ``rmsnorm_offset`` norm."""
