"""RAPID3's GRPO trainer for the embedded model or a diffusers SD3 / FLUX pipeline, readable top to bottom.

    rapid3 train --out runs/rapid3 [--config run.yaml] [--resume] [--group-size 8 ...]
    rapid3 train --pipeline PATH_OR_ID --prompt-file prompts.txt --reward-model CLIP_PATH_OR_ID ...
    torchrun --nproc_per_node N -m rapid3 train ...     # one process per GPU: rapid3.train.distributed

The run's world (``rapid3.worlds``: the embedded model, or a pipeline accelerated by ``rapid3.accelerate``)
provides the generator, the reward models and the prompts; the trainer never asks which world it is. The
reward's composition is ``rapid3.rewards.composite``, the held-out evaluation ``rapid3.eval.side_by_side``,
the run folder's log and export ``run_folder``: what stays here is the run, the iteration and the update.

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
Every ``eval_every`` iterations and after the last, ``side_by_side`` runs the policy (deterministic
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

import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..accel.controllers import FullCompute
from ..accel.costs import MeasuredStepCosts
from ..common.checkpoint import load_checkpoint, save_checkpoint
from ..common.history import keep_history
from ..common.run_lock import RunLock, first_missing
from ..common.signals import StopSignals
from ..eval.side_by_side import side_by_side
from ..policy import RapidPolicy
from ..rewards.composite import QualityModel, fidelity, image_rewards
from ..rewards.discriminator import Discriminator
from ..worlds import Checker, ImageWorld, build_world
from .config import CONFIG_FILE, POLICY_FIELDS, TrainConfig
from .curves import CURVES, plot_curves, read_log
from .distributed import MINIBATCHES, RANKS, AveragedGradients, GroupStreams, World, joined_world, stream_seed
from .faults import drop_nonfinite_groups, logger
from .grpo import group_advantages, grpo_loss, zero_spread_fraction
from .replay import ReplayBuffer
from .rollout import Rollouts, rollout
from .run_folder import EXPORT, RunLog, export_policy, make_run_folder

CHECKPOINT = "checkpoint.pt"
FIXED_ON_RESUME = (*POLICY_FIELDS, "disc_width", "replay_capacity", "pipeline", "step_costs")
"""Knobs that shape the saved state, so a resumed run cannot change them."""


# ----------------------------------------------------------------------------- rewards


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
    source: ImageWorld
    """Where images, their rewards and the prompts come from: the embedded model or a pipeline."""
    policy: RapidPolicy
    optimizer: torch.optim.Optimizer
    positives: ReplayBuffer
    negatives: ReplayBuffer
    prompt_rng: np.random.Generator
    iteration: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    world: World = field(default_factory=World)
    """This process's place in a distributed run."""
    stopped_by: int = 0
    """The signal (SIGTERM, SIGINT) that stopped ``train`` before ``iterations``; 0 if none did."""

    def state_dict(self) -> dict[str, Any]:
        """Policy, discriminator, optimisers, replay buffers, RNG states, iteration and config."""
        state = {"iteration": self.iteration, "config": self.cfg.to_dict(), "policy": self.policy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "prompt_rng": self.prompt_rng.bit_generator.state, "last_eval": self.last_eval,
                 "positives": self.positives.state_dict(), "negatives": self.negatives.state_dict()}
        if self.source.discriminator is not None:
            state["disc"] = self.source.discriminator.state_dict()
        if self.cfg.step_costs == "measured":  # timed once per run: a resumed run keeps its currency
            state["step_costs"] = self.source.generator.step_costs.to_rows()
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
        disc = self.source.discriminator
        if disc is not None and "disc" in state:  # a run switched to a d reward starts a fresh discriminator
            disc.load_state_dict(state["disc"])
        if self.cfg.step_costs == "measured":
            self.source.generator.step_costs = MeasuredStepCosts.from_rows(state["step_costs"])
        self.prompt_rng.bit_generator.state = state["prompt_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.last_eval = state["iteration"], state["last_eval"]


def train_iteration(run: Run, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """One GRPO iteration on these prompts (this rank's share): rollout, reward, advantages, updates.

    Groups with a NaN or infinity are dropped with a warning (``train/dropped_fraction``); if every
    group of every rank is, ValueError. Returns the metrics averaged over ranks.
    """
    cfg, world = run.cfg, run.world
    torch.manual_seed(stream_seed(RANKS, cfg.seed, run.iteration, world.rank))  # anything else drawing: per rank
    rollouts = rollout(run.source.generator, GroupStreams(run.policy, seeds, cfg.group_size), prompts, seeds,
                       group_size=cfg.group_size, step_cap=cfg.step_cap, guidance_scale=cfg.guidance_scale)
    originals = None  # full compute from each group's noise: the discriminator's positives, f's references
    if run.source.discriminator is not None or cfg.uses_fidelity:
        originals = run.source.generator.sample(prompts, seeds, FullCompute(), step_cap=cfg.step_cap,
                                    guidance_scale=cfg.guidance_scale).images
    scores = rollout_rewards(rollouts, run.source.quality, run.source.discriminator, lam=cfg.lam, omega=cfg.omega,
                             originals=originals if cfg.uses_fidelity else None, psi=cfg.psi)
    rollouts, scores, dropped = drop_nonfinite_groups(rollouts, scores)
    if world.sum(len(rollouts)) == 0:
        raise ValueError(f"every rollout of iteration {run.iteration + 1} has a NaN or infinity: the model, reward "
                         "model or policy is broken. The last checkpoint was kept.")
    advantages = group_advantages(scores["reward"], cfg.group_size)
    metrics = {"train/dropped_fraction": dropped / len(prompts)}
    if len(rollouts):  # else this rank's groups were all dropped: the other ranks report
        metrics |= rollout_metrics(rollouts, scores, cfg, run.source.generator.checker)
    if run.source.discriminator is None or run.iteration >= cfg.disc_warmup:  # warm-up: the discriminator learns first
        minibatch_rng = torch.Generator().manual_seed(stream_seed(MINIBATCHES, cfg.seed, run.iteration))
        metrics |= policy_update(run.policy, run.optimizer, rollouts, advantages, cfg, world, minibatch_rng)
    if run.source.discriminator is not None:
        run.positives.push(world.gather_rows(originals[originals.flatten(1).isfinite().all(1)]))
        run.negatives.push(world.gather_rows(rollouts.images))
        metrics |= discriminator_update(run.source.discriminator, run.positives, run.negatives, cfg, world)
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
    source = build_world(cfg.world_config())
    torch.manual_seed(cfg.seed)  # the policy's initialisation does not depend on what loading the world drew
    backbone = source.generator.backbone
    policy = RapidPolicy.for_backbone(backbone, **cfg.policy_kwargs()).to(backbone.device)
    if source.discriminator is not None:
        source.discriminator.optimizer = AveragedGradients(source.discriminator.optimizer, world)
    run = Run(cfg, source, policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
              ReplayBuffer(cfg.replay_capacity, seed=cfg.seed), ReplayBuffer(cfg.replay_capacity, seed=cfg.seed + 1),
              np.random.default_rng(cfg.seed), world=world)
    if state is not None:
        run.load_state_dict(state)
    elif cfg.step_costs == "measured":  # a batch the size of one rollout group, both CFG branches
        prompts, _ = source.training_prompts(np.random.default_rng(cfg.seed), cfg.group_size)
        source.generator.step_costs = source.generator.measure_step_costs(prompts)
    if cfg.profiled_step_costs() is not None:  # a profile file: read again on resume (step_costs is fixed)
        source.generator.step_costs = cfg.profiled_step_costs()
    return run


def train(cfg: TrainConfig, *, resume: bool = False) -> Run:
    """Train (or, with ``resume``, continue) the policy up to ``cfg.iterations``; export it to ``out/policy``.

    Under torchrun every process runs this on its share of each iteration's prompts, and rank 0
    alone evaluates and writes the run folder. SIGTERM or SIGINT stops every rank after the same
    iteration, with a final checkpoint and no export; ``Run.stopped_by`` then names the signal.
    """
    with joined_world() as world, StopSignals() as signals, ExitStack() as held:
        out = Path(cfg.out)
        if world.is_main:
            made = first_missing(out)
            make_run_folder(out)
            held.enter_context(RunLock(out, made=made))  # one run per folder, until this one ends
        run = build_run(cfg, resume=resume, world=world)
        if world.is_main:
            log = RunLog(out, run.iteration)  # first: a log it cannot read leaves the config files untouched
            keep_history(out, CONFIG_FILE, cfg.to_dict(), f"{'resumed' if resume else 'started'} at iteration "
                                                           f"{run.iteration}")
            cfg.to_yaml(out / CONFIG_FILE)
        bar = tqdm(total=cfg.iterations, initial=run.iteration, desc="grpo", unit="it", dynamic_ncols=True,
                   disable=not world.is_main)
        saved = run.iteration
        try:
            while run.iteration < cfg.iterations:
                run.stopped_by = int(world.max(signals.received))  # agreed: every rank stops after the same iteration
                if run.stopped_by:
                    break
                tic = time.perf_counter()
                everyone = run.source.training_prompts(run.prompt_rng, cfg.prompts_per_iteration)
                metrics = train_iteration(run, *(world.shard(items) for items in everyone))
                metrics["time/iteration_seconds"] = time.perf_counter() - tic
                run.iteration += 1
                last = run.iteration == cfg.iterations
                if not world.is_main:
                    continue
                _report(run, metrics, log, bar, evaluate=run.iteration % cfg.eval_every == 0 or last)
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
            export_policy(run.policy, out / EXPORT, iteration=run.iteration, train_config=cfg.to_dict(),
                          last_eval=run.last_eval)
    return run


def evaluate_heldout(run: Run) -> dict[str, float]:
    """The policy against full compute on the world's held-out prompts, with the run's reward models."""
    source = run.source
    return side_by_side(source.generator, run.policy, source.heldout_prompts, run.cfg.side_by_side(),
                        source.quality, source.discriminator)


def _report(run: Run, metrics: dict[str, float], log: RunLog, bar: tqdm, *, evaluate: bool) -> None:
    """Rank 0's bookkeeping after an iteration: the held-out evaluation when due, the log, the curves, the bar."""
    if evaluate:
        run.last_eval = evaluate_heldout(run)
        metrics |= run.last_eval
        bar.write(_eval_line(run.iteration, run.last_eval))
    log.write(run.iteration, metrics)
    if evaluate:
        plot_curves(read_log(log.path), log.path.parent / CURVES, run.cfg.step_cap)
    bar.update(1)
    bar.set_postfix(_postfix(metrics, run.last_eval))


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
