"""Named configs shipped with the zoo: one JSON file per preset."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _dir() -> Path:
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """Sorted preset names."""
    return sorted(p.stem for p in _dir().glob("*.json"))


def path(name: str) -> Path:
    """The JSON file of preset ``name``."""
    return _dir() / f"{name}.json"
