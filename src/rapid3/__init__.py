"""rapid3: learned per-image, per-step acceleration (Step-Skip, Cache-Reuse, Sparse-Attention) for DiTs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names imported on first use, so that `import rapid3` stays light (no torch or diffusers).
_LAZY = {
    "accelerate": "pipelines",
    "AcceleratedPipeline": "pipelines",
}

if TYPE_CHECKING:
    from .pipelines import AcceleratedPipeline, accelerate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["AcceleratedPipeline", "__version__", "accelerate"]
