"""GRPO rollouts: G trajectories per prompt from one initial noise, their decisions stacked for training.

The sampler's trace holds one (Observation, Actions) pair per executed step, over the samples
still running at that step. ``Rollouts`` stacks every decision of every trajectory into one flat
batch (so the policy re-scores them all in one forward) and keeps, for each decision, its
trajectory and step, from which the padded (trajectories x steps) log-prob layout of
``grpo_loss`` is built. The observations' ``probe`` closures hold the sampler's whole state
(latents, residual cache); they are replaced, so nothing of the sampler outlives the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import Tensor

from ..accel.actions import Actions, Observation
from ..policy import RapidPolicy
from ..worlds import Generation, Generator

T = TypeVar("T", Observation, Actions)


@dataclass
class Rollouts:
    """N = prompts x G trajectories (group-major: trajectory i belongs to group i // G) and their D decisions.

    ``images`` are the generator's, in [-1, 1]; ``equivalent_steps`` (K) and ``seconds`` come from
    the sampler's accounting. ``decisions`` / ``actions`` hold the D decisions;
    decision j was taken by trajectory ``trajectory[j]`` at its step ``step[j]``.
    ``old_log_probs`` and ``mask`` are (N, S), S the longest trajectory; padding is 0 / False.
    """

    prompts: list[str]
    seeds: list[int]
    group_size: int
    images: Tensor
    equivalent_steps: Tensor
    seconds: Tensor
    decisions: Observation
    actions: Actions
    trajectory: Tensor
    step: Tensor
    old_log_probs: Tensor
    mask: Tensor

    @classmethod
    def from_result(cls, prompts: list[str], seeds: list[int], group_size: int, result: Generation) -> Rollouts:
        """Stack a generation's trace (sampled with log-probs) into the training layout."""
        if not result.trace or result.trace[0][1].log_prob is None:
            raise ValueError("the rollout needs a trace with log-probs: sample with keep_trace=True and a "
                             "controller that samples (RapidPolicy with sampling=True).")
        observations, actions = zip(*result.trace)
        decisions = _cat(observations, probe=released_probe)
        actions = _cat(actions)
        trajectory = decisions.sample_ids.long()
        step = torch.cat([torch.full((len(obs),), s, dtype=torch.long) for s, obs in enumerate(observations)])
        shape = (len(prompts), len(observations))
        old = torch.zeros(shape, dtype=actions.log_prob.dtype).index_put((trajectory, step), actions.log_prob)
        mask = torch.zeros(shape, dtype=torch.bool).index_put((trajectory, step), torch.tensor(True))
        return cls(list(prompts), list(seeds), group_size, result.images,
                   result.stats.equivalent_steps.clone(), result.stats.seconds.clone(), decisions, actions,
                   trajectory, step, old, mask)

    def __len__(self) -> int:
        return len(self.prompts)

    def log_probs(self, policy: RapidPolicy) -> Tensor:
        """(N, S) log-probs of the taken actions under the policy's current weights (differentiable; 0 at padding)."""
        # A policy on a GPU scores there; the padded layout (and the old log-probs) live on the CPU.
        flat = policy.log_prob(self.decisions, self.actions).to(self.mask.device)
        return flat.new_zeros(self.mask.shape).index_put((self.trajectory, self.step), flat)

    def subset(self, index: Tensor) -> Rollouts:
        """The trajectories at ``index`` (in that order) with their decisions, e.g. a minibatch."""
        position = torch.full((len(self),), -1, dtype=torch.long)
        position[index] = torch.arange(len(index))
        keep = position[self.trajectory] >= 0
        picked = index.tolist()
        return replace(self, prompts=[self.prompts[i] for i in picked], seeds=[self.seeds[i] for i in picked],
                       images=self.images[index], equivalent_steps=self.equivalent_steps[index],
                       seconds=self.seconds[index], decisions=select_rows(self.decisions, keep),
                       actions=select_rows(self.actions, keep), trajectory=position[self.trajectory[keep]],
                       step=self.step[keep], old_log_probs=self.old_log_probs[index], mask=self.mask[index])


def rollout(pipe: Generator, policy: RapidPolicy, prompts: list[str], seeds: list[int], *, group_size: int,
            step_cap: int, guidance_scale: float) -> Rollouts:
    """G = ``group_size`` trajectories per prompt, each group from its prompt's seed, actions drawn from the policy."""
    grouped = lambda items: [item for item in items for _ in range(group_size)]  # noqa: E731
    sampling = policy.sampling
    policy.sampling = True
    try:
        result = pipe.sample(grouped(prompts), grouped(seeds), policy, step_cap=step_cap,
                             guidance_scale=guidance_scale, keep_trace=True)
    finally:
        policy.sampling = sampling
    return Rollouts.from_result(grouped(prompts), grouped(seeds), group_size, result)


def released_probe(kind: str) -> Tensor:
    """Stands in for a stored observation's probe: the sampler it would run on is gone."""
    raise RuntimeError(f"probe({kind!r}) on a stored rollout observation: the sampler state it needs was released; "
                       "controllers that probe must be re-run, not re-scored.")


def _cat(items: tuple[T, ...], **fixed) -> T:
    """Concatenate the tensor fields of dataclass instances along dim 0; other fields from the first (or ``fixed``)."""
    first = items[0]
    values = {f.name: torch.cat([getattr(item, f.name) for item in items])
              if isinstance(getattr(first, f.name), Tensor) else getattr(first, f.name) for f in fields(first)}
    return type(first)(**{**values, **fixed})


def select_rows(item: T, rows: Tensor) -> T:
    """The rows of every tensor field of a dataclass instance."""
    return replace(item, **{f.name: getattr(item, f.name)[rows] for f in fields(item)
                            if isinstance(getattr(item, f.name), Tensor)})
