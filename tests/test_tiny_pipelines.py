"""The tiny offline SD3 / FLUX pipelines run, are deterministic and survive save/load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from tiny_pipelines import (
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)

SIZE = 32
PROMPT = "a red circle"


def _quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Disable the progress bar and return ``pipe``."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: DiffusionPipeline, output_type: str = "latent", **kwargs: Any) -> Any:
    """Run a seeded 2-step generation at ``SIZE`` x ``SIZE`` and return ``.images``."""
    return pipe(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(0), output_type=output_type,
                **kwargs).images


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: tiny ops gain nothing from more, and on a shared 2-core
    machine two threads made each generation ~40x slower (0.03 s -> 1.3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3() -> StableDiffusion3Pipeline:
    """One tiny SD3 pipeline shared by this module's tests."""
    return _quiet(tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux() -> FluxPipeline:
    """One tiny FLUX pipeline shared by this module's tests."""
    return _quiet(tiny_flux_pipeline())


@pytest.fixture(params=["sd3", "flux"])
def pipe(request: pytest.FixtureRequest) -> DiffusionPipeline:
    """Each tiny pipeline in turn."""
    return request.getfixturevalue(request.param)


def test_latents_are_finite_and_deterministic(pipe: DiffusionPipeline) -> None:
    first, second = _generate(pipe), _generate(pipe)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_latent_shapes(sd3: StableDiffusion3Pipeline, flux: FluxPipeline) -> None:
    assert _generate(sd3).shape == (1, 16, SIZE // 2, SIZE // 2)
    assert _generate(flux).shape == (1, (SIZE // 4) ** 2, 64)  # packed 2x2 tokens


def test_pil_output_is_deterministic(pipe: DiffusionPipeline) -> None:
    first, second = _generate(pipe, "pil"), _generate(pipe, "pil")
    assert first[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_save_and_reload_reproduce_output(pipe: DiffusionPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    reloaded = _quiet(type(pipe).from_pretrained(tmp_path))
    assert torch.equal(_generate(reloaded), _generate(pipe))


def test_sd3_without_t5_runs() -> None:
    pipe = _quiet(tiny_sd3_pipeline(with_t5=False))
    assert pipe.text_encoder_3 is None
    assert torch.isfinite(_generate(pipe)).all()


def test_sd3_negative_prompt_and_guidance_change_output(sd3: StableDiffusion3Pipeline) -> None:
    unguided = _generate(sd3, guidance_scale=1.0)
    guided = _generate(sd3, guidance_scale=5.0)
    negative = _generate(sd3, guidance_scale=5.0, negative_prompt="a blue square")
    assert torch.isfinite(negative).all()
    assert not torch.equal(unguided, guided)
    assert not torch.equal(guided, negative)


def test_flux_embedded_guidance_changes_output(flux: FluxPipeline) -> None:
    assert not torch.equal(_generate(flux, guidance_scale=1.0), _generate(flux, guidance_scale=5.0))


def test_builders_are_seeded() -> None:
    for build in (tiny_sd3_transformer, tiny_flux_transformer):
        first, again, other = (build(seed).state_dict() for seed in (0, 0, 1))
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert not all(torch.equal(first[k], other[k]) for k in first)


def test_transformer_configs_and_overrides() -> None:
    sd3 = tiny_sd3_transformer(num_layers=2)
    assert len(sd3.transformer_blocks) == 2
    assert sd3.transformer_blocks[-1].context_pre_only
    assert not sd3.transformer_blocks[0].context_pre_only
    flux = tiny_flux_transformer()
    assert flux.config.guidance_embeds
    assert sum(flux.config.axes_dims_rope) == flux.config.attention_head_dim
    assert all(p.dtype == torch.float32 for p in [*sd3.parameters(), *flux.parameters()])
