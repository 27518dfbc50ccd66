"""Write a folder under a staging name and rename it into place only when it is complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(out_dir: Path, prefix: str = ".staging-") -> Iterator[Path]:
    """A path (not yet created) to write into, renamed to ``out_dir`` when the block succeeds.

    The staging folder lies beside ``out_dir`` (same filesystem, so the rename is atomic) and is removed
    when the block raises or is interrupted; ``out_dir`` then does not exist unless it existed (empty) before.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield staging / "out"
        if out_dir.exists():
            out_dir.rmdir()
        (staging / "out").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
