"""The embedded world: the shipped pixel-space MMDiT, its learned reward model, a conv discriminator, the
scene grammar's prompts and the deterministic checker that scores them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..accel.actions import Controller
from ..accel.costs import MeasuredStepCosts, measure_step_costs
from ..backbones.base import Conditioning
from ..embedded.checker import checker_accuracy
from ..embedded.model import GUIDANCE_SCALE
from ..embedded.pipeline import EmbeddedPipeline, initial_noise, to_uint8
from ..embedded.scenes import SceneSpec, evaluation_prompts, parse_caption, sample_scene
from ..embedded.text_encoder import MiniLMTextEncoder
from ..rewards.discriminator import ImageDiscriminator, ModuleDiscriminator
from ..rewards.embedded_reward import RewardModel, load_reward_model
from .base import Generation, ImageWorld, WorldConfig


class SceneChecker:
    """The embedded world's deterministic checker on its grammar's captions."""

    def accuracy(self, images: Tensor, prompts: list[str]) -> float:
        return checker_accuracy(list(to_uint8(images.cpu())), [parse_caption(p) for p in prompts])["accuracy"]

    def complexity(self, prompts: list[str]) -> list[int]:
        return [parse_caption(p).complexity for p in prompts]


class EmbeddedGenerator:
    """The embedded model as a ``Generator``: image i from the noise ``pipe`` gives seed ``seeds[i]``,
    so ``pipe(prompts, seed=s)`` equals sampling with seeds ``s, s + 1, ...``."""

    checker = SceneChecker()
    default_guidance = GUIDANCE_SCALE
    preview_scale = 8  # 32 x 32 pixels: shown at 256 x 256
    # Its ops are too small to gain from a bigger batch on a CPU, and images are saved per batch.
    default_batch = 16

    def __init__(self, pipe: EmbeddedPipeline, step_costs: MeasuredStepCosts | None = None) -> None:
        self.pipe, self.backbone = pipe, pipe.backbone
        self.step_costs = step_costs
        """What equivalent steps K count: None for FLOPs, or measured wall-clock per action."""

    def measure_step_costs(self, prompts: list[str], *, repeats: int = 5) -> MeasuredStepCosts:
        """Each action's wall-clock relative to a dense step on this machine, for one CFG forward of
        ``prompts`` (both branches: what the sampler runs), timed interleaved after a warm-up."""
        cond, uncond = self.pipe.encode(prompts)
        noise = initial_noise(len(prompts), seed=0)
        return measure_step_costs(self.backbone, torch.cat([noise, noise]), Conditioning.cat([cond, uncond]),
                                  repeats=repeats)

    def sample(self, prompts: list[str], seeds: list[int], controller: Controller, *, step_cap: int,
               guidance_scale: float | None, keep_trace: bool = False, progress: bool = False) -> Generation:
        """See ``Generator.sample``; the images are the final pixel-space latents, clamped, and ``seconds``
        the denoiser's and controller's time (the sampler's per-image accounting summed), without encoding."""
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        result = self.pipe.sample(prompts, seeds, controller, num_inference_steps=step_cap, guidance_scale=guidance,
                                  keep_trace=keep_trace, step_costs=self.step_costs, progress=progress)
        return Generation(result.latents.clamp(-1, 1), result.stats, result.trace, result.stats.seconds.sum().item())


@dataclass
class EmbeddedQuality:
    """The embedded world's learned reward model as a ``QualityModel``."""

    model: RewardModel
    encoder: MiniLMTextEncoder

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.model.score(images, prompts, self.encoder)


class SceneGrammar:
    """Training prompts: random train-split captions of the scene grammar (its kind weights)."""

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        return [sample_scene(rng, "train").caption for _ in range(n)]


def heldout_prompts(n: int) -> list[SceneSpec]:
    """The fixed evaluation set of ``n`` prompts: held-out compositions and, one in eight, single-object
    captions (the held-out split has none), so K can be compared between 1- and 3-object prompts."""
    return evaluation_prompts(n - n // 8, n // 8)


def build_embedded_world(config: WorldConfig) -> ImageWorld:
    """The embedded model (``config.model``), its reward model and a fresh conv discriminator when asked for.

    Sets torch to one CPU thread: a 3.5M-parameter model's ops are too small to split across threads, and
    on a busy 2-core machine a second thread stalls every op (measured: 28 steps in 4.7 s on one thread,
    80 s on two).
    """
    torch.set_num_threads(1)
    generator = EmbeddedGenerator(EmbeddedPipeline.from_pretrained(config.model))
    quality = None
    if config.quality:
        quality = EmbeddedQuality(load_reward_model(config.reward_model), generator.pipe.encoder)
    disc = None
    if config.discriminator:
        width = config.disc_width
        disc = ModuleDiscriminator(ImageDiscriminator(channels=(width, 2 * width, 4 * width)), lr=config.disc_lr)
    return ImageWorld(generator, quality, disc, SceneGrammar(),
                      [spec.caption for spec in heldout_prompts(config.eval_prompts)])
