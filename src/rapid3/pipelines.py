"""``rapid3.accelerate``: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` whose denoising
loop is rapid3's sampler loop, driven by a controller (a learned policy or any baseline).

    handle = rapid3.accelerate(pipe, controller)
    image = pipe("a red circle", num_inference_steps=28).images[0]
    print(handle.last_stats.equivalent_steps, handle.speedup_estimate)
    handle.remove()  # the pipeline is exactly as before

The handle is also a context manager that removes itself on exit:

    with rapid3.accelerate(pipe, controller) as handle:
        image = pipe("a red circle").images[0]

Everything except the denoising loop is the pipeline's own code, called in the pipeline's order
(``check_inputs``, ``encode_prompt``, ``prepare_latents``, FLUX's ``_unpack_latents``, the VAE decode
and ``image_processor.postprocess``), so with ``FullCompute()`` a call returns what the pipeline
returns and consumes the generator exactly as it does.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from .accel.actions import Controller
from .accel.costs import MeasuredStepCosts, SampleStats
from .accel.sampler import Sampler
from .accel.solvers import check_solver
from .backbones import ADAPTERS, Conditioning, backbone_for
from .common.limits import check_finite

# Pipeline arguments both families honour; every other argument of the pipeline's ``__call__`` must
# stay at its default, because the sampler loop would otherwise silently ignore it.
_COMMON_ARGUMENTS = frozenset({
    "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds", "pooled_prompt_embeds",
    "negative_prompt_embeds", "negative_pooled_prompt_embeds", "max_sequence_length", "height", "width",
    "num_inference_steps", "guidance_scale", "num_images_per_prompt", "generator", "latents", "output_type",
    "return_dict",
})

# The sampler loop is a plain rectified-flow Euler loop whose time schedule models only the
# scheduler's (static or dynamic exponential) shift: these options would make the pipeline differ.
_EULER_SCHEDULER_CONFIG = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                           "use_exponential_sigmas": False, "use_beta_sigmas": False,
                           "time_shift_type": "exponential", "stochastic_sampling": False}


@dataclass
class _Denoising:
    """What the sampler loop needs from one pipeline call."""

    latents: torch.Tensor
    cond: Conditioning
    uncond: Conditioning | None
    guidance_scale: float


class _Family:
    """What differs between the supported pipelines; everything else lives in ``AcceleratedPipeline``."""

    pipeline_class: ClassVar[type]
    output_class: ClassVar[type]
    honoured: ClassVar[frozenset[str]]

    def prepare(self, pipe: DiffusionPipeline, call: dict[str, Any], device: torch.device) -> _Denoising:
        """Encode the prompts and prepare the initial latents, in the pipeline's order."""
        raise NotImplementedError

    def unpack(self, pipe: DiffusionPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The sampler's latents in the VAE's (B, C, H, W) layout."""
        return latents


class _SD3(_Family):
    pipeline_class = StableDiffusion3Pipeline
    output_class = StableDiffusion3PipelineOutput
    honoured = _COMMON_ARGUMENTS | {"prompt_3", "negative_prompt_3", "clip_skip"}

    def prepare(self, pipe: StableDiffusion3Pipeline, call: dict[str, Any], device: torch.device) -> _Denoising:
        cfg = call["guidance_scale"] > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
        embeds, neg_embeds, pooled, neg_pooled = _call_with_same_names(
            pipe.encode_prompt, call, device=device, do_classifier_free_guidance=cfg)
        latents = _prepare_latents(pipe, call, pipe.transformer.config.in_channels, embeds.dtype, device)
        cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
        if not cfg:
            return _Denoising(latents, cond, None, 1.0)
        uncond = Conditioning({"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled})
        return _Denoising(latents, cond, uncond, call["guidance_scale"])


class _Flux(_Family):
    pipeline_class = FluxPipeline
    output_class = FluxPipelineOutput
    honoured = _COMMON_ARGUMENTS | {"true_cfg_scale"}

    def prepare(self, pipe: FluxPipeline, call: dict[str, Any], device: torch.device) -> _Denoising:
        has_negative = call["negative_prompt"] is not None or (
            call["negative_prompt_embeds"] is not None and call["negative_pooled_prompt_embeds"] is not None)
        true_cfg = call["true_cfg_scale"] > 1 and has_negative  # as FluxPipeline: no negative, no true CFG
        if true_cfg and call["prompt_embeds"] is not None and call["negative_prompt_embeds"] is not None:
            if call["prompt_embeds"].shape != call["negative_prompt_embeds"].shape:
                raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                                 f"directly, but got {tuple(call['prompt_embeds'].shape)} != "
                                 f"{tuple(call['negative_prompt_embeds'].shape)}.")
        positive = _call_with_same_names(pipe.encode_prompt, call, device=device)
        negative = None
        if true_cfg:
            negative = pipe.encode_prompt(
                prompt=call["negative_prompt"], prompt_2=call["negative_prompt_2"],
                prompt_embeds=call["negative_prompt_embeds"],
                pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
                device=device, num_images_per_prompt=call["num_images_per_prompt"],
                max_sequence_length=call["max_sequence_length"])
        # FLUX latents are packed 2x2 into channels: the transformer sees 4x the VAE's channels.
        latents, image_ids = _prepare_latents(pipe, call, pipe.transformer.config.in_channels // 4,
                                              positive[0].dtype, device)
        guidance = {}
        if pipe.transformer.config.guidance_embeds:  # guidance-distilled FLUX embeds the scale per sample
            guidance["guidance"] = torch.full((latents.shape[0],), call["guidance_scale"], device=device,
                                              dtype=torch.float32)

        def conditioning(embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor) -> Conditioning:
            return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled, **guidance},
                                shared={"txt_ids": text_ids, "img_ids": image_ids})

        if negative is None:
            return _Denoising(latents, conditioning(*positive), None, 1.0)
        embeds, pooled, text_ids = negative
        if embeds.shape[0] == 1:  # FluxPipeline lets one negative prompt serve a batch (by broadcasting)
            embeds, pooled = (t.expand(latents.shape[0], *t.shape[1:]) for t in (embeds, pooled))
        return _Denoising(latents, conditioning(*positive), conditioning(embeds, pooled, text_ids),
                          call["true_cfg_scale"])

    def unpack(self, pipe: FluxPipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)


_FAMILIES = (_SD3(), _Flux())


class AcceleratedPipeline:
    r"""
    Handle on a pipeline whose ``__call__`` runs rapid3's sampler loop; made by [`accelerate`].

    While the handle is active, ``pipe(...)`` takes the pipeline's usual arguments (see
    [`accelerate`] for which are honoured) and denoises with [`~accel.sampler.Sampler`], the
    pipeline's ``num_inference_steps`` being the step cap and ``controller`` deciding, per image and
    step, the next time, cache reuse and attention sparsity.

    The handle is a context manager: leaving the ``with`` block calls [`remove`].

    Attributes:
        pipe: The accelerated pipeline.
        controller ([`~accel.actions.Controller`]): Decides every step; may be replaced between calls.
        backbone: The rapid3 adapter hooked into ``pipe.transformer`` while the handle is active.
        last_stats ([`~accel.costs.SampleStats`] or `None`): Per-image cost accounting of the last
            completed call (steps, blocks, FLOPs, equivalent steps, and every step's actions in
            ``records``); `None` before the first call.
        last_step_cap (`int` or `None`): The step cap (``num_inference_steps``) of the last completed call.
        solver (`str`): How the sampler loop integrates each step ("euler" or "multistep2").
        step_costs ([`~accel.costs.MeasuredStepCosts`] or `None`): What equivalent steps count: `None` for
            FLOPs, or each action's measured cost (e.g. a ``rapid3 profile`` of the deployment machine).
    """

    def __init__(self, pipe: StableDiffusion3Pipeline | FluxPipeline, controller: Controller,
                 solver: str | None = None, *, compile: bool = False) -> None:
        self._family = _check_can_accelerate(pipe, controller, solver)
        self.pipe, self.controller, self.solver = pipe, controller, solver or "euler"
        self.last_stats: SampleStats | None = None
        self.last_step_cap: int | None = None
        self.backbone = backbone_for(pipe.transformer, pipe.scheduler)
        self.step_costs: MeasuredStepCosts | None = None
        if compile:
            self.backbone.compile_blocks()
        pipe.__class__ = _accelerated_class(self._family.pipeline_class, self)

    @property
    def active(self) -> bool:
        """Whether ``pipe(...)`` currently runs through this handle."""
        return getattr(type(self.pipe), "_rapid3_handle", None) is self

    @property
    def speedup_estimate(self) -> float:
        """Full-compute FLOPs at the last call's step cap over the FLOPs that call used (whole batch)."""
        if self.last_stats is None:
            raise RuntimeError("No accelerated call has completed yet: call the pipeline first.")
        return self.last_step_cap / self.last_stats.equivalent_steps.mean().item()

    def remove(self) -> None:
        """Restore the pipeline exactly: its own class (hence ``__call__``), and the transformer's forward
        and attention processors. Calling it again, or after another handle took over, does nothing."""
        if not self.active:
            return
        self.pipe.__class__ = self._family.pipeline_class
        self.backbone.remove()

    def __enter__(self) -> AcceleratedPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"AcceleratedPipeline({type(self.pipe).__name__}, controller={type(self.controller).__name__}, "
                f"{state})")

    @torch.no_grad()
    def _call(self, *args: Any, **kwargs: Any):
        """The accelerated ``pipe.__call__``: the pipeline's own steps around rapid3's denoising loop."""
        pipe, call = self.pipe, self._bind(args, kwargs)
        for scale in ("guidance_scale", "true_cfg_scale"):  # NaN > 1 is false: it would run unguided, silently
            check_finite(scale, call.get(scale))
        _call_with_same_names(pipe.check_inputs, call)
        denoising = self._family.prepare(pipe, call, pipe._execution_device)
        # Honour set_progress_bar_config(disable=True), which the pipeline keeps in this attribute.
        progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        sampler = Sampler(self.backbone, step_cap=call["num_inference_steps"], progress=progress, solver=self.solver,
                          step_costs=self.step_costs)
        result = sampler.sample(denoising.latents, denoising.cond, self.controller, uncond=denoising.uncond,
                                guidance_scale=denoising.guidance_scale)
        self.last_stats, self.last_step_cap = result.stats, call["num_inference_steps"]
        # The sampler keeps float32 latents; the pipeline's are in the text encoders' dtype.
        image = self._decode(result.latents.to(denoising.latents.dtype), call)
        pipe.maybe_free_model_hooks()
        if not call["return_dict"]:
            return (image,)
        return self._family.output_class(images=image)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of the pipeline's ``__call__`` by name, defaults filled in, unsupported ones rejected."""
        signature = inspect.signature(self._family.pipeline_class.__call__)
        bound = signature.bind(self.pipe, *args, **kwargs)  # unknown arguments: TypeError, as the pipeline
        bound.apply_defaults()
        call = dict(list(bound.arguments.items())[1:])  # drop ``self``
        defaults = {name: parameter.default for name, parameter in signature.parameters.items()}
        unsupported = [name for name, value in call.items()
                       if name not in self._family.honoured and not _is_default(value, defaults[name])]
        if unsupported:
            raise ValueError(
                f"{self._family.pipeline_class.__name__} accelerated by rapid3 does not support "
                f"{', '.join(unsupported)}: rapid3's sampler loop would ignore them. Call `remove()` on the "
                "rapid3 handle to use them with the pipeline's own loop.")
        call["height"] = call["height"] or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        call["width"] = call["width"] or self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return call

    def _decode(self, latents: torch.Tensor, call: dict[str, Any]):
        """As the pipeline: unshifted, unscaled, VAE-decoded and post-processed (unless ``output_type="latent"``)."""
        if call["output_type"] == "latent":
            return latents
        pipe = self.pipe
        latents = self._family.unpack(pipe, latents, call["height"], call["width"])
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=call["output_type"])


