"""The sampler loop against diffusers' own pipelines, per-sample independence, reuse, sparsity and costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd3_transformer

from rapid3.accel.actions import Actions, Observation, next_time_from_ratio, next_time_on_grid
from rapid3.accel.controllers import FullCompute, UniformSteps
from rapid3.accel.costs import MeasuredStepCosts, measure_step_costs
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning, SD3Backbone, TimeSchedule, backbone_for
from rapid3.backbones.sparse_attention import NUM_SPARSE_LEVELS, SPARSE_KEEP_FRACTIONS, default_block_size

PROMPTS = ["a red circle", "two blue squares"]


def _sd3_inputs(pipe, batch: int = 2, seed: int = 0):
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS[:batch], PROMPTS[:batch], PROMPTS[:batch], negative_prompt=[""] * batch, do_classifier_free_guidance=True)
    cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
    uncond = Conditioning({"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled})
    noise = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    return noise, cond, uncond


def test_full_compute_reproduces_sd3_pipeline():
    pipe = tiny_sd3_pipeline()
    noise, cond, uncond = _sd3_inputs(pipe)
    expected = pipe(PROMPTS, negative_prompt=[""] * 2, num_inference_steps=6, guidance_scale=4.5,
                    latents=noise.clone(), output_type="latent").images
    backbone = backbone_for(pipe.transformer, pipe.scheduler)
    result = Sampler(backbone, step_cap=6).sample(noise, cond, FullCompute(), uncond=uncond, guidance_scale=4.5)
    torch.testing.assert_close(result.latents, expected, rtol=1e-5, atol=1e-5)
    assert result.stats.steps.tolist() == [6, 6]


def test_full_compute_reproduces_flux_pipeline():
    pipe = tiny_flux_pipeline()
    size, steps = 32, 5
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS)
    latents, image_ids = pipe.prepare_latents(2, 16, size, size, embeds.dtype, torch.device("cpu"),
                                              torch.Generator().manual_seed(0))
    expected = pipe(PROMPTS, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                    latents=latents.clone(), output_type="latent").images
    cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled,
                         "guidance": torch.full((2,), 3.5)}, shared={"txt_ids": text_ids, "img_ids": image_ids})
    backbone = backbone_for(pipe.transformer, pipe.scheduler)
    result = Sampler(backbone, step_cap=steps).sample(latents, cond, FullCompute())
    torch.testing.assert_close(result.latents, expected, rtol=1e-5, atol=1e-5)


class ScriptedController:
    """Per sample: a fixed list of (ratio, reuse, level) actions, one per executed step."""

    def __init__(self, scripts: dict[int, list[tuple[float, bool, int]]]) -> None:
        self.scripts = scripts

    def reset(self, batch_size: int) -> None:
        pass

    def decide(self, obs: Observation) -> Actions:
        chosen = [self.scripts[int(i)][int(k)] for i, k in zip(obs.sample_ids, obs.step_index)]
        ratio = torch.tensor([c[0] for c in chosen], dtype=torch.float64)
        return Actions(next_t=next_time_from_ratio(obs.t, ratio), reuse=torch.tensor([c[1] for c in chosen]),
                       level=torch.tensor([c[2] for c in chosen]))


MIXED = [(0.8, False, 0), (0.8, True, 0), (0.7, False, 2), (0.6, False, 3), (0.5, True, 0), (0.5, False, 1),
         (0.5, False, 0), (0.5, False, 0)]
DENSE = [(0.6, False, 0)] * 8
SPARSE = [(0.7, False, 1), (0.7, True, 0), (0.5, False, 3), (0.5, False, 2)] * 2


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_sd3_pipeline()
    noise, cond, uncond = _sd3_inputs(pipe, batch=2)
    noise = torch.cat([noise, noise.flip(0), noise * 0.5])
    cond, uncond = (Conditioning.cat([c, c.select(torch.tensor([1, 0])), c]) for c in (cond, uncond))
    return SD3Backbone(pipe.transformer, pipe.scheduler), noise, cond, uncond


def test_sample_alone_equals_sample_in_mixed_batch(sd3):
    backbone, noise, cond, uncond = sd3
    sampler = Sampler(backbone, step_cap=8)
    batch = sampler.sample(noise, cond, ScriptedController({0: MIXED, 1: DENSE, 2: SPARSE, 3: MIXED, 4: DENSE,
                                                             5: SPARSE}), uncond=uncond, guidance_scale=3.0)
    one = torch.tensor([0])
    alone = sampler.sample(noise[:1], cond.select(one), ScriptedController({0: MIXED}), uncond=uncond.select(one),
                           guidance_scale=3.0)
    assert (batch.latents[0] - alone.latents[0]).abs().max().item() <= 1e-5
    assert [(r.reuse, r.level) for r in batch.stats.records[0]] == [(r.reuse, r.level) for r in alone.stats.records[0]]


def test_reuse_executes_zero_blocks(sd3):
    backbone, noise, cond, uncond = sd3
    result = Sampler(backbone, step_cap=8).sample(noise[:2], cond.select(torch.arange(2)),
                                                  ScriptedController({0: MIXED, 1: DENSE}), uncond=uncond.select(
                                                      torch.arange(2)), guidance_scale=3.0)
    n_blocks = len(backbone.blocks())
    for record in result.stats.records[0]:
        assert record.blocks == (0 if record.reuse else n_blocks)
        assert (record.attention_flops == 0) == record.reuse
    assert result.stats.blocks[1].item() == n_blocks * 8


def test_reuse_output_uses_cached_residual(sd3):
    """A reuse forward equals the full forward whose residual it reuses, at the same time."""
    backbone, noise, cond, _ = sd3
    x, sigma, c = noise[:1], torch.tensor([0.7]), cond.select(torch.tensor([0]))
    full = backbone.forward(x, sigma, c)
    reused = backbone.forward(x, sigma, c, reuse_residual=full.residual)
    torch.testing.assert_close(reused.velocity, full.velocity, rtol=1e-5, atol=1e-5)
    assert reused.blocks_run == 0 and full.blocks_run == len(backbone.blocks())


def test_sparsity_level_zero_is_dense_attention():
    transformer = tiny_sd3_transformer()
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 64), "pooled_projections": torch.randn(2, 48)}
    expected = transformer(hidden_states=x, timestep=torch.tensor([500.0, 250.0]), **kwargs).sample
    backbone = SD3Backbone(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))
    got = backbone.forward(x, torch.tensor([0.5, 0.25]), Conditioning(kwargs), level=0).velocity
    assert torch.equal(got, expected)
    sparse = backbone.forward(x, torch.tensor([0.5, 0.25]), Conditioning(kwargs), level=3).velocity
    assert not torch.allclose(sparse, expected, atol=1e-6)
    backbone.remove()
    assert torch.equal(transformer(hidden_states=x, timestep=torch.tensor([500.0, 250.0]), **kwargs).sample, expected)


def test_sparse_level_flops_follow_keep_fraction():
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_sd3_transformer(sample_size=32)
    backbone = SD3Backbone(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = torch.zeros(1, 16, 64, 64)  # 1024 image tokens
    cond = Conditioning({"encoder_hidden_states": torch.zeros(1, 8, 64), "pooled_projections": torch.zeros(1, 48)})
    n_img, n_txt = backbone.token_counts(x, cond)
    dense_non_attn, dense_attn = backbone.row_flops(x, cond, level=0, reuse=False)
    for level in range(1, NUM_SPARSE_LEVELS + 1):
        non_attn, attn = backbone.row_flops(x, cond, level=level, reuse=False)
        # Scoring key blocks (pooled q.k) is the only extra work, and it is small.
        assert dense_non_attn <= non_attn < dense_non_attn + 0.05 * (dense_non_attn + dense_attn)
        # Image queries x image keys scale with the keep fraction; text rows and columns stay dense.
        n = n_img + n_txt
        n_blocks = n_img // default_block_size(n_img)
        kept = math.ceil(SPARSE_KEEP_FRACTIONS[level - 1] * n_blocks - 1e-9) / n_blocks
        img_img_dense = dense_attn * n_img * n_img / (n * n)
        assert attn == pytest.approx(dense_attn - img_img_dense * (1 - kept), rel=1e-9)
    reuse_non_attn, reuse_attn = backbone.row_flops(x, cond, level=0, reuse=True)
    assert reuse_attn == 0 and 0 < reuse_non_attn < 0.15 * dense_non_attn  # embeddings and output layer only


def test_uniform_steps_end_at_zero_within_cap(sd3):
    backbone, noise, cond, _ = sd3
    result = Sampler(backbone, step_cap=5).sample(noise[:2], cond.select(torch.arange(2)), UniformSteps(3))
    for records in result.stats.records:
        assert len(records) == 3 and records[-1].next_t == 0.0
    slow = ScriptedController({0: [(0.95, False, 0)] * 8, 1: [(0.9, False, 0)] * 8})
    result = Sampler(backbone, step_cap=5).sample(noise[:2], cond.select(torch.arange(2)), slow)
    for records in result.stats.records:
        assert len(records) == 5 and records[-1].next_t == 0.0 and records[-2].next_t > 0.5


def test_equivalent_steps_count_reuse_and_sparsity(sd3):
    backbone, noise, cond, uncond = sd3
    result = Sampler(backbone, step_cap=8).sample(noise[:2], cond.select(torch.arange(2)),
                                                  ScriptedController({0: MIXED, 1: DENSE}),
                                                  uncond=uncond.select(torch.arange(2)), guidance_scale=3.0)
    dense_k = result.stats.equivalent_steps[1].item()
    assert dense_k == pytest.approx(len(result.stats.records[1]))
    for record in result.stats.records[0]:
        if record.reuse:
            assert record.equivalent_steps < 0.2
        elif record.level:
            assert 0.5 < record.equivalent_steps < 1.0
        else:
            assert record.equivalent_steps == pytest.approx(1.0)


def test_bad_inputs_have_clear_errors(sd3):
    backbone, noise, cond, uncond = sd3
    with pytest.raises(TypeError, match="no adapter for"):
        backbone_for(torch.nn.Linear(2, 2), None)
    sampler = Sampler(backbone, step_cap=4)
    with pytest.raises(ValueError, match="latents must be"):
        sampler.sample(noise[:, :3], cond, FullCompute())
    with pytest.raises(ValueError, match="multiples of the patch size"):
        sampler.sample(noise[..., :15, :15], cond, FullCompute())
    with pytest.raises(ValueError, match="sparsity level outside"):
        sampler.sample(noise[:1], cond.select(torch.tensor([0])), ScriptedController({0: [(0.5, False, 4)] * 4}))
    with pytest.raises(ValueError, match="reuse the cache"):
        sampler.sample(noise[:1], cond.select(torch.tensor([0])), ScriptedController({0: [(0.5, True, 0)] * 4}))
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        next_time_from_ratio(torch.ones(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="strictly inside"):
        next_time_from_ratio(torch.ones(1), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="strictly inside"):
        next_time_on_grid(torch.ones(1), torch.tensor([1.0]), TimeSchedule().uniform_times(4))
    with pytest.raises(ValueError, match="sparsity level"):
        backbone.forward(noise[:1], torch.ones(1), cond.select(torch.tensor([0])), level=7)
    with pytest.raises(ValueError, match="guidance_scale"):
        sampler.sample(noise, cond, FullCompute(), guidance_scale=5.0)


def test_flux_reuse_and_sparsity_in_a_mixed_batch():
    """FLUX: single-stream blocks skip on reuse too, sparse levels run, and batching is per sample."""
    pipe = tiny_flux_pipeline()
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS)
    latents, image_ids = pipe.prepare_latents(2, 16, 64, 64, embeds.dtype, torch.device("cpu"),
                                              torch.Generator().manual_seed(0))
    cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled,
                         "guidance": torch.full((2,), 3.5)}, shared={"txt_ids": text_ids, "img_ids": image_ids})
    backbone = backbone_for(pipe.transformer, pipe.scheduler)
    sampler = Sampler(backbone, step_cap=8)
    batch = sampler.sample(latents, cond, ScriptedController({0: MIXED, 1: SPARSE}))
    alone = sampler.sample(latents[:1], cond.select(torch.tensor([0])), ScriptedController({0: MIXED}))
    assert (batch.latents[0] - alone.latents[0]).abs().max().item() <= 1e-5
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert [r.blocks for r in batch.stats.records[0]] == [0 if reuse else n_blocks for _, reuse, _ in MIXED]
    sparse_attn = [r.attention_flops for r in batch.stats.records[1] if r.level == 3]
    dense = backbone.row_flops(latents, cond, level=0, reuse=False)[1]
    assert sparse_attn and all(a < dense for a in sparse_attn)


class ProbingController(ScriptedController):
    """Calls a backbone probe every step, then follows its script."""

    def __init__(self, scripts, kind: str) -> None:
        super().__init__(scripts)
        self.kind, self.features = kind, []

    def decide(self, obs: Observation) -> Actions:
        self.features.append(obs.probe(self.kind))
        return super().decide(obs)


def test_probes_return_first_block_features_and_are_charged(sd3):
    backbone, noise, cond, _ = sd3
    transformer = backbone.transformer
    x, c = noise[:1], cond.select(torch.tensor([0]))
    feature, blocks = backbone.probe(x, torch.tensor([0.5]), c, "modulated_input")
    with torch.no_grad():
        temb = transformer.time_text_embed(torch.tensor([500.0]), c.pooled)
        expected = transformer.transformer_blocks[0].norm1(transformer.pos_embed(x), emb=temb)[0]
    torch.testing.assert_close(feature, expected)
    assert blocks == 0
    with pytest.raises(ValueError, match="Unknown probe"):
        backbone.probe(x, torch.tensor([0.5]), c, "attention_maps")

    plain = Sampler(backbone, step_cap=8).sample(x, c, ScriptedController({0: MIXED}))
    for kind, extra_blocks in (("modulated_input", 0), ("first_block_residual", 1)):
        controller = ProbingController({0: MIXED}, kind)
        probed = Sampler(backbone, step_cap=8).sample(x, c, controller)
        assert len(controller.features) == 8
        torch.testing.assert_close(probed.latents, plain.latents)
        for with_probe, without in zip(probed.stats.records[0], plain.stats.records[0]):
            assert with_probe.blocks == without.blocks + extra_blocks
            assert with_probe.flops > without.flops


def test_measured_step_costs_define_equivalent_steps(sd3):
    backbone, noise, cond, _ = sd3
    costs = measure_step_costs(backbone, noise[:1], cond.select(torch.tensor([0])), repeats=1)
    assert costs.of(False, 0) == 1.0 and 0 < costs.of(True, 0) < 1.0
    assert set(costs.relative) == {(False, lv) for lv in range(NUM_SPARSE_LEVELS + 1)} | {(True, 0)}
    fixed = MeasuredStepCosts({**costs.relative, (True, 0): 0.25, (False, 3): 2.0})
    result = Sampler(backbone, step_cap=8, step_costs=fixed).sample(noise[:1], cond.select(torch.tensor([0])),
                                                                    ScriptedController({0: MIXED}))
    expected = {(False, 0): 1.0, (True, 0): 0.25, (False, 3): 2.0, (False, 2): costs.of(False, 2),
                (False, 1): costs.of(False, 1)}
    assert [r.equivalent_steps for r in result.stats.records[0]] == [expected[(r.reuse, r.level)]
                                                                     for r in result.stats.records[0]]


def test_grid_step_skip_moves_along_the_reference_grid():
    """Off-grid times step by grid intervals, linearly between points (numpy.interp); past the end is t = 0."""
    grid = TimeSchedule(t_min=1e-3).uniform_times(28)
    t = torch.tensor([1.0, 0.5, 0.3, 0.05, 0.05], dtype=torch.float64)
    ratio = torch.tensor([0.999999, 0.4, 0.8, 0.5, 0.1], dtype=torch.float64)
    times, positions = grid.flip(0).numpy(), np.arange(28, -1, -1.0)
    expected = [np.interp(np.interp(ti, times, positions) + 1 / ri, np.arange(29.0), grid.numpy())
                for ti, ri in zip(t.tolist(), ratio.tolist())]
    expected[-1] = 0.0  # 10 intervals from t = 0.05 overshoot the grid's end
    torch.testing.assert_close(next_time_on_grid(t, ratio, grid), torch.tensor(expected, dtype=torch.float64))
    assert next_time_on_grid(t[:1], ratio[:1], grid).item() == pytest.approx(grid[1].item(), abs=1e-6)
