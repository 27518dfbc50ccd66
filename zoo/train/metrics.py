"""A training run's metrics: ``metrics.jsonl``, TensorBoard event files and ``loss.png``, and the MFU yardstick."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted ``size³`` matmul in ``dtype`` on the default device, best of ``repeats`` (compiled and
    run once first): the peak MFU is measured against (``2 · size³`` FLOPs per matmul)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class MetricsLog:
    """Lines of one run: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars and the loss curve.

    ``keep_lines`` lines of an existing ``metrics.jsonl`` are kept (those a resumed checkpoint had written) and
    the rest dropped; TensorBoard events from ``first_step`` on are purged (tensorboardX's ``purge_step``).
    """

    def __init__(self, folder: Path, keep_lines: int = 0, first_step: int = 1):
        from tensorboardX import SummaryWriter

        self.path = folder / METRICS_FILE
        kept = self.path.read_text().splitlines(keepends=True)[:keep_lines] if self.path.exists() else []
        self.lines = [json.loads(line) for line in kept]
        self.path.write_text("".join(kept))
        self.file = self.path.open("a")
        self.writer = SummaryWriter(str(folder / TENSORBOARD_DIR), purge_step=first_step)
        self.folder = folder

    def write(self, line: dict[str, Any]) -> None:
        """Append ``line`` (flushed, so a killed run keeps it) and its scalars to TensorBoard."""
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        self.lines.append(line)
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, line["step"])

    def plot(self) -> None:
        """Write ``loss.png``: the training loss and the held-out loss against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 4))
        for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
            points = [(line["step"], line[key]) for line in self.lines if key in line]
            if points:
                axes.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
        axes.set_xlabel("step")
        axes.set_ylabel("cross-entropy (nats/token)")
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.folder / PLOT_FILE, dpi=100)
        plt.close(figure)

    def close(self) -> None:
        self.file.close()
        self.writer.close()
