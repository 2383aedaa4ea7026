"""`rapid3 generate`: images from a prompt or a prompt file, with the embedded model or a diffusers pipeline,
optionally accelerated by a policy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_pipeline_arguments, check_pipeline_flags, check_writable, world_config

if TYPE_CHECKING:
    from ..policy import RapidPolicy
    from ..worlds import Generator


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
    parser.add_argument("--scale", type=int, default=None,
                        help="upscale each image by this factor, nearest neighbour (default: 8 for the embedded "
                             "model's 32x32 images, 1 for a pipeline's)")
    add_pipeline_arguments(parser)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    check_pipeline_flags(args)
    prompts = _generate_prompts(args)
    paths = _output_paths(args, len(prompts))
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}.")
    from ..policy.shipped import load_policy
    from ..worlds import build_world

    policy = None if args.policy is None else load_policy(args.policy)
    generator = build_world(world_config(args)).generator
    if policy is not None:
        policy.check_backbone(generator.backbone)
        policy.to(generator.backbone.device)
    for path, (image, seconds, summary) in zip(paths, _generate(generator, args, prompts, policy)):
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


def _generate(generator: Generator, args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt, in batches of the generator's size (seconds: the batch's share);
    image i from the noise of seed ``args.seed + i``."""
    from PIL import Image

    from ..accel.controllers import FullCompute
    from ..embedded.pipeline import to_uint8

    scale = generator.preview_scale if args.scale is None else args.scale
    for start in range(0, len(prompts), generator.default_batch):
        batch = prompts[start:start + generator.default_batch]
        tic = time.perf_counter()
        out = generator.sample(batch, list(range(args.seed + start, args.seed + start + len(batch))),
                               policy or FullCompute(), step_cap=args.steps, guidance_scale=args.guidance,
                               progress=True)
        seconds = (time.perf_counter() - tic) / len(batch)
        stats = out.stats
        for i, pixels in enumerate(to_uint8(out.images.cpu())):
            image = Image.fromarray(pixels)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            k = stats.equivalent_steps[i].item()
            yield image, seconds, (f"{int(stats.steps[i])} steps, {k:.1f} equivalent steps "
                                   f"({args.steps / k:.2f}x fewer transformer FLOPs than {args.steps} steps)")
