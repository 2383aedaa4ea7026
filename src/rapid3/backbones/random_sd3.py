"""Random-weight SD3-architecture inputs for demos and benchmarks (timing does not depend on weights)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from .base import Conditioning
from .sd3 import SD3Backbone

HEADS, HEAD_DIM, TEXT_TOKENS, TEXT_DIM, PATCH, CHANNELS = 6, 64, 77, 384, 2, 16


def random_sd3_backbone(tokens: int, layers: int, seed: int = 0) -> SD3Backbone:
    """A random-weight SD3 MMDiT (hidden 384 = 6 heads x 64) sized for ``tokens`` image tokens."""
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"The number of image tokens must be a square number (e.g. 256, 1024, 4096); got {tokens}.")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=side * PATCH, patch_size=PATCH, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=TEXT_DIM, pos_embed_max_size=side)
    return SD3Backbone(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))


def random_sd3_setup(tokens: int, layers: int, batch: int, seed: int = 0
                     ) -> tuple[SD3Backbone, torch.Tensor, Conditioning, Conditioning]:
    """Backbone, noise, prompt and negative-prompt conditioning for a batch of random inputs."""
    backbone = random_sd3_backbone(tokens, layers, seed)
    side = int(round(tokens**0.5)) * PATCH
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, CHANNELS, side, side, generator=generator)

    def conditioning() -> Conditioning:
        return Conditioning({"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
                             "pooled_projections": torch.randn(batch, TEXT_DIM, generator=generator)})

    return backbone, noise, conditioning(), conditioning()
