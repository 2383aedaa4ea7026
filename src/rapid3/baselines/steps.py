"""Hand-set baselines on the pipeline's uniform time grid: full compute, step reduction,
fixed-interval residual caching (FORA / Delta-DiT style) and static sparse attention."""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation
from ..accel.sparse_attention import check_level


class UniformSteps:
    """The pipeline's own schedule with ``num_steps`` steps: always recompute, always dense.

    ``num_steps=None`` takes the sampler's step cap, i.e. the unaccelerated sampler.
    """

    def __init__(self, num_steps: int | None = None) -> None:
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        self.num_steps = num_steps

    def reset(self, batch_size: int) -> None:
        pass

    def decide(self, obs: Observation) -> Actions:
        zeros = torch.zeros(len(obs), dtype=torch.long)
        return Actions(next_t=self.next_times(obs), reuse=zeros.bool(), level=zeros)

    def next_times(self, obs: Observation) -> torch.Tensor:
        """The next time on the uniform grid for each row."""
        n = obs.step_cap if self.num_steps is None else self.num_steps
        if n > obs.step_cap:
            raise ValueError(f"{type(self).__name__} with {n} steps exceeds the sampler's step cap of {obs.step_cap}.")
        return obs.schedule.uniform_times(n)[(obs.step_index + 1).clamp_max(n)]


class FullCompute(UniformSteps):
    """The unaccelerated sampler: every step of the step cap, every block, dense attention."""

    def __init__(self) -> None:
        super().__init__(None)


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
