"""`rapid3 info` (versions, backbones, sparsity levels) and `rapid3 demo` (every hand-set controller on a
random-weight SD3-architecture DiT)."""

from __future__ import annotations

import argparse
import time

import torch

from .. import __version__


def add_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="versions, supported backbones and the sparsity levels")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import diffusers

    from ..backbones import ADAPTERS
    from ..backbones.sparse_attention import SPARSE_KEEP_FRACTIONS

    print(f"rapid3 {__version__} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print("backbones: " + ", ".join(f"{a.family} ({a.expected_class.__name__})" for a in ADAPTERS))
    print("sparse levels: 0 = dense, " + ", ".join(f"{i} = keep {k}" for i, k in enumerate(SPARSE_KEEP_FRACTIONS, 1)))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
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
    from ..accel.controllers import FullCompute, UniformSteps
    from ..accel.sampler import Sampler
    from ..backbones.random_sd3 import random_sd3_setup
    from ..baselines.steps import FixedIntervalCache, StaticSparse

    backbone, noise, cond, uncond = random_sd3_setup(args.tokens, args.layers, args.batch)
    sampler = Sampler(backbone, step_cap=args.steps, progress=True)
    controllers = {"full compute": FullCompute(), f"uniform {args.steps // 3} steps": UniformSteps(args.steps // 3),
                   "FORA interval 3": FixedIntervalCache(3), "static sparse keep 0.2": StaticSparse(3)}
    print(f"random-weight SD3 MMDiT, {args.layers} blocks, {args.tokens} image tokens, batch {args.batch}, CFG 4.5")
    print("| controller | steps | equivalent steps K | GFLOPs/image | seconds | speedup (time / FLOPs) | "
          "max |x - x_full| |")
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
