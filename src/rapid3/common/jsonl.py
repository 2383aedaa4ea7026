"""Append-only JSONL logs read back after a crash: a torn last line is expected, anything else is not.

A process killed (or a disk filling) in the middle of ``file.write`` leaves a last line cut short.
The checkpoint, not the log, is the truth of a run, so ``read_records`` drops that torn tail with a
warning; a bad line *before* the last cannot come from a crash, and is an error naming the file,
the line and the fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("rapid3")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-blank line, a torn last line dropped (with a warning)."""
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if index == len(lines) - 1:
                logger.warning("%s:%d: dropped a torn last line (the run was stopped while writing it).", path, number)
                break
            raise ValueError(f"{path}:{number} is not a JSON line ({error.msg}) and is not the last one, so no "
                             "crash tore it: repair or delete that line.") from None
        if not isinstance(record, dict):
            raise TypeError(f"{path}:{number}: expected a JSON object per line, got {line.strip()[:80]}")
        records.append(record)
    return records


def rewrite_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records``, one per line, atomically (a crash leaves the old file or the new)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    tmp.replace(path)
