"""A program (a training or evaluation script) that runs both as a ``rapid3`` subcommand and as ``python -m``.

Each program module defines its flags once, ``add_arguments(parser)``, and its body once,
``run_cli(args) -> exit code``; ``rapid3 embedded ...`` adds the flags to its own subparser, and the
module's ``main`` runs the same two through :func:`run_program`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
AddArguments = Callable[[argparse.ArgumentParser], None]


def program_parser(prog: str, description: str | None, add_arguments: AddArguments) -> argparse.ArgumentParser:
    """A stand-alone parser for ``python -m``: the module docstring as its help, the program's flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None,
                  convert: Callable[[argparse.Namespace], T]) -> T:
    """``convert(parsed argv)``, where a ValueError of ``convert`` (a flag's value it refuses) is the parser's
    usage error (exit status 2), as argparse reports its own."""
    args = parser.parse_args(argv)
    try:
        return convert(args)
    except ValueError as error:
        parser.error(str(error))


def run_program(prog: str, description: str | None, add_arguments: AddArguments,
                run_cli: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """``python -m`` of a program: parse, run; the errors a user can fix (a bad ``--resume`` folder, a missing
    model: ValueError, OSError) end it with one line ``PROG: error: ...`` instead of a traceback, as
    ``rapid3``'s own command line does."""
    args = program_parser(prog, description, add_arguments).parse_args(argv)
    try:
        return run_cli(args)
    except (ValueError, OSError) as error:
        sys.exit(f"{prog}: error: {error}")
