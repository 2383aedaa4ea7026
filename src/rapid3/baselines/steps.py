"""Hand-set baselines on the pipeline's uniform time grid: fixed-interval residual caching (FORA /
Delta-DiT style, and TaylorSeer's forecasting form of it) and static sparse attention. Full compute and uniform step reduction are the core
controllers of ``rapid3.accel.controllers``."""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation
from ..accel.cache import check_forecast_order
from ..accel.controllers import UniformSteps
from ..backbones.sparse_attention import check_level


def capped_orders(obs: Observation, order: int) -> torch.Tensor:
    """``order`` for every row, lowered where the row's cache holds too few full computations for it (early
    in a run a forecast starts as reuse, then order 1, as the history fills)."""
    return obs.forecast_orders().clamp(0, order)


class FixedIntervalCache(UniformSteps):
    """FORA / Delta-DiT style: recompute every ``interval``-th step, take the block-stack residual from the
    cache between — as it is (``order`` 0, FORA) or forecast to the step's time (``order`` 1 or 2,
    TaylorSeer). The first ``warmup`` steps always recompute."""

    def __init__(self, interval: int, num_steps: int | None = None, *, order: int = 0, warmup: int = 0) -> None:
        super().__init__(num_steps)
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval!r}.")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
        self.interval, self.warmup = interval, warmup
        self.forecast_order = check_forecast_order(order)

    def decide(self, obs: Observation) -> Actions:
        reuse = (obs.step_index % self.interval != 0) & obs.has_cache & (obs.step_index >= self.warmup)
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long),
                       order=capped_orders(obs, self.forecast_order))


class TaylorSeerCache(FixedIntervalCache):
    """TaylorSeer (Liu et al., "From Reusing to Forecasting", 2025) on the block-stack residual: full
    compute every ``interval`` steps and an order-``order`` forecast from the last order + 1 full
    computations between (divided differences on the actual times: ``rapid3.accel.cache``)."""

    def __init__(self, interval: int, order: int = 1, num_steps: int | None = None, *, warmup: int = 0) -> None:
        super().__init__(interval, num_steps, order=order, warmup=warmup)


class StaticSparse(UniformSteps):
    """Every step recomputed with the same attention sparsity ``level``."""

    def __init__(self, level: int, num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        self.level = check_level(level)

    def decide(self, obs: Observation) -> Actions:
        return Actions(next_t=self.next_times(obs), reuse=torch.zeros(len(obs), dtype=torch.bool),
                       level=torch.full((len(obs),), self.level, dtype=torch.long))
