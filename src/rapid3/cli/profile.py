"""`rapid3 profile`: what one step of every action costs on a backbone, eager and compiled; JSON + table."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .common import check_writable

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_profile(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "profile", help="time one step of every action (full, sparse levels, reuse) on a backbone",
        description="Times one denoising step of one image (all its guidance branches) for every action the "
                    "sampler can take, eager and with compiled transformer blocks, interleaved; reports medians "
                    "with ranges, each action's cost relative to a full step, the cache's memory per image and "
                    "branch, and on CUDA each step's peak memory. The JSON it writes is what `rapid3 train "
                    "--step-costs PROFILE.json` prices actions with. The backbone is --arch (published "
                    "hyper-parameters, random weights), --pipeline, or else the embedded model.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", default=None, choices=("sd3-medium", "sd3.5-large", "flux-dev"),
                        help="a published transformer with random weights (timing does not depend on weights)")
    source.add_argument("--pipeline", default=None, metavar="PATH_OR_ID", help="a StableDiffusion3Pipeline or "
                        "FluxPipeline (its transformer, random prompt embeddings of its usual length)")
    source.add_argument("--model", default=None, metavar="DIR", help="an embedded model folder (default: shipped)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (--arch, --pipeline)")
    parser.add_argument("--layers", type=int, default=None, help="--arch: fewer transformer blocks, full width")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default: bfloat16 on GPU, else float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--levels", type=int, nargs="+", default=None, metavar="LEVEL",
                        help="sparsity levels to time besides reuse (default: all; 0 = full is always timed): "
                             "each compiled level is one more graph per block kind to compile")
    parser.add_argument("--no-compile", action="store_true", help="eager only (compiling takes minutes on a CPU)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode")
    parser.add_argument("--out", type=Path, default=Path("profile.json"),
                        help="JSON output; the Markdown table goes beside it (.md)")
    parser.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from ..accel.profile import profile_backbone, step_actions

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    check_writable(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    backbone, latents, cond, branches, setup = _source(args, device, dtype)
    levels = None if args.levels is None else {0, *args.levels}
    actions = [a for a in step_actions() if levels is None or a.reuse or a.level in levels]
    profile = profile_backbone(backbone, latents, cond, branches=branches, repeats=args.repeats, actions=actions,
                               compile=not args.no_compile, compile_backend=args.compile_backend, setup=setup)
    profile.save(args.out)
    table = profile.table()
    args.out.with_suffix(".md").write_text(f"{_title(profile.setup)}\n\n{table}\n")
    print(_title(profile.setup))
    print(table)
    print(f"cache: {profile.cache_bytes_per_image_per_branch / 2**20:.2f} MiB per image per branch; "
          f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _title(setup: dict) -> str:
    return (f"{setup['source']}: {setup['blocks']} blocks, {setup['parameters'] / 1e6:,.0f}M parameters, "
            f"{setup['image_tokens']} image + {setup['text_tokens']} text tokens, {setup['branches']} branch(es), "
            f"{setup['device']} {setup['dtype']}, torch {setup['torch']}, {setup['repeats']} repeats, "
            f"compiled = {setup['compile_backend'] or 'not timed'}")


def _source(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(backbone, one image's latent rows, their conditioning, branches, setup notes) of the chosen source."""
    from ..backbones import Conditioning

    if args.arch is not None:
        from ..backbones.archs import random_arch_setup

        backbone, noise, cond, uncond = random_arch_setup(args.arch, resolution=args.resolution, layers=args.layers,
                                                          device=device, dtype=dtype)
        source = f"{args.arch} (random weights, {args.resolution}x{args.resolution})"
    elif args.pipeline is not None:
        backbone, noise, cond, uncond = _pipeline_source(args, device, dtype)
        source = f"{args.pipeline} ({args.resolution}x{args.resolution})"
    else:
        from ..embedded.pipeline import EmbeddedPipeline, initial_noise

        pipe = EmbeddedPipeline.from_pretrained(args.model)
        backbone, (cond, uncond) = pipe.backbone, pipe.encode(["a red circle to the left of a blue square"])
        noise, source = initial_noise(1, 0), f"embedded model {args.model or '(shipped)'}"
    if uncond is None:
        return backbone, noise, cond, 1, {"source": source}
    return backbone, torch.cat([noise, noise]), Conditioning.cat([uncond, cond]), 2, {"source": source}


def _pipeline_source(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from ..backbones import backbone_for
    from ..backbones.archs import random_inputs
    from ..worlds.pipeline import load_pipeline

    pipe = load_pipeline(args.pipeline, device=str(device), dtype=str(dtype).removeprefix("torch."))
    backbone = backbone_for(pipe.transformer, pipe.scheduler)
    # The pipelines' default prompt lengths: SD3 77 CLIP + 256 T5 tokens, FLUX 512 T5 tokens.
    flux = backbone.family == "flux"
    noise, cond, uncond = random_inputs(backbone, resolution=args.resolution, text_tokens=512 if flux else 333,
                                        cfg=not flux)
    return backbone, noise, cond, uncond
