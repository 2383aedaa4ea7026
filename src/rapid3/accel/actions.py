"""The controller interface: what a controller sees each step and what it decides, per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..backbones.base import TimeSchedule


@dataclass
class Observation:
    """The denoising state of the samples still running (row i is sample ``sample_ids[i]``).

    ``refresh_delta`` is the latent change since the sample's last full computation (X_t - X_tc,
    what Cache-Reuse watches; zeros before the first one), ``last_velocity`` the last
    guidance-combined model output, ``spent`` the equivalent steps used so far.
    ``probe(kind)`` runs a cheap backbone probe on these rows (prompt branch) — e.g. TeaCache's
    "modulated_input" — whose FLOPs and time are charged to the samples like any other compute.
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

    def __len__(self) -> int:
        return self.sample_ids.shape[0]


@dataclass
class Actions:
    """Per-sample decisions for one step.

    ``next_t``: the time to step to (Step-Skip; 0 ends the sample). ``reuse``: skip every block and
    reuse the cached residual (Cache-Reuse). ``level``: attention sparsity, 0 dense (Sparse-Attention;
    ignored on reuse). ``log_prob``: the log-probability of these actions, for learning controllers.
    """

    next_t: torch.Tensor
    reuse: torch.Tensor
    level: torch.Tensor
    log_prob: torch.Tensor | None = None


@runtime_checkable
class Controller(Protocol):
    """Decides, each step, what every running sample does. Baselines and learned policies alike."""

    def reset(self, batch_size: int) -> None:
        """Called once before a batch is sampled (controllers with per-sample memory clear it here)."""

    def decide(self, obs: Observation) -> Actions:
        """Actions for the rows of ``obs``."""


def next_time_from_ratio(t: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Step-Skip: the next time is ``t * ratio`` with the ratio strictly inside (0, 1)."""
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    if not bool(((ratio > 0) & (ratio < 1)).all()):
        bad = ratio[(ratio <= 0) | (ratio >= 1)]
        raise ValueError(f"A Step-Skip ratio must lie strictly inside (0, 1); got {bad.tolist()}.")
    return t.double() * ratio
