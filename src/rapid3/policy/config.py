"""The policy's knobs that a training run chooses, defined once: ``RapidPolicy`` takes its defaults from
here and ``rapid3.train.config.TrainConfig`` has these fields (same names, flags and YAML keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..accel.actions import check_step_schedule
from ..common.knobs import knob

PROBABILITIES = ("init_ratio", "init_reuse_prob", "init_dense_prob")
"""Knobs that must lie strictly inside (0, 1)."""


@dataclass(frozen=True)
class PolicyConfig:
    """RapidPolicy's trunk width, which heads it learns, how Step-Skip's ratio sets the next time, and the
    fresh policy's action distribution (see ``rapid_policy``'s module docstring)."""

    hidden_dim: int = knob(64, "width of the policy's shared trunk")
    step_skip: bool = knob(True, "learn the Step-Skip head (else the uniform grid of step_cap steps)")
    cache_reuse: bool = knob(True, "learn the Cache-Reuse head (else always recompute)")
    sparse_attention: bool = knob(True, "learn the Sparse-Attention head (else always dense)")
    step_schedule: str = knob("grid", "Step-Skip's ratio a: 'grid' advances 1/a intervals of the step_cap-step "
                                      "reference grid (a -> 1: no skip); 'geometric' (the paper's) steps to a * t")
    init_ratio: float = knob(0.85, "fresh Step-Skip Beta's mode (grid: about step_cap * 0.85 steps)")
    init_concentration: float = knob(20.0, "fresh Step-Skip Beta's alpha + beta - 2 (higher: less exploration)")
    init_reuse_prob: float = knob(0.2, "fresh Cache-Reuse probability of reusing when a cache exists")
    init_dense_prob: float = knob(0.7, "fresh Sparse-Attention probability of dense attention")

    def __post_init__(self) -> None:
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}.")
        check_step_schedule(self.step_schedule)
        for name in PROBABILITIES:
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie strictly inside (0, 1), got {getattr(self, name)}.")
        if self.init_concentration <= 0:
            raise ValueError(f"init_concentration must be positive, got {self.init_concentration}.")

    @staticmethod
    def names() -> tuple[str, ...]:
        """The knobs' names, in order (a subclass's own fields left out)."""
        return tuple(f.name for f in dataclasses.fields(PolicyConfig))

    def policy_kwargs(self) -> dict[str, Any]:
        """``RapidPolicy`` arguments set by this config."""
        return {name: getattr(self, name) for name in PolicyConfig.names()}
