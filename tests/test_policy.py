"""RapidPolicy: its log-probs against torch.distributions, masking, disabled heads, the real sampler, save/load."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from tiny_pipelines import tiny_sd3_transformer
from torch.distributions import Beta, Categorical

from rapid3.accel.actions import Actions, Controller, Observation
from rapid3.accel.controllers import UniformSteps
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning, SD3Backbone, TimeSchedule
from rapid3.backbones.sparse_attention import NUM_SPARSE_LEVELS
from rapid3.policy import RapidPolicy
from rapid3.train.grpo import group_advantages, grpo_loss

POOLED = 48  # the tiny SD3 transformer's pooled_projection_dim
STEP_CAP = 10


def no_probe(kind: str) -> torch.Tensor:
    raise AssertionError(f"RapidPolicy should not probe the backbone (asked for {kind!r}).")


def make_obs(batch: int = 8, *, seed: int = 0, hw: int = 8, has_cache: torch.Tensor | None = None) -> Observation:
    """A random mid-sampling observation of SD3-shaped latents; odd rows have a cache unless told."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    has_cache = torch.arange(batch) % 2 == 1 if has_cache is None else has_cache
    schedule = TimeSchedule(shift=3.0)
    t = 0.1 + 0.9 * torch.rand(batch, generator=g, dtype=torch.float64)
    step_index = torch.randint(0, STEP_CAP - 1, (batch,), generator=g)
    delta = 0.2 * randn(batch, 16, hw, hw) * has_cache.view(-1, 1, 1, 1)
    return Observation(sample_ids=torch.arange(batch), latents=randn(batch, 16, hw, hw), t=t, sigma=schedule.sigma(t),
                       step_index=step_index, refresh_delta=delta, last_velocity=randn(batch, 16, hw, hw),
                       has_cache=has_cache, spent=0.8 * step_index.double(), pooled=randn(batch, POOLED),
                       step_cap=STEP_CAP, schedule=schedule, probe=no_probe)


def make_policy(seed: int = 0, scale: float = 0.1, **config) -> RapidPolicy:
    """A small policy with every weight perturbed, so that its decisions depend on the observation."""
    policy = RapidPolicy(pooled_dim=POOLED, hidden_dim=32, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


def expected_log_prob(policy: RapidPolicy, obs: Observation, actions: Actions) -> torch.Tensor:
    """The joint log-prob from torch.distributions, with RAPID3's masking rules written out."""
    dist = policy.distribution(obs)
    total = torch.zeros(len(obs))
    if dist.alpha is not None:
        total += Beta(dist.alpha, dist.beta).log_prob(actions.step_ratio.float())
    if dist.cache_logits is not None:  # reuse is impossible without a cache: no term there
        total += torch.where(obs.has_cache, Categorical(logits=dist.cache_logits).log_prob(actions.reuse.long()), 0.0)
    if dist.sparse_logits is not None:  # the level is irrelevant on a reuse step
        total += torch.where(actions.reuse, 0.0, Categorical(logits=dist.sparse_logits).log_prob(actions.level))
    return total


def test_sampled_log_probs_match_torch_distributions():
    policy, obs = make_policy(), make_obs(64)
    policy.sampling = True
    torch.manual_seed(0)
    actions = policy.decide(obs)
    assert isinstance(policy, Controller)
    # Every masking case occurs: reuse and recompute with a cache, several levels, no-cache rows.
    assert actions.reuse.any() and (obs.has_cache & ~actions.reuse).any() and len(actions.level.unique()) > 1
    assert not (actions.reuse & ~obs.has_cache).any()
    expected = expected_log_prob(policy, obs, actions).detach()
    torch.testing.assert_close(actions.log_prob, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.log_prob(obs, actions).detach(), expected, rtol=1e-5, atol=1e-5)


def test_entropy_matches_torch_distributions_and_is_differentiable():
    policy, obs = make_policy(), make_obs(16)
    dist = policy.distribution(obs)
    cache, sparse = Categorical(logits=dist.cache_logits), Categorical(logits=dist.sparse_logits)
    recompute = torch.where(obs.has_cache, cache.probs[:, 0], 1.0)
    expected = (Beta(dist.alpha, dist.beta).entropy() + torch.where(obs.has_cache, cache.entropy(), 0.0)
                + recompute * sparse.entropy())
    entropy = policy.entropy(obs)
    torch.testing.assert_close(entropy, expected)
    entropy.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (policy.step_head.weight, policy.token_proj.weight))


