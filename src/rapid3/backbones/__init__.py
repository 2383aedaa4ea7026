"""Backbones: the frozen DiTs the sampler loop drives (one adapter file per DiT family)."""

from __future__ import annotations

import torch

from .base import Backbone, BackboneOutput, Conditioning, TimeSchedule
from .flux import FluxBackbone
from .sd3 import SD3Backbone

ADAPTERS = (SD3Backbone, FluxBackbone)


def backbone_for(transformer: torch.nn.Module, scheduler) -> SD3Backbone | FluxBackbone:
    """Wrap a diffusers transformer in the adapter for its family.

    Raises ``TypeError`` for a transformer class rapid3 has no adapter for.
    """
    for adapter in ADAPTERS:
        if isinstance(transformer, adapter.expected_class):
            return adapter(transformer, scheduler)
    supported = ", ".join(a.expected_class.__name__ for a in ADAPTERS)
    raise TypeError(f"rapid3 has no adapter for {type(transformer).__name__}; supported transformers: {supported}.")


__all__ = ["ADAPTERS", "Backbone", "BackboneOutput", "Conditioning", "FluxBackbone", "SD3Backbone", "TimeSchedule",
           "backbone_for"]
