"""Cache modes (reuse, forecast of order 1 and 2) and the multistep2 solver on the one sampler loop."""

from __future__ import annotations

import math

import pytest
import torch
from test_sampler import MIXED, ScriptedController, sd3  # noqa: F401  (sd3: the module-scoped tiny backbone)

from rapid3.accel.actions import Actions, Observation
from rapid3.accel.cache import CACHE_MODES, ResidualCache, newton_forecast
from rapid3.accel.controllers import UniformSteps
from rapid3.accel.sampler import Sampler
from rapid3.backbones import BackboneOutput, TimeSchedule


def test_forecast_is_exact_for_polynomials_on_uneven_times_per_sample_and_branch():
    """Order k reproduces any residual polynomial of degree <= k in sigma, each sample and branch its own."""
    batch, branches, shape = 3, 2, (4, 5)
    coefficients = torch.randn(batch, branches, 3, *shape, generator=torch.Generator().manual_seed(0))
    residual = lambda s, degree: sum(coefficients[:, :, j] * s.view(-1, 1, 1, 1) ** j  # noqa: E731
                                     for j in range(degree + 1))
    sigmas = [torch.tensor([0.97, 0.9, 0.8]), torch.tensor([0.71, 0.6, 0.52]), torch.tensor([0.33, 0.41, 0.2])]
    target = torch.tensor([0.1, 0.35, 0.05])  # per sample; the third sample's nodes are not even ordered
    everyone = torch.arange(batch)
    for degree in range(3):
        cache = ResidualCache(batch, branches, depth=3)
        for s in sigmas:
            cache.store(everyone, residual(s, degree).transpose(0, 1).flatten(0, 1), s)
        for order in range(degree, 3):
            got = cache.rows(everyone, target, order).unflatten(0, (branches, batch)).transpose(0, 1)
            torch.testing.assert_close(got, residual(target, degree), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cache.rows(everyone, target, 1), cache.rows(everyone, target, 2))


def test_newton_forecast_of_order_one_is_the_line_through_the_last_two():
    values, nodes = torch.tensor([[[2.0]], [[1.0]]]), torch.tensor([[0.5], [0.75]], dtype=torch.float64)
    at = torch.tensor([0.25], dtype=torch.float64)
    assert newton_forecast(values, nodes, at).item() == pytest.approx(3.0)


def test_cache_keeps_at_most_depth_residuals_and_orders_need_history():
    cache = ResidualCache(2, 1, depth=2)
    for step in range(4):
        cache.store(torch.tensor([0]), torch.full((1, 3), float(step)), torch.tensor([1.0 - step / 4]))
    assert cache.residuals.shape[0] == 2 and cache.count.tolist() == [2, 0]
    assert cache.residuals[:, 0, 0, 0].tolist() == [3.0, 2.0]  # newest first, the oldest fell off
    with pytest.raises(ValueError, match="order 2 needs 3 cached"):
        cache.rows(torch.tensor([0]), torch.tensor([0.0]), 2)


class ModeScript(ScriptedController):
    """Per sample: a fixed list of (ratio, cache mode name) per step; forecasts up to ``forecast_order``."""

    def __init__(self, scripts: dict[int, list[tuple[float, str]]], forecast_order: int = 2) -> None:
        super().__init__({i: [(ratio, mode != "recompute", 0) for ratio, mode in s] for i, s in scripts.items()})
        self.modes, self.forecast_order = scripts, forecast_order

    def decide(self, obs: Observation) -> Actions:
        actions = super().decide(obs)
        names = [self.modes[int(i)][int(k)][1] for i, k in zip(obs.sample_ids, obs.step_index)]
        actions.order = torch.tensor([max(CACHE_MODES.index(n) - 1, 0) for n in names])
        return actions


