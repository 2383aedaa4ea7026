"""Cost accounting of a sampling run: per sample, what every executed step computed and took."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


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
    """

    relative: dict[tuple[bool, int], float]

    def of(self, reuse: bool, level: int) -> float:
        return self.relative[(bool(reuse), int(level))]

    def to_rows(self) -> list[list[float]]:
        """[reuse, level, relative cost] rows: plain numbers, for a ``weights_only`` checkpoint."""
        return [[float(reuse), float(level), cost] for (reuse, level), cost in self.relative.items()]

    @classmethod
    def from_rows(cls, rows: list[list[float]]) -> MeasuredStepCosts:
        """Inverse of :meth:`to_rows`."""
        return cls({(bool(reuse), int(level)): float(cost) for reuse, level, cost in rows})


def interleaved_medians(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per runner; each round runs every runner once, after one warm-up round,
    so machine drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(repeats + 1):
        for name, run in runners.items():
            tic = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def measure_step_costs(backbone, latents: torch.Tensor, cond, *, repeats: int = 5) -> MeasuredStepCosts:
    """Time one forward of ``latents`` (all rows) per action, interleaved; ratios to the full step."""
    from ..backbones.sparse_attention import NUM_SPARSE_LEVELS

    sigma = torch.full((latents.shape[0],), 0.5)
    residual = backbone.forward(latents, sigma, cond).residual
    actions = [(False, level) for level in range(NUM_SPARSE_LEVELS + 1)] + [(True, 0)]
    runners = {action: (lambda a=action: backbone.forward(latents, sigma, cond, level=a[1],
                                                          reuse_residual=residual if a[0] else None))
               for action in actions}
    medians = interleaved_medians(runners, repeats)
    return MeasuredStepCosts({action: medians[action] / medians[(False, 0)] for action in actions})
