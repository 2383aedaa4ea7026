"""A model folder's ``config.json`` checked against its safetensors weights before loading, so a config
edited by hand or copied from another model says which field is wrong instead of a ``size mismatch``
traceback (or, for a string where a number belongs, torch's "argument 'size' must be tuple of ints").

Each model family names its facts: a field (as the user would fix it), what the config implies and
what the weights' tensor shapes say. Only the header of the safetensors file is read.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Fact:
    """``field``: what ``from_config(config)`` implies must equal what ``from_weights(shapes)`` says."""

    field: str
    from_config: Callable[[dict[str, Any]], Any]
    from_weights: Callable[[Shapes], Any]


def check_config_matches_weights(folder: str | Path, weights_file: str, cls: type, facts: list[Fact]) -> None:
    """ValueError naming each field of ``folder/config.json`` (defaults of ``cls.__init__`` filling absent
    ones) of the wrong type or disagreeing with ``folder/weights_file``. A folder missing either file is
    left to the loader, whose error already says what is missing."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / weights_file
    if not config_path.is_file() or not weights_path.is_file():
        return
    try:
        given = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not JSON ({error}).") from None
    if not isinstance(given, dict):
        raise TypeError(f"{config_path} must hold a JSON object of the model's fields.")
    config = {**_defaults(cls), **given}
    _check_types(config, _defaults(cls), config_path)
    shapes = _shapes(weights_path)
    if shapes is None:  # unreadable: the loader reports the corrupt file
        return
    wrong = []
    for fact in facts:
        try:
            in_weights = fact.from_weights(shapes)
        except KeyError:  # a tensor this fact reads is absent: another fact (a head's presence) says why
            continue
        if fact.from_config(config) != in_weights:
            wrong.append(f"{fact.field} is {fact.from_config(config)!r} but the weights have {in_weights!r}")
    if wrong:
        raise ValueError(f"{config_path} does not match its weights {weights_file}: {'; '.join(wrong)}. Restore the "
                         "config.json saved with these weights.")


def _defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_types(config: dict[str, Any], defaults: dict[str, Any], where: Path) -> None:
    """Each field of the type of its default (ints taken as floats; a None default takes anything)."""
    for name, default in defaults.items():
        value = config[name]
        if default is None:
            continue
        kind = list if isinstance(default, tuple) else type(default)  # JSON has lists, never tuples
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, (list, tuple)) if kind is list else
              isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{where}: {name} must be {'a number' if kind is float else kind.__name__}, got "
                             f"{value!r}.")


def _shapes(path: Path) -> Shapes | None:
    """Every tensor's shape from the safetensors header; None if the file cannot be read."""
    try:
        with safe_open(path, "pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118  (not a dict)
    except Exception:  # noqa: BLE001  (safetensors raises its own error types for a torn header)
        return None
