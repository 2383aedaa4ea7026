"""What the trainer, its evaluation and the benchmark sample from: the ``Generator`` interface.

    generator = PipelineGenerator.from_pretrained("black-forest-labs/FLUX.1-dev", height=512, width=512)
    out = generator.sample(prompts, seeds, policy, step_cap=28, guidance_scale=3.5, keep_trace=True)
    out.images, out.stats.equivalent_steps, out.trace

Two implementations, both on rapid3's one sampler loop:

- :class:`EmbeddedGenerator`: the shipped pixel-space model (``EmbeddedPipeline``); it has a
  deterministic checker, so evaluation can report GenEval-style accuracy.
- :class:`PipelineGenerator`: a diffusers ``StableDiffusion3Pipeline`` / ``FluxPipeline`` run through
  ``rapid3.accelerate`` (the pipeline's own encoding, latents and decoding around the sampler loop);
  no checker exists for its open-ended prompts.

Image i always starts from the noise of ``seeds[i]`` alone, so repeating a seed repeats the noise
(a GRPO group) and an image does not depend on its batch. This module lives at the package top,
not under ``train/``, because ``rapid3 bench`` and ``rapid3 generate`` use it as much as the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from torch import Tensor

from .accel.actions import Actions, Controller, Observation
from .accel.controllers import FullCompute
from .accel.costs import MeasuredStepCosts, SampleStats, measure_step_costs
from .backbones.base import Conditioning
from .backbones.diffusers_dit import DiffusersDiT
from .embedded.checker import checker_accuracy
from .embedded.pipeline import EmbeddedPipeline, initial_noise, to_uint8
from .embedded.scenes import parse_caption
from .pipelines import AcceleratedPipeline, accelerate

PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusion3Pipeline, FluxPipeline)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Text-to-image sampling through rapid3's sampler loop, as GRPO and its evaluation need it."""

    backbone: DiffusersDiT
    """The backbone adapter the sampler drives (what ``RapidPolicy.for_backbone`` shapes a policy for)."""
    checker: Checker | None
    """The world's checker, or None (real pipelines: evaluation reports reward, discriminator, K, speedup)."""

    def sample(self, prompts: list[str], seeds: list[int], controller: Controller, *, step_cap: int,
               guidance_scale: float, keep_trace: bool = False) -> Generation:
        """One image per (prompt, seed), ``controller`` deciding every step, at most ``step_cap`` steps each."""


class SceneChecker:
    """The embedded world's deterministic checker on its grammar's captions."""

    def accuracy(self, images: Tensor, prompts: list[str]) -> float:
        return checker_accuracy(list(to_uint8(images.cpu())), [parse_caption(p) for p in prompts])["accuracy"]

    def complexity(self, prompts: list[str]) -> list[int]:
        return [parse_caption(p).complexity for p in prompts]


class EmbeddedGenerator:
    """The embedded model as a :class:`Generator`: image i from the noise ``pipe`` gives seed ``seeds[i]``,
    so ``pipe(prompts, seed=s)`` equals sampling with seeds ``s, s + 1, ...``."""

    checker = SceneChecker()

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
               guidance_scale: float, keep_trace: bool = False) -> Generation:
        """See :meth:`Generator.sample`; the images are the final pixel-space latents, clamped, and ``seconds``
        the denoiser's and controller's time (the sampler's per-image accounting summed), without encoding."""
        result = self.pipe.sample(prompts, seeds, controller, num_inference_steps=step_cap,
                                  guidance_scale=guidance_scale, keep_trace=keep_trace, step_costs=self.step_costs)
        return Generation(result.latents.clamp(-1, 1), result.stats, result.trace, result.stats.seconds.sum().item())