R, U, F1, F2 = "recompute", "reuse", "forecast1", "forecast2"
FORECASTS = [(0.8, R), (0.8, R), (0.8, R), (0.7, F2), (0.7, F1), (0.6, R), (0.5, F1), (0.5, R)]
REUSES = [(0.8, R), (0.8, U), (0.8, R), (0.7, U), (0.7, F1), (0.6, F1), (0.5, R), (0.5, U)]
COMPUTES = [(0.6, R)] * 8


def test_order_zero_is_todays_reuse_bit_for_bit(sd3):  # noqa: F811
    backbone, noise, cond, uncond = sd3
    script = {0: MIXED, 1: MIXED[::-1]}
    rows = torch.arange(2)
    kwargs = {"uncond": uncond.select(rows), "guidance_scale": 3.0}
    plain = Sampler(backbone, step_cap=8).sample(noise[:2], cond.select(rows), ScriptedController(script), **kwargs)
    as_modes = ModeScript({i: [(r, U if reuse else R) for r, reuse, _ in s] for i, s in script.items()})
    as_modes.scripts = script  # same levels as the plain run
    modes = Sampler(backbone, step_cap=8).sample(noise[:2], cond.select(rows), as_modes, **kwargs)
    assert torch.equal(plain.latents, modes.latents)
    assert [r.mode for r in modes.stats.records[0]] == [U if reuse else R for _, reuse, _ in MIXED]


def test_image_alone_equals_itself_in_a_batch_of_mixed_modes(sd3):  # noqa: F811
    backbone, noise, cond, uncond = sd3
    sampler = Sampler(backbone, step_cap=8)
    batch = sampler.sample(noise[:3], cond.select(torch.arange(3)), ModeScript({0: FORECASTS, 1: REUSES, 2: COMPUTES}),
                           uncond=uncond.select(torch.arange(3)), guidance_scale=3.0, keep_trace=True)
    for i, script in enumerate((FORECASTS, REUSES)):
        one = torch.tensor([i])
        alone = sampler.sample(noise[one], cond.select(one), ModeScript({0: script}), uncond=uncond.select(one),
                               guidance_scale=3.0)
        assert (batch.latents[i] - alone.latents[0]).abs().max().item() <= 1e-5
        assert [r.mode for r in batch.stats.records[i]] == [mode for _, mode in script]
    assert CACHE_MODES[int(batch.trace[3][1].mode[0])] == F2  # the trace carries the mode too
    assert batch.trace[3][0].forecast_orders().tolist() == [2, 1, 2]


def test_forecast_steps_run_no_block_and_cost_a_little_more_than_reuse(sd3):  # noqa: F811
    backbone, noise, cond, uncond = sd3
    result = Sampler(backbone, step_cap=8).sample(noise[:1], cond.select(torch.tensor([0])),
                                                  ModeScript({0: FORECASTS}), uncond=uncond.select(torch.tensor([0])),
                                                  guidance_scale=3.0)
    records = result.stats.records[0]
    flops = {r.mode: r.flops for r in records}
    assert all(r.blocks == 0 for r in records if r.reuse)
    reuse_flops = 2 * backbone.row_flops(noise[:1], cond, level=0, reuse=True)[0]
    assert reuse_flops < flops[F1] < flops[F2] < 0.2 * flops[R]


def test_a_forecast_changes_the_image_from_reuse(sd3):  # noqa: F811
    backbone, noise, cond, uncond = sd3
    one = torch.tensor([0])
    run = lambda script: Sampler(backbone, step_cap=8).sample(  # noqa: E731
        noise[one], cond.select(one), ModeScript({0: script}), uncond=uncond.select(one), guidance_scale=3.0)
    reuse = run([(r, U if m != R else R) for r, m in FORECASTS])
    forecast = run(FORECASTS)
    assert (reuse.latents - forecast.latents).abs().max().item() > 1e-4


