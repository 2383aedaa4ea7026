"""`rapid3 train`: GRPO training of a policy (the trainer is ``rapid3.train.trainer``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_limits_flag

if TYPE_CHECKING:
    from ..train.config import TrainConfig


def add_train(sub: argparse._SubParsersAction) -> None:
    from ..train.config import add_arguments

    parser = sub.add_parser(
        "train", help="train a RAPID3 policy with GRPO for the embedded model or a diffusers SD3 / FLUX pipeline",
        description="GRPO training of the three acceleration heads: rollout groups from shared noise, reward "
                    "(q + omega*d)(1 - lam^K)/(K(1 - lam)) from a quality model q and an adversarial discriminator "
                    "d, clipped per-decision surrogate, held-out evaluation against full compute. On the embedded "
                    "model (default) q is its learned reward model and prompts come from its scene grammar; with "
                    "--pipeline PATH_OR_ID, prompts come from --prompt-file, q is a CLIP score (--reward-model) and "
                    "d a frozen CLIP vision tower with a trainable adapter (--disc-model, default the same CLIP). "
                    "Knobs come from the defaults, then --config, then the flags.")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of knobs (see RUN/config.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint and config.yaml")
    add_arguments(parser)
    add_limits_flag(parser)
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ..train.config import config_from_args
    from ..train.run_folder import EXPORT
    from ..train.trainer import train

    cfg = config_from_args(args)
    _check_limits(cfg, args.beyond_limits)
    untrained = _never_updated(cfg)
    if untrained:
        print(f"rapid3 train: warning: {untrained}", file=sys.stderr)
    run = train(cfg, resume=args.resume)
    if run.stopped_by:  # checkpointed and resumable, but not finished: exit as a shell reports the signal
        return 128 + run.stopped_by
    if run.world.is_main:
        print(f"trained {run.iteration} iterations; policy in {Path(cfg.out) / EXPORT}"
              + (" (never updated: every iteration was discriminator warm-up)" if untrained else ""))
    return 0


def _check_limits(cfg: TrainConfig, override: bool) -> None:
    """The upper bounds of the knobs that size one iteration's work, before anything loads."""
    from ..common.limits import check_limits

    check_limits([("steps", "step_cap", cfg.step_cap), ("image_size", "height", cfg.height),
                  ("image_size", "width", cfg.width),
                  ("batch", "trajectories per iteration (prompts_per_iteration x group_size)",
                   cfg.prompts_per_iteration * cfg.group_size), ("batch", "eval_batch", cfg.eval_batch),
                  ("prompts", "eval_prompts", cfg.eval_prompts)], override)


def _never_updated(cfg: TrainConfig) -> str | None:
    """Why the policy this run exports will be its untrained initialisation, if it will be."""
    if cfg.uses_discriminator and cfg.disc_warmup >= cfg.iterations:
        return (f"disc_warmup ({cfg.disc_warmup}) >= iterations ({cfg.iterations}): every iteration only trains "
                "the discriminator, so the exported policy is the untrained initial one; raise --iterations above "
                "--disc-warmup or lower --disc-warmup.")
    return None
