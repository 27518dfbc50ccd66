"""Where a config comes from: ``load_config`` reads a preset name, a JSON file or a dict, strictly and with limits."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoo import presets
from zoo.config import ModelConfig
from zoo.errors import ZooError


class ConfigSourceError(ZooError, ValueError):
    """A config could not be read: missing file, unknown preset, malformed JSON, too large or too deep."""


MAX_CONFIG_BYTES = 2**20
"""Largest config file read (1 MiB; a preset is about 1 KiB)."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of objects and lists in a config (the zoo's own sections nest 6 levels)."""


def _too_deep(where: str) -> ConfigSourceError:
    return ConfigSourceError(f"{where}: objects and lists nested more than {MAX_CONFIG_DEPTH} levels deep "
                             f"(a config nests about 6)")


def check_depth(data: Any, where: str) -> None:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (Mapping, list, tuple)):
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(where)
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, Mapping) else node))


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array"}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ConfigSourceError(f"key {key!r} appears twice in one JSON object (a config sets each key once)")
        data[key] = value
    return data


def load_config(source: str | os.PathLike | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A validated ``ModelConfig`` from a preset name, a JSON file path, or a dict.

    Values are parsed strictly (see ``zoo.config``). Raises ``pydantic.ValidationError`` for invalid
    content, ``TypeError`` for a ``source`` of another type, and ``ConfigSourceError`` when the source
    cannot be read: no such file or preset (with the closest preset name), not UTF-8, malformed JSON, a
    key repeated in one object, a top level that is not an object, a file over ``MAX_CONFIG_BYTES``, or
    objects and lists nested deeper than ``MAX_CONFIG_DEPTH``.
    """
    if isinstance(source, ModelConfig):
        return source
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(f"config must be a preset name, a JSON file path, a dict or a ModelConfig, "
                        f"got {type(source).__name__}")
    if isinstance(source, Mapping):
        check_depth(source, "the config dict")
        return ModelConfig.model_validate(source)
    path = Path(source)
    if not path.is_file():
        if str(source) in presets.names():
            path = presets.path(str(source))
        else:
            raise ConfigSourceError(f"{str(source)!r} is neither a config file nor a preset; "
                                    f"{presets.hint(str(source))}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigSourceError(f"{path}: {size:,} bytes is over the {MAX_CONFIG_BYTES:,}-byte (1 MiB) limit of a "
                                f"config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise ConfigSourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigSourceError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ConfigSourceError as exc:  # a repeated key
        raise ConfigSourceError(f"{path}: {exc}") from None
    except RecursionError:  # deeper than the JSON parser goes
        raise _too_deep(str(path)) from None
    check_depth(data, str(path))
    if not isinstance(data, dict):
        raise ConfigSourceError(f"{path}: the top level must be a JSON object, got {_JSON_TYPES[type(data)]}")
    return ModelConfig.model_validate(data)
