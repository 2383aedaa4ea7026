"""The pipeline world: a diffusers ``StableDiffusion3Pipeline`` / ``FluxPipeline`` run through
``rapid3.accelerate`` (the pipeline's own encoding, latents and decoding around the sampler loop), a CLIP
score as the quality model, a frozen CLIP vision tower with a trainable adapter as the discriminator, and
prompts from files. No checker exists for its open-ended prompts.

    generator = PipelineGenerator.from_pretrained("black-forest-labs/FLUX.1-dev", height=512, width=512)
    out = generator.sample(prompts, seeds, policy, step_cap=28, guidance_scale=3.5, keep_trace=True)
    out.images, out.stats.equivalent_steps, out.trace
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from torch import Tensor

from ..accel.actions import Actions, Controller, Observation
from ..accel.controllers import FullCompute
from ..accel.costs import MeasuredStepCosts
from ..common.prompts import read_prompts, split_prompts
from ..pipelines import AcceleratedPipeline, accelerate
from ..rewards.clip import CLIPAdapterDiscriminator, CLIPScore
from .base import Generation, ImageWorld, PromptPool, WorldConfig

PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusion3Pipeline, FluxPipeline)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HELDOUT_SPLIT_SEED = 0
"""Seed of the split that sets held-out prompts aside from a prompt file (it seeds no noise): fixed, so runs
with different seeds or knobs evaluate on one set."""


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
    default_guidance = None  # the pipeline's own
    preview_scale = 1
    default_batch = 1  # one megapixel image at a time: what a GPU's memory allows for every model size

    def __init__(self, pipe: StableDiffusion3Pipeline | FluxPipeline, *, height: int | None = None,
                 width: int | None = None, image_size: int | None = None) -> None:
        self.handle: AcceleratedPipeline = accelerate(pipe, FullCompute())
        self.pipe, self.backbone = pipe, self.handle.backbone
        self.height, self.width, self.image_size = height, width, image_size

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None, dtype: str | None = None,
                        **kwargs) -> PipelineGenerator:
        """:func:`load_pipeline` then the generator (``kwargs``: ``height``, ``width``, ``image_size``)."""
        return cls(load_pipeline(path, device=device, dtype=dtype), **kwargs)

    @property
    def step_costs(self) -> MeasuredStepCosts | None:
        """What equivalent steps count (None: FLOPs); set from a ``rapid3 profile`` by the trainer."""
        return self.handle.step_costs

    @step_costs.setter
    def step_costs(self, costs: MeasuredStepCosts | None) -> None:
        self.handle.step_costs = costs

    def sample(self, prompts: list[str], seeds: list[int], controller: Controller, *, step_cap: int,
               guidance_scale: float | None, keep_trace: bool = False, progress: bool = False) -> Generation:
        """See ``Generator.sample``; ``seconds`` is the denoiser's and controller's time (the sampler's
        per-image accounting summed), without the pipeline's prompt encoding and VAE decoding."""
        recorder = _Recorder(controller) if keep_trace else None
        self.handle.controller = controller if recorder is None else recorder
        guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        self.pipe.set_progress_bar_config(disable=not progress)
        images = self.pipe(list(prompts), num_inference_steps=step_cap, height=self.height, width=self.width,
                           output_type="pt", generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                           **guidance).images
        stats = self.handle.last_stats
        return Generation(self._resize(images.float() * 2 - 1), stats, [] if recorder is None else recorder.trace,
                          stats.seconds.sum().item())

    def measure_step_costs(self, prompts: list[str]) -> MeasuredStepCosts:
        raise ValueError("step_costs 'measured' is implemented for the embedded model only; with a pipeline use "
                         "step_costs 'flops'.")

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


def build_pipeline_world(config: WorldConfig) -> ImageWorld:
    """A diffusers pipeline with the CLIP score and CLIP-adapter discriminator asked for; prompts from files.

    Prompts and reward models load first, so a bad file or a missing model fails before the (large)
    pipeline loads, and everything before any sampling.
    """
    train_prompts, heldout = _prompt_split(config)
    device = resolve_device(config.device)
    quality = CLIPScore.from_pretrained(config.reward_model, device=device) if config.quality else None
    disc = None
    if config.discriminator:
        disc = CLIPAdapterDiscriminator.from_pretrained(config.disc_model or config.reward_model, device=device,
                                                        hidden=config.disc_width, lr=config.disc_lr)
    generator = PipelineGenerator.from_pretrained(config.pipeline, device=config.device, dtype=config.dtype,
                                                  height=config.height, width=config.width,
                                                  image_size=config.image_size)
    return ImageWorld(generator, quality, disc, PromptPool(train_prompts), heldout)


def _prompt_split(config: WorldConfig) -> tuple[list[str], list[str]]:
    """Training and held-out prompts: the prompt file and the held-out file, or a fixed split of the one file."""
    if config.prompt_file is None:
        return [], []
    prompts = read_prompts(config.prompt_file)
    if config.eval_prompt_file is None:
        return split_prompts(prompts, config.eval_prompts, seed=HELDOUT_SPLIT_SEED)
    return prompts, read_prompts(config.eval_prompt_file)[:config.eval_prompts]
