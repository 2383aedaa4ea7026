"""GRPO math for RAPID3: per-group advantages and the clipped surrogate (the compute-discounted reward
is ``rapid3.rewards.composite``).

Pure tensor functions; the trainer composes them (rollout -> reward -> advantage -> update).
"""

from __future__ import annotations

import torch


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