def accelerate(pipe: StableDiffusion3Pipeline | FluxPipeline, controller: Controller, *,
               solver: str | None = None, compile: bool = False) -> AcceleratedPipeline:
    r"""
    Make ``pipe(...)`` denoise with rapid3's sampler loop, driven by ``controller``.

    The pipeline keeps its own input checks, prompt encoding, latent preparation and decoding;
    only the denoising loop changes. Honoured arguments: ``prompt``, ``prompt_2`` (SD3 also
    ``prompt_3``), ``negative_prompt`` (``_2``, SD3 ``_3``), the prompt-embedding arguments,
    ``max_sequence_length``, SD3's ``clip_skip``, ``height``, ``width``, ``num_inference_steps`` (the
    step cap: no image runs more steps), ``guidance_scale`` (SD3: classifier-free guidance when > 1;
    FLUX: the embedded guidance), FLUX's ``true_cfg_scale`` (with a negative prompt),
    ``num_images_per_prompt``, ``generator``, ``latents``, ``output_type`` and ``return_dict``. Any
    other argument (callbacks, IP-Adapter inputs, ``joint_attention_kwargs``, ``sigmas``, SD3's
    ``mu`` and skip-layer guidance, ...) raises a ``ValueError`` unless left at its default.

    Args:
        pipe (`StableDiffusion3Pipeline` or `FluxPipeline`):
            The pipeline to accelerate (exactly these classes), with a ``FlowMatchEulerDiscreteScheduler``.
        controller ([`~accel.actions.Controller`]):
            Decides every step, per image: a learned ``RapidPolicy`` or a baseline such as ``FullCompute()``.
        solver (`str`, *optional*):
            "euler" or "multistep2" (``rapid3.accel.solvers``). By default the pipeline's scheduler must be
            the ``FlowMatchEulerDiscreteScheduler`` that the loop reproduces; naming a solver also accepts
            diffusers' other flow-matching schedulers, whose time schedule (shift) is then kept and whose
            update rule is replaced by the named solver.
        compile (`bool`, defaults to `False`):
            Run the transformer blocks under ``torch.compile`` (inductor). The first calls compile one
            graph per block kind and sparsity level; after that, images switching actions and sub-batch
            sizes changing recompile nothing, and the hooks add no graph break inside a block.

    Returns:
        [`AcceleratedPipeline`]: The handle: per-call statistics (``last_stats``,
        ``speedup_estimate``) and ``remove()``, which restores the pipeline exactly. It is also a
        context manager that removes itself on exit.

    Raises:
        TypeError: For another pipeline class, a transformer or scheduler class rapid3 cannot drive (a
            non-Euler flow-matching scheduler unless ``solver`` is given), or a ``controller`` that is not a
            controller.
        ValueError: For scheduler options the sampler loop does not follow (Karras sigmas, stochastic
            sampling, ...).
        RuntimeError: If ``pipe`` is already accelerated (remove that handle first) or its transformer is
            hooked by another rapid3 backbone.

    Examples:
        ```py
        >>> import rapid3
        >>> from rapid3.baselines.steps import FixedIntervalCache

        >>> with rapid3.accelerate(pipe, FixedIntervalCache(2)) as handle:
        ...     image = pipe("a red circle", num_inference_steps=28).images[0]
        >>> handle.speedup_estimate  # about 2 for every other step reused
        ```
    """
    return AcceleratedPipeline(pipe, controller, solver, compile=compile)


