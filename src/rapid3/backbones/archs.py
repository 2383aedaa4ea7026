"""Published DiT architectures without their weights: SD3-medium, SD3.5-large and FLUX.1-dev.

Timing and memory do not depend on the weights, so a random-weight transformer with the published
hyper-parameters (the ``transformer/config.json`` of each Hugging Face repository, in diffusers'
own constructor arguments) prices actions as the real model would. On the ``meta`` device a model
is built without allocating anything, which is how parameter counts are checked against the
published sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

from . import backbone_for
from .base import Conditioning
from .flux import FluxBackbone
from .sd3 import SD3Backbone

VAE_SCALE = 8
"""Pixels per latent cell of the SD3 / FLUX VAEs (16 latent channels for both)."""


@dataclass(frozen=True)
class Arch:
    """One published transformer: its diffusers class and config, and the shape of its conditioning.

    ``text_tokens``: joint-attention text tokens of the pipeline's default prompt encoding (SD3:
    77 CLIP + 256 T5; FLUX.1-dev: 512 T5). ``branches``: transformer calls per step (2 with CFG;
    FLUX.1-dev is guidance-distilled, one call). ``scheduler``: the pipeline's scheduler config.
    """

    name: str
    family: str
    config: dict[str, Any]
    text_tokens: int
    branches: int
    scheduler: dict[str, Any] = field(default_factory=dict)
    published_params: float = 0.0

    @property
    def model_class(self) -> type:
        return SD3Transformer2DModel if self.family == "sd3" else FluxTransformer2DModel

    def with_layers(self, layers: int | None) -> dict[str, Any]:
        """The config, with ``layers`` transformer blocks in all (FLUX keeps its 1:2 double:single split)."""
        config = dict(self.config)
        if layers is None:
            return config
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}.")
        if self.family == "sd3":
            config["num_layers"] = layers
        else:
            config["num_layers"] = max(1, round(layers / 3))
            config["num_single_layers"] = max(1, layers - config["num_layers"])
        return config

    def image_tokens(self, resolution: int) -> int:
        """Image tokens at ``resolution``² pixels: latents of resolution / 8, patches of 2x2."""
        if resolution % (2 * VAE_SCALE):
            raise ValueError(f"resolution must be a multiple of {2 * VAE_SCALE}, got {resolution}.")
        return (resolution // (2 * VAE_SCALE)) ** 2


_SD3_SCHEDULER = {"shift": 3.0}
_FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096}

ARCHS: dict[str, Arch] = {a.name: a for a in (
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    Arch("sd3-medium", "sd3", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}, text_tokens=77 + 256, branches=2, scheduler=_SD3_SCHEDULER, published_params=2.0e9),
    # stabilityai/stable-diffusion-3.5-large, transformer/config.json (QK RMS-norm, no dual attention)
    Arch("sd3.5-large", "sd3", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
        "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
        "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}, text_tokens=77 + 256, branches=2, scheduler=_SD3_SCHEDULER,
        published_params=8.1e9),
    # black-forest-labs/FLUX.1-dev, transformer/config.json
    Arch("flux-dev", "flux", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56)}, text_tokens=512, branches=1, scheduler=_FLUX_SCHEDULER,
        published_params=11.9e9),
)}


def get_arch(name: str) -> Arch:
    """The architecture called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in ARCHS:
        raise ValueError(f"Unknown architecture {name!r}; known: {', '.join(ARCHS)}.")
    return ARCHS[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the target dtype: a 12B model built in float32 first
    # would need 48 GB before the cast.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(arch: Arch | str, *, layers: int | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """The architecture's transformer with random weights on ``device`` (``"meta"``: nothing allocated).

    ``layers`` overrides the block count, for small-scale runs of a full-width model.
    """
    arch = get_arch(arch) if isinstance(arch, str) else arch
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = arch.model_class(**arch.with_layers(layers))
    return model.eval().requires_grad_(False)


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def random_arch_setup(arch: Arch | str, *, resolution: int, batch: int = 1, layers: int | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                      ) -> tuple[SD3Backbone | FluxBackbone, torch.Tensor, Conditioning, Conditioning | None]:
    """Backbone, noise, prompt conditioning and (with CFG) negative conditioning of random inputs at
    ``resolution``² pixels, shaped as the architecture's pipeline would feed it."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    transformer = build_transformer(arch, layers=layers, device=device, dtype=dtype, seed=seed)
    backbone = backbone_for(transformer, FlowMatchEulerDiscreteScheduler(**arch.scheduler))
    noise, cond, uncond = random_inputs(backbone, resolution=resolution, text_tokens=arch.text_tokens, batch=batch,
                                        cfg=arch.branches == 2, seed=seed)
    return backbone, noise, cond, uncond


def random_inputs(backbone: SD3Backbone | FluxBackbone, *, resolution: int, text_tokens: int, batch: int = 1,
                  cfg: bool = True, seed: int = 0) -> tuple[torch.Tensor, Conditioning, Conditioning | None]:
    """Noise and random prompt conditioning (and with ``cfg`` a negative one) for ``backbone`` at
    ``resolution``² pixels, on the transformer's device: what its pipeline would pass, minus the meaning."""
    config = backbone.transformer.config
    device = next(backbone.transformer.parameters()).device
    # On meta (shapes only, e.g. counting FLOPs of a full-size model) there is nothing to seed.
    generator = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device)
    side = resolution // VAE_SCALE

    def conditioning() -> Conditioning:
        per_sample = {"encoder_hidden_states": randn(batch, text_tokens, config.joint_attention_dim),
                      "pooled_projections": randn(batch, config.pooled_projection_dim)}
        if backbone.family == "sd3":
            return Conditioning(per_sample)
        if config.guidance_embeds:
            per_sample["guidance"] = torch.full((batch,), 3.5, device=device)
        return Conditioning(per_sample, {"txt_ids": torch.zeros(text_tokens, 3, device=device),
                                         "img_ids": _flux_image_ids(side // 2, device)})

    if backbone.family == "sd3":
        noise = randn(batch, config.in_channels, side, side)
    else:
        noise = randn(batch, (side // 2) ** 2, config.in_channels)
    return noise, conditioning(), conditioning() if cfg else None


def _flux_image_ids(side: int, device: str | torch.device) -> torch.Tensor:
    """FluxPipeline's ``_prepare_latent_image_ids``: (row, column) of each packed token."""
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    return ids.reshape(side * side, 3)
