"""The embedded text-to-image pipeline: MiniLM prompts -> rapid3's sampler loop -> 32x32 RGB images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..accel.actions import Controller
from ..accel.controllers import FullCompute
from ..accel.costs import MeasuredStepCosts, SampleStats
from ..accel.sampler import Sampler, SampleResult
from ..backbones import Conditioning, SD3Backbone
from .model import GUIDANCE_SCALE, SAMPLING_STEPS, embedded_info, load_embedded
from .scenes import IMAGE_SIZE
from .text_encoder import MAX_TOKENS, UNCONDITIONAL_PROMPT, CaptionConditioning, MiniLMTextEncoder, TextEncoder


@dataclass
class EmbeddedOutput:
    """Images as uint8 (B, 32, 32, 3), the final pixel-space latents in [-1, 1], and the cost accounting."""

    images: np.ndarray
    latents: torch.Tensor
    stats: SampleStats


class EmbeddedPipeline:
    """The project's own pixel-space MMDiT, sampled through the one sampler loop.

    ``pipe(prompts)`` is the 28-step CFG sampler every acceleration is measured against; pass a
    ``controller`` (a baseline or a ``RapidPolicy``) to accelerate it.
    """

    def __init__(self, backbone: SD3Backbone, encoder: TextEncoder,
                 conditioning: CaptionConditioning | None = None) -> None:
        self.backbone, self.encoder = backbone, encoder
        self.conditioning = conditioning or CaptionConditioning()  # the plain one: MiniLM's states and their mean

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, encoder: TextEncoder | None = None) -> EmbeddedPipeline:
        """Load the shipped model (or one exported to ``path``) and the MiniLM text encoder (or ``encoder``,
        to share one already loaded), offline."""
        transformer, scheduler = load_embedded(path)
        conditioning = CaptionConditioning.from_info(embedded_info(path))
        return cls(SD3Backbone(transformer, scheduler), encoder or MiniLMTextEncoder(), conditioning)

    def encode(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        """(prompt, unconditional) conditioning; raises ValueError for empty or over-long prompts."""
        for prompt in prompts:
            check_prompt(self.encoder, prompt)
        tokens, pooled = self.conditioning.encode(self.encoder, list(prompts) + [UNCONDITIONAL_PROMPT])
        cond = Conditioning({"encoder_hidden_states": tokens[:-1], "pooled_projections": pooled[:-1]})
        n = len(prompts)
        uncond = Conditioning({"encoder_hidden_states": tokens[-1:].expand(n, -1, -1),
                               "pooled_projections": pooled[-1:].expand(n, -1)})
        return cond, uncond

    def __call__(self, prompts: list[str] | str, *, num_inference_steps: int = SAMPLING_STEPS,
                 guidance_scale: float = GUIDANCE_SCALE, seed: int = 0, controller: Controller | None = None,
                 progress: bool = False) -> EmbeddedOutput:
        """Generate one image per prompt; image i starts from noise seeded ``seed + i``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("Give at least one prompt.")
        result = self.sample(prompts, range(seed, seed + len(prompts)), controller or FullCompute(),
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=progress)
        return EmbeddedOutput(to_uint8(result.latents), result.latents, result.stats)

    def sample(self, prompts: list[str], seeds: Iterable[int], controller: Controller, *, num_inference_steps: int,
               guidance_scale: float, progress: bool = False, keep_trace: bool = False,
               step_costs: MeasuredStepCosts | None = None, solver: str = "euler") -> SampleResult:
        """The sampler loop on ``prompts``, image i from the noise of ``seeds[i]`` alone (a repeated seed
        repeats the noise); ``step_costs``: what equivalent steps count (None: FLOPs); ``solver``: the
        sampler's ("euler", the reference, or "multistep2")."""
        cond, uncond = self.encode(prompts)
        noise = torch.cat([initial_noise(1, seed) for seed in seeds])
        sampler = Sampler(self.backbone, step_cap=num_inference_steps, progress=progress, step_costs=step_costs,
                          solver=solver)
        return sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=guidance_scale,
                              keep_trace=keep_trace)


def initial_noise(batch: int, seed: int) -> torch.Tensor:
    """Noise for a batch where image i is seeded ``seed + i``: an image does not depend on its batch."""
    return torch.stack([torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(batch)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]: the inverse of :func:`to_uint8`."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def check_prompt_text(prompt: str) -> None:
    """Reject a prompt that is not text or is empty (cheap: no encoder needed)."""
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError("The prompt is empty: describe the image, e.g. \"a red circle above a blue square\".")


def check_prompt(encoder: TextEncoder, prompt: str) -> None:
    """Reject prompts the model cannot read: not text, empty, or longer than its token window."""
    check_prompt_text(prompt)
    n_tokens = encoder.count_tokens(prompt)
    if n_tokens > MAX_TOKENS:
        raise ValueError(f"The prompt is {n_tokens} tokens long; the embedded model reads at most {MAX_TOKENS} "
                         f"(e.g. \"a red circle, a blue square and a green triangle\"). Shorten it.")