def test_order_beyond_history_and_unknown_solver_are_refused(sd3):  # noqa: F811
    backbone, noise, cond, _ = sd3
    one = torch.tensor([0])
    early = [(0.8, R), (0.8, F2)] + [(0.8, R)] * 6
    with pytest.raises(ValueError, match=r"order 2 from a cache holding 1 .* ask at most Observation.forecast_orders"):
        Sampler(backbone, step_cap=8).sample(noise[one], cond.select(one), ModeScript({0: early}))
    with pytest.raises(ValueError, match=r"set ModeScript.forecast_order = 2 so the sampler keeps 3"):
        Sampler(backbone, step_cap=8).sample(noise[one], cond.select(one), ModeScript({0: FORECASTS}, 1))
    with pytest.raises(ValueError, match="solver must be one of euler, multistep2"):
        Sampler(backbone, solver="heun")


class ToyODE:
    """A backbone whose velocity is known in closed form: dx/dsigma = x * cos(sigma), so
    x(sigma) = x(1) * exp(sin(sigma) - sin(1)). No blocks, no cache; enough of the Backbone protocol."""

    family, txt_first = "toy", False

    def check_latents(self, latents):
        pass

    def schedule(self, latents):
        return TimeSchedule(shift=3.0)  # uneven sigma steps, as SD3's shifted schedule

    def forward(self, latents, sigma, cond, *, level=0, reuse_residual=None):
        velocity = latents * torch.cos(sigma.double()).view(-1, 1)
        return BackboneOutput(velocity.float(), torch.zeros_like(latents), 0, 0)

    def row_flops(self, latents, cond, *, level, reuse):
        return 1, 0


@pytest.mark.parametrize("solver, order", [("euler", 1), ("multistep2", 2)])
def test_solver_converges_at_its_order(solver, order):
    from rapid3.backbones import Conditioning

    x1 = torch.tensor([[1.0], [-0.5]])
    cond = Conditioning({"pooled_projections": torch.zeros(2, 1)})
    exact = x1 * math.exp(math.sin(0.0) - math.sin(1.0))
    errors = []
    for steps in (16, 32, 64):
        result = Sampler(ToyODE(), step_cap=steps, solver=solver).sample(x1.clone(), cond, UniformSteps())
        errors.append((result.latents.double() - exact).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(2 ** order * 0.75 < r < 2 ** order * 1.3 for r in ratios), (errors, ratios)


def test_multistep2_first_step_is_euler_and_full_compute_stays_euler_by_default(sd3):  # noqa: F811
    backbone, noise, cond, _ = sd3
    one = torch.tensor([0])
    euler = Sampler(backbone, step_cap=1).sample(noise[one], cond.select(one), UniformSteps())
    multistep = Sampler(backbone, step_cap=1, solver="multistep2").sample(noise[one], cond.select(one), UniformSteps())
    assert torch.equal(euler.latents, multistep.latents)
    assert Sampler(backbone).solver == "euler"


def test_measured_step_costs_price_forecasts(sd3):  # noqa: F811
    from rapid3.accel.costs import MeasuredStepCosts, measure_step_costs

    backbone, noise, cond, _ = sd3
    one = torch.tensor([0])
    costs = measure_step_costs(backbone, noise[one], cond.select(one), repeats=1)
    assert set(costs.forecast) == {1, 2} and all(0 < c < 1 for c in costs.forecast.values())
    assert MeasuredStepCosts.from_rows(costs.to_rows()) == costs
    fixed = MeasuredStepCosts(costs.relative, {1: 0.3, 2: 0.4})
    result = Sampler(backbone, step_cap=8, step_costs=fixed).sample(noise[one], cond.select(one),
                                                                    ModeScript({0: FORECASTS}))
    priced = {"recompute": 1.0, "forecast1": 0.3, "forecast2": 0.4}
    assert [r.equivalent_steps for r in result.stats.records[0]] == [priced[m] for _, m in FORECASTS]
    with pytest.raises(ValueError, match="no forecast of order 2 .* measure them again"):
        Sampler(backbone, step_cap=8, step_costs=MeasuredStepCosts(costs.relative)).sample(
            noise[one], cond.select(one), ModeScript({0: FORECASTS}))
