"""Each hand-set baseline does what its definition says, on the real sampler loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_pipelines import tiny_sd3_transformer

from rapid3.accel.controllers import UniformSteps
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning, SD3Backbone
from rapid3.baselines.steps import FixedIntervalCache, StaticSparse


@pytest.fixture(scope="module")
def run():
    backbone = SD3Backbone(tiny_sd3_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = Conditioning({"encoder_hidden_states": torch.randn(2, 5, 64), "pooled_projections": torch.randn(2, 48)})
    return lambda controller, cap=9: Sampler(backbone, step_cap=cap).sample(noise, cond, controller).stats


def test_fora_recomputes_exactly_every_nth_step(run):
    stats = run(FixedIntervalCache(3))
    for records in stats.records:
        assert [r.reuse for r in records] == [i % 3 != 0 for i in range(9)]


def test_static_sparse_uses_its_level_every_step(run):
    stats = run(StaticSparse(2))
    assert all(r.level == 2 and not r.reuse for records in stats.records for r in records)


def test_uniform_steps_follow_the_pipeline_grid(run):
    stats = run(UniformSteps(4))
    times = [r.t for r in stats.records[0]] + [stats.records[0][-1].next_t]
    grid = FlowMatchEulerDiscreteScheduler(shift=3.0)
    expected = torch.linspace(1.0, grid.sigma_min, 4).tolist() + [0.0]
    assert times == pytest.approx(expected)


def test_bad_knobs_are_rejected(run):
    with pytest.raises(ValueError, match="interval"):
        FixedIntervalCache(0)
    with pytest.raises(ValueError, match="sparsity level"):
        StaticSparse(4)
    with pytest.raises(ValueError, match="exceeds the sampler's step cap"):
        run(UniformSteps(12), cap=9)
