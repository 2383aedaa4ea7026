"""GRPO math: the compute-discounted reward, group advantages and the clipped surrogate's sign and masking."""

from __future__ import annotations

import pytest
import torch

from rapid3.rewards.composite import discounted_reward
from rapid3.train.grpo import group_advantages, grpo_loss, zero_spread_fraction


@pytest.mark.parametrize("lam, omega", [(0.97, 1.0), (0.8, 0.5), (0.5, 0.0)])
def test_discounted_reward_is_the_explicit_sum_for_integer_k(lam, omega):
    q, d = torch.tensor([0.7, 0.2]), torch.tensor([0.4, 0.9])
    for k in range(1, 29):
        explicit = sum(lam ** (k - j) * (q.double() + omega * d.double()) for j in range(1, k + 1)) / k
        torch.testing.assert_close(discounted_reward(q, d, float(k), lam=lam, omega=omega), explicit)


def test_discounted_reward_falls_with_compute():
    k = torch.linspace(0.5, 40.0, 200)
    reward = discounted_reward(0.6, 0.3, k, lam=0.97, omega=1.0)
    assert (reward.diff() < 0).all()
    assert discounted_reward(0.6, 0.3, 1.0, lam=0.97, omega=1.0).item() == pytest.approx(0.9)  # K = 1: no discount


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": 0.0, "omega": 1.0}, "lam"), ({"lam": 1.0, "omega": 1.0}, "lam"), ({"lam": 1.5, "omega": 1.0}, "lam"),
    ({"lam": 0.9, "omega": -0.1}, "omega"),
])
def test_discounted_reward_rejects_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        discounted_reward(0.5, 0.5, 10.0, **kwargs)


def test_discounted_reward_rejects_non_positive_compute():
    with pytest.raises(ValueError, match="equivalent_steps"):
        discounted_reward(0.5, 0.5, torch.tensor([3.0, 0.0]), lam=0.9, omega=1.0)


def test_group_advantages_normalise_each_group_alone():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, 0.0, 0.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3))
    torch.testing.assert_close(adv[0].std(correction=0), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))
    shifted = rewards.clone()
    shifted[:4] = 3 * shifted[:4] - 7  # an affine change inside group 0 alone
    adv_shifted = group_advantages(shifted, group_size=4).view(3, 4)
    torch.testing.assert_close(adv_shifted, adv, rtol=1e-5, atol=1e-5)
    assert zero_spread_fraction(rewards, group_size=4) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(rewards, group_size=5)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(rewards, group_size=1)


def test_grpo_loss_gradient_sign_and_clipping():
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # phi = 1: gradient descent raises the log-prob of positive-advantage actions, lowers the others.
    new = old.clone().requires_grad_()
    grpo_loss(new, old, advantages).backward()
    torch.testing.assert_close(new.grad, -advantages / 4)
    # phi outside [0.8, 1.2] in the advantage's favour: clipped, no gradient; against it: pessimistic, kept.
    new = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5])).requires_grad_()
    loss = grpo_loss(new, old, advantages, clip=0.2)
    loss.backward()
    assert new.grad[0] == 0 and new.grad[1] == 0 and new.grad[2] < 0 and new.grad[3] > 0
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 0.5 - 1.5) / 4)


def test_grpo_loss_padded_layout_equals_flat_decisions():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 4]
    new, old = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.arange(4) < torch.tensor(lengths)[:, None]
    new, old = new.masked_fill(~mask, float("nan")).requires_grad_(), old.masked_fill(~mask, float("nan"))
    advantages = torch.tensor([0.5, -1.0, 2.0])
    loss = grpo_loss(new, old, advantages, mask=mask)
    flat = grpo_loss(new[mask], old[mask], advantages.repeat_interleave(torch.tensor(lengths)))
    torch.testing.assert_close(loss, flat)
    loss.backward()
    assert torch.isfinite(new.grad).all() and (new.grad[~mask] == 0).all()
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(new, old, advantages[:2], mask=mask)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_solves_a_contextual_bandit(sign):
    """Per context one arm is always best (sign=1) or always worst (sign=-1); GRPO finds / avoids it."""
    torch.manual_seed(0)
    contexts, arms, group = 3, 4, 8
    best = torch.tensor([2, 0, 3])
    logits = torch.zeros(contexts, arms, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    context = torch.arange(contexts).repeat_interleave(group)  # one group per context
    for _ in range(150):
        with torch.no_grad():
            action = torch.distributions.Categorical(logits=logits[context]).sample()
            old = torch.distributions.Categorical(logits=logits[context]).log_prob(action)
        reward = sign * (action == best[context]).double() + 0.1 * torch.rand(len(action), dtype=torch.float64)
        advantages = group_advantages(reward, group)
        for _ in range(2):  # inner epochs over one rollout batch: ratios move off 1 and clipping matters
            new = torch.distributions.Categorical(logits=logits[context]).log_prob(action)
            loss = grpo_loss(new, old, advantages)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    p_best = logits.softmax(-1)[torch.arange(contexts), best]
    assert (p_best > 0.9).all() if sign > 0 else (p_best < 0.05).all()
