"""FirstBlockCache-style threshold caching (ParaAttention's First Block Cache, as in diffusers'
``apply_first_block_cache``) as a controller on the pipeline's uniform grid.

Each step the first block's residual (its output minus its input) is probed
(``obs.probe("first_block_residual")``, charged to the sample). If its relative L1 change from the
residual seen at the sample's last full computation is below ``threshold``, the step reuses the
cached block-stack residual; otherwise it recomputes and that residual becomes the new reference.
As in diffusers, the reference moves only on recomputation, so slow drift still triggers one.

One difference from diffusers' hook, forced by the sampler's probe-then-act order: a recomputed
step runs the first block again (the probe's output is not carried into the full forward), so it
costs one block of one guidance branch more; the probe is charged, so K and FLOPs include it.
"""

from __future__ import annotations

import torch

from ..accel.actions import Actions, Observation
from ..accel.controllers import UniformSteps
from .teacache import relative_l1


class FirstBlockCache(UniformSteps):
    """Reuse the cached residual while the first block's residual has changed by less than
    ``threshold`` (relative L1) since the sample's last full computation."""

    def __init__(self, threshold: float, num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}.")
        self.threshold = float(threshold)
        self.reference: torch.Tensor | None = None  # first-block residual at each sample's last recompute
        self.batch_size = 0

    def reset(self, batch_size: int) -> None:
        self.reference = None
        self.batch_size = batch_size

    def decide(self, obs: Observation) -> Actions:
        residual = obs.probe("first_block_residual")
        ids = obs.sample_ids
        if self.reference is None:
            self.reference = residual.new_zeros((self.batch_size, *residual.shape[1:]))
        cached = obs.has_cache  # a sample with a cache has a reference: both are set on recompute
        reuse = torch.zeros(len(obs), dtype=torch.bool)
        if bool(cached.any()):
            reuse[cached] = relative_l1(residual[cached], self.reference[ids[cached]]) < self.threshold
        self.reference[ids[~reuse]] = residual[~reuse]
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long))
