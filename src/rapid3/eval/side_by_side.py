"""A policy against full compute on the same prompts and noise, side by side, on any world's generator.

The trainer runs it on its held-out prompts every ``eval_every`` iterations, the ablation on each trained
variant, and ``rapid3 bench --pipeline`` on a prompt file::

    settings = SideBySideSettings(step_cap=28, guidance_scale=4.0, batch=16)
    metrics = side_by_side(world.generator, policy, prompts, settings, world.quality, world.discriminator)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..accel.controllers import FullCompute
from ..policy import RapidPolicy
from ..rewards.composite import QualityModel, fidelity, image_rewards
from ..rewards.discriminator import Discriminator
from ..worlds import Checker, Generation, Generator


@dataclass(frozen=True)
class SideBySideSettings:
    """How the two samplers run and how their images are rewarded (the reward's knobs as in training)."""

    step_cap: int = 28
    """Full compute's step count and the policy's step cap."""
    guidance_scale: float | None = 4.0
    """Classifier-free guidance of both (None: the generator's default)."""
    batch: int = 16
    """Images per batch; full compute and the policy alternate batch by batch."""
    lam: float = 0.97
    omega: float = 1.0
    psi: float = 1.0
    with_fidelity: bool = False
    """Whether the reward has the fidelity term f (the SSIM to full compute is always reported)."""


@torch.no_grad()
def side_by_side(pipe: Generator, policy: RapidPolicy, prompts: list[str], settings: SideBySideSettings,
                 quality: QualityModel | None = None, disc: Discriminator | None = None) -> dict[str, float]:
    """Policy (deterministic) vs full compute on ``prompts``, image i from seed i.

    The two alternate batch by batch, so both see the same machine load; wall-clock is the
    generator's denoising time, the controller's own overhead included. Reward terms (``_full``:
    of full compute) when the models are given; checker accuracy and equivalent steps by prompt
    complexity when the generator has a checker (the embedded world).
    """
    images, k, flops, seconds = _run_both(pipe, policy, prompts, settings)
    metrics = {"eval/equivalent_steps": k["policy"].mean().item(),
               "eval/speedup_flops": flops["full"] / flops["policy"],
               "eval/speedup_wall": seconds["full"] / seconds["policy"]}
    ssim = fidelity(images["policy"], images["full"])
    metrics["eval/ssim"] = ssim.mean().item()
    fidelities = {"policy": ssim, "full": torch.ones_like(ssim)} if settings.with_fidelity else {}
    for name, suffix in (("policy", ""), ("full", "_full")):
        scores = image_rewards(images[name], prompts, k[name], quality, disc, lam=settings.lam,
                               omega=settings.omega, fidelities=fidelities.get(name), psi=settings.psi)
        metrics[f"eval/reward{suffix}"] = scores["reward"].mean().item()
        if quality is not None:
            metrics[f"eval/quality{suffix}"] = scores["quality"].mean().item()
        if disc is not None:
            metrics[f"eval/disc{suffix}"] = scores["disc"].mean().item()
    if pipe.checker is not None:
        metrics |= checker_metrics(pipe.checker, images, k["policy"], prompts)
    return metrics


def _run_both(pipe: Generator, policy: RapidPolicy, prompts: list[str], settings: SideBySideSettings
              ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float], dict[str, float]]:
    """Images, equivalent steps, total FLOPs and seconds of full compute and the policy, by name."""
    controllers = {"full": FullCompute(), "policy": policy}
    runs: dict[str, list[Generation]] = {name: [] for name in controllers}
    sampling, policy.sampling = policy.sampling, False
    try:
        for start in range(0, len(prompts), settings.batch):
            batch = prompts[start:start + settings.batch]
            seeds = list(range(start, start + len(batch)))
            for name, controller in controllers.items():
                runs[name].append(pipe.sample(batch, seeds, controller, step_cap=settings.step_cap,
                                              guidance_scale=settings.guidance_scale))
    finally:
        policy.sampling = sampling
    images = {name: torch.cat([g.images for g in gens]) for name, gens in runs.items()}
    k = {name: torch.cat([g.stats.equivalent_steps for g in gens]) for name, gens in runs.items()}
    flops = {name: sum(g.stats.flops.sum().item() for g in gens) for name, gens in runs.items()}
    seconds = {name: sum(g.seconds for g in gens) for name, gens in runs.items()}
    return images, k, flops, seconds


def checker_metrics(checker: Checker, images: dict[str, Tensor], k: Tensor, prompts: list[str]) -> dict[str, float]:
    """Checker accuracy of the policy's and full compute's images, and the policy's K by prompt complexity."""
    metrics = {"eval/accuracy": checker.accuracy(images["policy"], prompts),
               "eval/accuracy_full": checker.accuracy(images["full"], prompts)}
    complexity = torch.tensor(checker.complexity(prompts))
    for c in complexity.unique().tolist():  # adaptivity: simple scenes should cost less
        metrics[f"eval/equivalent_steps/objects_{c}"] = k[complexity == c].mean().item()
    return metrics


def comparison_table(metrics: dict[str, float], step_cap: int) -> str:
    """The Markdown table of a side-by-side run: full compute and the policy, K, speedups and the quality
    score where there was a quality model."""
    score = lambda key: "-" if key not in metrics else f"{metrics[key]:.3f}"  # noqa: E731
    return "\n".join([
        "| method | equivalent steps | FLOP speedup | wall-clock speedup | quality |", "|---|---|---|---|---|",
        f"| full compute | {step_cap} | 1.00x | 1.00x | {score('eval/quality_full')} |",
        f"| rapid3 policy | {metrics['eval/equivalent_steps']:.2f} | {metrics['eval/speedup_flops']:.2f}x | "
        f"{metrics['eval/speedup_wall']:.2f}x | {score('eval/quality')} |"])
