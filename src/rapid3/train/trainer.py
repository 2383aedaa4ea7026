"""RAPID3's GRPO trainer for the embedded model or a diffusers SD3 / FLUX pipeline, readable top to bottom.

    rapid3 train --out runs/rapid3 [--config run.yaml] [--resume] [--group-size 8 ...]
    rapid3 train --pipeline PATH_OR_ID --prompt-file prompts.txt --reward-model CLIP_PATH_OR_ID ...
    torchrun --nproc_per_node N -m rapid3 train ...     # one process per GPU: rapid3.train.distributed

Both sample through a ``Generator`` (``rapid3.generators``): the embedded model, or the pipeline
accelerated by ``rapid3.accelerate``. The embedded world's reward model is its learned one and its
prompts come from the scene grammar; a pipeline's are a CLIP score and a prompt file.

Each iteration, on this rank's prompts (``train_iteration``):
  1. rollout: G trajectories per prompt from one initial noise, actions drawn from the policy;
  2. reward: r = (q + omega * d + psi * f) * (1 - lam^K) / (K * (1 - lam)) with q the learned reward
     model, d the discriminator's probability that the image is from the full-compute sampler, f (ours,
     optional) the SSIM to the full-compute image from the same noise, K the equivalent steps
     (``reward`` picks the terms: the paper's q + d, or q, d, f alone or combined);
  3. advantages normalised within each prompt's group;
  4. ``inner_epochs`` x ``minibatches`` AdamW steps on the clipped surrogate, per-decision ratios, no KL;
  5. the discriminator: full-compute images of the same prompts and noise join the positives'
     replay buffer, the rollouts the negatives', then ``disc_steps`` updates.
The first ``disc_warmup`` iterations skip step 4, so the policy first meets a discriminator that
already tells its rollouts from full compute. K counts FLOPs, or, with ``step_costs: measured``,
each action's wall-clock relative to a dense step, timed once at the start of the run.
Every ``eval_every`` iterations and after the last, ``evaluate`` runs the policy (deterministic
mode) and full compute side by side on fixed held-out prompts: reward terms, equivalent steps,
FLOP and wall-clock speedups, and, in the embedded world, checker accuracy (evaluation only, never
a reward) and equivalent steps by scene complexity.

The run folder holds ``config.yaml``, ``checkpoint.pt`` (atomic; ``--resume`` continues bit for
bit), ``log.jsonl`` (one record per iteration), ``tensorboard/``, ``curves.png`` (learning curves,
redrawn after each evaluation) and, at the end, ``policy/``
(safetensors + config.json for ``RapidPolicy.from_pretrained`` / ``rapid3 generate --policy``).

The shipped default policy (``rapid3 generate --policy default``) is a run of the documented
embedded config on the shipped embedded model and reward model, copied into the package::

    rapid3 train --config configs/embedded-policy.yaml --out runs/default-policy
    cp runs/default-policy/policy/* src/rapid3/policies/default/
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..accel.controllers import FullCompute
from ..accel.costs import MeasuredStepCosts
from ..common.checkpoint import load_checkpoint, save_checkpoint
from ..common.prompts import read_prompts, split_prompts
from ..common.signals import StopSignals
from ..embedded.pipeline import EmbeddedPipeline
from ..embedded.reward import RewardModel, load_reward_model
from ..embedded.scenes import SceneSpec, evaluation_prompts, sample_scene
from ..embedded.text_encoder import MiniLMTextEncoder
from ..generators import Checker, EmbeddedGenerator, Generation, Generator, PipelineGenerator, resolve_device
from ..policy import RapidPolicy
from ..rewards.clip import CLIPAdapterDiscriminator, CLIPScore
from ..rewards.discriminator import Discriminator, ImageDiscriminator, ModuleDiscriminator
from ..rewards.metrics import ssim_tensor
from .config import CONFIG_FILE, POLICY_FIELDS, TrainConfig
from .curves import CURVES, plot_curves, read_log
from .distributed import MINIBATCHES, RANKS, AveragedGradients, GroupStreams, World, joined_world, stream_seed
from .faults import drop_nonfinite_groups, logger
from .grpo import discounted_reward, group_advantages, grpo_loss, zero_spread_fraction
from .replay import ReplayBuffer
from .rollout import Rollouts, rollout

CHECKPOINT, LOG, TENSORBOARD, EXPORT = "checkpoint.pt", "log.jsonl", "tensorboard", "policy"
FIXED_ON_RESUME = (*POLICY_FIELDS, "disc_width", "replay_capacity", "pipeline", "step_costs")
"""Knobs that shape the saved state, so a resumed run cannot change them."""
EVAL_SEED = 0
"""Seed of the held-out evaluation prompts: fixed, so runs with different seeds or knobs compare on one set."""


# ----------------------------------------------------------------------------- rewards


class QualityModel(Protocol):
    """The quality term q of the reward (ImageReward's role; a CLIP score for real pipelines)."""

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Quality (B,) in [0, 1] of each image (B, 3, H, W) in [-1, 1] for its prompt; no grad."""


@dataclass
class EmbeddedQuality:
    """The embedded world's learned reward model as a ``QualityModel``."""

    model: RewardModel
    encoder: MiniLMTextEncoder

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.model.score(images, prompts, self.encoder)


def image_rewards(images: Tensor, prompts: list[str], equivalent_steps: Tensor, quality: QualityModel | None,
                  disc: Discriminator | None, *, lam: float, omega: float, fidelities: Tensor | None = None,
                  psi: float = 0.0) -> dict[str, Tensor]:
    """Per image: ``quality`` q, ``disc`` d, ``fidelity`` f (given: :func:`fidelity` to the full-compute
    image from the same noise), 0 for an absent term, and the discounted ``reward`` r."""
    absent = torch.zeros(len(images), dtype=torch.float64)
    q = absent if quality is None else quality.score(images, prompts).double().cpu()
    d = absent if disc is None else disc.score(images).double().cpu()
    f = absent if fidelities is None else fidelities
    return {"quality": q, "disc": d, "fidelity": f,
            "reward": discounted_reward(q, d, equivalent_steps, lam=lam, omega=omega, fidelity=f, psi=psi)}


def fidelity(images: Tensor, reference: Tensor) -> Tensor:
    """SSIM (B,) float64 of images in [-1, 1] to their references, clipped to [0, 1] (a reward term must
    not be negative: the discount would then reward spending more)."""
    to_unit = lambda x: (x.double().cpu() + 1) / 2  # noqa: E731  (SSIM's luminance term needs intensities >= 0)
    return ssim_tensor(to_unit(images), to_unit(reference), data_range=1.0).clamp(0, 1)


def rollout_rewards(rollouts: Rollouts, quality: QualityModel | None, disc: Discriminator | None, *,
                    lam: float, omega: float, originals: Tensor | None = None, psi: float = 0.0) -> dict[str, Tensor]:
    """:func:`image_rewards` of every trajectory; ``originals``: one full-compute image per prompt (for f)."""
    f = None if originals is None else fidelity(rollouts.images, originals.repeat_interleave(rollouts.group_size, 0))
    return image_rewards(rollouts.images, rollouts.prompts, rollouts.equivalent_steps, quality, disc, lam=lam,
                         omega=omega, fidelities=f, psi=psi)


# ----------------------------------------------------------------------------- updates


def policy_update(policy: RapidPolicy, optimizer: torch.optim.Optimizer, rollouts: Rollouts, advantages: Tensor,
                  cfg: TrainConfig, world: World, generator: torch.Generator) -> dict[str, float]:
    """``inner_epochs`` passes of ``minibatches`` clipped-surrogate steps; means over the steps.

    Minibatches split every rank's trajectories (``World.minibatches``; ``generator`` in the same
    state on all ranks). A rank's per-decision mean loss is weighted by ``size`` x its share of the
    minibatch's decisions, so the gradient averaged over ranks is the one of the whole minibatch's
    per-decision mean; the statistics are weighted alike, so their mean over ranks is the global one.
    """
    steps = []
    for _ in range(cfg.inner_epochs):
        for index in world.minibatches(len(rollouts), cfg.minibatches, generator):
            batch = rollouts.subset(index)
            decisions = int(batch.mask.sum())
            total = world.sum(decisions)
            if total == 0:  # empty on every rank (their groups were dropped): no step anywhere
                continue
            weight = world.size * decisions / total  # 1.0 on one process
            optimizer.zero_grad(set_to_none=True)
            stats = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
            if decisions:
                new = batch.log_probs(policy)
                loss = weight * grpo_loss(new, batch.old_log_probs, advantages[index], clip=cfg.clip, mask=batch.mask)
                loss.backward()
                log_ratio = (new.detach() - batch.old_log_probs)[batch.mask]
                ratio = log_ratio.exp()
                stats = {"loss": loss.item(),
                         "clip_fraction": weight * ((ratio - 1).abs() > cfg.clip).float().mean().item(),
                         # k3 estimator of KL(old || new)
                         "approx_kl": weight * ((ratio - 1) - log_ratio).mean().item()}
            world.average_gradients(policy.parameters())  # before clipping: every rank clips the same gradient
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            steps.append({**stats, "grad_norm": grad_norm.item()})
    return _means("policy", steps)


def discriminator_update(disc: Discriminator, positives: ReplayBuffer, negatives: ReplayBuffer,
                         cfg: TrainConfig, world: World) -> dict[str, float]:
    """``disc_steps`` updates on ``disc_batch`` images per class drawn from the replay buffers, which
    hold every rank's images; each rank trains on its equal share of every batch."""
    if min(len(positives), len(negatives)) < world.size:  # too few to share (every rollout so far dropped)
        return {}
    steps = [disc.step(world.share(positives.sample(cfg.disc_batch)), world.share(negatives.sample(cfg.disc_batch)))
             for _ in range(cfg.disc_steps)]
    return _means("disc", steps)


def _means(prefix: str, steps: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic averaged over the update steps, as ``prefix/name`` (nothing for no step)."""
    return {f"{prefix}/{key}": float(np.mean([step[key] for step in steps])) for key in steps[0]} if steps else {}


# ----------------------------------------------------------------------------- one iteration


@dataclass
class Run:
    """Everything a training run holds; ``state_dict`` is what its checkpoint stores."""

    cfg: TrainConfig
    pipe: Generator
    policy: RapidPolicy
    optimizer: torch.optim.Optimizer
    quality: QualityModel | None
    disc: ModuleDiscriminator | None
    positives: ReplayBuffer
    negatives: ReplayBuffer
    prompt_rng: np.random.Generator
    iteration: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    train_prompts: list[str] | None = None  # a pipeline's prompt file; None: the embedded scene grammar
    eval_prompts: list[str] = field(default_factory=list)
    world: World = field(default_factory=World)
    stopped_by: int = 0
    """The signal (SIGTERM, SIGINT) that stopped ``train`` before ``iterations``; 0 if none did."""

    def state_dict(self) -> dict[str, Any]:
        """Policy, discriminator, optimisers, replay buffers, RNG states, iteration and config."""
        state = {"iteration": self.iteration, "config": self.cfg.to_dict(), "policy": self.policy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "prompt_rng": self.prompt_rng.bit_generator.state, "last_eval": self.last_eval,
                 "positives": self.positives.state_dict(), "negatives": self.negatives.state_dict()}
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
        if self.cfg.step_costs == "measured":  # timed once per run: a resumed run keeps its currency
            state["step_costs"] = self.pipe.step_costs.to_rows()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; the run continues exactly where the saved one stopped."""
        saved = state["config"]
        changed = [name for name in FIXED_ON_RESUME if saved.get(name) != getattr(self.cfg, name)]  # older runs: None
        if changed:
            raise ValueError("a resumed run cannot change " + ", ".join(
                f"{name} (saved {saved[name]!r}, given {getattr(self.cfg, name)!r})" for name in changed) + ".")
        try:
            self.policy.load_state_dict(state["policy"])
        except RuntimeError as error:  # the policy's shapes come from the backbone it was built for
            raise ValueError("the checkpoint's policy was built for another model (its tensor shapes differ); resume "
                             "with the model the run was started with.") from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.positives.load_state_dict(state["positives"])
        self.negatives.load_state_dict(state["negatives"])
        if self.disc is not None and "disc" in state:  # a run switched to a d reward starts a fresh discriminator
            self.disc.load_state_dict(state["disc"])
        if self.cfg.step_costs == "measured":
            self.pipe.step_costs = MeasuredStepCosts.from_rows(state["step_costs"])
        self.prompt_rng.bit_generator.state = state["prompt_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.last_eval = state["iteration"], state["last_eval"]


def training_prompts(rng: np.random.Generator, n: int, pool: list[str] | None = None) -> tuple[list[str], list[int]]:
    """``n`` random prompts and a noise seed for each: from ``pool`` (uniformly), or, without one, train-split
    captions of the embedded scene generator (its kind weights)."""
    if pool is None:
        captions = [sample_scene(rng, "train").caption for _ in range(n)]
    else:
        captions = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    return captions, [int(seed) for seed in rng.integers(0, 2**31, size=n)]


def train_iteration(run: Run, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """One GRPO iteration on these prompts (this rank's share): rollout, reward, advantages, updates.

    Groups with a NaN or infinity are dropped with a warning (``train/dropped_fraction``); if every
    group of every rank is, ValueError. Returns the metrics averaged over ranks.
    """
    cfg, world = run.cfg, run.world
    torch.manual_seed(stream_seed(RANKS, cfg.seed, run.iteration, world.rank))  # anything else drawing: per rank
    rollouts = rollout(run.pipe, GroupStreams(run.policy, seeds, cfg.group_size), prompts, seeds,
                       group_size=cfg.group_size, step_cap=cfg.step_cap, guidance_scale=cfg.guidance_scale)
    originals = None  # full compute from each group's noise: the discriminator's positives, f's references
    if run.disc is not None or cfg.uses_fidelity:
        originals = run.pipe.sample(prompts, seeds, FullCompute(), step_cap=cfg.step_cap,
                                    guidance_scale=cfg.guidance_scale).images
    scores = rollout_rewards(rollouts, run.quality, run.disc, lam=cfg.lam, omega=cfg.omega,
                             originals=originals if cfg.uses_fidelity else None, psi=cfg.psi)
    rollouts, scores, dropped = drop_nonfinite_groups(rollouts, scores)
    if world.sum(len(rollouts)) == 0:
        raise ValueError(f"every rollout of iteration {run.iteration + 1} has a NaN or infinity: the model, reward "
                         "model or policy is broken. The last checkpoint was kept.")
    advantages = group_advantages(scores["reward"], cfg.group_size)
    metrics = {"train/dropped_fraction": dropped / len(prompts)}
    if len(rollouts):  # else this rank's groups were all dropped: the other ranks report
        metrics |= rollout_metrics(rollouts, scores, cfg, run.pipe.checker)
    if run.disc is None or run.iteration >= cfg.disc_warmup:  # warm-up: the discriminator learns first
        minibatch_rng = torch.Generator().manual_seed(stream_seed(MINIBATCHES, cfg.seed, run.iteration))
        metrics |= policy_update(run.policy, run.optimizer, rollouts, advantages, cfg, world, minibatch_rng)
    if run.disc is not None:
        run.positives.push(world.gather_rows(originals[originals.flatten(1).isfinite().all(1)]))
        run.negatives.push(world.gather_rows(rollouts.images))
        metrics |= discriminator_update(run.disc, run.positives, run.negatives, cfg, world)
    return world.mean(metrics)


def rollout_metrics(rollouts: Rollouts, scores: dict[str, Tensor], cfg: TrainConfig,
                    checker: Checker | None = None) -> dict[str, float]:
    """What the rollouts did: reward terms, compute, actions, group spread, checker accuracy (monitoring only)."""
    k, actions = rollouts.equivalent_steps, rollouts.actions
    recompute = ~actions.reuse
    metrics = {"train/reward": scores["reward"].mean().item(), "train/equivalent_steps": k.mean().item(),
               "train/speedup": cfg.step_cap / k.mean().item(),  # full compute: K = step_cap
               "train/steps": rollouts.mask.sum(1).double().mean().item(),
               "train/reuse_fraction": actions.reuse.double().mean().item(),
               "train/sparse_fraction": ((actions.level > 0) & recompute).sum().item() / max(1, recompute.sum().item()),
               "train/zero_spread": zero_spread_fraction(scores["reward"], cfg.group_size),
               "train/seconds_per_image": rollouts.seconds.mean().item()}
    if checker is not None:
        metrics["train/accuracy"] = checker.accuracy(rollouts.images, rollouts.prompts)
    if cfg.uses_quality:
        metrics["train/quality"] = scores["quality"].mean().item()
    if cfg.uses_discriminator:
        metrics["train/disc"] = scores["disc"].mean().item()
    if cfg.uses_fidelity:
        metrics["train/fidelity"] = scores["fidelity"].mean().item()
    return metrics


# ----------------------------------------------------------------------------- evaluation


def heldout_prompts(n: int) -> list[SceneSpec]:
    """The fixed evaluation set of ``n`` prompts: held-out compositions and, one in eight, single-object
    captions (the held-out split has none), so K can be compared between 1- and 3-object prompts."""
    return evaluation_prompts(n - n // 8, n // 8)


@torch.no_grad()
def evaluate(pipe: Generator, policy: RapidPolicy, prompts: list[str], cfg: TrainConfig,
             quality: QualityModel | None = None, disc: Discriminator | None = None) -> dict[str, float]:
    """Policy (deterministic) vs full compute on ``prompts``, image i from seed i, side by side.

    The two alternate batch by batch, so both see the same machine load; wall-clock is the
    generator's denoising time, the controller's own overhead included. Reward terms (``_full``:
    of full compute) when the models are given; checker accuracy and equivalent steps by prompt
    complexity when the generator has a checker (the embedded world).
    """
    controllers = {"full": FullCompute(), "policy": policy}
    runs: dict[str, list[Generation]] = {name: [] for name in controllers}
    sampling, policy.sampling = policy.sampling, False
    for start in range(0, len(prompts), cfg.eval_batch):
        batch = prompts[start:start + cfg.eval_batch]
        seeds = list(range(start, start + len(batch)))
        for name, controller in controllers.items():
            runs[name].append(pipe.sample(batch, seeds, controller, step_cap=cfg.step_cap,
                                          guidance_scale=cfg.guidance_scale))
    policy.sampling = sampling
    images = {name: torch.cat([g.images for g in gens]) for name, gens in runs.items()}
    k = {name: torch.cat([g.stats.equivalent_steps for g in gens]) for name, gens in runs.items()}
    flops = {name: sum(g.stats.flops.sum().item() for g in gens) for name, gens in runs.items()}
    seconds = {name: sum(g.seconds for g in gens) for name, gens in runs.items()}
    metrics = {"eval/equivalent_steps": k["policy"].mean().item(),
               "eval/speedup_flops": flops["full"] / flops["policy"],
               "eval/speedup_wall": seconds["full"] / seconds["policy"]}
    ssim = fidelity(images["policy"], images["full"])
    metrics["eval/ssim"] = ssim.mean().item()
    fidelities = {"policy": ssim, "full": torch.ones_like(ssim)} if cfg.uses_fidelity else {}
    for name, suffix in (("policy", ""), ("full", "_full")):
        scores = image_rewards(images[name], prompts, k[name], quality, disc, lam=cfg.lam, omega=cfg.omega,
                               fidelities=fidelities.get(name), psi=cfg.psi)
        metrics[f"eval/reward{suffix}"] = scores["reward"].mean().item()
        if quality is not None:
            metrics[f"eval/quality{suffix}"] = scores["quality"].mean().item()
        if disc is not None:
            metrics[f"eval/disc{suffix}"] = scores["disc"].mean().item()
    if pipe.checker is not None:
        metrics |= checker_metrics(pipe.checker, images, k["policy"], prompts)
    return metrics


def checker_metrics(checker: Checker, images: dict[str, Tensor], k: Tensor, prompts: list[str]) -> dict[str, float]:
    """Checker accuracy of the policy's and full compute's images, and the policy's K by prompt complexity."""
    metrics = {"eval/accuracy": checker.accuracy(images["policy"], prompts),
               "eval/accuracy_full": checker.accuracy(images["full"], prompts)}
    complexity = torch.tensor(checker.complexity(prompts))
    for c in complexity.unique().tolist():  # adaptivity: simple scenes should cost less
        metrics[f"eval/equivalent_steps/objects_{c}"] = k[complexity == c].mean().item()
    return metrics


# ----------------------------------------------------------------------------- the run


def build_run(cfg: TrainConfig, *, resume: bool = False, world: World | None = None) -> Run:
    """A fresh run from ``cfg``, or, with ``resume``, the one checkpointed in ``cfg.out``; ``world``: this
    process's place in a distributed run (default: the only process)."""
    world = world or World()
    if cfg.prompts_per_iteration % world.size:
        raise ValueError(f"prompts_per_iteration ({cfg.prompts_per_iteration}) must be a multiple of the number of "
                         f"processes ({world.size}): each rolls out whole groups of an equal share of the prompts.")
    path = Path(cfg.out) / CHECKPOINT
    if not resume and path.exists():
        raise FileExistsError(f"{cfg.out} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                              "or choose another --out.")
    state = load_checkpoint(path) if resume else None  # before any work: a bad checkpoint fails fast
    torch.manual_seed(cfg.seed)
    parts = _pipeline_parts(cfg) if cfg.pipeline else _embedded_parts(cfg)
    policy = parts.policy
    if parts.disc is not None:
        parts.disc.optimizer = AveragedGradients(parts.disc.optimizer, world)
    run = Run(cfg, parts.pipe, policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
              parts.quality, parts.disc, ReplayBuffer(cfg.replay_capacity, seed=cfg.seed),
              ReplayBuffer(cfg.replay_capacity, seed=cfg.seed + 1), np.random.default_rng(cfg.seed),
              train_prompts=parts.train_prompts, eval_prompts=parts.eval_prompts, world=world)
    if state is not None:
        run.load_state_dict(state)
    elif cfg.step_costs == "measured":  # a batch the size of one rollout group, both CFG branches
        run.pipe.step_costs = run.pipe.measure_step_costs(
            training_prompts(np.random.default_rng(cfg.seed), cfg.group_size)[0])
    return run


class _Parts(NamedTuple):
    """What differs between the embedded world and a real pipeline."""

    pipe: Generator
    policy: RapidPolicy
    quality: QualityModel | None
    disc: ModuleDiscriminator | None
    train_prompts: list[str] | None
    eval_prompts: list[str]


def _embedded_parts(cfg: TrainConfig) -> _Parts:
    """The embedded model, its policy, learned reward model and conv discriminator; prompts from the grammar."""
    pipe = EmbeddedGenerator(EmbeddedPipeline.from_pretrained(cfg.model))
    policy = RapidPolicy.for_backbone(pipe.backbone, **cfg.policy_kwargs())
    quality = EmbeddedQuality(load_reward_model(cfg.reward_model), pipe.pipe.encoder) if cfg.uses_quality else None
    disc = None
    if cfg.uses_discriminator:
        width = cfg.disc_width
        disc = ModuleDiscriminator(ImageDiscriminator(channels=(width, 2 * width, 4 * width)), lr=cfg.disc_lr)
    return _Parts(pipe, policy, quality, disc, None, [spec.caption for spec in heldout_prompts(cfg.eval_prompts)])


def _pipeline_parts(cfg: TrainConfig) -> _Parts:
    """A diffusers pipeline, its policy, the CLIP score and CLIP-adapter discriminator; prompts from files.

    Prompts and reward models load first, so a bad file or a missing model fails before the
    (large) pipeline loads, and everything before any sampling.
    """
    prompts = read_prompts(cfg.prompt_file)
    if cfg.eval_prompt_file is None:
        train_prompts, eval_prompts = split_prompts(prompts, cfg.eval_prompts, seed=EVAL_SEED)
    else:
        train_prompts, eval_prompts = prompts, read_prompts(cfg.eval_prompt_file)[:cfg.eval_prompts]
    device = resolve_device(cfg.device)
    quality = CLIPScore.from_pretrained(cfg.reward_model, device=device) if cfg.uses_quality else None
    disc = None
    if cfg.uses_discriminator:
        disc = CLIPAdapterDiscriminator.from_pretrained(cfg.disc_model or cfg.reward_model, device=device,
                                                        hidden=cfg.disc_width, lr=cfg.disc_lr)
    pipe = PipelineGenerator.from_pretrained(cfg.pipeline, device=cfg.device, dtype=cfg.dtype, height=cfg.height,
                                             width=cfg.width, image_size=cfg.reward_image_size)
    policy = RapidPolicy.for_backbone(pipe.backbone, **cfg.policy_kwargs()).to(device)
    return _Parts(pipe, policy, quality, disc, train_prompts, eval_prompts)


class RunLog:
    """One JSONL record and TensorBoard scalars per iteration. On resume, the records of the
    interrupted run past the checkpoint are dropped from both, so the logs read as one run."""

    def __init__(self, out: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.path = out / LOG
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["iteration"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start + 1)

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"iteration": iteration, "time": time.time(), **metrics}) + "\n")
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export_policy(run: Run, path: Path) -> None:
    """The policy as safetensors + config.json, with the run's config and last evaluation beside it."""
    run.policy.save_pretrained(path)
    info = {"iteration": run.iteration, "train_config": run.cfg.to_dict(), "eval": run.last_eval}
    (path / "rapid3_policy.json").write_text(json.dumps(info, indent=2) + "\n")


def train(cfg: TrainConfig, *, resume: bool = False) -> Run:
    """Train (or, with ``resume``, continue) the policy up to ``cfg.iterations``; export it to ``out/policy``.

    Under torchrun every process runs this on its share of each iteration's prompts, and rank 0
    alone evaluates and writes the run folder. SIGTERM or SIGINT stops every rank after the same
    iteration, with a final checkpoint and no export; ``Run.stopped_by`` then names the signal.
    """
    with joined_world() as world, StopSignals() as signals:
        out = Path(cfg.out)
        if world.is_main:
            make_run_folder(out)
        run = build_run(cfg, resume=resume, world=world)
        if world.is_main:
            cfg.to_yaml(out / CONFIG_FILE)
            log = RunLog(out, run.iteration)
        bar = tqdm(total=cfg.iterations, initial=run.iteration, desc="grpo", unit="it", dynamic_ncols=True,
                   disable=not world.is_main)
        saved = run.iteration
        try:
            while run.iteration < cfg.iterations:
                run.stopped_by = int(world.max(signals.received))  # agreed: every rank stops after the same iteration
                if run.stopped_by:
                    break
                tic = time.perf_counter()
                everyone = training_prompts(run.prompt_rng, cfg.prompts_per_iteration, run.train_prompts)
                metrics = train_iteration(run, *(world.shard(items) for items in everyone))
                metrics["time/iteration_seconds"] = time.perf_counter() - tic
                run.iteration += 1
                last = run.iteration == cfg.iterations
                if not world.is_main:
                    continue
                if run.iteration % cfg.eval_every == 0 or last:
                    run.last_eval = evaluate(run.pipe, run.policy, run.eval_prompts, cfg, run.quality, run.disc)
                    metrics |= run.last_eval
                    bar.write(_eval_line(run.iteration, run.last_eval))
                log.write(run.iteration, metrics)
                if "eval/equivalent_steps" in metrics:
                    plot_curves(read_log(out / LOG), out / CURVES, cfg.step_cap)
                bar.update(1)
                bar.set_postfix(_postfix(metrics, run.last_eval))
                if run.iteration % cfg.checkpoint_every == 0 or last:
                    save_checkpoint(out / CHECKPOINT, run.state_dict())
                    saved = run.iteration
        finally:
            bar.close()
            if world.is_main:
                log.close()
        if world.is_main and run.stopped_by:
            if saved != run.iteration:
                save_checkpoint(out / CHECKPOINT, run.state_dict())
            logger.warning("stopped by %s after iteration %d; continue with `rapid3 train --out %s --resume`.",
                           signal.Signals(run.stopped_by).name, run.iteration, out)
        elif world.is_main:
            export_policy(run, out / EXPORT)
    return run


def make_run_folder(out: Path) -> None:
    """Create the run folder and prove it writable, before anything is loaded or computed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write the run folder {out} ({error.strerror or error}); choose another --out.") \
            from error


def _postfix(metrics: dict[str, float], last_eval: dict[str, float]) -> dict[str, str]:
    """Live numbers: this iteration's reward and FLOP speedup; with a checker, rollout and last held-out accuracy."""
    postfix = {"reward": f"{metrics['train/reward']:.3f}", "speedup": f"{metrics['train/speedup']:.2f}x"}
    if "train/accuracy" in metrics:
        held_out = last_eval.get("eval/accuracy")
        postfix |= {"acc": f"{metrics['train/accuracy']:.2f}",
                    "eval_acc": "-" if held_out is None else f"{held_out:.2f}"}
    return postfix


def _eval_line(iteration: int, metrics: dict[str, float]) -> str:
    """The held-out result: checker accuracy where there is a checker, else the reward, beside full compute's."""
    name = "accuracy" if "eval/accuracy" in metrics else "reward"
    return (f"iteration {iteration}: held-out {name} {metrics[f'eval/{name}']:.3f} "
            f"(full compute {metrics[f'eval/{name}_full']:.3f}), K {metrics['eval/equivalent_steps']:.1f}, "
            f"speedup {metrics['eval/speedup_flops']:.2f}x FLOPs / {metrics['eval/speedup_wall']:.2f}x wall-clock")