def _check_can_accelerate(pipe: Any, controller: Controller, solver: str | None) -> _Family:
    """The pipeline's family, after checking that rapid3 can take over its denoising loop."""
    handle = getattr(type(pipe), "_rapid3_handle", None)
    if handle is not None:
        raise RuntimeError(f"This {type(pipe).__name__} is already accelerated by rapid3 ({handle!r}); "
                           "call `remove()` on that handle first.")
    family = next((f for f in _FAMILIES if type(pipe) is f.pipeline_class), None)
    if family is None:
        # Exact classes only: a subclass may change ``__call__``, which the accelerated call mirrors.
        supported = ", ".join(f.pipeline_class.__name__ for f in _FAMILIES)
        raise TypeError(f"rapid3.accelerate supports {supported}; got {type(pipe).__name__}.")
    if not isinstance(controller, Controller):
        hint = (" A policy by name or folder? Load it first: rapid3.policy.shipped.load_policy(NAME_OR_PATH)."
                if isinstance(controller, (str, Path)) else "")
        raise TypeError(f"controller must implement rapid3's Controller protocol (reset, decide); "
                        f"got {type(controller).__name__}.{hint}")
    rapid3_processors = tuple(adapter.processor_cls for adapter in ADAPTERS)
    if any(isinstance(p, rapid3_processors) for p in pipe.transformer.attn_processors.values()):
        raise RuntimeError("The pipeline's transformer is already hooked by a rapid3 backbone (another "
                           "accelerated pipeline sharing it?); remove that first.")
    _check_scheduler(pipe.scheduler, solver)
    return family


