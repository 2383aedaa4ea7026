"""RAPID3's GRPO trainer for the embedded model, readable top to bottom.

    rapid3 train --out runs/rapid3 [--config run.yaml] [--resume] [--group-size 8 ...]

Each iteration, on this rank's prompts (``train_iteration``):
  1. rollout: G trajectories per prompt from one initial noise, actions drawn from the policy;
  2. reward: r = (q + omega * d) * (1 - lam^K) / (K * (1 - lam)) with q the learned reward model,
     d the discriminator's probability that the image is from the full-compute sampler, K the
     equivalent steps (``reward`` picks q + d, q alone or d alone);
  3. advantages normalised within each prompt's group;
  4. ``inner_epochs`` x ``minibatches`` AdamW steps on the clipped surrogate, per-decision ratios, no KL;
  5. the discriminator: full-compute images of the same prompts and noise join the positives'
     replay buffer, the rollouts the negatives', then ``disc_steps`` updates.
Every ``eval_every`` iterations and after the last, ``evaluate`` runs the policy (deterministic
mode) and full compute side by side on fixed held-out prompts: checker accuracy (evaluation only,
never a reward), equivalent steps by scene complexity, FLOP and wall-clock speedups.

The run folder holds ``config.yaml``, ``checkpoint.pt`` (atomic; ``--resume`` continues bit for
bit), ``log.jsonl`` (one record per iteration), ``tensorboard/`` and, at the end, ``policy/``
(safetensors + config.json for ``RapidPolicy.from_pretrained`` / ``rapid3 generate --policy``).

The shipped default policy (``rapid3 generate --policy default``) is a run with every default
knob on the shipped embedded model and reward model, copied into the package::

    rapid3 train --out runs/default-policy
    cp runs/default-policy/policy/* src/rapid3/policies/default/
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..baselines.steps import FullCompute
from ..embedded.checker import checker_accuracy
from ..embedded.pipeline import EmbeddedPipeline, to_uint8
from ..embedded.reward import RewardModel, load_reward_model
from ..embedded.scenes import SceneSpec, parse_caption, sample_scene
from ..embedded.text_encoder import MiniLMTextEncoder
from ..policy import RapidPolicy
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CONFIG_FILE, POLICY_FIELDS, TrainConfig
from .discriminator import Discriminator, ImageDiscriminator, ModuleDiscriminator, ReplayBuffer
from .grpo import discounted_reward, group_advantages, grpo_loss, zero_spread_fraction
from .rollout import Rollouts, rollout, sample_images

CHECKPOINT, LOG, TENSORBOARD, EXPORT = "checkpoint.pt", "log.jsonl", "tensorboard", "policy"
FIXED_ON_RESUME = (*POLICY_FIELDS, "disc_width", "replay_capacity")
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


def rollout_rewards(rollouts: Rollouts, quality: QualityModel | None, disc: Discriminator | None, *,
                    lam: float, omega: float) -> dict[str, Tensor]:
    """Per trajectory: ``quality`` q, ``disc`` d (0 for an absent term) and the discounted ``reward`` r."""
    absent = torch.zeros(len(rollouts), dtype=torch.float64)
    q = absent if quality is None else quality.score(rollouts.images, rollouts.prompts).double()
    d = absent if disc is None else disc.score(rollouts.images).double()
    return {"quality": q, "disc": d,
            "reward": discounted_reward(q, d, rollouts.equivalent_steps, lam=lam, omega=omega)}


# ----------------------------------------------------------------------------- updates


def policy_update(policy: RapidPolicy, optimizer: torch.optim.Optimizer, rollouts: Rollouts, advantages: Tensor,
                  cfg: TrainConfig) -> dict[str, float]:
    """``inner_epochs`` passes of ``minibatches`` clipped-surrogate steps; means over the steps."""
    steps = []
    for _ in range(cfg.inner_epochs):
        for index in torch.randperm(len(rollouts)).tensor_split(cfg.minibatches):
            batch = rollouts.subset(index)
            new = batch.log_probs(policy)
            loss = grpo_loss(new, batch.old_log_probs, advantages[index], clip=cfg.clip, mask=batch.mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            log_ratio = (new.detach() - batch.old_log_probs)[batch.mask]
            ratio = log_ratio.exp()
            steps.append({"loss": loss.item(), "grad_norm": grad_norm.item(),
                          "clip_fraction": ((ratio - 1).abs() > cfg.clip).float().mean().item(),
                          "approx_kl": ((ratio - 1) - log_ratio).mean().item()})  # k3 estimator of KL(old || new)
    return _means("policy", steps)


def discriminator_update(disc: Discriminator, positives: ReplayBuffer, negatives: ReplayBuffer,
                         cfg: TrainConfig) -> dict[str, float]:
    """``disc_steps`` updates on ``disc_batch`` images per class drawn from the replay buffers."""
    steps = [disc.step(positives.sample(cfg.disc_batch), negatives.sample(cfg.disc_batch))
             for _ in range(cfg.disc_steps)]
    return _means("disc", steps)


def _means(prefix: str, steps: list[dict[str, float]]) -> dict[str, float]:
    """Each statistic averaged over the update steps, as ``prefix/name``."""
    return {f"{prefix}/{key}": float(np.mean([step[key] for step in steps])) for key in steps[0]}


# ----------------------------------------------------------------------------- one iteration


@dataclass
class Run:
    """Everything a training run holds; ``state_dict`` is what its checkpoint stores."""

    cfg: TrainConfig
    pipe: EmbeddedPipeline
    policy: RapidPolicy
    optimizer: torch.optim.Optimizer
    quality: QualityModel | None
    disc: ModuleDiscriminator | None
    positives: ReplayBuffer
    negatives: ReplayBuffer
    prompt_rng: np.random.Generator
    iteration: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Policy, discriminator, optimisers, replay buffers, RNG states, iteration and config."""
        state = {"iteration": self.iteration, "config": self.cfg.to_dict(), "policy": self.policy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "prompt_rng": self.prompt_rng.bit_generator.state, "last_eval": self.last_eval,
                 "positives": self.positives.state_dict(), "negatives": self.negatives.state_dict()}
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; the run continues exactly where the saved one stopped."""
        saved = state["config"]
        changed = [name for name in FIXED_ON_RESUME if saved[name] != getattr(self.cfg, name)]
        if changed:
            raise ValueError("a resumed run cannot change " + ", ".join(
                f"{name} (saved {saved[name]!r}, given {getattr(self.cfg, name)!r})" for name in changed) + ".")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.positives.load_state_dict(state["positives"])
        self.negatives.load_state_dict(state["negatives"])
        if self.disc is not None and "disc" in state:  # a run switched to a d reward starts a fresh discriminator
            self.disc.load_state_dict(state["disc"])
        self.prompt_rng.bit_generator.state = state["prompt_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.last_eval = state["iteration"], state["last_eval"]


def training_prompts(rng: np.random.Generator, n: int) -> tuple[list[str], list[int]]:
    """``n`` random train-split captions (the scene generator's kind weights) and a noise seed for each."""
    captions = [sample_scene(rng, "train").caption for _ in range(n)]
    return captions, [int(seed) for seed in rng.integers(0, 2**31, size=n)]


def train_iteration(run: Run, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """One GRPO iteration on these prompts (this rank's share): rollout, reward, advantages, updates."""
    cfg = run.cfg
    rollouts = rollout(run.pipe, run.policy, prompts, seeds, group_size=cfg.group_size, step_cap=cfg.step_cap,
                       guidance_scale=cfg.guidance_scale)
    scores = rollout_rewards(rollouts, run.quality, run.disc, lam=cfg.lam, omega=cfg.omega)
    advantages = group_advantages(scores["reward"], cfg.group_size)
    metrics = rollout_metrics(rollouts, scores, cfg)
    metrics |= policy_update(run.policy, run.optimizer, rollouts, advantages, cfg)
    if run.disc is not None:
        originals = sample_images(run.pipe, prompts, seeds, FullCompute(), step_cap=cfg.step_cap,
                                  guidance_scale=cfg.guidance_scale)
        run.positives.push(originals.latents.clamp(-1, 1))
        run.negatives.push(rollouts.images)
        metrics |= discriminator_update(run.disc, run.positives, run.negatives, cfg)
    return metrics


def rollout_metrics(rollouts: Rollouts, scores: dict[str, Tensor], cfg: TrainConfig) -> dict[str, float]:
    """What the rollouts did: reward terms, compute, actions, group spread, checker accuracy (monitoring only)."""
    k, actions = rollouts.equivalent_steps, rollouts.actions
    recompute = ~actions.reuse
    metrics = {"train/reward": scores["reward"].mean().item(), "train/equivalent_steps": k.mean().item(),
               "train/speedup": cfg.step_cap / k.mean().item(),  # full compute: K = step_cap
               "train/steps": rollouts.mask.sum(1).double().mean().item(),
               "train/reuse_fraction": actions.reuse.double().mean().item(),
               "train/sparse_fraction": ((actions.level > 0) & recompute).sum().item() / max(1, recompute.sum().item()),
               "train/zero_spread": zero_spread_fraction(scores["reward"], cfg.group_size),
               "train/seconds_per_image": rollouts.seconds.mean().item(),
               "train/accuracy": checker_accuracy(list(to_uint8(rollouts.images)),
                                                  [parse_caption(p) for p in rollouts.prompts])["accuracy"]}
    if cfg.uses_quality:
        metrics["train/quality"] = scores["quality"].mean().item()
    if cfg.uses_discriminator:
        metrics["train/disc"] = scores["disc"].mean().item()
    return metrics


# ----------------------------------------------------------------------------- evaluation


def heldout_prompts(n: int) -> list[SceneSpec]:
    """The fixed evaluation set: ``n`` held-out-split captions (the first ``n`` of one seeded sequence)."""
    rng = np.random.default_rng(EVAL_SEED)
    return [sample_scene(rng, "heldout") for _ in range(n)]


@torch.no_grad()
def evaluate(pipe: EmbeddedPipeline, policy: RapidPolicy, specs: list[SceneSpec], cfg: TrainConfig,
             quality: QualityModel | None = None) -> dict[str, float]:
    """Policy (deterministic) vs full compute on ``specs``, image i from seed i, side by side.

    The two alternate batch by batch, so both see the same machine load; wall-clock covers the
    sampler with the controller's own overhead (prompts are encoded beforehand, for both).
    """
    controllers = {"full": FullCompute(), "policy": policy}
    images: dict[str, list[Tensor]] = {name: [] for name in controllers}
    k: dict[str, list[Tensor]] = {name: [] for name in controllers}
    seconds = dict.fromkeys(controllers, 0.0)
    sampling, policy.sampling = policy.sampling, False
    pipe.encode([s.caption for s in specs])  # warm the encoder's cache: not timed, for neither side
    for start in range(0, len(specs), cfg.eval_batch):
        prompts = [s.caption for s in specs[start:start + cfg.eval_batch]]
        seeds = list(range(start, start + len(prompts)))
        for name, controller in controllers.items():
            tic = time.perf_counter()
            result = sample_images(pipe, prompts, seeds, controller, step_cap=cfg.step_cap,
                                   guidance_scale=cfg.guidance_scale)
            seconds[name] += time.perf_counter() - tic
            images[name].append(result.latents.clamp(-1, 1))
            k[name].append(result.stats.equivalent_steps)
    policy.sampling = sampling
    images = {name: torch.cat(parts) for name, parts in images.items()}
    k = {name: torch.cat(parts) for name, parts in k.items()}
    accuracy = {name: checker_accuracy(list(to_uint8(images[name])), specs) for name in controllers}
    metrics = {"eval/accuracy": accuracy["policy"]["accuracy"], "eval/accuracy_full": accuracy["full"]["accuracy"],
               "eval/equivalent_steps": k["policy"].mean().item(),
               "eval/speedup_flops": k["full"].mean().item() / k["policy"].mean().item(),
               "eval/speedup_wall": seconds["full"] / seconds["policy"]}
    complexity = torch.tensor([s.complexity for s in specs])
    for c in complexity.unique().tolist():  # adaptivity: simple scenes should cost less
        metrics[f"eval/equivalent_steps/objects_{c}"] = k["policy"][complexity == c].mean().item()
    if quality is not None:
        captions = [s.caption for s in specs]
        metrics["eval/quality"] = quality.score(images["policy"], captions).mean().item()
        metrics["eval/quality_full"] = quality.score(images["full"], captions).mean().item()
    return metrics


# ----------------------------------------------------------------------------- the run


def build_run(cfg: TrainConfig, *, resume: bool = False) -> Run:
    """A fresh run from ``cfg``, or, with ``resume``, the one checkpointed in ``cfg.out``."""
    path = Path(cfg.out) / CHECKPOINT
    if resume and not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if not resume and path.exists():
        raise FileExistsError(f"{cfg.out} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                              "or choose another --out.")
    state = load_checkpoint(path) if resume else None  # before any work: a bad checkpoint fails fast
    torch.manual_seed(cfg.seed)
    pipe = EmbeddedPipeline.from_pretrained(cfg.model)
    policy = RapidPolicy.for_backbone(pipe.backbone, **cfg.policy_kwargs())
    quality = EmbeddedQuality(load_reward_model(cfg.reward_model), pipe.encoder) if cfg.uses_quality else None
    disc = None
    if cfg.uses_discriminator:
        width = cfg.disc_width
        disc = ModuleDiscriminator(ImageDiscriminator(channels=(width, 2 * width, 4 * width)), lr=cfg.disc_lr)
    run = Run(cfg, pipe, policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
              quality, disc, ReplayBuffer(cfg.replay_capacity, seed=cfg.seed),
              ReplayBuffer(cfg.replay_capacity, seed=cfg.seed + 1), np.random.default_rng(cfg.seed))
    if state is not None:
        run.load_state_dict(state)
    return run


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
    """Train (or, with ``resume``, continue) the policy up to ``cfg.iterations``; export it to ``out/policy``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, resume=resume)
    cfg.to_yaml(out / CONFIG_FILE)
    specs = heldout_prompts(cfg.eval_prompts)
    log = RunLog(out, run.iteration)
    bar = tqdm(total=cfg.iterations, initial=run.iteration, desc="grpo", unit="it", dynamic_ncols=True)
    try:
        while run.iteration < cfg.iterations:
            tic = time.perf_counter()
            metrics = train_iteration(run, *training_prompts(run.prompt_rng, cfg.prompts_per_iteration))
            metrics["time/iteration_seconds"] = time.perf_counter() - tic
            run.iteration += 1
            last = run.iteration == cfg.iterations
            if run.iteration % cfg.eval_every == 0 or last:
                run.last_eval = evaluate(run.pipe, run.policy, specs, cfg, run.quality)
                metrics |= run.last_eval
                bar.write(_eval_line(run.iteration, run.last_eval))
            log.write(run.iteration, metrics)
            bar.update(1)
            bar.set_postfix(_postfix(metrics, run.last_eval))
            if run.iteration % cfg.checkpoint_every == 0 or last:
                save_checkpoint(out / CHECKPOINT, run.state_dict())
    finally:
        bar.close()
        log.close()
    export_policy(run, out / EXPORT)
    return run


def _postfix(metrics: dict[str, float], last_eval: dict[str, float]) -> dict[str, str]:
    """Live numbers: this iteration's reward, FLOP speedup and rollout accuracy, the last held-out accuracy."""
    held_out = last_eval.get("eval/accuracy")
    return {"reward": f"{metrics['train/reward']:.3f}", "speedup": f"{metrics['train/speedup']:.2f}x",
            "acc": f"{metrics['train/accuracy']:.2f}", "eval_acc": "-" if held_out is None else f"{held_out:.2f}"}


def _eval_line(iteration: int, metrics: dict[str, float]) -> str:
    return (f"iteration {iteration}: held-out accuracy {metrics['eval/accuracy']:.3f} "
            f"(full compute {metrics['eval/accuracy_full']:.3f}), K {metrics['eval/equivalent_steps']:.1f}, "
            f"speedup {metrics['eval/speedup_flops']:.2f}x FLOPs / {metrics['eval/speedup_wall']:.2f}x wall-clock")
