"""Cost accounting of a sampling run: per sample, what every executed step computed and took."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import CACHE_MODES, MAX_FORECAST_ORDER, ResidualCache


@dataclass(frozen=True)
class StepRecord:
    """One executed step of one sample."""

    t: float
    next_t: float
    reuse: bool
    level: int
    blocks: int
    flops: float
    attention_flops: float
    equivalent_steps: float
    seconds: float
    order: int = 0
    """Forecast order of a cache step (0: the cached residual as it is); 0 on recompute."""

    @property
    def mode(self) -> str:
        """The step's cache mode: "recompute", "reuse", "forecast1" or "forecast2"."""
        return CACHE_MODES[self.reuse * (1 + self.order)]


@dataclass
class SampleStats:
    """Per-sample totals (tensors of shape (B,)) and the step-by-step records.

    ``equivalent_steps`` is RAPID3's K: each step counts its FLOPs over those of a dense
    full-compute step of the same image (all guidance branches), so a reuse step counts only its
    embedding and output layers and a sparse step counts its attention saving — or, when the
    sampler is given ``MeasuredStepCosts``, the action's measured time over a full step's.
    ``seconds`` splits each sub-batch's wall-clock evenly among the samples it carried, plus each
    sample's share of the controller's decision time (also in ``controller_seconds``).
    """

    full_step_flops: float
    steps: torch.Tensor
    blocks: torch.Tensor
    flops: torch.Tensor
    attention_flops: torch.Tensor
    equivalent_steps: torch.Tensor
    seconds: torch.Tensor
    controller_seconds: torch.Tensor
    records: list[list[StepRecord]] = field(repr=False)

    @classmethod
    def empty(cls, batch_size: int, full_step_flops: float) -> SampleStats:
        zeros = lambda dtype: torch.zeros(batch_size, dtype=dtype)  # noqa: E731
        return cls(full_step_flops, zeros(torch.long), zeros(torch.long), zeros(torch.float64),
                   zeros(torch.float64), zeros(torch.float64), zeros(torch.float64), zeros(torch.float64),
                   [[] for _ in range(batch_size)])

    def add(self, sample: int, record: StepRecord) -> None:
        self.records[sample].append(record)
        self.steps[sample] += 1
        self.blocks[sample] += record.blocks
        self.flops[sample] += record.flops
        self.attention_flops[sample] += record.attention_flops
        self.equivalent_steps[sample] += record.equivalent_steps
        self.seconds[sample] += record.seconds

    def summary(self) -> dict[str, float]:
        """Batch means, as plain floats (for logs and JSON)."""
        return {
            "steps": self.steps.double().mean().item(),
            "blocks": self.blocks.double().mean().item(),
            "equivalent_steps": self.equivalent_steps.mean().item(),
            "tflops": self.flops.mean().item() / 1e12,
            "attention_tflops": self.attention_flops.mean().item() / 1e12,
            "seconds": self.seconds.mean().item(),
            "controller_seconds": self.controller_seconds.mean().item(),
        }


@dataclass(frozen=True)
class MeasuredStepCosts:
    """Wall-clock cost of each action relative to a dense full step, measured on one backbone.

    Equivalent steps K count FLOPs by default. Where FLOPs and time disagree — block-sparse
    attention on a CPU at a few hundred tokens saves FLOPs but costs time — pass these to the
    ``Sampler`` so that K, and every reward computed from it, counts what the hardware pays.
    ``relative`` is keyed by (reuse, level); ``forecast`` by forecast order (a cache step of that order).
    """

    relative: dict[tuple[bool, int], float]
    forecast: dict[int, float] = field(default_factory=dict)

    def of(self, reuse: bool, level: int, order: int = 0) -> float:
        """The relative cost of a step with this action (``order`` > 0: a forecast cache step)."""
        if reuse and order:
            if order not in self.forecast:
                raise ValueError(f"These step costs hold no forecast of order {order} (measured before forecasts "
                                 "existed?): measure them again with measure_step_costs.")
            return self.forecast[order]
        return self.relative[(bool(reuse), int(level))]

    def to_rows(self) -> list[list[float]]:
        """[reuse, level, relative cost] rows, then [1, 0, cost, order] per forecast order: plain numbers,
        for a ``weights_only`` checkpoint."""
        rows = [[float(reuse), float(level), cost] for (reuse, level), cost in self.relative.items()]
        return rows + [[1.0, 0.0, cost, float(order)] for order, cost in self.forecast.items()]

    @classmethod
    def from_rows(cls, rows: list[list[float]]) -> MeasuredStepCosts:
        """Inverse of :meth:`to_rows`."""
        relative = {(bool(row[0]), int(row[1])): float(row[2]) for row in rows if len(row) == 3}
        return cls(relative, {int(row[3]): float(row[2]) for row in rows if len(row) == 4})


def interleaved_times(runners: dict[Any, Callable[[], object]], repeats: int) -> dict[Any, list[float]]:
    """Seconds of each runner per round; each round runs every runner once, after one warm-up round (which
    also compiles), so machine drift hits all of them alike."""
    times: dict[Any, list[float]] = {name: [] for name in runners}
    for round_index in range(repeats + 1):
        for name, run in runners.items():
            tic = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - tic)
    return times


def interleaved_medians(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per runner of :func:`interleaved_times`."""
    return {name: statistics.median(t) for name, t in interleaved_times(runners, repeats).items()}


@torch.no_grad()
def measure_step_costs(backbone, latents: torch.Tensor, cond, *, repeats: int = 5) -> MeasuredStepCosts:
    """Time one forward of ``latents`` (all rows) per action, interleaved; ratios to the full step.
    A forecast of order k is timed with its extrapolation from k + 1 cached residuals, as the sampler runs it."""
    from ..backbones.sparse_attention import NUM_SPARSE_LEVELS

    sigma = torch.full((latents.shape[0],), 0.5)
    cache = ResidualCache(latents.shape[0], 1, depth=MAX_FORECAST_ORDER + 1)
    everyone = torch.arange(latents.shape[0])
    for step in range(MAX_FORECAST_ORDER + 1):  # a history at distinct noise levels, as a run leaves it
        cache.store(everyone, backbone.forward(latents, sigma + 0.1 * step, cond).residual, sigma + 0.1 * step)

    def run(reuse: bool, level: int, order: int) -> object:
        residual = cache.rows(everyone, sigma - 0.1, order) if reuse else None
        return backbone.forward(latents, sigma, cond, level=level, reuse_residual=residual)

    actions = ([(False, level, 0) for level in range(NUM_SPARSE_LEVELS + 1)]
               + [(True, 0, order) for order in range(MAX_FORECAST_ORDER + 1)])
    medians = interleaved_medians({action: (lambda a=action: run(*a)) for action in actions}, repeats)
    full = medians[(False, 0, 0)]
    return MeasuredStepCosts({(reuse, level): medians[(reuse, level, 0)] / full for reuse, level, order in actions
                              if order == 0},
                             {order: medians[(True, 0, order)] / full for _, _, order in actions if order})
