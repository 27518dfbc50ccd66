"""Named configs shipped with the zoo: one JSON file per preset."""

from __future__ import annotations

import difflib
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


def hint(name: str) -> str:
    """For a name that is no preset: the closest preset name (if one is close) and the list of presets."""
    close = difflib.get_close_matches(name, names(), n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"presets: {', '.join(names())}"
