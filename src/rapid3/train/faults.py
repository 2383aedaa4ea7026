"""Training that survives rollouts that blow up: ``drop_nonfinite_groups`` removes a group with a NaN or
infinity in any image, reward term or log-prob before it reaches the advantages, the update or the
replay buffers. (Stop signals: ``rapid3.common.signals``.)"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .rollout import Rollouts

logger = logging.getLogger("rapid3.train")


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
