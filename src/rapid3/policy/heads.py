"""The three heads and the joint distribution of one step's actions.

Step-Skip: Beta(alpha, beta) over the next-time ratio, alpha, beta = 1 + softplus(.) > 1 so the
Beta is unimodal. Cache-Reuse: two logits (recompute, reuse). Sparse-Attention: 1 + N logits
(dense, then the sparse levels). The joint probability of a step is hierarchical:

    pi(a) = Beta(ratio) * P(reuse | has_cache) * P(level | recompute)

Reuse is impossible without a cache (those rows recompute with probability 1, log-prob 0), and the
level is irrelevant on a reuse step (it adds nothing). A disabled head has a fixed action and adds
nothing either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Beta

RATIO_EPS = 1e-4
"""Ratios are kept in [RATIO_EPS, 1 - RATIO_EPS]: a float32 Beta draw can round to 0 or 1."""


def biased_linear(width: int, bias: list[float]) -> nn.Linear:
    """A head ``Linear(width, len(bias))`` with zero weights, so a fresh head outputs ``bias`` for any input."""
    layer = nn.Linear(width, len(bias))
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(bias))
    return layer


def step_head(width: int, ratio: float, concentration: float) -> nn.Linear:
    """Step-Skip head whose fresh Beta has mode ``ratio`` and alpha + beta - 2 = ``concentration``."""
    inv_softplus = lambda y: y + math.log(-math.expm1(-y))  # log(e^y - 1), without overflow at large y  # noqa: E731
    return biased_linear(width, [inv_softplus(concentration * ratio), inv_softplus(concentration * (1 - ratio))])


def cache_head(width: int, reuse_prob: float) -> nn.Linear:
    """Cache-Reuse head (logits: recompute, reuse) whose fresh reuse probability is ``reuse_prob``."""
    return biased_linear(width, [0.0, math.log(reuse_prob / (1 - reuse_prob))])


def sparse_head(width: int, levels: int, dense_prob: float) -> nn.Linear:
    """Sparse-Attention head (1 + ``levels`` logits) whose fresh policy is dense with ``dense_prob``,
    the rest shared equally by the sparse levels."""
    return biased_linear(width, [math.log(dense_prob)] + [math.log((1 - dense_prob) / levels)] * levels)


def beta_parameters(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) = 1 + softplus of the step head's two outputs: both > 1, a unimodal Beta."""
    alpha, beta = (1 + F.softplus(raw)).unbind(-1)
    return alpha, beta


class Decision(NamedTuple):
    """One step's actions per row: ``ratio`` is None when Step-Skip is disabled (the default grid is used)."""

    ratio: torch.Tensor | None
    reuse: torch.Tensor
    level: torch.Tensor


@dataclass
class ActionDistribution:
    """Per-row distribution of one step's actions. A disabled head's field is None."""

    alpha: torch.Tensor | None
    beta: torch.Tensor | None
    cache_logits: torch.Tensor | None
    sparse_logits: torch.Tensor | None
    has_cache: torch.Tensor

    def mode(self) -> Decision:
        """The most likely actions: Beta mode (alpha - 1) / (alpha + beta - 2), argmax, argmax."""
        ratio = None if self.alpha is None else _clamp_ratio((self.alpha - 1) / (self.alpha + self.beta - 2))
        reuse = self._reuse(None if self.cache_logits is None else self.cache_logits.argmax(-1) == 1)
        level = None if self.sparse_logits is None else self.sparse_logits.argmax(-1)
        return Decision(ratio, reuse, self._level(level, reuse))

    def sample(self) -> Decision:
        """Actions drawn from the distribution (torch's global RNG)."""
        ratio = None if self.alpha is None else _clamp_ratio(self._beta().sample())
        wanted = None if self.cache_logits is None else torch.bernoulli(self.cache_logits.softmax(-1)[:, 1]).bool()
        reuse = self._reuse(wanted)
        level = None if self.sparse_logits is None else torch.multinomial(self.sparse_logits.softmax(-1), 1)[:, 0]
        return Decision(ratio, reuse, self._level(level, reuse))

    def log_prob(self, decision: Decision) -> torch.Tensor:
        """Joint log-probability per row; impossible or irrelevant choices and disabled heads add 0."""
        total = self.has_cache.new_zeros(self.has_cache.shape, dtype=self._dtype())
        if self.alpha is not None:
            total = total + self._beta().log_prob(decision.ratio.to(self.alpha.dtype))
        if self.cache_logits is not None:
            chosen = self.cache_logits.log_softmax(-1).gather(-1, decision.reuse.long()[:, None])[:, 0]
            total = total + torch.where(self.has_cache, chosen, 0.0)
        if self.sparse_logits is not None:
            chosen = self.sparse_logits.log_softmax(-1).gather(-1, decision.level.long()[:, None])[:, 0]
            total = total + torch.where(decision.reuse, 0.0, chosen)
        return total

    def entropy(self) -> torch.Tensor:
        """Joint entropy per row: H(ratio) + H(reuse) + P(recompute) * H(level) (Beta's is differential)."""
        total = self.has_cache.new_zeros(self.has_cache.shape, dtype=self._dtype())
        if self.alpha is not None:
            total = total + self._beta().entropy()
        recompute = torch.ones_like(total)
        if self.cache_logits is not None:
            total = total + torch.where(self.has_cache, _categorical_entropy(self.cache_logits), 0.0)
            recompute = torch.where(self.has_cache, self.cache_logits.softmax(-1)[:, 0], 1.0)
        if self.sparse_logits is not None:
            total = total + recompute * _categorical_entropy(self.sparse_logits)
        return total

    def _beta(self) -> Beta:
        # alpha, beta > 1 and ratios in (0, 1) by construction: skip torch's per-call argument checks.
        return Beta(self.alpha, self.beta, validate_args=False)

    def _reuse(self, wanted: torch.Tensor | None) -> torch.Tensor:
        # A row without a cache recomputes whatever the head says: reuse has probability 0 there.
        return torch.zeros_like(self.has_cache) if wanted is None else wanted & self.has_cache

    def _level(self, level: torch.Tensor | None, reuse: torch.Tensor) -> torch.Tensor:
        # The level means nothing on a reuse step; report 0 (dense) there, as the sampler runs it.
        if level is None:
            return torch.zeros_like(reuse, dtype=torch.long)
        return torch.where(reuse, 0, level)

    def _dtype(self) -> torch.dtype:
        present = [x for x in (self.alpha, self.cache_logits, self.sparse_logits) if x is not None]
        return present[0].dtype


def _clamp_ratio(ratio: torch.Tensor) -> torch.Tensor:
    return ratio.clamp(RATIO_EPS, 1 - RATIO_EPS)


def _categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)
