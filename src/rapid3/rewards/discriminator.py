"""RAPID3's adversarial discriminator: "original (full-compute) sampler" vs "accelerated rollout".

Its probability d_i that a rollout is original joins the reward (r ∝ q + ω·d), which keeps the
policy from gaming the reward model alone. Trained with cross-entropy, alternating with policy
updates::

    disc = ModuleDiscriminator(ImageDiscriminator())
    d = disc.score(rollouts)                  # reward term, no grad
    disc.step(full_compute_images, rollouts)  # the trainer draws both from replay buffers (train/replay.py)

The trainer talks to the :class:`Discriminator` protocol only, so the CLIP-vision-encoder +
adapter discriminator of real pipelines can replace the embedded conv net without touching it;
any module mapping images to logits can already be wrapped by :class:`ModuleDiscriminator`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from rapid3.embedded.scenes import IMAGE_SIZE
from rapid3.rewards.shared import balanced_bce, check_images


@runtime_checkable
class Discriminator(Protocol):
    """What the GRPO trainer needs from a discriminator."""

    def score(self, images: Tensor) -> Tensor:
        """Probability (B,) in [0, 1] that each image comes from the full-compute sampler; no grad."""
        ...

    def step(self, positives: Tensor, negatives: Tensor) -> dict[str, float]:
        """One update on full-compute ``positives`` and accelerated ``negatives``; returns ``loss`` and ``acc``."""
        ...


class ImageDiscriminator(ModelMixin, ConfigMixin):
    """Small conv net on (B, 3, S, S) images in [-1, 1] -> logit (B,) of "from the full-compute sampler".

    Strided conv stages halve the resolution; global average pooling at the end, since what
    separates accelerated from original samples (blur, noise, colour drift) is everywhere in the
    image rather than at a place. No normalisation layers: per-sample normalisation would divide
    out the feature energy that tells a noisy or blurred image from a clean one.
    """

    @register_to_config
    def __init__(self, image_size: int = IMAGE_SIZE, channels: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for a, b in zip(channels, channels[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B,)."""
        check_images(images, self.config.image_size)
        return self.head(self.features(images)).squeeze(1)


def discriminator_step(disc: nn.Module, optimizer: torch.optim.Optimizer, positives: Tensor,
                       negatives: Tensor) -> dict[str, float]:
    """One optimizer step of binary cross-entropy: positives (original) -> 1, negatives (accelerated) -> 0.

    The two classes are weighted equally whatever their batch sizes, so an imbalanced call does
    not bias the discriminator; ``acc`` is the class-balanced accuracy before the step.
    """
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"need at least one positive and one negative, got {len(positives)} and {len(negatives)}.")
    if positives.shape[1:] != negatives.shape[1:]:
        raise ValueError(f"positives {tuple(positives.shape)} and negatives {tuple(negatives.shape)} differ in "
                         "image shape.")
    disc.train()
    logits = disc(torch.cat([positives, negatives]))
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).to(logits.device)
    loss = balanced_bce(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    pos, neg = logits[:len(positives)], logits[len(positives):]
    acc = 0.5 * ((pos > 0).float().mean() + (neg <= 0).float().mean())
    return {"loss": loss.item(), "acc": acc.item()}


@torch.no_grad()
def discriminator_score(disc: nn.Module, images: Tensor) -> Tensor:
    """Probability (B,) in [0, 1] that each image is from the full-compute sampler (eval mode, no grad)."""
    was_training = disc.training
    disc.eval()
    scores = torch.sigmoid(disc(images))
    disc.train(was_training)
    return scores


class ModuleDiscriminator:
    """A :class:`Discriminator` from any module mapping images to logits, with its own AdamW."""

    def __init__(self, module: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0) -> None:
        self.module = module
        # Only trainable parameters: a frozen backbone (e.g. a CLIP encoder under an adapter) stays frozen.
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)

    def score(self, images: Tensor) -> Tensor:
        """See :meth:`Discriminator.score`."""
        return discriminator_score(self.module, images)

    def step(self, positives: Tensor, negatives: Tensor) -> dict[str, float]:
        """See :meth:`Discriminator.step`."""
        return discriminator_step(self.module, self.optimizer, positives, negatives)

    def state_dict(self) -> dict[str, Any]:
        """Module and optimizer state, for the trainer's checkpoint."""
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
