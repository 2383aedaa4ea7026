"""A run folder's config history: every start and resume appends the config it ran with, so a
``--resume`` that changes knobs never loses the recipe the run started with (``config.yaml`` holds
only the latest). The history is a YAML stream, read with ``yaml.safe_load_all``::

    --- # started at iteration 0, 2026-12-08T01:00:00Z
    group_size: 8
    ...
    --- # resumed at iteration 40, 2026-12-08T03:00:00Z
    group_size: 16
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

HISTORY_FILE = "config_history.yaml"


def keep_history(folder: str | Path, config_file: str, config: dict[str, Any], note: str) -> None:
    """Append ``config`` to ``folder/HISTORY_FILE`` with ``note`` and the time. A run begun before histories
    were kept gets its old ``config_file`` recorded first, before the caller overwrites it."""
    folder = Path(folder)
    history, previous = folder / HISTORY_FILE, folder / config_file
    if not history.exists() and previous.is_file():
        _append(history, yaml.safe_load(previous.read_text()) or {}, f"{config_file} before this history began")
    _append(history, config, f"{note}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


def read_history(folder: str | Path) -> list[dict[str, Any]]:
    """The configs of ``folder``'s history, oldest first ([] without one)."""
    path = Path(folder) / HISTORY_FILE
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None] if path.exists() else []


def _append(path: Path, config: dict[str, Any], note: str) -> None:
    with open(path, "a") as file:
        file.write(f"--- # {note}\n" + yaml.safe_dump(config, sort_keys=False))
