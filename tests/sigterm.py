"""A test helper: deliver SIGTERM to this process while a training step is in progress."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any


def sigterm_during(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` that sends this process SIGTERM before it returns, as a scheduler's preemption would."""
    def stepped(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    return stepped
