"""FirstBlockCache-style controller: reuse while the first block's residual stays within the threshold
of the residual at the sample's last recompute; the reference moves only on recompute."""

from __future__ import annotations

import pytest
import torch
from test_teacache import drive, tiny  # noqa: F401  (the tiny backbone fixture)

from rapid3.accel.controllers import FullCompute
from rapid3.accel.sampler import Sampler
from rapid3.baselines.first_block import FirstBlockCache


def test_reference_moves_only_on_recompute():
    # A residual growing 4% per step: against the last recompute's residual the change reaches
    # 8.2% after two reuses, 12.5% on the third step, which recomputes. A reference that followed
    # every step would see 4% forever and never recompute.
    reuse = drive(FirstBlockCache(0.1), {0: 0.04})[0]
    assert reuse == [False, True, True, False, True, True, False, True, True]


def test_state_is_per_sample():
    reuse = drive(FirstBlockCache(0.1), {1: 0.04, 2: 0.2})
    assert reuse[1] == [False, True, True, False, True, True, False, True, True]
    assert reuse[2] == [False] * 9


def test_knobs_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCache(-1.0)


def test_on_the_sampler_the_probe_runs_one_block_and_is_charged(tiny):  # noqa: F811
    backbone, noise, cond = tiny
    sampler = Sampler(backbone, step_cap=5)
    full = sampler.sample(noise, cond, FullCompute())
    always = sampler.sample(noise, cond, FirstBlockCache(1e9))
    records = always.stats.records[0]
    assert [r.reuse for r in records] == [False, True, True, True, True]
    assert [r.blocks for r in records] == [3, 1, 1, 1, 1]  # 2 blocks + the probe's first block, then probes only
    assert records[0].flops > full.stats.records[0][0].flops
    never = sampler.sample(noise, cond, FirstBlockCache(1e-9))
    torch.testing.assert_close(never.latents, full.latents)
