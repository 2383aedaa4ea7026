"""`rapid3 generate`: images from a prompt or a prompt file, with the embedded model or a diffusers pipeline,
optionally accelerated by a policy."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    add_limits_flag,
    add_pipeline_arguments,
    check_folder_out,
    check_image_out,
    check_pipeline_flags,
    save_image,
    world_config,
)

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
    parser.add_argument("--batch", type=int, default=None,
                        help="images per sampler call, each batch written as soon as it is done (default: 16 for "
                             "the embedded model, 1 for a pipeline)")
    add_pipeline_arguments(parser)
    add_limits_flag(parser)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    check_pipeline_flags(args)
    _check_knobs(args)
    prompts = _generate_prompts(args)
    paths = _output_paths(args, len(prompts))
    from ..policy.shipped import load_policy
    from ..worlds import build_world

    policy = None if args.policy is None else load_policy(args.policy)
    generator = build_world(world_config(args)).generator
    if policy is not None:
        policy.place_on(generator.backbone)
    _write_images(paths, _generate(generator, args, prompts, policy))
    return 0


def _check_knobs(args: argparse.Namespace) -> None:
    """Every number the user sized, before any work: lower bounds, upper bounds, NaN, seed range."""
    from ..common.limits import check_finite, check_limits, check_seed

    for flag, value in (("--scale", args.scale), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    check_finite("--guidance", args.guidance)
    check_seed("--seed", args.seed)
    check_limits([("steps", "--steps", args.steps), ("scale", "--scale", args.scale), ("batch", "--batch", args.batch),
                  ("image_size", "--height", args.height), ("image_size", "--width", args.width)], args.beyond_limits)


def _write_images(paths: list[Path], results) -> None:
    """Write each (image, seconds, summary) as it comes, so an interrupt loses only the images in progress."""
    written = 0
    try:
        for path, (image, seconds, summary) in zip(paths, results):
            save_image(image, path)
            written += 1
            print(f"wrote {path} ({image.width}x{image.height}) in {seconds:.2f} s: {summary}")
    except KeyboardInterrupt:
        where = f"; they are in {paths[0].parent}" if written else ""
        raise KeyboardInterrupt(f"interrupted (Ctrl-C) after {written} of {len(paths)} images{where}.") from None


def _generate_prompts(args: argparse.Namespace) -> list[str]:
    """The positional prompt or the prompt file's, checked before any model loads."""
    from ..common.limits import check_limits
    from ..common.prompts import read_prompts
    from ..embedded.pipeline import check_prompt_text

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a prompt or --prompt-file (one of them).")
    prompts = [args.prompt] if args.prompt_file is None else read_prompts(args.prompt_file)
    for prompt in prompts:
        check_prompt_text(prompt)
    longest = max(prompts, key=len)
    check_limits([("prompts", "the number of prompts", len(prompts)),
                  ("prompt_chars", f"the length of the prompt {longest[:30]!r}...", len(longest))], args.beyond_limits)
    if args.pipeline is None:  # a diffusers pipeline's text encoders know the words; the embedded model does not
        _warn_unknown_words(prompts)
    return prompts


def _warn_unknown_words(prompts: list[str], most: int = 5) -> None:
    """One warning line per prompt with words the embedded model never saw (the first ``most``, then a count)."""
    import sys

    from ..embedded.vocabulary import vocabulary_warning

    warnings = [line for line in map(vocabulary_warning, prompts) if line]
    for line in warnings[:most]:
        print(f"rapid3 generate: warning: {line}", file=sys.stderr)
    if len(warnings) > most:
        print(f"rapid3 generate: warning: ... and {len(warnings) - most} more prompts with unknown words.",
              file=sys.stderr)


def _output_paths(args: argparse.Namespace, n: int) -> list[Path]:
    """Where each image goes: --out itself, or numbered PNGs in the --out folder (made with the first image)."""
    if args.prompt_file is None:
        out = Path("rapid3.png") if args.out is None else args.out
        check_image_out(out)
        return [out]
    folder = args.out or Path("rapid3-images")
    check_folder_out(folder)  # made with the first image: a refused run leaves no empty folder
    return [folder / f"{i:04d}.png" for i in range(n)]


def _generate(generator: Generator, args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt, in batches of the generator's size (seconds: the batch's share);
    image i from the noise of seed ``args.seed + i``."""
    from PIL import Image

    from ..accel.controllers import FullCompute
    from ..embedded.pipeline import to_uint8

    scale = generator.preview_scale if args.scale is None else args.scale
    size = args.batch or generator.default_batch
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
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
