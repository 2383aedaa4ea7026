"""Step-count baselines: the full-compute sampler and uniform step reduction."""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation


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
        n = obs.step_cap if self.num_steps is None else self.num_steps
        if n > obs.step_cap:
            raise ValueError(f"UniformSteps({n}) exceeds the sampler's step cap of {obs.step_cap}.")
        grid = obs.schedule.uniform_times(n)
        next_t = grid[(obs.step_index + 1).clamp_max(n)]
        return Actions(next_t=next_t, reuse=torch.zeros(len(obs), dtype=torch.bool),
                       level=torch.zeros(len(obs), dtype=torch.long))


class FullCompute(UniformSteps):
    """The unaccelerated sampler: every step of the step cap, every block, dense attention."""

    def __init__(self) -> None:
        super().__init__(None)
