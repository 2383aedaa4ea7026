"""Flags and checks shared by several commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..worlds import WorldConfig


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """--pipeline and how to run it: shared by `generate` and `bench`."""
    group = parser.add_argument_group("a diffusers pipeline instead of the embedded model")
    group.add_argument("--pipeline", default=None, metavar="PATH_OR_ID",
                       help="a StableDiffusion3Pipeline or FluxPipeline: local folder or Hugging Face Hub id")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="pipeline dtype (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")


def check_pipeline_flags(args: argparse.Namespace) -> None:
    """Refuse pipeline-only flags without --pipeline, and --model with it, rather than ignore them."""
    if args.pipeline is None:
        given = [f"--{name}" for name in ("device", "dtype", "height", "width") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --pipeline.")
    elif args.model is not None:
        raise ValueError("give either --pipeline (a diffusers pipeline) or --model (an embedded model), not both.")


def check_writable(path: Path) -> None:
    """Fail before any work is lost if ``path`` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"The output folder {folder} does not exist; create it or choose another --out.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"The output folder {folder} is not writable; choose another --out.")


def world_config(args: argparse.Namespace) -> WorldConfig:
    """The world ``generate`` and ``bench`` draw from: ``--pipeline`` with its device, dtype and size, or the
    embedded ``--model``."""
    from ..worlds import WorldConfig  # here: building the parser must stay cheap

    return WorldConfig(model=None if args.model is None else str(args.model), pipeline=args.pipeline,
                       device=args.device, dtype=args.dtype, height=args.height, width=args.width)
