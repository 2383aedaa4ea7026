"""Training checkpoints that survive a crash at any moment (the GRPO trainer's, the embedded generator's
and reward model's: each names its own format, so one is never resumed as another).

``save_checkpoint`` writes a temporary file next to the target, flushes it to disk and renames
it over the target (``os.replace`` is atomic on POSIX), so the file at ``path`` is always either
the previous complete checkpoint or the new complete one, never a torn mix. ``load_checkpoint``
reads with ``weights_only=True`` (tensors, numbers, strings, containers: no pickled code) and
turns an unreadable file, or one of another format, into a ``CheckpointError`` that names it, leaving it
untouched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "rapid3-grpo-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, not a rapid3 checkpoint of the expected
    format, or trained with settings the resumed run contradicts)."""


def save_checkpoint(path: str | Path, state: dict[str, Any], format_tag: str = FORMAT) -> None:
    """Write ``state`` (plus ``format_tag``) to ``path`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save({"format": format_tag, **state}, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = _disk_full(error)
        if full is not None:  # torch reports a failed write as "unexpected pos": say what it was
            raise OSError(full.errno, f"the disk is full: could not write the checkpoint {path} "
                          f"({os.strerror(full.errno)}); the previous one was left intact. Free some space and "
                          "continue with --resume.") from error
        raise
    _fsync_dir(path.parent)  # ... and the rename itself survives a power cut


def load_checkpoint(path: str | Path, format_tag: str = FORMAT) -> dict[str, Any]:
    """The state saved at ``path`` by ``save_checkpoint`` with the same ``format_tag``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt or not a rapid3 checkpoint of that format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a torn zip, a bad pickle or EOF each its own way
        raise CheckpointError(f"the checkpoint {path} is corrupt or truncated and cannot be resumed "
                              f"({type(error).__name__}: {error}). It was left as it is; restore a copy "
                              "or start a new run in another folder.") from error
    if not isinstance(state, dict) or state.get("format") != format_tag:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a rapid3 training checkpoint of this kind (format {found!r}, expected "
                              f"{format_tag!r}).")
    return state


def _disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind ``error`` (itself, or the cause or context torch chained it to)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
