"""Conversions between zoo checkpoints and other projects' formats (``torch``: NX-AI's PyTorch xlstm)."""
