"""Peers: diffusers' own cache hooks, run through their own code on the same backbone, prompts and seeds.

THE PEER HARNESS. diffusers' hooks decide once per transformer call and keep their state inside the
hooked modules, so they cannot run inside rapid3's per-sample sampler loop. :class:`PeerHarness` is
rapid3's one other denoising loop, for peers only: Euler with classifier-free guidance (both
branches in one call, as ``StableDiffusion3Pipeline`` does) over a plain copy of the transformer
(no rapid3 hooks or processors) with one diffusers hook applied, image by image, because a hook's
decision is per call and batching would let images change each other's schedule. It takes the time
grid and the transformer's call arguments from the backbone adapter, so with no hook it reproduces
the sampler's full compute. Cost is counted as the adapter counts it, by torch's ``FlopCounterMode``
(taught the CPU SDPA kernel, which it does not know): once, per module, on a full forward of the
unhooked model; then each call adds up the modules that really ran in it (see :class:`_Meter`).

The hooks need a cache context around each call (SD3 has no ``CacheMixin`` to set one), which the
harness sets as diffusers' pipelines do.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..accel.costs import SampleStats, StepRecord
from ..backbones.base import Conditioning
from ..backbones.diffusers_dit import DiffusersDiT

CONTEXT = "cond_uncond"  # one call carries both guidance branches, so one hook state per image


@dataclass(frozen=True)
class Peer:
    """A diffusers cache hook and how its config is built from the benchmark's knob."""

    function: str
    apply: Callable[[torch.nn.Module, Any], None]
    config: Callable[[Any, PeerHarness], Any]
    knob: str


PEERS: dict[str, Peer] = {
    "mag_cache": Peer("apply_mag_cache", apply_mag_cache, lambda knob, h: MagCacheConfig(
        threshold=knob, num_inference_steps=h.num_steps, mag_ratios=h.mag_ratios()), "threshold"),
    # float32 Taylor factors: bf16 storage would add rounding error that is not the method's.
    "taylorseer_cache": Peer("apply_taylorseer_cache", apply_taylorseer_cache, lambda knob, h: TaylorSeerCacheConfig(
        cache_interval=knob, taylor_factors_dtype=torch.float32), "cache_interval"),
    "pyramid_attention_broadcast": Peer(
        "apply_pyramid_attention_broadcast", apply_pyramid_attention_broadcast,
        lambda knob, h: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=knob,
                                                        current_timestep_callback=h.current_timestep),
        "spatial_attention_block_skip_range"),
    "first_block_cache": Peer("apply_first_block_cache", apply_first_block_cache,
                              lambda knob, h: FirstBlockCacheConfig(threshold=knob), "threshold"),
}

# Why a hook fails where we know the cause (NOTES.md): (hook, transformer class) -> (a string of the
# error it raises, the explanation the report shows beside that error).
KNOWN_FAILURES = {
    ("first_block_cache", "SD3Transformer2DModel"): (
        "NoneType",
        ("SD3's last block is `context_pre_only` and returns encoder_hidden_states=None, which "
         "FirstBlockCache's tail hook subtracts from the head block's output")),
}


def explain_failure(peer: str, transformer: torch.nn.Module, error: str) -> str | None:
    """The known cause of ``peer`` failing on this transformer with this error, if we know it."""
    signature, why = KNOWN_FAILURES.get((peer, type(transformer).__name__), (None, None))
    return why if signature is not None and signature in error else None


