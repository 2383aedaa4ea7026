"""Can a generator learn to read word order? A screen for caption conditionings.

    rapid3 embedded word-order [--model PATH] [--steps 1500] [--eval-every 500] [--out word_order.json]
        [--colours red,blue] [--token-positions | --no-token-positions]

Fine-tunes a copy of the model (nothing is written to ``--model``) on captions of two circles, once per
task, and every ``--eval-every`` steps samples each caption (28 steps, CFG) and reports how often its
relation holds (``checker.relation_outcome``):

- ``order``: "a red circle left of a blue circle", "a blue circle left of a red circle" and the same with
  "right of". Two captions with the same words mean mirror images, so only word order tells them apart.
- ``bag``: "a red circle left of a blue circle" and "a blue circle right of a red circle": red is always on
  the left, which the words alone tell.

``bag`` needs no reading at all (one layout serves both captions): it checks that the fine-tune works.
Measured on the generator shipped before the current one (step 15817) with token positions (``--token-positions``,
CPU): ``bag`` is at 0.96-1.00 from step 500 on, ``order`` at 0.44 / 0.38 / 0.56 / 0.96 at steps 0 / 500 / 1000 /
1500. Learning word order is slow, not impossible: the 300 steps of earlier screens showed chance and proved nothing.
A model with canonical relations (``CaptionConditioning.canonical_relations``) reads the "right of" captions of
``order`` as their mirrors, so for it ``order`` is two captions that word order alone tells apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rapid3.common.programs import parse_checked, program_parser
from rapid3.embedded import scenes
from rapid3.embedded.checker import check
from rapid3.embedded.evaluate import generate, relation_outcomes
from rapid3.embedded.model import SAMPLING_STEPS
from rapid3.embedded.pipeline import EmbeddedPipeline, to_model_space
from rapid3.embedded.train_generator import flow_matching_loss, training_conditioning

TASKS = ("order", "bag")


def task_scenes(task: str, colours: tuple[str, str] = ("red", "blue")) -> list[scenes.SceneSpec]:
    """The captions of ``task`` (see the module docstring) for circles in ``colours``."""
    first, second = (scenes.ObjectSpec("circle", c) for c in colours)
    order = [scenes.make_scene(pair, scenes.Relation(0, r, 1))
             for pair in ((first, second), (second, first)) for r in ("left of", "right of")]
    return order if task == "order" else [order[0], order[3]]  # both: the first colour on the left


def holds(pipe: EmbeddedPipeline, specs: list[scenes.SceneSpec], samples: int) -> float:
    """Share of ``samples`` images per caption whose relation holds."""
    specs = [s for s in specs for _ in range(samples)]
    images = generate(pipe, specs, SAMPLING_STEPS, batch=64)
    return relation_outcomes([check(image, spec) for image, spec in zip(images, specs)], specs)["holds"]


def fine_tune(pipe: EmbeddedPipeline, specs: list[scenes.SceneSpec], steps: int, eval_every: int, samples: int,
              batch: int = 32, lr: float = 3e-4, seed: int = 0) -> list[dict[str, float]]:
    """Train ``pipe``'s transformer in place on renders of ``specs``; the relation-holds curve, step 0 included."""
    model = pipe.backbone.transformer
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    curve = [{"step": 0, "holds": holds(pipe, specs, samples)}]
    for step in tqdm(range(1, steps + 1), desc="fine-tune", unit="step"):
        picked = [specs[i] for i in rng.integers(len(specs), size=batch)]
        x0 = to_model_space(np.stack([scenes.render(scenes.place(s, rng)) for s in picked]))
        tokens, pooled = training_conditioning(pipe.encoder, [s.caption for s in picked], 0.1, pipe.conditioning)
        model.train().requires_grad_(True)  # the backbone adapter keeps its transformer frozen in eval mode
        with torch.enable_grad():
            loss = flow_matching_loss(model, x0, tokens, pooled, time_mean=0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.eval().requires_grad_(False)
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "holds": holds(pipe, specs, samples)})
            tqdm.write(f"step {step}: the relation holds in {curve[-1]['holds']:.2f}", file=sys.stderr)
    return curve


def run(model: Path | None, steps: int, eval_every: int, samples: int, colours: tuple[str, str],
        token_positions: bool | None) -> dict:
    """Both tasks on fresh copies of ``model``: ``{"token_positions": ..., "ordered_pairs": ..., "tasks": {task: curve}}``."""
    tasks, encoder = {}, None
    for task in TASKS:
        pipe = EmbeddedPipeline.from_pretrained(model, encoder)
        encoder = pipe.encoder
        if token_positions is not None:
            pipe.conditioning = replace(pipe.conditioning, token_positions=token_positions)
        pipe.backbone.transformer.float()  # shipped in fp16
        tasks[task] = fine_tune(pipe, task_scenes(task, colours), steps, eval_every, samples)
    return {"model": str(model) if model else "shipped", **asdict(pipe.conditioning),
            "colours": list(colours), "tasks": tasks}


def table(result: dict) -> str:
    """One row per evaluated step: the share of samples whose relation holds, per task."""
    curves = result["tasks"]
    rows = ["step  " + "  ".join(f"{t:>5}" for t in TASKS)]
    for i, point in enumerate(curves[TASKS[0]]):
        rows.append(f"{point['step']:>4}  " + "  ".join(f"{curves[t][i]['holds']:5.2f}" for t in TASKS))
    return "\n".join(rows)


PROG = "python -m rapid3.embedded.word_order"  # also `rapid3 embedded word-order`


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The program's flags (on ``rapid3 embedded word-order`` and ``python -m``)."""
    p.add_argument("--model", type=Path, help="an exported generator (default: the shipped one)")
    p.add_argument("--steps", type=int, default=1500,
                   help="fine-tuning steps per task (batch 32; ~17 minutes each on 2 CPU cores)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--samples", type=int, default=12, help="images per caption at each evaluation")
    p.add_argument("--colours", default="red,blue", help="the two circles' colours, comma-separated")
    p.add_argument("--token-positions", action=argparse.BooleanOptionalAction, default=None,
                   help="add token position codes to the captions (default: as the model was trained)")
    p.add_argument("--out", type=Path, default=Path("word_order.json"))


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``colours`` as a pair; ValueError for a bad ``--colours``, ``--steps``, ``--eval-every`` or
    ``--samples``."""
    colours = tuple(args.colours.split(","))
    if len(colours) != 2 or len(set(colours)) != 2 or not set(colours) <= set(scenes.COLORS):
        raise ValueError(f"--colours {args.colours}: give two different colours of {', '.join(scenes.COLORS)}")
    for name in ("steps", "eval_every", "samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    args.colours = colours
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line -> checked arguments (a bad value: the usage error, exit status 2)."""
    return parse_checked(program_parser(PROG, __doc__, add_arguments), argv, checked)


def screen(args: argparse.Namespace) -> dict:
    """Fine-tune, print the table, write the JSON; the result (``args`` as :func:`checked` returns them)."""
    result = run(args.model, args.steps, args.eval_every, args.samples, args.colours, args.token_positions)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


def run_cli(args: argparse.Namespace) -> int:
    """``rapid3 embedded word-order``."""
    screen(checked(args))
    return 0


def main(argv: list[str] | None = None) -> dict:
    """``python -m rapid3.embedded.word_order``: the result."""
    return screen(parse_args(argv))


if __name__ == "__main__":
    main()
