"""Checker accuracy of the embedded model, by step count and prompt complexity, with caption grids.

    rapid3 embedded evaluate [--model DIR] [--prompts 200] [--singles 30] [--steps 28 4] --out DIR

Held-out prompts are compositions never seen in training, round-robin over kinds; single-object
prompts (all of which are in training) are drawn with seeds never used in training. Writes
``evaluation.json`` and ``grid_<steps>steps.png`` (the first held-out prompt of each kind and a
few singles, one row per seed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..accel.controllers import UniformSteps
from ..common.programs import program_parser
from .checker import CheckResult, check, checker_accuracy, relation_outcome
from .grid import caption_grid
from .pipeline import EmbeddedPipeline
from .scenes import SceneSpec, evaluation_prompts

EVAL_NOISE_SEED = 10_000
"""Seed of this script's images' initial noise (image i: EVAL_NOISE_SEED + i), apart from the noise that
``rapid3 bench`` and the trainer's evaluation draw (image i: i). It chooses no prompts (those are
``scenes.evaluation_prompts``), unlike ``rapid3.worlds.pipeline.HELDOUT_SPLIT_SEED``, which chooses held-out prompts."""


def generate(pipe: EmbeddedPipeline, specs: list[SceneSpec], steps: int, batch: int) -> np.ndarray:
    """uint8 images for ``specs`` with the uniform ``steps``-step sampler (image i seeded EVAL_NOISE_SEED + i)."""
    images = []
    for start in tqdm(range(0, len(specs), batch), desc=f"{steps} steps", unit="batch"):
        chunk = [s.caption for s in specs[start:start + batch]]
        images.append(pipe(chunk, num_inference_steps=steps, seed=EVAL_NOISE_SEED + start,
                           controller=UniformSteps(steps)).images)
    return np.concatenate(images)


def relation_outcomes(results: list[CheckResult], specs: list[SceneSpec]) -> dict[str, float]:
    """Fractions of the relation prompts whose objects show each ``checker.relation_outcome``
    (``reversed`` high: the model reads the axis but not which object goes where)."""
    outcomes = [relation_outcome(result, spec) for result, spec in zip(results, specs) if spec.relation is not None]
    return {k: outcomes.count(k) / max(len(outcomes), 1) for k in ("holds", "reversed", "other", "missing")}


def grid_columns(specs: list[SceneSpec]) -> list[int]:
    """One column per kind (its first prompt) plus up to three single-object prompts."""
    first_of_kind = {}
    for i, spec in enumerate(specs):
        first_of_kind.setdefault(spec.kind, i)
    singles = [i for i, s in enumerate(specs) if s.kind == "single"][:3]
    return sorted(set(first_of_kind.values()) | set(singles))


PROG = "python -m rapid3.embedded.evaluate"  # also `rapid3 embedded evaluate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The program's flags (on ``rapid3 embedded evaluate`` and ``python -m``)."""
    parser.add_argument("--model", type=Path, default=None, help="exported model folder (default: shipped)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    parser.add_argument("--singles", type=int, default=30, help="single-object prompts")
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 4], help="sampler step counts to compare")
    parser.add_argument("--batch", type=int, default=25, help="images per sampler batch")
    parser.add_argument("--out", type=Path, required=True, help="folder for evaluation.json and the grids")


def evaluate_model(args: argparse.Namespace) -> dict:
    """Sample the evaluation prompts at each step count; write evaluation.json and the grids, print a table."""
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = EmbeddedPipeline.from_pretrained(args.model)
    specs = evaluation_prompts(args.prompts, args.singles)
    columns = grid_columns(specs)
    results = {}
    for steps in args.steps:
        tic = time.perf_counter()
        images = generate(pipe, specs, steps, args.batch)
        accuracy = checker_accuracy(list(images), specs)
        checks = [check(image, spec) for image, spec in zip(images, specs)]
        by_kind = {kind: float(np.mean([c.passed for c, s in zip(checks, specs) if s.kind == kind]))
                   for kind in dict.fromkeys(s.kind for s in specs)}
        results[steps] = {"accuracy": accuracy["accuracy"], "mean_score": accuracy["mean_score"],
                          "by_complexity": {c: v["accuracy"] for c, v in accuracy["by_complexity"].items()},
                          "by_kind": by_kind, "relations": relation_outcomes(checks, specs),
                          "n": len(specs), "seconds": time.perf_counter() - tic}
        title = f"{steps}-step sampler, CFG; checker accuracy {accuracy['accuracy']:.2f} on {len(specs)} prompts"
        caption_grid([[images[i] for i in columns]], [f"[{specs[i].kind}] {specs[i].caption}" for i in columns],
                     title).save(args.out / f"grid_{steps}steps.png")
    (args.out / "evaluation.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| steps | overall | " + " | ".join(f"{c} object(s)" for c in (1, 2, 3)) + " | by kind |")
    print("|---|---|---|---|---|---|")
    for steps, r in results.items():
        by_c = " | ".join(f"{r['by_complexity'].get(c, float('nan')):.3f}" for c in (1, 2, 3))
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items())
        print(f"| {steps} | {r['accuracy']:.3f} | {by_c} | {kinds} |")
    for steps, r in results.items():
        print(f"{steps} steps, relation prompts: " + ", ".join(f"{k} {v:.2f}" for k, v in r["relations"].items()))
    print(f"wrote {args.out / 'evaluation.json'} and grids")
    return results


def run_cli(args: argparse.Namespace) -> int:
    """``rapid3 embedded evaluate``."""
    evaluate_model(args)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """``python -m rapid3.embedded.evaluate``: the results by step count."""
    return evaluate_model(program_parser(PROG, __doc__, add_arguments).parse_args(argv))


if __name__ == "__main__":
    main()
