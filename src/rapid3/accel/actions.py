"""The controller interface: what a controller sees each step and what it decides, per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..backbones.base import TimeSchedule
from .cache import cache_mode


@dataclass
class Observation:
    """The denoising state of the samples still running (row i is sample ``sample_ids[i]``).

    ``refresh_delta`` is the latent change since the sample's last full computation (X_t - X_tc,
    what Cache-Reuse watches; zeros before the first one), ``last_velocity`` the last
    guidance-combined model output, ``spent`` the equivalent steps used so far.
    ``probe(kind)`` runs a cheap backbone probe on these rows (prompt branch) — e.g. TeaCache's
    "modulated_input" — whose FLOPs and time are charged to the samples like any other compute.
    ``cache_depth`` is how many full computations each sample's residual cache holds (a forecast of
    order k needs k + 1); None where the observation predates forecasts: ``has_cache`` as 0 or 1.
    """

    sample_ids: torch.Tensor
    latents: torch.Tensor
    t: torch.Tensor
    sigma: torch.Tensor
    step_index: torch.Tensor
    refresh_delta: torch.Tensor
    last_velocity: torch.Tensor
    has_cache: torch.Tensor
    spent: torch.Tensor
    pooled: torch.Tensor
    step_cap: int
    schedule: TimeSchedule
    probe: Callable[[str], torch.Tensor]
    cache_depth: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sample_ids.shape[0]

    def forecast_orders(self) -> torch.Tensor:
        """The highest forecast order each row's cache supports (-1: no cache yet, 0: reuse only)."""
        depth = self.has_cache.long() if self.cache_depth is None else self.cache_depth
        return depth - 1


@dataclass
class Actions:
    """Per-sample decisions for one step.

    ``next_t``: the time to step to (Step-Skip; 0 ends the sample). ``reuse``: skip every block and
    take the block-stack residual from the cache (Cache-Reuse). ``order``: what a cache step makes of
    the cache, per sample — 0 the last residual as it is, 1 or 2 its forecast of that order
    (``rapid3.accel.cache``); None is order 0 everywhere, and it is ignored where ``reuse`` is False.
    ``level``: attention sparsity, 0 dense (Sparse-Attention; ignored on cache steps).
    ``log_prob``: the log-probability of these actions, for learning controllers.
    ``step_ratio``: a learning controller's raw Step-Skip action that ``next_t`` was derived from
    (kept because the last step's ``next_t = 0`` no longer tells which ratio was drawn).
    """

    next_t: torch.Tensor
    reuse: torch.Tensor
    level: torch.Tensor
    log_prob: torch.Tensor | None = None
    step_ratio: torch.Tensor | None = None
    order: torch.Tensor | None = None

    @property
    def mode(self) -> torch.Tensor:
        """Per sample, the index into ``rapid3.accel.cache.CACHE_MODES`` (recompute, reuse, forecast1, ...)."""
        return cache_mode(self.reuse, self.order)


@runtime_checkable
class Controller(Protocol):
    """Decides, each step, what every running sample does. Baselines and learned policies alike.

    A controller that forecasts sets an attribute ``forecast_order`` (the highest order it asks for),
    so that the sampler keeps ``forecast_order + 1`` residuals per sample; without it, one.
    """

    def reset(self, batch_size: int) -> None:
        """Called once before a batch is sampled (controllers with per-sample memory clear it here)."""

    def decide(self, obs: Observation) -> Actions:
        """Actions for the rows of ``obs``."""


STEP_SCHEDULES = ("grid", "geometric")
"""How Step-Skip's ratio sets the next time: ``next_time_on_grid`` or ``next_time_from_ratio``."""


def check_step_schedule(name: str) -> None:
    """ValueError unless ``name`` is one of ``STEP_SCHEDULES``."""
    if name not in STEP_SCHEDULES:
        raise ValueError(f"step_schedule must be one of {', '.join(STEP_SCHEDULES)}; got {name!r}.")


def next_time_from_ratio(t: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Geometric Step-Skip (the paper's): the next time is ``t * ratio``, the ratio strictly inside (0, 1)."""
    return t.double() * _check_ratio(ratio)


def next_time_on_grid(t: torch.Tensor, ratio: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Grid-relative Step-Skip: from ``t``, advance ``1 / ratio`` intervals of the reference ``grid``.

    ``grid`` is the reference sampler's decreasing times ending at 0 (``TimeSchedule.uniform_times``);
    positions between its points are linear in t. A ratio near 1 takes one interval, so "no skip"
    is the reference schedule itself; 0.5 takes two, and so on. Past the grid's end, the sample ends (0).
    """
    grid = grid.double().to(t.device)
    intervals = len(grid) - 1
    positions = torch.arange(intervals + 1, dtype=torch.float64, device=t.device)
    target = _interpolate(t.double(), grid.flip(0), positions.flip(0)) + 1 / _check_ratio(ratio).to(t.device)
    return torch.where(target < intervals, _interpolate(target, positions, grid), torch.zeros_like(target))


def _check_ratio(ratio: torch.Tensor) -> torch.Tensor:
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    if not bool(((ratio > 0) & (ratio < 1)).all()):
        bad = ratio[(ratio <= 0) | (ratio >= 1)]
        raise ValueError(f"A Step-Skip ratio must lie strictly inside (0, 1); got {bad.tolist()}.")
    return ratio


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing ``xp``: piecewise-linear, exact at the points, clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    right = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[right - 1], xp[right]
    return fp[right - 1] + (x - x0) / (x1 - x0) * (fp[right] - fp[right - 1])
