"""One owner per run folder: an OS file lock (``fcntl.flock``) on ``RUN/run.lock``, held while a run lives.

    with RunLock(out):
        ...  # build, train, checkpoint, export

A second run into the same folder fails at once with a one-line ``RunFolderBusy`` naming the PID
that holds it. The kernel drops the lock when its process ends, however it ends (SIGKILL, a power
cut, an OOM kill), so a stale ``run.lock`` left by a killed run never blocks ``--resume``: only a live
process can hold it. The file keeps the last holder's PID for the message; its presence means nothing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

LOCK_FILE = "run.lock"


class RunFolderBusy(OSError):
    """Another live process holds the run folder's lock."""


def first_missing(folder: str | Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None: ``folder`` exists)."""
    missing = [p for p in (Path(folder), *Path(folder).parents) if not p.exists()]
    return missing[-1] if missing else None


class RunLock:
    """An exclusive, non-blocking lock on a run folder (which must exist), released on exit.

    ``made``: the outermost folder the caller created for this run (the run folder or a parent of it), or
    None. If the run then fails before writing anything into the run folder (a bad model path, a bad
    checkpoint), the lock file and the folders made go too: a refusal leaves nothing behind.
    """

    def __init__(self, folder: str | Path, *, made: Path | None = None) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.made = made
        self._fd: int | None = None

    def __enter__(self) -> Self:
        # O_CREAT without O_TRUNC: until the lock is ours, the file holds the owner's PID for the message.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"{self.path.parent} is in use by another run (PID {owner}); wait for it to end or "
                                "stop it, or choose another --out.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._fd is None:
            return
        folder = self.path.parent
        if self.made is not None and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            # Removed while still locked: a run that opens the file meanwhile fails as busy, one that opens
            # it after the unlink makes its own folder and file, and this process does nothing more.
            self.path.unlink()
            for made in (folder, *folder.parents):
                if any(made.iterdir()):
                    break
                made.rmdir()
                if made == self.made:
                    break
        os.close(self._fd)  # closing the only descriptor releases the lock
        self._fd = None
