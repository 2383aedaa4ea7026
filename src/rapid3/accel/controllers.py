"""The core controllers every run starts from: the unaccelerated sampler and uniform step reduction.

They live beside the ``Controller`` protocol (``actions.py``) because everything else is measured
against ``FullCompute`` and most hand-set baselines (``rapid3.baselines``) build on ``UniformSteps``.
"""

from __future__ import annotations

import torch

from .actions import Actions, Observation


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
