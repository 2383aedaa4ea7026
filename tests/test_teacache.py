"""TeaCache: its schedule follows the accumulated, rescaled change of the modulated input, per sample;
its probe is charged; its calibration pairs input and output changes of the same steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from rapid3.accel.actions import Observation
from rapid3.accel.controllers import FullCompute
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning, SD3Backbone, TimeSchedule
from rapid3.baselines.teacache import TeaCache, calibrate, relative_l1
from rapid3.embedded.model import embedded_scheduler_config, embedded_transformer_config


def scripted_observation(ids: list[int], step: int, features: torch.Tensor, cap: int = 9) -> Observation:
    """An observation of samples ``ids`` at ``step`` whose probe returns ``features`` (rows of ids)."""
    n = len(ids)
    schedule = TimeSchedule()
    t = schedule.uniform_times(cap)[step].expand(n).clone()
    return Observation(
        sample_ids=torch.tensor(ids), latents=torch.zeros(n, 1), t=t, sigma=schedule.sigma(t),
        step_index=torch.full((n,), step), refresh_delta=torch.zeros(n, 1), last_velocity=torch.zeros(n, 1),
        has_cache=torch.full((n,), step > 0), spent=torch.zeros(n), pooled=torch.zeros(n, 1), step_cap=cap,
        schedule=schedule, probe=lambda kind: features)


def drive(controller, growth: dict[int, float], cap: int = 9) -> dict[int, list[bool]]:
    """Feed each sample a feature that grows by ``growth[i]`` (relative L1) per step; return reuse flags."""
    ids = sorted(growth)
    controller.reset(max(ids) + 1)
    reuse = {i: [] for i in ids}
    for step in range(cap):
        features = torch.stack([torch.full((4,), (1 + growth[i]) ** step) for i in ids])
        actions = controller.decide(scripted_observation(ids, step, features, cap))
        for i, flag in zip(ids, actions.reuse.tolist()):
            reuse[i].append(flag)
    return reuse


def test_relative_l1_per_row():
    previous = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    current = torch.tensor([[1.5, -1.5], [2.0, 2.0]])
    assert relative_l1(current, previous).tolist() == [0.5, 0.0]


def test_reuses_until_the_accumulated_change_reaches_the_threshold():
    # 10% change per step, threshold 0.25: two reuses, then the third step's 0.3 forces a recompute.
    # First and last step always recompute.
    reuse = drive(TeaCache(0.25), {0: 0.1})[0]
    assert reuse == [False, True, True, False, True, True, False, True, False]


def test_state_is_per_sample_and_follows_the_rescaling():
    # Sample 3 changes twice as fast as sample 0, so it recomputes twice as often; a rescaling that
    # halves every change makes sample 3 behave like sample 0 did.
    reuse = drive(TeaCache(0.25), {0: 0.1, 3: 0.2})
    assert reuse[0] == [False, True, True, False, True, True, False, True, False]
    assert reuse[3] == [False, True, False, True, False, True, False, True, False]
    halved = drive(TeaCache(0.25, coefficients=(0.5, 0.0)), {3: 0.2})[3]
    assert halved == reuse[0]


def test_knobs_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        TeaCache(0.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**embedded_transformer_config(num_layers=2))
    backbone = SD3Backbone(transformer, FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()))
    g = torch.Generator().manual_seed(0)
    cond = Conditioning({"encoder_hidden_states": torch.randn(2, 16, 384, generator=g),
                         "pooled_projections": torch.randn(2, 384, generator=g)})
    return backbone, torch.randn(2, 3, 32, 32, generator=g), cond


def test_on_the_sampler_probe_is_charged_and_a_tiny_threshold_is_full_compute(tiny):
    backbone, noise, cond = tiny
    sampler = Sampler(backbone, step_cap=6)
    full = sampler.sample(noise, cond, FullCompute())
    strict = sampler.sample(noise, cond, TeaCache(1e-9))
    torch.testing.assert_close(strict.latents, full.latents)
    assert all(s > f for s, f in zip(strict.stats.flops.tolist(), full.stats.flops.tolist()))  # the probes
    loose = sampler.sample(noise, cond, TeaCache(1e9))
    assert [r.reuse for r in loose.stats.records[0]] == [False, True, True, True, True, False]


def test_calibration_pairs_output_changes_of_consecutive_steps(tiny):
    backbone, noise, cond = tiny
    sampler = Sampler(backbone, step_cap=6)
    # Degree 0 fits the mean output change: check it against the velocities of a traced run.
    constant = calibrate(sampler, noise, cond, degree=0)
    velocities = [obs.last_velocity for obs, _ in sampler.sample(noise, cond, FullCompute(), keep_trace=True).trace]
    changes = torch.cat([relative_l1(velocities[k + 1], velocities[k]) for k in range(1, len(velocities) - 1)])
    assert constant.shape == (1,) and constant[0] == pytest.approx(changes.mean().item(), rel=1e-6)
    assert np.isfinite(calibrate(sampler, noise, cond, degree=2)).all()
    with pytest.raises(ValueError, match="too few"):
        calibrate(sampler, noise, cond, degree=8)
