"""Cost accounting of a sampling run: per sample, what every executed step computed and took."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    embedding and output layers and a sparse step counts its attention saving.
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