def test_fresh_policy_is_near_neutral_and_samples_its_distribution():
    """Init: Beta mode 0.85, reuse 0.2, dense 0.7; draws follow the Beta and the categoricals."""
    policy, obs = RapidPolicy(pooled_dim=POOLED, hidden_dim=32), make_obs(4000, hw=2, has_cache=torch.ones(4000, dtype=torch.bool))
    dist = policy.distribution(obs)
    torch.testing.assert_close((dist.alpha - 1) / (dist.alpha + dist.beta - 2), torch.full((4000,), 0.85))
    torch.testing.assert_close(dist.cache_logits.softmax(-1)[:, 1], torch.full((4000,), 0.2))
    torch.testing.assert_close(dist.sparse_logits.softmax(-1)[:, 0], torch.full((4000,), 0.7))
    policy.sampling = True
    torch.manual_seed(1)
    actions = policy.decide(obs)
    assert actions.step_ratio.mean().item() == pytest.approx(18 / 22, abs=0.01)  # Beta(18, 4) mean
    assert actions.reuse.float().mean().item() == pytest.approx(0.2, abs=0.03)
    dense = (actions.level[~actions.reuse] == 0).float().mean().item()
    assert dense == pytest.approx(0.7, abs=0.03)


def test_deterministic_mode_is_beta_mode_and_argmax():
    policy, obs = make_policy(scale=0.3), make_obs(32)
    actions = policy.decide(obs)
    dist = policy.distribution(obs)
    mode = ((dist.alpha - 1) / (dist.alpha + dist.beta - 2)).detach()
    torch.testing.assert_close(actions.step_ratio, mode)
    reuse = (dist.cache_logits.argmax(-1) == 1) & obs.has_cache
    assert torch.equal(actions.reuse, reuse) and reuse.any()
    assert torch.equal(actions.level, torch.where(reuse, 0, dist.sparse_logits.argmax(-1)))
    assert actions.log_prob is None
    assert torch.equal(policy.decide(obs).next_t, actions.next_t)


@pytest.mark.parametrize("disabled", ["step_skip", "cache_reuse", "sparse_attention"])
def test_disabled_heads_use_defaults_and_add_no_log_prob(disabled):
    policy, obs = make_policy(**{disabled: False, "default_steps": 6}), make_obs(32)
    assert not any(name.startswith(disabled.split("_")[0] + "_head") for name in policy.state_dict())
    policy.sampling = True
    actions = policy.decide(obs)
    if disabled == "step_skip":
        assert torch.equal(actions.next_t, UniformSteps(6).decide(obs).next_t)
    elif disabled == "cache_reuse":
        assert not actions.reuse.any()
    else:
        assert not actions.level.any() and actions.reuse.any()
    torch.testing.assert_close(actions.log_prob, expected_log_prob(policy, obs, actions).detach())


def test_reuse_never_chosen_without_cache():
    policy, obs = make_policy(), make_obs(32)
    with torch.no_grad():
        policy.cache_head.bias.copy_(torch.tensor([0.0, 20.0]))  # the head wants to reuse everywhere
    for sampling in (False, True):
        policy.sampling = sampling
        actions = policy.decide(obs)
        assert torch.equal(actions.reuse, obs.has_cache)
    forced = Actions(next_t=actions.next_t, reuse=torch.ones(32, dtype=torch.bool), level=actions.level,
                     step_ratio=actions.step_ratio)
    with pytest.raises(ValueError, match="reuse a cache"):
        policy.log_prob(obs, forced)
    with pytest.raises(ValueError, match="no Step-Skip ratio"):
        policy.log_prob(obs, Actions(next_t=actions.next_t, reuse=actions.reuse, level=actions.level))


def test_packed_flux_latents_decide_like_spatial_ones():
    policy, obs = make_policy(), make_obs(4)
    pack = lambda x: FluxPipeline._pack_latents(x, 4, 16, 8, 8)  # noqa: E731
    packed = Observation(**{**vars(obs), "latents": pack(obs.latents), "refresh_delta": pack(obs.refresh_delta),
                            "last_velocity": pack(obs.last_velocity)})
    spatial, flux = policy.distribution(obs), policy.distribution(packed)
    torch.testing.assert_close(flux.alpha, spatial.alpha)
    torch.testing.assert_close(flux.sparse_logits, spatial.sparse_logits)
    with pytest.raises(ValueError, match=r"packed \(B, N, 64\)"):
        policy.decide(Observation(**{**vars(obs), "latents": obs.latents[:, :, :7]}))
    with pytest.raises(ValueError, match="pooled prompts of size 48"):
        policy.decide(Observation(**{**vars(obs), "pooled": obs.pooled[:, :5]}))


