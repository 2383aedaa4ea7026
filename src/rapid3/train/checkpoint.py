"""Training checkpoints that survive a crash at any moment.

``save_checkpoint`` writes a temporary file next to the target, flushes it to disk and renames
it over the target (``os.replace`` is atomic on POSIX), so the file at ``path`` is always either
the previous complete checkpoint or the new complete one, never a torn mix. ``load_checkpoint``
reads with ``weights_only=True`` (tensors, numbers, strings, containers: no pickled code) and
turns an unreadable file into a ``CheckpointError`` that names it, leaving it untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "rapid3-grpo-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, or not a rapid3 checkpoint)."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # ... and the rename itself survives a power cut


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved at ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a rapid3 training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a torn zip, a bad pickle or EOF each its own way
        raise CheckpointError(f"the checkpoint {path} is corrupt or truncated and cannot be resumed "
                              f"({type(error).__name__}: {error}). It was left as it is; restore a copy "
                              "or start a new run in another folder.") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a rapid3 training checkpoint (format {found!r}, expected {FORMAT!r}).")
    return state


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
