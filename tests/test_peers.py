"""The peer harness runs diffusers' own cache hooks on a plain copy of the embedded SD3 transformer:
with no hook it is the sampler's full compute, cost counted the same way; hooks that work on SD3 skip
work; FirstBlockCache's known SD3 failure is still a failure."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from rapid3.accel.controllers import FullCompute
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning, SD3Backbone
from rapid3.baselines.peers import _FLOP_MAPPING, PeerHarness, explain_failure
from rapid3.embedded.model import embedded_scheduler_config, embedded_transformer_config

STEPS, GUIDANCE = 6, 4.0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = embedded_transformer_config(num_layers=2)
    hooked = SD3Transformer2DModel(**config)
    plain = SD3Transformer2DModel(**config)
    plain.load_state_dict(hooked.state_dict())
    backbone = SD3Backbone(hooked, FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()))
    g = torch.Generator().manual_seed(1)
    make = lambda: Conditioning({"encoder_hidden_states": torch.randn(2, 16, 384, generator=g),  # noqa: E731
                                 "pooled_projections": torch.randn(2, 384, generator=g)})
    cond, uncond = make(), make()
    noise = torch.randn(2, 3, 32, 32, generator=g)
    harness = PeerHarness(plain, backbone, num_steps=STEPS, guidance_scale=GUIDANCE)
    return harness, backbone, noise, cond, uncond


def test_without_a_hook_the_harness_is_the_samplers_full_compute(setup):
    harness, backbone, noise, cond, uncond = setup
    expected = Sampler(backbone, step_cap=STEPS).sample(noise, cond, FullCompute(), uncond=uncond,
                                                        guidance_scale=GUIDANCE)
    run = harness.run(harness.hooked(None), noise, cond, uncond)
    torch.testing.assert_close(run.latents, expected.latents, rtol=1e-5, atol=1e-5)
    assert run.stats.flops.tolist() == pytest.approx(expected.stats.flops.tolist(), rel=1e-9)
    assert run.stats.equivalent_steps.tolist() == pytest.approx([STEPS, STEPS])
    assert run.stats.blocks.tolist() == [2 * STEPS, 2 * STEPS]


def test_mag_cache_calibrates_then_skips_whole_steps(setup):
    harness, _, noise, cond, uncond = setup
    with pytest.raises(ValueError, match="calibrate_mag_cache"):
        harness.hooked("mag_cache", 0.1)
    ratios = harness.calibrate_mag_cache(noise, cond, uncond)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    run = harness.run(harness.hooked("mag_cache", 10.0), noise, cond, uncond)  # skip whenever allowed
    records = run.stats.records[0]
    skipped = [r.reuse for r in records]
    # retention: the first round(0.2 * 6) = 1 step computes; then at most 3 skips in a row.
    assert skipped == [False, True, True, True, False, True]
    assert all(r.blocks == 0 and r.equivalent_steps < 0.05 for r in records if r.reuse)


@pytest.mark.parametrize("peer, knob", [("taylorseer_cache", 2), ("pyramid_attention_broadcast", 2)])
def test_attention_level_hooks_save_flops_but_run_every_block(setup, peer, knob):
    harness, _, noise, cond, uncond = setup
    run = harness.run(harness.hooked(peer, knob), noise[:1], cond.select(torch.tensor([0])),
                      uncond.select(torch.tensor([0])))
    records = run.stats.records[0]
    assert all(r.blocks == 2 for r in records)
    assert any(r.equivalent_steps < 0.95 for r in records) and run.stats.equivalent_steps[0] < STEPS


@pytest.mark.parametrize("peer, knob", [("mag_cache", 0.3), ("taylorseer_cache", 2),
                                        ("pyramid_attention_broadcast", 3)])
def test_counted_flops_are_what_torchs_counter_sees(setup, peer, knob):
    """The per-module meter against FlopCounterMode around a whole hooked run."""
    harness, _, noise, cond, uncond = setup
    one = torch.tensor([1])
    harness.full_step_flops(noise, cond, uncond)
    if peer == "mag_cache" and "mag_cache" not in harness.calibration:
        harness.calibrate_mag_cache(noise, cond, uncond)
    with FlopCounterMode(display=False, custom_mapping=_FLOP_MAPPING) as counter:
        run = harness.run(harness.hooked(peer, knob), noise[one], cond.select(one), uncond.select(one))
    assert run.stats.flops[0].item() == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert run.stats.equivalent_steps[0] < STEPS


def test_first_block_cache_fails_on_sd3_as_documented(setup):
    harness, _, noise, cond, uncond = setup
    with pytest.raises(TypeError, match="NoneType") as error:
        harness.run(harness.hooked("first_block_cache", 0.1), noise[:1], cond.select(torch.tensor([0])),
                    uncond.select(torch.tensor([0])))
    assert "context_pre_only" in explain_failure("first_block_cache", harness.transformer, str(error.value))
    assert explain_failure("first_block_cache", harness.transformer, "IndexError: pop from empty list") is None


def test_the_harness_refuses_a_hooked_transformer(setup):
    _, backbone, *_ = setup
    with pytest.raises(ValueError, match="without hooks"):
        PeerHarness(backbone.transformer, backbone, num_steps=STEPS, guidance_scale=GUIDANCE)
