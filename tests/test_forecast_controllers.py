"""Training-free forecasting controllers: TaylorSeer-style fixed interval with order k, DBCache-style
threshold with its guards and optional forecast; per-sample decisions, batch-independent images."""

from __future__ import annotations

import pytest
import torch
from test_sampler import sd3  # noqa: F401  (the module-scoped tiny backbone)
from test_teacache import drive

from rapid3.accel.sampler import Sampler
from rapid3.baselines.first_block import DBCacheStyle
from rapid3.baselines.steps import FixedIntervalCache, TaylorSeerCache


def _modes(result, sample: int = 0) -> list[str]:
    return [r.mode for r in result.stats.records[sample]]


def test_taylorseer_forecasts_as_its_history_fills(sd3):  # noqa: F811
    backbone, noise, cond, _ = sd3
    one = torch.tensor([0])
    result = Sampler(backbone, step_cap=10).sample(noise[one], cond.select(one), TaylorSeerCache(3, order=2))
    assert _modes(result) == ["recompute", "reuse", "reuse", "recompute", "forecast1", "forecast1", "recompute",
                              "forecast2", "forecast2", "recompute"]


def test_order_zero_interval_cache_is_fora(sd3):  # noqa: F811
    backbone, noise, cond, _ = sd3
    one = torch.tensor([0])
    result = Sampler(backbone, step_cap=7).sample(noise[one], cond.select(one), FixedIntervalCache(3, warmup=2))
    assert _modes(result) == ["recompute", "recompute", "reuse", "recompute", "reuse", "reuse", "recompute"]


def test_dbcache_guards_warmup_and_runs_of_cache_steps():
    # 4% growth per step against the last recompute: FirstBlockCache alone would reuse twice, then recompute.
    assert drive(DBCacheStyle(0.1, warmup=2), {0: 0.04})[0] == [False, False, True, True, False, True, True,
                                                                  False, True]
    assert drive(DBCacheStyle(0.1, warmup=1, max_cached_steps=1), {0: 0.04})[0] == [False] + [True, False] * 4
    with pytest.raises(ValueError, match="max_cached_steps must be None or a positive integer"):
        DBCacheStyle(0.1, max_cached_steps=0)
    with pytest.raises(ValueError, match=r"order must be a forecast order in 0..2"):
        DBCacheStyle(0.1, order=3)


@pytest.mark.parametrize("make", [lambda: DBCacheStyle(0.5, order=1), lambda: TaylorSeerCache(2, order=1)])
def test_image_alone_equals_itself_in_a_batch(sd3, make):  # noqa: F811
    backbone, noise, cond, uncond = sd3
    sampler = Sampler(backbone, step_cap=8)
    rows = torch.tensor([0, 1, 4])  # three different images (the fixture repeats some)
    batch = sampler.sample(noise[rows], cond.select(rows), make(), uncond=uncond.select(rows), guidance_scale=3.0)
    for i, row in enumerate(rows.tolist()):
        one = torch.tensor([row])
        alone = sampler.sample(noise[one], cond.select(one), make(), uncond=uncond.select(one), guidance_scale=3.0)
        assert (batch.latents[i] - alone.latents[0]).abs().max().item() <= 1e-5
        assert _modes(batch, i) == _modes(alone)
    if isinstance(make(), DBCacheStyle):  # the threshold made different decisions for different images
        assert len({tuple(_modes(batch, i)) for i in range(3)}) > 1
