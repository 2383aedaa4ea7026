"""Ablations of RAPID3 on the embedded model: which heads, which reward terms, which Step-Skip schedule.

    python -m rapid3.train.ablation --out bench-out/ablation [--config base.yaml] [--iterations 40]
        [--variants step,step+cache,step+cache+sparse,q,d,q+d,geometric] [--eval-prompts 64]

Each variant is a ``rapid3 train`` run from one base config with one change (``VARIANTS``); the
base itself (every head, the base's reward) is ``step+cache+sparse`` and serves both tables. Runs live in
``OUT/<variant>/`` and are resumed or skipped when already there, so a killed ablation continues.
Then every trained policy is evaluated against full compute on the same held-out prompts and seeds
(the trainer's side-by-side evaluation: checker accuracy, K counted in FLOPs, FLOP and wall-clock
speedups, the reward model's q; each run's own discriminator is not comparable across runs, so d is
left out), and ``ablation.json`` and ``ablation.md`` are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..eval.side_by_side import side_by_side
from ..policy import RapidPolicy
from ..worlds import build_world
from .config import TrainConfig, read_yaml
from .trainer import CHECKPOINT, EXPORT, train

VARIANTS: dict[str, dict[str, Any]] = {
    "step": {"cache_reuse": False, "sparse_attention": False},  # TPDM: the step head alone
    "step+cache": {"sparse_attention": False},
    "step+cache+sparse": {},  # the base config itself: every head, its reward
    "q": {"reward": "q"},
    "d": {"reward": "d"},
    "q+d": {"reward": "q+d"},  # the paper's reward
    # The paper's next t = a * t; at the grid's 0.85 it would never end a trajectory before the 28-step cap.
    "geometric": {"step_schedule": "geometric", "init_ratio": 0.75},
}
HEADS_TABLE = ("step", "step+cache", "step+cache+sparse")
REWARDS_TABLE = ("q", "d", "q+d")  # then the base's own reward (the step+cache+sparse run)
SCHEDULES_TABLE = ("geometric",)  # then the base's own schedule
COLUMNS = (("eval/accuracy", "checker acc.", 3), ("eval/accuracy_full", "full compute acc.", 3),
           ("eval/equivalent_steps", "K (FLOPs)", 1), ("eval/speedup_wall", "wall-clock speedup", 2),
           ("eval/speedup_flops", "FLOP speedup", 2), ("eval/ssim", "SSIM to full", 3), ("eval/quality", "q", 3),
           ("train_minutes", "train min", 1))


def train_variants(base: TrainConfig, out: Path, variants: list[str]) -> dict[str, Path]:
    """Train (or resume, or skip when exported) each variant under ``out``; their policy folders."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    folders = {}
    for name in variants:
        cfg = base.replace(out=str(out / name), **VARIANTS[name])
        folder = out / name / EXPORT
        if not (folder / "config.json").is_file():
            print(f"training {name} in {cfg.out}", flush=True)
            train(cfg, resume=(out / name / CHECKPOINT).is_file())
        if not (folder / "config.json").is_file():  # stopped by a signal: its checkpoint waits for a rerun
            raise RuntimeError(f"{name} stopped before its last iteration; rerun the ablation to resume it.")
        folders[name] = folder
    return folders


def evaluate_variants(base: TrainConfig, folders: dict[str, Path], eval_prompts: int) -> dict[str, dict[str, float]]:
    """Each trained policy against full compute on the same held-out prompts (image i from seed i), with the
    base config's world and its quality model (no discriminator: each run's own is not comparable)."""
    cfg = base.replace(eval_prompts=eval_prompts)
    world = build_world(dataclasses.replace(cfg.world_config(), quality=True, discriminator=False))
    results = {}
    for name, folder in folders.items():
        print(f"evaluating {name} on {len(world.heldout_prompts)} held-out prompts", flush=True)
        metrics = side_by_side(world.generator, RapidPolicy.from_pretrained(folder), world.heldout_prompts,
                               cfg.side_by_side(), world.quality)
        results[name] = {**metrics, "train_minutes": _train_minutes(folder.parent)}
    return results


def _train_minutes(run: Path) -> float:
    """Wall-clock minutes of a run's iterations (evaluations excluded), from its log."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return sum(r.get("time/iteration_seconds", 0.0) for r in records) / 60


def tables(results: dict[str, dict[str, float]], base_reward: str, base_schedule: str) -> str:
    """The per-head, reward-term and schedule tables as Markdown (rows of variants that ran; the base
    config's run, reward ``base_reward`` and Step-Skip schedule ``base_schedule``, is the full row of each)."""
    header = "| variant | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)

    def row(label: str, metrics: dict[str, float]) -> str:
        cells = ["–" if metrics.get(key) is None else f"{metrics[key]:.{digits}f}" for key, _, digits in COLUMNS]
        return f"| {label} | " + " | ".join(cells) + " |"

    def with_base(names: tuple[str, ...], base_label: str) -> list[str]:
        rows = [row(name, results[name]) for name in names if name in results and name != base_label]
        if rows and "step+cache+sparse" in results:
            rows.append(row(f"{base_label} (base)", results["step+cache+sparse"]))
        return rows

    heads = [row(name, results[name]) for name in HEADS_TABLE if name in results]
    lines = []
    if heads:
        lines += [f"## Heads (reward {base_reward})", "", header, rule, *heads, ""]
    for title, rows in (("Reward terms (every head)", with_base(REWARDS_TABLE, base_reward)),
                        ("Step-Skip schedule (every head)", with_base(SCHEDULES_TABLE, base_schedule))):
        if rows:
            lines += [f"## {title}", "", header, rule, *rows, ""]
    return "\n".join(lines)


def run_ablation(base: TrainConfig, out: Path, variants: list[str], eval_prompts: int) -> dict[str, Any]:
    """Train, evaluate, write ``ablation.json`` and ``ablation.md`` in ``out``; the results."""
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate_variants(base, train_variants(base, out, variants), eval_prompts)
    summary = {"base_config": base.to_dict(), "eval_prompts": eval_prompts,
               "variants": {name: VARIANTS[name] for name in variants}, "results": results}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    markdown = tables(results, base.reward, base.step_schedule)
    (out / "ablation.md").write_text("# RAPID3 ablations on the embedded model\n\n" + markdown)
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m rapid3.train.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, ablation.json and ablation.md")
    parser.add_argument("--config", type=Path, help="base `rapid3 train` YAML (default: the trainer's defaults)")
    parser.add_argument("--iterations", type=int, help="GRPO iterations of every run (overrides the config)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts of the final evaluation")
    parser.add_argument("--train-only", action="store_true",
                        help="train the variants and stop (e.g. two processes training disjoint variants in one OUT; "
                             "a last run without it evaluates them all together)")
    args = parser.parse_args(argv)
    base = TrainConfig().replace(**(read_yaml(args.config) if args.config else {}))
    if args.iterations is not None:
        base = base.replace(iterations=args.iterations)
    if args.train_only:
        train_variants(base, args.out, args.variants.split(","))
        return
    summary = run_ablation(base, args.out, args.variants.split(","), args.eval_prompts)
    print(tables(summary["results"], base.reward, base.step_schedule))
    print(f"wrote {args.out / 'ablation.md'}")


if __name__ == "__main__":
    main()
