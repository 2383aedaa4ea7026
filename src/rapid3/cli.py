"""The ``rapid3`` command line: ``rapid3 info``, ``demo``, ``generate``, ``train`` (and the commands later issues add)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__

if TYPE_CHECKING:
    from .policy import RapidPolicy


def _add_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="versions, supported backbones and the sparsity levels")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import diffusers

    from .accel.sparse_attention import SPARSE_KEEP_FRACTIONS
    from .backbones import ADAPTERS

    print(f"rapid3 {__version__} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print("backbones: " + ", ".join(f"{a.family} ({a.expected_class.__name__})" for a in ADAPTERS))
    print("sparse levels: 0 = dense, " + ", ".join(f"{i} = keep {k}" for i, k in enumerate(SPARSE_KEEP_FRACTIONS, 1)))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run the sampler loop with each controller on a random-weight SD3-architecture DiT",
        description="Times full compute against step reduction, FORA caching and static sparse attention on "
                    "one batch of a random-weight SD3-architecture transformer, all through rapid3's sampler "
                    "loop, and prints equivalent steps, FLOPs, wall-clock and the deviation from full compute.")
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens per sample (a square number)")
    parser.add_argument("--steps", type=int, default=28, help="step cap: the full-compute sampler's step count")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (hidden 384)")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .accel.sampler import Sampler
    from .baselines.steps import FixedIntervalCache, FullCompute, StaticSparse, UniformSteps
    from .demo import random_sd3_setup

    backbone, noise, cond, uncond = random_sd3_setup(args.tokens, args.layers, args.batch)
    sampler = Sampler(backbone, step_cap=args.steps, progress=True)
    controllers = {"full compute": FullCompute(), f"uniform {args.steps // 3} steps": UniformSteps(args.steps // 3),
                   "FORA interval 3": FixedIntervalCache(3), "static sparse keep 0.2": StaticSparse(3)}
    print(f"random-weight SD3 MMDiT, {args.layers} blocks, {args.tokens} image tokens, batch {args.batch}, CFG 4.5")
    print(f"| controller | steps | equivalent steps K | GFLOPs/image | seconds | speedup (time / FLOPs) | "
          f"max |x - x_full| |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for name, controller in controllers.items():
        tic = time.perf_counter()
        result = sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=4.5)
        seconds = time.perf_counter() - tic
        stats = result.stats
        if reference is None:
            reference = (result.latents, seconds, stats.flops.mean().item())
        flops = stats.flops.mean().item()
        deviation = (result.latents - reference[0]).abs().max().item()
        print(f"| {name} | {stats.steps.double().mean():.1f} | {stats.equivalent_steps.mean():.2f} | "
              f"{flops / 1e9:.1f} | {seconds:.2f} | {reference[1] / seconds:.2f}x / {reference[2] / flops:.2f}x | "
              f"{deviation:.3f} |")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate", help="generate an image with the embedded text-to-image model",
        description="Generate a 32x32 image from a prompt such as \"a red circle above a blue square\" with the "
                    "embedded pixel-space MMDiT (28-step CFG sampler unless accelerated).")
    parser.add_argument("prompt", help="what to draw: 1-3 coloured circles/squares/triangles, counts, relations")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps (the step cap when accelerated)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", type=Path, default=Path("rapid3.png"), help="PNG to write")
    parser.add_argument("--scale", type=int, default=8, help="upscale the 32x32 image by this factor (nearest)")
    parser.add_argument("--model", type=Path, default=None, help="an exported embedded model folder "
                                                                  "(default: the weights shipped in the package)")
    parser.add_argument("--policy", default=None, metavar="NAME_OR_PATH",
                        help="accelerate with a trained RAPID3 policy: a shipped one by name ('default') or a "
                             "folder written by `rapid3 train` (RUN/policy)")
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .embedded.model import GUIDANCE_SCALE
    from .embedded.pipeline import EmbeddedPipeline, check_prompt_text

    check_prompt_text(args.prompt)
    _writable(args.out)
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}.")
    policy = None if args.policy is None else _load_policy(args.policy)
    pipe = EmbeddedPipeline.from_pretrained(args.model)
    guidance = GUIDANCE_SCALE if args.guidance is None else args.guidance
    tic = time.perf_counter()
    output = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=guidance, seed=args.seed,
                  controller=policy, progress=True)
    seconds = time.perf_counter() - tic
    image = Image.fromarray(output.images[0])
    image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
    image.save(args.out)
    stats = output.stats
    print(f"wrote {args.out} ({image.width}x{image.height}) in {seconds:.2f} s: {int(stats.steps[0])} steps, "
          f"{stats.equivalent_steps[0]:.1f} equivalent steps")
    return 0


SHIPPED_POLICIES = Path(__file__).resolve().parent / "policies"


def _load_policy(name_or_path: str) -> RapidPolicy:
    """A shipped policy by name (``default``) or a policy folder; FileNotFoundError saying how to get one."""
    from .policy import RapidPolicy

    path = Path(name_or_path) if Path(name_or_path).is_dir() else SHIPPED_POLICIES / name_or_path
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in SHIPPED_POLICIES.glob("*/config.json")) if SHIPPED_POLICIES.is_dir() else []
        raise FileNotFoundError(
            f"no policy {name_or_path!r}: neither a policy folder nor a shipped one "
            f"(shipped: {', '.join(shipped) or 'none'}). Train one with `rapid3 train --out RUN` and pass "
            "--policy RUN/policy.")
    return RapidPolicy.from_pretrained(path)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.config import add_arguments

    parser = sub.add_parser(
        "train", help="train a RAPID3 policy for the embedded model with GRPO",
        description="GRPO training of the three acceleration heads on the embedded model: rollout groups from "
                    "shared noise, reward (q + omega*d)(1 - lam^K)/(K(1 - lam)) from the learned reward model q "
                    "and an adversarial discriminator d, clipped per-decision surrogate, held-out evaluation "
                    "against full compute. Knobs come from the defaults, then --config, then the flags.")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of knobs (see RUN/config.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint and config.yaml")
    add_arguments(parser)
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.config import config_from_args
    from .train.trainer import EXPORT, train

    cfg = config_from_args(args)
    run = train(cfg, resume=args.resume)
    print(f"trained {run.iteration} iterations; policy in {Path(cfg.out) / EXPORT}")
    return 0


def _writable(path: Path) -> None:
    """Fail before any work is lost if ``path`` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"The output folder {folder} does not exist; create it or choose another --out.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"The output folder {folder} is not writable; choose another --out.")


COMMANDS = [_add_info, _add_demo, _add_generate, _add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapid3", description="Learned per-image, per-step acceleration for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"rapid3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"rapid3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
