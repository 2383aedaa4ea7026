"""What the image scorers share: the check of their image input and the class-balanced loss they train with
(the embedded reward model, :mod:`rapid3.rewards.embedded_reward`, and the discriminator)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def check_images(images: Tensor, size: int) -> None:
    """Raise ValueError unless ``images`` is a float tensor (B, 3, size, size) with B >= 1."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        got = f"a {images.dtype} tensor" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, 3, {size}, {size}) in [-1, 1], got {got}.")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or images.shape[0] == 0:
        raise ValueError(f"images must be (B, 3, {size}, {size}) with B >= 1, got {tuple(images.shape)}.")


def balanced_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy with positives and negatives weighted equally, whatever their numbers."""
    positive = labels > 0.5
    if positive.all() or not positive.any():
        raise ValueError("balanced_bce needs at least one positive and one negative.")
    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return 0.5 * (losses[positive].mean() + losses[~positive].mean())

