"""What the rest of rapid3 codes against, whichever world the images come from.

A *world* is where images come from and how they are judged: the embedded model with its learned
reward model, conv discriminator, scene grammar and deterministic checker (``worlds.embedded``), or a
diffusers SD3 / FLUX pipeline with CLIP rewards and prompt files (``worlds.pipeline``). Each world's
module builds an :class:`ImageWorld` from a :class:`WorldConfig`; the trainer, ``rapid3 generate``,
``rapid3 bench`` and the ablation use only what is here, so none of them branches on the world.

Image i of a ``Generator.sample`` call always starts from the noise of ``seeds[i]`` alone, so repeating
a seed repeats the noise (a GRPO group) and an image does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from ..accel.actions import Actions, Controller, Observation
from ..accel.costs import MeasuredStepCosts, SampleStats
from ..backbones.diffusers_dit import DiffusersDiT
from ..rewards.composite import QualityModel
from ..rewards.discriminator import ModuleDiscriminator


@dataclass(frozen=True)
class WorldConfig:
    """Which world to build and the knobs that build it (``rapid3 train``'s ``TrainConfig.world_config()``,
    or ``rapid3 generate`` / ``bench``'s flags). ``pipeline`` set: a diffusers pipeline; else the embedded model."""

    model: str | None = None
    """Exported embedded model folder (None: the one shipped in the package)."""
    pipeline: str | None = None
    """A diffusers StableDiffusion3Pipeline / FluxPipeline: local folder or Hub id."""
    device: str | None = None
    dtype: str | None = None
    height: int | None = None
    width: int | None = None
    image_size: int | None = None
    """Pipeline: shorter side of the images handed to the reward models (None: as decoded)."""
    prompt_file: str | None = None
    """Pipeline: training prompts (.txt or .jsonl)."""
    eval_prompt_file: str | None = None
    """Pipeline: held-out prompts (None: ``eval_prompts`` set aside from ``prompt_file``)."""
    eval_prompts: int = 64
    """How many held-out prompts the world provides."""
    reward_model: str | None = None
    """Embedded: a reward model export (None: the shipped one); pipeline: the CLIPModel of the CLIP score."""
    disc_model: str | None = None
    """Pipeline: the CLIP whose frozen vision tower carries the discriminator's adapter (None: reward_model)."""
    disc_width: int = 32
    """Embedded: channels of the conv discriminator's first stage; pipeline: the CLIP adapter's hidden width."""
    disc_lr: float = 3e-4
    quality: bool = False
    """Build the quality model q."""
    discriminator: bool = False
    """Build the discriminator d."""


@dataclass
class Generation:
    """Images (B, 3, H, W) float32 in [-1, 1], per-image cost accounting, the (observation, actions)
    of every step when a trace was asked for, and the batch's denoising wall-clock in seconds."""

    images: Tensor
    stats: SampleStats
    trace: list[tuple[Observation, Actions]] = field(repr=False)
    seconds: float


class Checker(Protocol):
    """A trustworthy, non-learned check of images against their prompts (evaluation only, never a reward)."""

    def accuracy(self, images: Tensor, prompts: list[str]) -> float:
        """Fraction of images (B, 3, H, W) in [-1, 1] that show everything their prompt asks for."""

    def complexity(self, prompts: list[str]) -> list[int]:
        """A difficulty level per prompt, to see whether the policy spends more on harder prompts."""


@runtime_checkable
class Generator(Protocol):
    """Text-to-image sampling through rapid3's sampler loop."""

    backbone: DiffusersDiT
    """The backbone adapter the sampler drives (what ``RapidPolicy.for_backbone`` shapes a policy for)."""
    checker: Checker | None
    """The world's checker, or None (real pipelines: evaluation reports reward, discriminator, K, speedup)."""
    step_costs: MeasuredStepCosts | None
    """What equivalent steps K count: None for FLOPs, or measured wall-clock per action."""
    default_guidance: float | None
    """The guidance scale the model is sampled with when none is given (None: the pipeline's own default)."""
    preview_scale: int
    """Nearest-neighbour upscaling that makes one image viewable (the embedded model draws 32x32)."""
    default_batch: int
    """Images per call when a user generates many: what fits the model and device comfortably."""

    def sample(self, prompts: list[str], seeds: list[int], controller: Controller, *, step_cap: int,
               guidance_scale: float | None, keep_trace: bool = False, progress: bool = False) -> Generation:
        """One image per (prompt, seed), ``controller`` deciding every step, at most ``step_cap`` steps each;
        ``guidance_scale`` None: ``default_guidance``."""

    def measure_step_costs(self, prompts: list[str]) -> MeasuredStepCosts:
        """Each action's wall-clock relative to a dense step on this machine (ValueError where unsupported)."""


class PromptSource(Protocol):
    """Where training prompts come from."""

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` random training prompts."""


@dataclass
class PromptPool:
    """Training prompts drawn uniformly from a list (a pipeline's prompt file)."""

    prompts: list[str]

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self.prompts[i] for i in rng.integers(0, len(self.prompts), size=n)]


@dataclass
class ImageWorld:
    """Everything a world provides: its generator, the reward models asked for (None when not), where
    training prompts come from, and a fixed held-out evaluation set."""

    generator: Generator
    quality: QualityModel | None
    discriminator: ModuleDiscriminator | None
    train_prompts: PromptSource
    heldout_prompts: list[str]

    def training_prompts(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[int]]:
        """``n`` random training prompts and a noise seed for each, both drawn from ``rng``."""
        captions = self.train_prompts.draw(rng, n)
        return captions, [int(seed) for seed in rng.integers(0, 2**31, size=n)]
