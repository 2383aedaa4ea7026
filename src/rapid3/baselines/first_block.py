"""FirstBlockCache-style threshold caching (ParaAttention's First Block Cache, as in diffusers'
``apply_first_block_cache``) as a controller on the pipeline's uniform grid.

Each step the first block's residual (its output minus its input) is probed
(``obs.probe("first_block_residual")``, charged to the sample). If its relative L1 change from the
residual seen at the sample's last full computation is below ``threshold``, the step reuses the
cached block-stack residual; otherwise it recomputes and that residual becomes the new reference.
As in diffusers, the reference moves only on recomputation, so slow drift still triggers one.

One difference from diffusers' hook, forced by the sampler's probe-then-act order: a recomputed
step runs the first block again (the probe's output is not carried into the full forward), so it
costs one block of one guidance branch more; the probe is charged, so K and FLOPs include it.
"""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation
from ..accel.cache import check_forecast_order
from ..accel.controllers import UniformSteps
from .steps import capped_orders
from .teacache import relative_l1


class FirstBlockCache(UniformSteps):
    """Reuse the cached residual while the first block's residual has changed by less than
    ``threshold`` (relative L1) since the sample's last full computation."""

    def __init__(self, threshold: float, num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}.")
        self.threshold = float(threshold)
        self.reference: torch.Tensor | None = None  # first-block residual at each sample's last recompute
        self.batch_size = 0

    def reset(self, batch_size: int) -> None:
        self.reference = None
        self.batch_size = batch_size

    def decide(self, obs: Observation) -> Actions:
        residual = obs.probe("first_block_residual")
        ids = obs.sample_ids
        if self.reference is None:
            self.reference = residual.new_zeros((self.batch_size, *residual.shape[1:]))
        cached = self.may_cache(obs)  # a sample with a cache has a reference: both are set on recompute
        reuse = torch.zeros(len(obs), dtype=torch.bool)
        if bool(cached.any()):
            reuse[cached] = relative_l1(residual[cached], self.reference[ids[cached]]) < self.threshold
        self.reference[ids[~reuse]] = residual[~reuse]
        return self.actions(obs, reuse)

    def may_cache(self, obs: Observation) -> torch.Tensor:
        """Rows whose step may come from the cache if the first block says so: those that have one."""
        return obs.has_cache

    def actions(self, obs: Observation, reuse: torch.Tensor) -> Actions:
        """The step's actions once the rows that take the cache are known."""
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long))


class DBCacheStyle(FirstBlockCache):
    """cache-dit's DBCache decision (F1B0: the first block probes, no block runs after the cache) with its
    guards, per sample: the first ``warmup`` steps recompute, at most ``max_cached_steps`` cache steps run
    in a row (None: no limit), and a cache step forecasts the residual with ``order`` (0: reuse as it is;
    1, 2: TaylorSeer's forecast, cache-dit's calibrator). The last F blocks run with the cache in DBCache
    (Bn > 0) are not available here: this loop caches the whole block stack (``docs/bench/forecast.md``)."""

    def __init__(self, threshold: float, num_steps: int | None = None, *, order: int = 0, warmup: int = 1,
                 max_cached_steps: int | None = None) -> None:
        super().__init__(threshold, num_steps)
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
        if max_cached_steps is not None and (not isinstance(max_cached_steps, int) or max_cached_steps < 1):
            raise ValueError(f"max_cached_steps must be None or a positive integer, got {max_cached_steps!r}.")
        self.forecast_order = check_forecast_order(order)
        self.warmup, self.max_cached_steps = warmup, max_cached_steps
        self.in_a_row = torch.zeros(0, dtype=torch.long)  # each sample's cache steps since its last recompute

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.in_a_row = torch.zeros(batch_size, dtype=torch.long)

    def may_cache(self, obs: Observation) -> torch.Tensor:
        allowed = obs.has_cache & (obs.step_index >= self.warmup)
        if self.max_cached_steps is not None:
            allowed &= self.in_a_row[obs.sample_ids] < self.max_cached_steps
        return allowed

    def actions(self, obs: Observation, reuse: torch.Tensor) -> Actions:
        ids = obs.sample_ids
        self.in_a_row[ids] = torch.where(reuse, self.in_a_row[ids] + 1, 0)
        actions = super().actions(obs, reuse)
        actions.order = capped_orders(obs, self.forecast_order)
        return actions
