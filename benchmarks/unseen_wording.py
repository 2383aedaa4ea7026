"""Accuracy on prompts worded as no training caption is, beside the same scenes in the grammar's words.

For the bench's evaluation scenes (held-out compositions plus single objects), every controller (full
compute, and each policy given) draws each scene twice from the same noise: from its grammar caption and
from its unseen wording (``rapid3.embedded.wordings``). The checker scores both against the same scene,
so the difference is the cost of the wording alone; a policy's loss against full compute is reported on
each. Writes JSON (``--out``) and prints a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/unseen_wording.py --policy default --out docs/unseen_wording.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from rapid3.accel.actions import Controller
from rapid3.accel.controllers import FullCompute
from rapid3.embedded.checker import check
from rapid3.embedded.pipeline import to_uint8
from rapid3.embedded.scenes import SceneSpec, evaluation_prompts
from rapid3.embedded.wordings import unseen_wordings
from rapid3.policy.shipped import load_policy
from rapid3.worlds import Generator, WorldConfig, build_world

BATCH = 25


def passed(generator: Generator, controller: Controller, specs: list[SceneSpec], steps: int) -> dict[str, np.ndarray]:
    """Per scene: whether the image passed the checker, and the equivalent steps spent (image i from seed i)."""
    ok, k = [], []
    for start in range(0, len(specs), BATCH):
        batch = specs[start:start + BATCH]
        out = generator.sample([s.caption for s in batch], list(range(start, start + len(batch))), controller,
                               step_cap=steps, guidance_scale=None)
        ok += [check(image, spec).passed for image, spec in zip(to_uint8(out.images), batch)]
        k += out.stats.equivalent_steps.tolist()
    return {"passed": np.array(ok, dtype=float), "equivalent_steps": np.array(k)}


def summary(result: dict[str, np.ndarray], specs: list[SceneSpec]) -> dict:
    """Accuracy overall and by scene kind, mean equivalent steps."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for spec, ok in zip(specs, result["passed"]):
        by_kind[spec.kind].append(ok)
    return {"accuracy": float(result["passed"].mean()), "equivalent_steps": float(result["equivalent_steps"].mean()),
            "accuracy_by_kind": {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", default=[], help="a shipped policy name or RUN/policy folder")
    parser.add_argument("--prompts", type=int, default=200, help="held-out scenes (the bench's default)")
    parser.add_argument("--singles", type=int, default=25, help="single-object scenes (the bench's default)")
    parser.add_argument("--steps", type=int, default=28, help="full compute's steps, the policies' step cap")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = parser.parse_args(argv)
    generator = build_world(WorldConfig()).generator
    grammar = evaluation_prompts(args.prompts, args.singles)
    wordings = {"grammar": grammar, "unseen": unseen_wordings(grammar)}
    controllers: dict[str, Controller] = {"full compute": FullCompute(), **{p: load_policy(p) for p in args.policy}}
    results = {name: {w: summary(passed(generator, c, specs, args.steps), specs) for w, specs in wordings.items()}
               for name, c in controllers.items()}
    examples = [{"grammar": g.caption, "unseen": u.caption} for g, u in list(zip(*wordings.values()))[::20]]
    args.out.write_text(json.dumps({"scenes": len(grammar), "steps": args.steps, "results": results,
                                    "examples": examples}, indent=1) + "\n")
    full = results["full compute"]
    print("| controller | K | grammar acc. | unseen acc. | loss vs full, grammar | loss vs full, unseen |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['grammar']['equivalent_steps']:.1f} | {r['grammar']['accuracy']:.3f} | "
              f"{r['unseen']['accuracy']:.3f} | {full['grammar']['accuracy'] - r['grammar']['accuracy']:+.3f} | "
              f"{full['unseen']['accuracy'] - r['unseen']['accuracy']:+.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
