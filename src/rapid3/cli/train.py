"""`rapid3 train`: GRPO training of a policy (the trainer is ``rapid3.train.trainer``)."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from ..train.config import config_from_args
    from ..train.run_folder import EXPORT
    from ..train.trainer import train

    cfg = config_from_args(args)
    run = train(cfg, resume=args.resume)
    if run.stopped_by:  # checkpointed and resumable, but not finished: exit as a shell reports the signal
        return 128 + run.stopped_by
    if run.world.is_main:
        print(f"trained {run.iteration} iterations; policy in {Path(cfg.out) / EXPORT}")
    return 0
