"""The reward of one image: RAPID3's compute-discounted score of a quality term q, a discriminator term d and
(ours, optional) a fidelity term f, each in [0, 1].

    r = (q + omega * d + psi * f) * (1 - lam^K) / (K * (1 - lam))

The models behind q and d are the world's (``rapid3.worlds``): the embedded reward model or a CLIP score,
the conv or CLIP-adapter discriminator. Every function here is free of training state, so the trainer,
its held-out evaluation and the ablation compose rewards the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .discriminator import Discriminator
from .metrics import ssim_tensor


class QualityModel(Protocol):
    """The quality term q of the reward (ImageReward's role; a CLIP score for real pipelines)."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Quality (B,) in [0, 1] of each image (B, 3, H, W) in [-1, 1] for its prompt; no grad."""


def image_rewards(images: Tensor, prompts: list[str], equivalent_steps: Tensor, quality: QualityModel | None,
                  disc: Discriminator | None, *, lam: float, omega: float, fidelities: Tensor | None = None,
                  psi: float = 0.0) -> dict[str, Tensor]:
    """Per image: ``quality`` q, ``disc`` d, ``fidelity`` f (given: :func:`fidelity` to the full-compute
    image from the same noise), 0 for an absent term, and the discounted ``reward`` r."""
    absent = torch.zeros(len(images), dtype=torch.float64)
    q = absent if quality is None else quality.score(images, prompts).double().cpu()
    d = absent if disc is None else disc.score(images).double().cpu()
    f = absent if fidelities is None else fidelities
    return {"quality": q, "disc": d, "fidelity": f,
            "reward": discounted_reward(q, d, equivalent_steps, lam=lam, omega=omega, fidelity=f, psi=psi)}


def fidelity(images: Tensor, reference: Tensor) -> Tensor:
    """SSIM (B,) float64 of images in [-1, 1] to their references, clipped to [0, 1] (a reward term must
    not be negative: the discount would then reward spending more)."""
    to_unit = lambda x: (x.double().cpu() + 1) / 2  # noqa: E731  (SSIM's luminance term needs intensities >= 0)
    return ssim_tensor(to_unit(images), to_unit(reference), data_range=1.0).clamp(0, 1)


def discounted_reward(quality: torch.Tensor | float, disc: torch.Tensor | float,
                      equivalent_steps: torch.Tensor | float, *, lam: float, omega: float,
                      fidelity: torch.Tensor | float = 0.0, psi: float = 0.0) -> torch.Tensor:
    """RAPID3's reward r = (1/K) sum_{k=1..K} lam^(K-k) s = s (1 - lam^K) / (K (1 - lam)) with the score
    s = q + omega d (+ psi f, our fidelity term: the image's similarity to full compute from the same noise).

    The closed form is used, so K (equivalent steps) may be fractional. For s > 0 the reward falls
    as K grows, which is what makes the policy spend less; keep q, d and f non-negative.

    Raises:
        ValueError: unless 0 < lam < 1, omega >= 0, psi >= 0 and every K > 0.
    """
    if not 0 < lam < 1:
        raise ValueError(f"lam (the compute discount) must lie strictly inside (0, 1), got {lam}.")
    if omega < 0 or psi < 0:
        raise ValueError(f"omega and psi (the discriminator and fidelity weights) must be >= 0, got {omega}, {psi}.")
    k = torch.as_tensor(equivalent_steps, dtype=torch.float64)
    if not bool((k > 0).all()):
        raise ValueError(f"equivalent_steps must be positive, got {k.min().item()}.")
    score = (torch.as_tensor(quality, dtype=torch.float64) + omega * torch.as_tensor(disc, dtype=torch.float64)
             + psi * torch.as_tensor(fidelity, dtype=torch.float64))
    return score * (1 - lam**k) / (k * (1 - lam))
