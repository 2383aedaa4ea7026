"""`rapid3 embedded ...`: the programs of the embedded world (train its generator and its reward model,
evaluate a generator, screen a caption conditioning), each defined once in its own module, which also runs
with ``python -m``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

PROGRAMS = {
    "train-generator": ("rapid3.embedded.train_generator",
                        "train the embedded text-to-image MMDiT on procedural scenes, resumably, on CPU or a GPU"),
    "train-reward": ("rapid3.rewards.train_embedded_reward",
                     "train the embedded reward model (image-caption agreement, the GRPO quality term q)"),
    "evaluate": ("rapid3.embedded.evaluate",
                 "checker accuracy of an embedded generator by step count and prompt complexity, with grids"),
    "word-order": ("rapid3.embedded.word_order",
                   "screen whether a generator can learn word order (fine-tunes a copy on two-circle captions)"),
}
"""Subcommand -> (the module that defines it with ``add_arguments`` and ``run_cli``, one line of help)."""


class ProgramParser(argparse.ArgumentParser):
    """A program's parser that imports the program, and so adds its flags, only when that program is chosen:
    the modules pull in diffusers and the models (seconds), which ``rapid3 info`` should not pay for."""

    def __init__(self, *args: Any, module: str, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.module, self.loaded = module, False

    def load(self) -> None:
        """Add the program's flags, its docstring as the description and its ``run_cli`` as what runs."""
        if not self.loaded:
            program = importlib.import_module(self.module)
            program.add_arguments(self)
            self.description = program.__doc__
            self.set_defaults(run=program.run_cli)
            self.loaded = True

    def parse_known_args(self, args: list[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.load()  # before parsing, so --help shows the program's flags
        return super().parse_known_args(args, namespace)


def add_embedded(sub: argparse._SubParsersAction) -> None:
    """``rapid3 embedded PROGRAM ...``."""
    parser = sub.add_parser(
        "embedded", help="the embedded world's programs: train-generator, train-reward, evaluate, word-order",
        description="Programs of the embedded world, the small text-to-image model rapid3 ships so that it runs "
                    "anywhere. `rapid3 embedded PROGRAM --help` explains each.")
    programs = parser.add_subparsers(dest="program", required=True, metavar="PROGRAM", parser_class=ProgramParser)
    for name, (module, help_text) in PROGRAMS.items():
        programs.add_parser(name, help=help_text, module=module)
