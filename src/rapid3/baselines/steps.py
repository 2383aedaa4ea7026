"""Hand-set baselines on the pipeline's uniform time grid: fixed-interval residual caching (FORA /
Delta-DiT style) and static sparse attention. Full compute and uniform step reduction are the core
controllers of ``rapid3.accel.controllers``."""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation
from ..accel.controllers import UniformSteps
from ..backbones.sparse_attention import check_level


class FixedIntervalCache(UniformSteps):
    """FORA / Delta-DiT style: recompute every ``interval``-th step, reuse the cached residual between."""

    def __init__(self, interval: int, num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}.")
        self.interval = interval

    def decide(self, obs: Observation) -> Actions:
        reuse = (obs.step_index % self.interval != 0) & obs.has_cache
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long))


class StaticSparse(UniformSteps):
    """Every step recomputed with the same attention sparsity ``level``."""

    def __init__(self, level: int, num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        self.level = check_level(level)

    def decide(self, obs: Observation) -> Actions:
        return Actions(next_t=self.next_times(obs), reuse=torch.zeros(len(obs), dtype=torch.bool),
                       level=torch.full((len(obs),), self.level, dtype=torch.long))
