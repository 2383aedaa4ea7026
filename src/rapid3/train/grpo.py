"""GRPO math for RAPID3: the compute-discounted reward, per-group advantages, the clipped surrogate.

Pure tensor functions; the trainer composes them (rollout -> reward -> advantage -> update).
"""

from __future__ import annotations

import torch


def discounted_reward(quality: torch.Tensor | float, disc: torch.Tensor | float,
                      equivalent_steps: torch.Tensor | float, *, lam: float, omega: float,
                      fidelity: torch.Tensor | float = 0.0, psi: float = 0.0) -> torch.Tensor:
    """RAPID3's reward r = (1/K) sum_{k=1..K} lam^(K-k) s = s (1 - lam^K) / (K (1 - lam)) with the score
    s = q + omega d (+ psi f, our fidelity term: the image's similarity to full compute from the same noise).

    The closed form is used, so K (equivalent steps) may be fractional. For s > 0 the reward falls
    as K grows, which is what makes the policy spend less; keep q, d and f non-negative.

    Raises:
        ValueError: unless 0 < lam < 1, omega >= 0, psi >= 0 and every K > 0.
    """
    if not 0 < lam < 1:
        raise ValueError(f"lam (the compute discount) must lie strictly inside (0, 1), got {lam}.")
    if omega < 0 or psi < 0:
        raise ValueError(f"omega and psi (the discriminator and fidelity weights) must be >= 0, got {omega}, {psi}.")
    k = torch.as_tensor(equivalent_steps, dtype=torch.float64)
    if not bool((k > 0).all()):
        raise ValueError(f"equivalent_steps must be positive, got {k.min().item()}.")
    score = (torch.as_tensor(quality, dtype=torch.float64) + omega * torch.as_tensor(disc, dtype=torch.float64)
             + psi * torch.as_tensor(fidelity, dtype=torch.float64))
    return score * (1 - lam**k) / (k * (1 - lam))


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + eps) within each group (population std).

    ``rewards`` is flat, groups of ``group_size`` consecutive trajectories (one prompt each).
    """
    groups = _groups(rewards, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, correction=0, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def zero_spread_fraction(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> float:
    """Fraction of groups whose reward std is <= ``eps``: they teach nothing (all advantages ~0)."""
    groups = _groups(rewards, group_size)
    return float((groups.std(dim=1, correction=0) <= eps).float().mean())


def grpo_loss(new_log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
              clip: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level clipped PPO surrogate, no KL: -mean over decisions of min(phi A, clip(phi) A).

    Each decision (one step of one trajectory) has its own ratio phi = exp(new - old) and the
    advantage of its trajectory. Log-probs are (trajectories,) or padded (trajectories, steps) with
    ``mask`` (True = a real decision; padding may hold anything, even NaN); ``advantages`` is
    (trajectories,) and is broadcast over steps. The mean runs over all real decisions, so long
    trajectories weigh more (DAPO-style token-level averaging).
    """
    if clip <= 0:
        raise ValueError(f"clip must be positive, got {clip}.")
    if new_log_probs.shape != old_log_probs.shape:
        raise ValueError(f"new and old log-probs differ in shape: {tuple(new_log_probs.shape)} vs "
                         f"{tuple(old_log_probs.shape)}.")
    if advantages.shape != new_log_probs.shape[:1]:
        raise ValueError(f"advantages must be (trajectories,) = {tuple(new_log_probs.shape[:1])}, "
                         f"got {tuple(advantages.shape)}.")
    mask = torch.ones_like(new_log_probs, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != new_log_probs.shape or not bool(mask.any()):
        raise ValueError("mask must match the log-probs' shape and mark at least one decision.")
    adv = advantages.to(new_log_probs.dtype).view(-1, *[1] * (new_log_probs.ndim - 1))
    ratio = torch.exp(torch.where(mask, new_log_probs - old_log_probs.detach(), 0.0))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -torch.where(mask, surrogate, 0.0).sum() / mask.sum()


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards`` (N,) as (N / group_size, group_size); raises ``ValueError`` on a bad split."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no spread), got {group_size}.")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be flat with a length divisible by group_size={group_size}; "
                         f"got shape {tuple(rewards.shape)}.")
    return rewards.view(-1, group_size)