class PipelineGenerator:
    """A diffusers SD3 / FLUX pipeline as a :class:`Generator`, through ``rapid3.accelerate``.

    The pipeline stays accelerated while the generator is used (``close()`` restores it); each call
    swaps in its controller. Image i uses a CPU ``torch.Generator`` seeded ``seeds[i]``, so images are
    the same on any device and in any batch. Images are decoded by the pipeline and, with
    ``image_size``, resized (shorter side) for the reward models: CLIP reads 224 pixels, and the
    discriminator's replay buffers would otherwise hold megapixel images.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (exactly these classes).
        height, width: image size (None: the pipeline's default).
        image_size: shorter side of the returned images (None: as decoded; never enlarged).
    """

    checker = None

    def __init__(self, pipe: StableDiffusion3Pipeline | FluxPipeline, *, height: int | None = None,
                 width: int | None = None, image_size: int | None = None) -> None:
        self.handle: AcceleratedPipeline = accelerate(pipe, FullCompute())
        self.pipe, self.backbone = pipe, self.handle.backbone
        self.height, self.width, self.image_size = height, width, image_size
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None, dtype: str | None = None,
                        **kwargs) -> PipelineGenerator:
        """:func:`load_pipeline` then the generator (``kwargs``: ``height``, ``width``, ``image_size``)."""
        return cls(load_pipeline(path, device=device, dtype=dtype), **kwargs)

    def sample(self, prompts: list[str], seeds: list[int], controller: Controller, *, step_cap: int,
               guidance_scale: float, keep_trace: bool = False) -> Generation:
        """See :meth:`Generator.sample`; ``seconds`` is the denoiser's and controller's time (the sampler's
        per-image accounting summed), without the pipeline's prompt encoding and VAE decoding."""
        recorder = _Recorder(controller) if keep_trace else None
        self.handle.controller = controller if recorder is None else recorder
        images = self.pipe(list(prompts), num_inference_steps=step_cap, guidance_scale=guidance_scale,
                           height=self.height, width=self.width, output_type="pt",
                           generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images
        stats = self.handle.last_stats
        return Generation(self._resize(images.float() * 2 - 1), stats, [] if recorder is None else recorder.trace,
                          stats.seconds.sum().item())

    def close(self) -> None:
        """Give the pipeline back exactly as it was."""
        self.handle.remove()

    def _resize(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if self.image_size is None or min(height, width) <= self.image_size:
            return images
        scale = self.image_size / min(height, width)
        size = (round(height * scale), round(width * scale))
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


@dataclass
class _Recorder:
    """A controller that records what the one it wraps saw and decided: the sampler's trace, taken from
    inside ``pipe(...)``, where the accelerated pipeline keeps no trace of its own."""

    controller: Controller
    trace: list[tuple[Observation, Actions]] = field(default_factory=list)

    def reset(self, batch_size: int) -> None:
        self.controller.reset(batch_size)

    def decide(self, obs: Observation) -> Actions:
        actions = self.controller.decide(obs)
        self.trace.append((obs, actions))
        return actions


def resolve_device(device: str | None) -> torch.device:
    """``device``, or the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name, or bfloat16 on a GPU and float32 on the CPU (where bfloat16 matmuls are slow)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    return DTYPES[dtype]


def load_pipeline(path: str | Path, *, device: str | None = None,
                  dtype: str | None = None) -> StableDiffusion3Pipeline | FluxPipeline:
    """A diffusers pipeline from a local folder or Hub id, on ``device`` in ``dtype`` (see ``resolve_*``).

    Its class is read from ``model_index.json`` first, so an unsupported pipeline is refused before
    any weights load (``TypeError``); a path that is neither a folder nor reachable on the Hub raises
    ``FileNotFoundError``.
    """
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    try:
        index = DiffusionPipeline.load_config(str(path))
    except (OSError, ValueError) as error:
        where = ("has no model_index.json" if Path(path).is_dir()
                 else "is neither a local folder nor reachable on the Hub")
        raise FileNotFoundError(f"cannot load a diffusers pipeline from {str(path)!r}: it {where} ({error})") from error
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise TypeError(f"{path} holds a {name}; rapid3 accelerates {' and '.join(PIPELINE_CLASSES)} only.")
    return PIPELINE_CLASSES[name].from_pretrained(str(path), dtype=dtype_).to(device_)
