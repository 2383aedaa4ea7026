"""Flags and checks shared by several commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

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


def add_limits_flag(parser: argparse.ArgumentParser) -> None:
    """The deliberate way past ``rapid3.common.limits``' upper bounds."""
    from ..common.limits import LIMITS, OVERRIDE_FLAG

    maxima = ", ".join(f"{knob} {limit.maximum:,}" for knob, limit in LIMITS.items())
    parser.add_argument(OVERRIDE_FLAG, action="store_true",
                        help=f"allow knobs over their sanity limits ({maxima}); see docs/bad_inputs.md")


def check_image_out(path: Path) -> None:
    """Refuse, before any work, an --out that cannot take one image: a folder, or a name without an image
    extension PIL can write."""
    from PIL import Image

    if path.is_dir() or not path.name:
        raise IsADirectoryError(f"--out {str(path) or '(empty)'} is a folder; give an image file such as "
                                f"{path / 'rapid3.png'} (with --prompt-file, --out is a folder).")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {path} has no image extension PIL can write ({path.suffix or 'none'}); end it in "
                         ".png (or .jpg, .webp).")
    check_writable(path)


def check_folder_out(folder: Path) -> None:
    """Refuse, before any work, an --out folder that is a file or cannot be created; create nothing yet (a
    refused run leaves no empty folder behind)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file; with --prompt-file, --out is a folder for the images.")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot create or write the output folder {folder} ({existing} is not a writable "
                              "folder); choose another --out.")


def save_image(image: Image.Image, path: Path) -> None:
    """Save ``image`` to ``path`` whole or not at all (a Ctrl-C mid-write leaves no torn PNG), creating its
    folder on the first image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format=_image_format(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _image_format(path: Path) -> str:
    """PIL's format name for ``path``'s extension (the temporary file's own extension says nothing)."""
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]
