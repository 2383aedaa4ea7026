"""RAPID3's adversarial discriminator: "original (full-compute) sampler" vs "accelerated rollout".

Its probability d_i that a rollout is original joins the reward (r ∝ q + ω·d), which keeps the
policy from gaming the reward model alone. Trained with cross-entropy, alternating with policy
updates::

    disc = ModuleDiscriminator(ImageDiscriminator())
    buffer = ReplayBuffer(capacity=4096, seed=0)
    originals = PositiveCache(generate_full_compute)      # (prompts, seeds) -> images, cached
    ...
    rollouts = ...                                          # the policy's images for prompts, seeds
    d = disc.score(rollouts)                                # reward term, no grad
    buffer.push(rollouts)
    disc.step(originals.get(prompts, seeds), buffer.sample(len(prompts)))

The trainer talks to the :class:`Discriminator` protocol only, so the CLIP-vision-encoder +
adapter discriminator of real pipelines can replace the embedded conv net without touching it;
any module mapping images to logits can already be wrapped by :class:`ModuleDiscriminator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from rapid3.embedded.reward import balanced_bce, check_images
from rapid3.embedded.scenes import IMAGE_SIZE


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


class ReplayBuffer:
    """The latest ``capacity`` negative images (FIFO), sampled uniformly with a seeded generator.

    Images are stored detached, on CPU, in the dtype pushed. Mixing older rollouts into each
    discriminator step keeps it from forgetting what the policy did a few updates ago.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}.")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self._images: Tensor | None = None  # ring storage, allocated on the first push
        self._next = 0  # slot the next image goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, images: Tensor) -> None:
        """Add images (B, ...); once full, each new image replaces the oldest."""
        images = images.detach().cpu()[-self.capacity:]  # more than capacity at once: only the newest stay
        if self._images is None:
            self._images = images.new_empty((self.capacity, *images.shape[1:]))
        elif images.shape[1:] != self._images.shape[1:]:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} pushed into a buffer of "
                             f"{tuple(self._images.shape[1:])}.")
        slots = (self._next + torch.arange(len(images))) % self.capacity
        self._images[slots] = images.to(self._images.dtype)
        self._next = (self._next + len(images)) % self.capacity
        self._size = min(self.capacity, self._size + len(images))

    def contents(self) -> Tensor:
        """All stored images, oldest first."""
        if self._images is None:
            raise ValueError("the replay buffer is empty.")
        start = (self._next - self._size) % self.capacity
        return self._images[(start + torch.arange(self._size)) % self.capacity]

    def sample(self, n: int) -> Tensor:
        """``min(n, len(self))`` distinct stored images, uniformly at random."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer; push rollouts first.")
        picked = torch.randperm(self._size, generator=self.generator)[:n]
        return self.contents()[picked]

    def state_dict(self) -> dict[str, Any]:
        """Capacity, the images (oldest first) and the sampling RNG."""
        return {"capacity": self.capacity, "images": self.contents() if self._size else None,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the capacity must match)."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"state is for capacity {state['capacity']}, this buffer holds {self.capacity}.")
        self._images, self._next, self._size = None, 0, 0
        if state["images"] is not None:
            self.push(state["images"])
        self.generator.set_state(state["generator"])


class PositiveCache:
    """Full-compute images per (prompt, seed), generated on first request and kept.

    ``generate(prompts, seeds)`` must return one image per pair, image i depending only on
    ``(prompts[i], seeds[i])``; GRPO revisits the same prompt and noise, so each original is
    sampled once.
    """

    def __init__(self, generate: Callable[[list[str], list[int]], Tensor]) -> None:
        self.generate = generate
        self._images: dict[tuple[str, int], Tensor] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, prompts: list[str], seeds: list[int]) -> Tensor:
        """Images (B, ...) for the pairs, generating the missing ones in one call."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt.")
        keys = list(zip(prompts, seeds))
        missing = list(dict.fromkeys(k for k in keys if k not in self._images))
        if missing:
            images = self.generate([p for p, _ in missing], [s for _, s in missing])
            self._images.update(zip(missing, images.detach().cpu()))
        return torch.stack([self._images[k] for k in keys])
