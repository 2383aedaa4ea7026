"""Reward models for real pipelines: ``CLIPScore`` (the quality term q) and ``CLIPAdapterDiscriminator``
(the adversarial term d: a frozen CLIP vision tower under a small trainable adapter). The embedded
world's own reward model lives in ``rapid3.embedded.reward``."""

from .clip import CLIPAdapter, CLIPAdapterDiscriminator, CLIPPixels, CLIPScore, load_clip_vision

__all__ = ["CLIPAdapter", "CLIPAdapterDiscriminator", "CLIPPixels", "CLIPScore", "load_clip_vision"]
