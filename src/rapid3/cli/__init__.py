"""The ``rapid3`` command line: one module per command (``info`` and ``demo``, ``generate``, ``train``,
``bench``, ``embedded``, ``profile``), each adding its parser with ``add(sub)``; ``main`` turns the errors a user can fix into one line."""

from __future__ import annotations

import argparse
import signal
import sys

from .. import __version__
from . import bench, embedded, generate, info, profile, train

COMMANDS = [info.add_info, info.add_demo, generate.add_generate, train.add_train, bench.add_bench,
            embedded.add_embedded, profile.add_profile]


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
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line saying what was kept, not a traceback
        print(f"rapid3 {args.command}: {interrupt or 'interrupted (Ctrl-C).'}", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
