"""What the sampler loop needs from a DiT: conditioning, a forward on a sub-batch, a time schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class Conditioning:
    """Prompt conditioning for a batch: ``per_sample`` tensors (batch dim first) and ``shared`` ones.

    The tensors are passed as keyword arguments to the transformer, so their names are the
    transformer's own (``encoder_hidden_states``, ``pooled_projections``, FLUX's ``guidance``,
    ``txt_ids`` ...). ``shared`` holds tensors that carry no batch dimension (FLUX's position ids).
    """

    per_sample: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.per_sample.items()}
        if not sizes:
            raise ValueError("Conditioning needs at least one per-sample tensor (e.g. encoder_hidden_states).")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Conditioning tensors disagree on the batch size: {sizes}.")

    def __len__(self) -> int:
        return next(iter(self.per_sample.values())).shape[0]

    def select(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of the samples at ``index`` (a 1-D long tensor)."""
        return Conditioning({k: v[index] for k, v in self.per_sample.items()}, self.shared)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack conditionings along the batch (their ``shared`` tensors must be the same)."""
        names = parts[0].per_sample.keys()
        return Conditioning({k: torch.cat([p.per_sample[k] for p in parts]) for k in names}, parts[0].shared)

    @property
    def pooled(self) -> torch.Tensor:
        """The pooled prompt embedding (B, P): what policies observe of the prompt."""
        return self.per_sample["pooled_projections"]


@dataclass
class BackboneOutput:
    """One transformer run on a sub-batch.

    ``residual`` is the image-stream block-stack residual (last block's output minus the first
    block's input), the quantity Cache-Reuse stores; on a reuse run it is the residual that was given.
    """

    velocity: torch.Tensor
    residual: torch.Tensor
    blocks_run: int
    attention_flops: int


class TimeSchedule:
    """Continuous sampler time ``t`` in [0, 1] and the model's own noise level ``sigma(t)``.

    Controllers decide in ``t`` (before any model-specific shift); ``sigma`` applies the
    scheduler's rule (static shift for SD3, resolution-dependent exponential shift for FLUX), in
    the precision the pipelines use (SD3's scheduler: float64 then float32; FluxPipeline: float32),
    so a uniform schedule reproduces the pipeline's sigmas exactly.
    """

    def __init__(self, *, shift: float = 1.0, mu: float | None = None, grid: str = "scheduler",
                 t_min: float = 1e-3) -> None:
        if grid not in ("scheduler", "flux"):
            raise ValueError(f"Unknown time grid {grid!r}: expected 'scheduler' or 'flux'.")
        self.shift, self.mu, self.grid, self.t_min = shift, mu, grid, t_min

    @classmethod
    def from_scheduler(cls, scheduler, *, image_seq_len: int, grid: str) -> TimeSchedule:
        """Read the shift rule from a diffusers ``FlowMatchEulerDiscreteScheduler``."""
        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        return cls(shift=float(config.get("shift", 1.0)), mu=mu, grid=grid, t_min=float(scheduler.sigma_min))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Model noise level for times ``t`` (float32 out); ``sigma(0) = 0``."""
        if self.mu is not None:  # FluxPipeline shifts float32 times in float32: do the same, bit for bit
            t = t.float()
            sig = math.exp(self.mu) / (math.exp(self.mu) + (1 / t.clamp_min(1e-12) - 1))
        else:
            t = t.double()
            sig = self.shift * t / (1.0 + (self.shift - 1.0) * t)
        return torch.where(t > 0, sig, torch.zeros_like(sig)).float()

    def uniform_times(self, num_steps: int) -> torch.Tensor:
        """The pipeline's own ``num_steps`` grid of times, followed by 0 (float64, length num_steps + 1)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        if self.grid == "flux":  # FluxPipeline: np.linspace(1.0, 1 / n, n)
            times = np.linspace(1.0, 1.0 / num_steps, num_steps)
        else:  # FlowMatchEulerDiscreteScheduler.set_timesteps: linspace(sigma_max, sigma_min) before the shift
            times = np.linspace(1.0, self.t_min, num_steps)
        return torch.from_numpy(np.append(times, 0.0))


@runtime_checkable
class Backbone(Protocol):
    """A frozen DiT the sampler loop can run on any subset of a batch, at per-sample times."""

    family: str
    txt_first: bool

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem if ``latents`` cannot be denoised by this model."""

    def schedule(self, latents: torch.Tensor) -> TimeSchedule:
        """The time schedule for latents of this shape."""

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *, level: int = 0,
                reuse_residual: torch.Tensor | None = None) -> BackboneOutput:
        """Velocity for each row at its own ``sigma``; dense (level 0) or block-sparse attention; or,
        given ``reuse_residual``, every transformer block skipped and that residual added instead."""

    def token_counts(self, latents: torch.Tensor, cond: Conditioning | None) -> tuple[int, int]:
        """(image tokens, text tokens) per row."""

    def row_flops(self, latents: torch.Tensor, cond: Conditioning, *, level: int, reuse: bool) -> tuple[int, int]:
        """(FLOPs outside the attention core, attention-core FLOPs) of one row's forward with that action."""

    def probe(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
              kind: str) -> tuple[torch.Tensor, int]:
        """(feature, blocks run): a cheap feature for threshold-caching controllers
        ("modulated_input", "first_block_residual")."""

    def probe_flops(self, latents: torch.Tensor, cond: Conditioning, kind: str) -> int:
        """FLOPs of one row's ``probe(kind)``."""
