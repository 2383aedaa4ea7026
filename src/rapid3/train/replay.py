"""The discriminator's replay buffers: the latest full-compute and rollout images, part of a run's state."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