def _check_scheduler(scheduler: Any, solver: str | None) -> None:
    name = type(scheduler).__name__
    if solver is not None:
        check_solver(solver)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if not name.startswith("FlowMatch"):
            raise TypeError(f"rapid3's sampler loop samples flow-matching models: the pipeline needs a "
                            f"FlowMatchEulerDiscreteScheduler, got {name}.")
        if solver is None:
            raise TypeError(f"rapid3's sampler loop reproduces FlowMatchEulerDiscreteScheduler, not the pipeline's "
                            f"{name}: pass solver='euler' or 'multistep2' to rapid3.accelerate to sample with "
                            "rapid3's solver on that scheduler's time schedule.")
    config = scheduler.config
    changed = {k: config.get(k) for k, v in _EULER_SCHEDULER_CONFIG.items() if config.get(k, v) != v}
    if changed:
        raise ValueError(f"rapid3's sampler loop does not support these scheduler options: {changed}.")


def _accelerated_class(cls: type, handle: AcceleratedPipeline) -> type:
    """A subclass of ``cls``, with the same name, whose ``__call__`` is ``handle._call``.

    Python looks ``__call__`` up on the type, never the instance, so the only way to redirect
    ``pipe(...)`` for this one pipeline object (and no other) is to give it its own class;
    ``remove()`` puts the original back. The name stays, so reprs and saved configs do not change.
    """

    @functools.wraps(cls.__call__)  # keeps the pipeline's signature and docs for help(pipe)
    def __call__(pipe, *args: Any, **kwargs: Any):
        return handle._call(*args, **kwargs)

    namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "_rapid3_handle": handle}
    return type(cls)(cls.__name__, (cls,), namespace)


def _call_with_same_names(fn: Any, call: dict[str, Any], **extra: Any) -> Any:
    """Call a pipeline method with the call's arguments that its signature names the same way, plus ``extra``."""
    names = inspect.signature(fn).parameters
    return fn(**{name: value for name, value in call.items() if name in names}, **extra)


def _prepare_latents(pipe: DiffusionPipeline, call: dict[str, Any], channels: int, dtype: torch.dtype,
                     device: torch.device) -> Any:
    """``pipe.prepare_latents`` for the whole batch: the only place the generator is used."""
    batch = _prompt_batch_size(call) * call["num_images_per_prompt"]
    return pipe.prepare_latents(batch, channels, call["height"], call["width"], dtype, device, call["generator"],
                                call["latents"])


def _prompt_batch_size(call: dict[str, Any]) -> int:
    """As the pipelines: one per prompt, or the batch of ``prompt_embeds``."""
    prompt = call["prompt"]
    if isinstance(prompt, str):
        return 1
    return len(prompt) if prompt is not None else call["prompt_embeds"].shape[0]


def _is_default(value: Any, default: Any) -> bool:
    """Whether an argument was left at its default (tensors never count as a default)."""
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    return type(value) is type(default) and value == default