@dataclass
class PeerRun:
    """Final latents (B, ...) and per-image cost accounting of one harness run."""

    latents: torch.Tensor
    stats: SampleStats


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel (4 * B * H * Nq * Nk * D), unknown to FlopCounterMode."""
    return sdpa_flop_count(query, key, value)


_FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class PeerHarness:
    """Runs a plain diffusers transformer with a diffusers cache hook, image by image.

    ``transformer`` must be a copy that rapid3's backbone has not hooked (load the model twice);
    ``backbone`` supplies the time schedule and the call arguments.
    """

    def __init__(self, transformer: torch.nn.Module, backbone: DiffusersDiT, *, num_steps: int,
                 guidance_scale: float) -> None:
        if any(hasattr(m, "_diffusers_hook") for m in transformer.modules()):
            raise ValueError("the peer harness needs a transformer without hooks: load a second copy of the model")
        self.transformer = transformer.eval().requires_grad_(False)
        self.backbone, self.num_steps, self.guidance_scale = backbone, num_steps, guidance_scale
        self.timestep = 0.0
        self.calibration: dict[str, list[float]] = {}
        self._module_flops: dict[str, tuple[float, float]] | None = None

    def current_timestep(self) -> float:
        """The timestep of the call in progress (Pyramid Attention Broadcast's timestep range uses it)."""
        return self.timestep

    def hooked(self, peer: str | None, knob: Any = None) -> torch.nn.Module:
        """A fresh copy of the transformer with ``peer``'s hook applied (``None``: no hook)."""
        model = copy.deepcopy(self.transformer)
        if peer is not None:
            spec = PEERS[peer]
            spec.apply(model, spec.config(knob, self))
        return model

    def mag_ratios(self) -> list[float]:
        """MagCache's magnitude ratios for this backbone: set by :meth:`calibrate_mag_cache`."""
        if "mag_cache" not in self.calibration:
            raise ValueError("MagCache needs its ratios: run PeerHarness.calibrate_mag_cache(...) first.")
        return self.calibration["mag_cache"]

    def calibrate_mag_cache(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning) -> list[float]:
        """MagCache's own calibration mode on these images; its printed ratios, averaged over images."""
        model = self.hooked(None)
        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=self.num_steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.run(model, noise, cond, uncond, count=False)
        printed_lists = re.findall(r"Calibration Complete.*?\n(\[.*?\])", printed.getvalue(), re.DOTALL)
        runs = [ast.literal_eval(found) for found in printed_lists]
        if len(runs) != len(noise):
            raise RuntimeError(f"MagCache printed {len(runs)} calibrations for {len(noise)} images.")
        self.calibration["mag_cache"] = torch.tensor(runs).mean(0).tolist()
        return self.calibration["mag_cache"]

    @torch.no_grad()
    def run(self, model: torch.nn.Module, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning, *,
            count: bool = True) -> PeerRun:
        """Denoise each image of ``noise`` from t = 1 to 0 on the uniform grid; ``count``: FLOPs and blocks."""
        stats = SampleStats.empty(len(noise), self.full_step_flops(noise, cond, uncond))
        latents = []
        for i in range(len(noise)):
            index = torch.tensor([i])
            rows = Conditioning.cat([uncond.select(index), cond.select(index)])  # branch order of the sampler
            latents.append(self._image(model, noise[i:i + 1], rows, stats, i, count))
        latents = torch.stack(latents)
        return PeerRun(latents, stats)

    def full_step_flops(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning) -> float:
        """FLOPs of one unhooked step of one image, both guidance branches (measured once, per module)."""
        if self._module_flops is None:
            rows = Conditioning.cat([uncond.select(torch.tensor([0])), cond.select(torch.tensor([0]))])
            inputs = torch.cat([noise[:1], noise[:1]])
            self._module_flops = module_flops(self.transformer,
                                              lambda: self._call(self.transformer, inputs, torch.ones(2), rows))
        return sum(total for total, _ in self._module_flops.values())

    def _image(self, model: torch.nn.Module, noise: torch.Tensor, rows: Conditioning, stats: SampleStats,
               index: int, count: bool) -> torch.Tensor:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        schedule = self.backbone.schedule(noise)
        times = schedule.uniform_times(self.num_steps)
        sigmas = schedule.sigma(times)
        x = noise.float().clone()
        meter = _Meter(model, self._module_flops) if count else None
        with meter or contextlib.nullcontext():
            for k in range(self.num_steps):
                velocity, record = self._step(model, x, sigmas[k:k + 2], rows, k, meter)
                x = x + (sigmas[k + 1] - sigmas[k]) * velocity
                stats.add(index, StepRecord(t=float(times[k]), next_t=float(times[k + 1]), level=0, **record,
                                            equivalent_steps=record["flops"] / stats.full_step_flops))
        return x[0]

    def _step(self, model: torch.nn.Module, x: torch.Tensor, sigmas: torch.Tensor, rows: Conditioning, k: int,
              meter: _Meter | None) -> tuple[torch.Tensor, dict]:
        """One guided velocity at ``sigmas[0]`` and its cost (counted when a ``meter`` is given)."""
        self.timestep = float(sigmas[0]) * self.backbone.scheduler.config.num_train_timesteps
        _set_cache_context(model, CacheContext(CONTEXT, step_index=k, num_inference_steps=self.num_steps,
                                               timestep=self.timestep, sigma=float(sigmas[0])))
        if meter is not None:
            meter.reset()
        tic = time.perf_counter()
        try:
            velocity = self._call(model, torch.cat([x, x]), sigmas[:1].repeat(2), rows)
        finally:
            _set_cache_context(model, None)
        seconds = time.perf_counter() - tic
        flops, attention, blocks = meter.totals() if meter is not None else (0.0, 0.0, 0)
        uncond_v, cond_v = velocity.float().chunk(2)
        record = {"reuse": meter is not None and blocks == 0, "blocks": blocks, "flops": flops,
                  "attention_flops": attention, "seconds": seconds}
        return uncond_v + self.guidance_scale * (cond_v - uncond_v), record

    def _call(self, model: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
              rows: Conditioning) -> torch.Tensor:
        dtype = self.backbone.dtype()
        return model(hidden_states=latents.to(dtype), **self.backbone.call_kwargs(sigma, rows, dtype),
                     return_dict=False)[0]


def module_flops(model: torch.nn.Module, call: Callable[[], Any]) -> dict[str, tuple[float, float]]:
    """Each module's own FLOPs per call, (all, attention core), excluding its children's: one
    ``call()`` of ``model`` under torch's FLOP counter, which attributes every op to all the modules
    it ran inside."""
    calls: Counter[str] = Counter()
    names = {module: name for name, module in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda m, args: calls.update([names[m]])) for m in names]
    try:
        with FlopCounterMode(display=False, custom_mapping=_FLOP_MAPPING, depth=None) as counter:
            call()
    finally:
        for handle in handles:
            handle.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def inclusive(name: str, attention: bool) -> float:
        ops = counts.get(f"{root}.{name}" if name else root, {})
        return float(sum(v for op, v in ops.items() if not attention or "attention" in str(op)))

    def called_children(name: str, module: torch.nn.Module) -> list[str]:
        """The nearest called descendants: containers (ModuleList) are never called themselves."""
        found = []
        for child, sub in module.named_children():
            full = f"{name}.{child}" if name else child
            found += [full] if calls[full] else called_children(full, sub)
        return found

    return {name: tuple((inclusive(name, a) - sum(inclusive(c, a) for c in called_children(name, module)))
                        / calls[name] for a in (False, True))
            for name, module in model.named_modules() if calls[name]}


