"""rapid3.accelerate on tiny diffusers SD3 and FLUX pipelines: same images as the pipeline with
FullCompute, cheaper ones with caching/sparsity, exact restoration, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

import rapid3
from rapid3.accel.actions import Actions, Observation
from rapid3.accel.controllers import FullCompute, UniformSteps
from rapid3.baselines.steps import FixedIntervalCache, StaticSparse

PROMPTS = ["a red circle", "two blue squares"]
SD3_CALL = {"prompt": PROMPTS, "negative_prompt": "a green square", "guidance_scale": 4.5, "num_inference_steps": 4,
            "num_images_per_prompt": 2}
FLUX_CALL = {"prompt": PROMPTS, "height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 3.5}


@pytest.fixture(scope="module")
def sd3() -> StableDiffusion3Pipeline:
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux() -> FluxPipeline:
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain_latents(sd3, flux) -> dict[str, torch.Tensor]:
    """Each pipeline's own latents for its standard call (seed 0), before any acceleration."""
    return {"sd3": _run(sd3, {**SD3_CALL, "output_type": "latent"})[0],
            "flux": _run(flux, {**FLUX_CALL, "output_type": "latent"})[0]}


def _run(pipe, call: dict, seed: int = 0, **overrides):
    """The pipeline's output for ``call`` with a fresh generator, and that generator's final state."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(**{**call, **overrides}, generator=generator).images
    return images, generator.get_state()


def _rapid3_leftovers(transformer: torch.nn.Module) -> list[str]:
    """Names of any rapid3 hook or attention processor still on ``transformer``."""
    hooks = [f"{name}:{hook}" for name, module in transformer.named_modules() if hasattr(module, "_diffusers_hook")
             for hook in module._diffusers_hook.hooks if hook.startswith("rapid3")]
    processors = [name for name, p in transformer.attn_processors.items() if type(p).__module__.startswith("rapid3")]
    return hooks + processors


@pytest.mark.parametrize(("output_type", "return_dict"), [("latent", True), ("pil", True), ("np", False), ("pt", True)])
def test_sd3_full_compute_equals_pipeline(sd3, output_type, return_dict):
    """CFG with a negative prompt, two images per prompt: bit for bit, and the same generator consumption."""
    call = {**SD3_CALL, "output_type": output_type}
    expected, expected_state = _run(sd3, call)
    with rapid3.accelerate(sd3, FullCompute()) as handle:
        generator = torch.Generator().manual_seed(0)
        out = sd3(**call, generator=generator, return_dict=return_dict)
        images = out.images if return_dict else out[0]
    assert torch.equal(generator.get_state(), expected_state)
    if output_type in ("latent", "pt"):
        assert torch.equal(images, expected)
    else:
        assert len(images) == 4 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    assert handle.last_stats.steps.tolist() == [4] * 4
    assert handle.speedup_estimate == pytest.approx(1.0)


def test_sd3_without_cfg_and_positional_prompt(sd3):
    expected = sd3("a red circle", guidance_scale=1.0, num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(1)).images
    with rapid3.accelerate(sd3, FullCompute()):
        got = sd3("a red circle", guidance_scale=1.0, num_inference_steps=3, output_type="latent",
                  generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(got, expected)


# Not bit for bit on FLUX: FluxPipeline computes its shifted sigma grid in float32, one ulp away from
# rapid3's TimeSchedule at some steps, and true CFG runs both branches in one batch, not two calls.
@pytest.mark.parametrize("extra", [{}, {"negative_prompt": "blue", "true_cfg_scale": 2.0}],
                         ids=["embedded", "true_cfg"])
def test_flux_full_compute_matches_pipeline(flux, extra):
    call = {**FLUX_CALL, **extra}
    expected_latents, expected_state = _run(flux, call, output_type="latent")
    expected_pil, _ = _run(flux, call, output_type="pil")
    with rapid3.accelerate(flux, FullCompute()):
        latents, state = _run(flux, call, output_type="latent")
        pil, _ = _run(flux, call, output_type="pil")
    assert torch.equal(state, expected_state)
    assert latents.shape == expected_latents.shape == (2, 64, 64)  # packed, as the pipeline returns them
    torch.testing.assert_close(latents, expected_latents, rtol=1e-5, atol=1e-5)
    for a, b in zip(pil, expected_pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


class RandomReuse(UniformSteps):
    """Per image and step, reuse the cache with probability 1/2 (own generator, so reproducible)."""

    def reset(self, batch_size: int) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def decide(self, obs: Observation) -> Actions:
        reuse = (torch.rand(len(obs), generator=self.generator) < 0.5) & obs.has_cache
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long))


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("controller", [FixedIntervalCache(2), StaticSparse(3), RandomReuse()],
                         ids=["interval_cache", "static_sparse", "random_reuse"])
def test_accelerated_controllers_save_flops_and_remove_cleanly(request, plain_latents, family, controller):
    pipe, expected = request.getfixturevalue(family), plain_latents[family]
    call = {**(SD3_CALL if family == "sd3" else FLUX_CALL), "output_type": "latent"}
    processors = {name: type(p) for name, p in pipe.transformer.attn_processors.items()}
    with rapid3.accelerate(pipe, controller) as handle:
        fast, _ = _run(pipe, call)
    stats = handle.last_stats
    assert fast.shape == expected.shape and torch.isfinite(fast).all()
    assert handle.speedup_estimate > (1.0 if isinstance(controller, StaticSparse) else 1.2)  # few image tokens
    assert (stats.flops < stats.full_step_flops * 4).all()
    n_blocks = len(handle.backbone.blocks())
    for records in stats.records:
        assert len(records) == 4 and records[-1].next_t == 0.0
        for record in records:
            assert record.blocks == (0 if record.reuse else n_blocks)
            assert (record.level == 3) == isinstance(controller, StaticSparse)
    # Removed on leaving the block: the pipeline's own output again, bit for bit, and no rapid3 left.
    assert type(pipe) is (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)
    assert torch.equal(_run(pipe, call)[0], expected)
    assert {name: type(p) for name, p in pipe.transformer.attn_processors.items()} == processors
    assert _rapid3_leftovers(pipe.transformer) == []


def test_random_reuse_decides_per_image(sd3):
    with rapid3.accelerate(sd3, RandomReuse()) as handle:
        sd3(**SD3_CALL, output_type="latent", generator=torch.Generator().manual_seed(0))
    reuse_patterns = {tuple(r.reuse for r in records) for records in handle.last_stats.records}
    assert len(reuse_patterns) > 1
    assert len(set(handle.last_stats.equivalent_steps.tolist())) > 1


def test_remove_restores_pipeline_and_allows_reaccelerating(sd3, plain_latents):
    call, expected = {**SD3_CALL, "output_type": "latent"}, plain_latents["sd3"]
    original_call = type(sd3).__call__
    handle = rapid3.accelerate(sd3, FixedIntervalCache(2))
    try:
        assert handle.active and type(sd3).__name__ == "StableDiffusion3Pipeline"
        assert repr(handle).endswith("controller=FixedIntervalCache, active)")
        with pytest.raises(RuntimeError, match="already accelerated"):
            rapid3.accelerate(sd3, FullCompute())
        _run(sd3, call)
    finally:
        handle.remove()
    handle.remove()  # a second remove does nothing
    assert not handle.active and type(sd3) is StableDiffusion3Pipeline and type(sd3).__call__ is original_call
    assert _rapid3_leftovers(sd3.transformer) == []
    assert torch.equal(_run(sd3, call)[0], expected)
    with rapid3.accelerate(sd3, FullCompute()):
        handle.remove()  # a stale handle leaves the new acceleration alone
        assert torch.equal(_run(sd3, call)[0], expected) and _rapid3_leftovers(sd3.transformer)
    assert _rapid3_leftovers(sd3.transformer) == []


def test_unsupported_pipelines_and_controllers_are_rejected(sd3):
    with pytest.raises(TypeError, match="supports StableDiffusion3Pipeline, FluxPipeline; got Linear"):
        rapid3.accelerate(torch.nn.Linear(2, 2), FullCompute())
    with pytest.raises(TypeError, match="Controller protocol"):
        rapid3.accelerate(sd3, object())
    original = sd3.scheduler
    try:
        sd3.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
        with pytest.raises(ValueError, match="stochastic_sampling"):
            rapid3.accelerate(sd3, FullCompute())
    finally:
        sd3.scheduler = original
    assert type(sd3) is StableDiffusion3Pipeline and _rapid3_leftovers(sd3.transformer) == []


def test_other_flow_schedulers_need_a_named_solver(sd3, plain_latents):
    """A non-Euler flow-matching scheduler is refused by name unless a solver is named; with solver="euler"
    the loop samples that scheduler's time schedule with Euler steps (here: the same as the Euler pipeline)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    original = sd3.scheduler
    try:
        sd3.scheduler = FlowMatchHeunDiscreteScheduler.from_config(original.config)
        with pytest.raises(TypeError, match="not the pipeline's FlowMatchHeunDiscreteScheduler: pass solver="):
            rapid3.accelerate(sd3, FullCompute())
        with pytest.raises(ValueError, match="solver must be one of euler, multistep2"):
            rapid3.accelerate(sd3, FullCompute(), solver="heun")
        with rapid3.accelerate(sd3, FullCompute(), solver="euler"):
            latents = _run(sd3, {**SD3_CALL, "output_type": "latent"})[0]
        torch.testing.assert_close(latents, plain_latents["sd3"], rtol=1e-5, atol=1e-5)
        with rapid3.accelerate(sd3, FullCompute(), solver="multistep2") as handle:
            second_order = _run(sd3, {**SD3_CALL, "output_type": "latent"})[0]
        assert handle.solver == "multistep2" and not torch.allclose(second_order, latents)
    finally:
        sd3.scheduler = original


@pytest.mark.parametrize(("family", "bad"), [
    ("sd3", {"callback_on_step_end": lambda pipe, i, t, kwargs: kwargs}),
    ("sd3", {"sigmas": [1.0, 0.5, 0.25, 0.1], "skip_guidance_layers": [1]}),
    ("flux", {"joint_attention_kwargs": {"scale": 0.5}}),
    ("flux", {"ip_adapter_image_embeds": [torch.zeros(1, 4)]}),
])
def test_unsupported_call_arguments_are_named(request, family, bad):
    pipe = request.getfixturevalue(family)
    call = SD3_CALL if family == "sd3" else FLUX_CALL
    with rapid3.accelerate(pipe, FullCompute()) as handle:
        with pytest.raises(ValueError, match="does not support " + ", ".join(bad)):
            pipe(**call, **bad)
        with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
            pipe(**call, foo=1)
        with pytest.raises(RuntimeError, match="No accelerated call"):
            handle.speedup_estimate


def test_import_rapid3_stays_light():
    code = "import sys, rapid3; assert 'accelerate' in dir(rapid3) and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
