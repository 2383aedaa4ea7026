"""Documented dataclass fields: a config's knobs carry their own help text (for ``--help`` and config files)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def knob(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation (``field.metadata["doc"]``)."""
    return field(default=default, metadata={"doc": doc})