class _Meter:
    """What really ran in one call of a hooked model, from a pre-hook on every module.

    A module ran when it was called and, if a diffusers hook sits on it, at least one of its children
    was called too (a hook that skips a module returns without calling any). A call's FLOPs are the
    own FLOPs (:func:`module_flops`) of the modules that ran; counting every call under
    FlopCounterMode instead would double a peer's run time. Transformer blocks that ran are counted.
    """

    def __init__(self, model: torch.nn.Module, own_flops: dict[str, tuple[float, float]]) -> None:
        self.own_flops = own_flops
        self.names = {module: name for name, module in model.named_modules()}
        self.hooked = {name for module, name in self.names.items()
                       if getattr(getattr(module, "_diffusers_hook", None), "hooks", None)}
        self.blocks = {name for name in self.names.values()
                       if re.fullmatch(r"(single_)?transformer_blocks\.\d+", name)}
        self.calls: Counter[str] = Counter()
        self.handles: list[Any] = []

    def __enter__(self) -> _Meter:
        self.handles = [m.register_forward_pre_hook(self._called) for m in self.names]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _called(self, module: torch.nn.Module, args: Any) -> None:
        self.calls[self.names[module]] += 1

    def reset(self) -> None:
        self.calls.clear()

    def _inside_ran(self, name: str) -> bool:
        """Whether anything inside module ``name`` was called (its own forward ran past its hook)."""
        prefix = f"{name}." if name else ""
        return any(n and n.startswith(prefix) and n != name for n, count in self.calls.items() if count)

    def totals(self) -> tuple[float, float, int]:
        """(FLOPs, attention-core FLOPs, blocks that ran) since the last ``reset``."""
        ran = {name: n for name, n in self.calls.items() if name not in self.hooked or self._inside_ran(name)}
        flops = sum(self.own_flops.get(name, (0.0, 0.0))[0] * n for name, n in ran.items())
        attention = sum(self.own_flops.get(name, (0.0, 0.0))[1] * n for name, n in ran.items())
        return flops, attention, sum(1 for name in ran if name in self.blocks)
