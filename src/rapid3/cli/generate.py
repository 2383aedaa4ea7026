"""`rapid3 generate`: images from a prompt or a prompt file, with the embedded model or a diffusers pipeline,
optionally accelerated by a policy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .common import add_pipeline_arguments, check_pipeline_flags, check_writable

if TYPE_CHECKING:
    from ..policy import RapidPolicy


def add_generate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate", help="generate images with the embedded model or a diffusers SD3 / FLUX pipeline",
        description="Generate an image from a prompt such as \"a red circle above a blue square\" with the "
                    "embedded pixel-space MMDiT (28-step CFG sampler unless accelerated), or, with --pipeline, "
                    "with a diffusers StableDiffusion3Pipeline / FluxPipeline, optionally accelerated by a policy "
                    "trained for it (`rapid3 train --pipeline`).")
    parser.add_argument("prompt", nargs="?", help="what to draw (or give --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="one image per prompt of a .txt (one per line) or .jsonl ({\"prompt\": ...}) file; "
                             "--out is then a folder")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps (the step cap when accelerated)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i: seed + i)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default rapid3.png); with --prompt-file a folder (default rapid3-images)")
    parser.add_argument("--policy", default=None, metavar="NAME_OR_PATH",
                        help="accelerate with a trained RAPID3 policy: a shipped one by name ('default') or a "
                             "folder written by `rapid3 train` (RUN/policy)")
    embedded = parser.add_argument_group("the embedded model")
    embedded.add_argument("--model", type=Path, default=None, help="an exported embedded model folder "
                                                                    "(default: the weights shipped in the package)")
    embedded.add_argument("--scale", type=int, default=8, help="upscale the 32x32 image by this factor (nearest)")
    add_pipeline_arguments(parser)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    check_pipeline_flags(args)
    prompts = _generate_prompts(args)
    paths = _output_paths(args, len(prompts))
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}.")
    from ..policy.shipped import load_policy

    policy = None if args.policy is None else load_policy(args.policy)
    generate = _generate_with_pipeline if args.pipeline else _generate_embedded
    for path, (image, seconds, summary) in zip(paths, generate(args, prompts, policy)):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height}) in {seconds:.2f} s: {summary}")
    return 0


def _generate_prompts(args: argparse.Namespace) -> list[str]:
    """The positional prompt or the prompt file's, checked before any model loads."""
    from ..common.prompts import read_prompts
    from ..embedded.pipeline import check_prompt_text

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a prompt or --prompt-file (one of them).")
    if args.prompt_file is not None:
        return read_prompts(args.prompt_file)
    check_prompt_text(args.prompt)
    return [args.prompt]


def _output_paths(args: argparse.Namespace, n: int) -> list[Path]:
    """Where each image goes: --out itself, or numbered PNGs in the --out folder (made if missing)."""
    if args.prompt_file is None:
        out = args.out or Path("rapid3.png")
        check_writable(out)
        return [out]
    folder = args.out or Path("rapid3-images")
    folder.mkdir(parents=True, exist_ok=True)
    check_writable(folder / "0.png")
    return [folder / f"{i:04d}.png" for i in range(n)]


def _generate_embedded(args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt from the embedded model, in one batch (seconds: the batch's share)."""
    from PIL import Image

    from ..embedded.model import GUIDANCE_SCALE
    from ..embedded.pipeline import EmbeddedPipeline

    # A 3.5M-parameter model's ops are too small to split across threads, and on a busy 2-core
    # machine a second thread stalls every op (measured: 28 steps in 4.7 s on one thread, 80 s on two).
    torch.set_num_threads(1)
    pipe = EmbeddedPipeline.from_pretrained(args.model)
    if policy is not None:
        policy.check_backbone(pipe.backbone)
    guidance = GUIDANCE_SCALE if args.guidance is None else args.guidance
    tic = time.perf_counter()
    output = pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance, seed=args.seed,
                  controller=policy, progress=True)
    seconds = (time.perf_counter() - tic) / len(prompts)
    stats = output.stats
    for i in range(len(prompts)):
        image = Image.fromarray(output.images[i])
        image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
        yield image, seconds, f"{int(stats.steps[i])} steps, {stats.equivalent_steps[i]:.1f} equivalent steps"


def _generate_with_pipeline(args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt from a diffusers pipeline under ``rapid3.accelerate``, one call each."""
    from ..accel.controllers import FullCompute
    from ..generators import load_pipeline
    from ..pipelines import accelerate

    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype)
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
    with accelerate(pipe, policy or FullCompute()) as handle:
        if policy is not None:
            policy.check_backbone(handle.backbone)
            policy.to(pipe.device)
        for i, prompt in enumerate(prompts):
            tic = time.perf_counter()
            image = pipe(prompt, num_inference_steps=args.steps, height=args.height, width=args.width,
                         generator=torch.Generator().manual_seed(args.seed + i), **guidance).images[0]
            stats = handle.last_stats
            yield image, time.perf_counter() - tic, (
                f"{int(stats.steps[0])} steps, {stats.equivalent_steps[0]:.1f} equivalent steps "
                f"({handle.speedup_estimate:.2f}x fewer transformer FLOPs than {args.steps} steps)")
