"""Stop a long job cleanly: SIGTERM (a scheduler's preemption, torchrun's shutdown) or SIGINT (Ctrl-C)
asks it to stop after the unit of work in progress (an iteration, a training step), then write a final
checkpoint and exit. Later signals are only logged, because torchrun forwards the signal it gets to
workers that already received it from the terminal; SIGKILL still stops at once, losing at most the
work since the last checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Self

logger = logging.getLogger("rapid3")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM / SIGINT set ``received`` (the first signal's number; 0: none) instead of
    killing the process. Outside the main thread, where handlers cannot be set, it does nothing."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received:
            logger.warning("%s: already stopping after the work in progress (SIGKILL stops at once; the last "
                           "checkpoint stays good).", name)
            return
        self.received = signum
        logger.warning("%s: stopping after the work in progress; a final checkpoint follows.", name)