def test_policy_drives_the_sd3_sampler_with_cfg():
    g = torch.Generator().manual_seed(0)
    backbone = SD3Backbone(tiny_sd3_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    cond, uncond = (Conditioning({"encoder_hidden_states": torch.randn(3, 7, 64, generator=g),
                                  "pooled_projections": torch.randn(3, POOLED, generator=g)}) for _ in range(2))
    noise = torch.randn(3, 16, 8, 8, generator=g)
    policy = RapidPolicy.for_backbone(backbone, hidden_dim=32)
    assert policy.config.backbone_family == "sd3" and policy.config.pooled_dim == POOLED
    policy.sampling = True
    torch.manual_seed(0)
    result = Sampler(backbone, step_cap=6).sample(noise, cond, policy, uncond=uncond, guidance_scale=3.0,
                                                  keep_trace=True)
    assert torch.isfinite(result.latents).all()
    assert all(1 <= len(records) <= 6 and records[-1].next_t == 0.0 for records in result.stats.records)
    assert any(record.reuse for records in result.stats.records for record in records)
    for obs, actions in result.trace:  # stored rollout log-probs are what the policy recomputes
        torch.testing.assert_close(policy.log_prob(obs, actions).detach(), actions.log_prob, rtol=1e-5, atol=1e-5)


def test_save_and_load_decide_identically(tmp_path):
    policy, obs = make_policy(scale=0.3, default_steps=5, sparse_attention=False), make_obs(16)
    policy.save_pretrained(tmp_path)
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = RapidPolicy.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(policy.config) and loaded.config.default_steps == 5
    first, second = policy.decide(obs), loaded.decide(obs)
    assert torch.equal(first.next_t, second.next_t) and torch.equal(first.reuse, second.reuse)
    assert torch.equal(policy.log_prob(obs, first), loaded.log_prob(obs, first))


def test_policy_is_tiny():
    """RAPID3's heads are ~0.025% of FLUX; ours at SD3-medium sizes stay far below 0.025% of its 2B."""
    assert sum(p.numel() for p in RapidPolicy(pooled_dim=2048).parameters()) < 0.00025 * 2e9


def test_grpo_moves_the_policy_toward_the_rewarded_actions():
    """Reward = [level == 2] - ratio: GRPO makes level 2 the mode and lowers the Beta mode."""
    policy, prompts = make_policy(scale=0.05, cache_reuse=False), make_obs(4, hw=4)
    obs = Observation(**{k: v.repeat_interleave(8, 0) if isinstance(v, torch.Tensor) else v
                         for k, v in vars(prompts).items()})  # 4 groups of 8 rollouts of one state each
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-2)
    start_ratio = policy.decide(obs).step_ratio.mean().item()
    torch.manual_seed(0)
    for _ in range(60):
        policy.sampling = True
        actions = policy.decide(obs)
        reward = (actions.level == 2).double() - actions.step_ratio
        advantages = group_advantages(reward, group_size=8)
        loss = grpo_loss(policy.log_prob(obs, actions), actions.log_prob, advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.sampling = False
    final = policy.decide(obs)
    assert (final.level == 2).all()
    assert final.step_ratio.mean().item() < start_ratio - 0.1


def test_bad_config_raises():
    with pytest.raises(ValueError, match="at least one head"):
        RapidPolicy(step_skip=False, cache_reuse=False, sparse_attention=False)
    with pytest.raises(ValueError, match="init_ratio"):
        RapidPolicy(init_ratio=1.0)
    with pytest.raises(ValueError, match="default_steps"):
        RapidPolicy(default_steps=0)
    with pytest.raises(ValueError, match="step_schedule must be one of grid, geometric; got 'linear'"):
        RapidPolicy(step_schedule="linear")
    assert RapidPolicy(pooled_dim=POOLED).sparse_head.out_features == 1 + NUM_SPARSE_LEVELS


def sampled_times(step_schedule: str, ratio: float) -> list[float]:
    """The times a policy whose Step-Skip always picks ``ratio`` visits on the tiny SD3 sampler."""
    backbone = SD3Backbone(tiny_sd3_transformer(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    policy = RapidPolicy.for_backbone(backbone, hidden_dim=32, step_schedule=step_schedule, init_ratio=ratio,
                                      init_concentration=1e4, cache_reuse=False, sparse_attention=False)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning({"encoder_hidden_states": torch.randn(1, 7, 64, generator=g),
                         "pooled_projections": torch.randn(1, POOLED, generator=g)})
    result = Sampler(backbone, step_cap=STEP_CAP).sample(torch.randn(1, 16, 8, 8, generator=g), cond, policy)
    return [record.t for record in result.stats.records[0]] + [result.stats.records[0][-1].next_t]


def test_grid_step_skip_without_skipping_is_the_reference_schedule():
    reference = TimeSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), image_seq_len=16,
                                            grid="scheduler").uniform_times(STEP_CAP)
    torch.testing.assert_close(torch.tensor(sampled_times("grid", 0.9999), dtype=torch.float64), reference,
                               rtol=0, atol=1e-3)
    # Ratio 0.5 takes every other point of the grid; the geometric schedule halves t instead.
    torch.testing.assert_close(torch.tensor(sampled_times("grid", 0.5), dtype=torch.float64), reference[::2], rtol=0, atol=1e-3)
    geometric = sampled_times("geometric", 0.5)
    assert geometric[:3] == pytest.approx([1.0, 0.5, 0.25], abs=1e-3)
