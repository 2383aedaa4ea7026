"""Training that survives what goes wrong: stop signals and rollouts that blow up.

- ``StopSignals``: SIGTERM (a scheduler's preemption, torchrun's shutdown) or SIGINT (Ctrl-C)
  asks the trainer to stop after the iteration in progress; it then writes a final checkpoint and
  exits. Later signals are only logged, because torchrun forwards the signal it gets to workers
  that already received it from the terminal; SIGKILL still stops at once, losing at most the
  iterations since the last checkpoint (one, with ``checkpoint_every: 1``).
- ``drop_nonfinite_groups``: a group with a NaN or infinity in any image, reward term or
  log-prob is removed before it reaches the advantages, the update or the replay buffers.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Self

import torch
from torch import Tensor

from .rollout import Rollouts

logger = logging.getLogger("rapid3.train")
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
            logger.warning("%s: already stopping after this iteration (SIGKILL stops at once; the last "
                           "checkpoint stays good).", name)
            return
        self.received = signum
        logger.warning("%s: stopping after the iteration in progress; a final checkpoint follows.", name)


def drop_nonfinite_groups(rollouts: Rollouts, scores: dict[str, Tensor]) -> tuple[Rollouts, dict[str, Tensor], int]:
    """``rollouts`` and their per-trajectory ``scores`` without the groups that hold a NaN or infinity,
    and how many groups were dropped (each logged with its prompt and seed).

    A whole group goes: its advantages compare its members, so one missing member would change
    every other member's advantage.
    """
    finite = rollouts.images.flatten(1).isfinite().all(1).cpu() & rollouts.equivalent_steps.isfinite().cpu()
    finite &= torch.where(rollouts.mask, rollouts.old_log_probs, 0.0).isfinite().all(1).cpu()
    for values in scores.values():
        finite &= values.isfinite().cpu()
    groups = finite.view(-1, rollouts.group_size).all(1)
    for group in (~groups).nonzero().flatten().tolist():
        first = group * rollouts.group_size
        logger.warning("dropped the rollouts of %r (seed %d): NaN or infinity in an image, reward or log-prob.",
                       rollouts.prompts[first], rollouts.seeds[first])
    kept = groups.repeat_interleave(rollouts.group_size)
    if bool(kept.all()):
        return rollouts, scores, 0
    index = kept.nonzero().flatten()
    return rollouts.subset(index), {name: values[index] for name, values in scores.items()}, int((~groups).sum())
