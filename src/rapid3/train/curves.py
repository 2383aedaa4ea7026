"""Learning curves of a GRPO run, drawn from its ``log.jsonl``: reward, equivalent steps, held-out
checker accuracy (or reward, without a checker) and speedup, each beside full compute where it has one.

    python -m rapid3.train.curves RUN_FOLDER [--out curves.png]

The trainer redraws ``curves.png`` in the run folder after every evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ..common.jsonl import read_records  # noqa: E402
from .config import CONFIG_FILE, TrainConfig  # noqa: E402

CURVES = "curves.png"


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``; ValueError if it holds none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}: give a run folder written by `rapid3 train`.")
    records = read_records(path)  # a run killed mid-write leaves a torn last line
    if not records:
        raise ValueError(f"{path} holds no iteration yet: plot once the run has logged one.")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of the records that have ``key``."""
    rows = [(r["iteration"], r[key]) for r in records if key in r]
    return [i for i, _ in rows], [v for _, v in rows]


def plot_curves(records: list[dict], out: str | Path, step_cap: int | None = None) -> Path:
    """Write the four-panel learning-curve PNG of ``records`` to ``out``; returns its path."""
    quality = "accuracy" if any("eval/accuracy" in r for r in records) else "reward"
    panels = (
        ("reward (training rollouts)", [("train/reward", "rollouts", "-")]),
        ("equivalent steps K ↓", [("train/equivalent_steps", "rollouts (sampling)", "-"),
                                  ("eval/equivalent_steps", "held-out (deterministic)", "o-")]),
        (f"held-out {'checker accuracy' if quality == 'accuracy' else 'reward'} ↑",
         [(f"eval/{quality}", "policy", "o-"), (f"eval/{quality}_full", "full compute", "s--")]),
        ("held-out speedup over full compute ↑", [("eval/speedup_flops", "FLOPs", "o-"),
                                                  ("eval/speedup_wall", "wall-clock", "s-")]),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, lines) in zip(axes, panels):
        for key, label, style in lines:
            x, y = series(records, key)
            if x:
                ax.plot(x, y, style, label=label, markersize=4)
        if title.startswith("equivalent") and step_cap:
            ax.axhline(step_cap, color="grey", linestyle=":", label=f"full compute ({step_cap})")
        if title.startswith("held-out speedup"):
            ax.axhline(1.0, color="grey", linestyle=":", label="full compute")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m rapid3.train.curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder of `rapid3 train` (holds log.jsonl)")
    parser.add_argument("--out", type=Path, help=f"PNG to write (default: RUN/{CURVES})")
    args = parser.parse_args(argv)
    step_cap = TrainConfig.from_yaml(args.run / CONFIG_FILE).step_cap if (args.run / CONFIG_FILE).is_file() else None
    print(plot_curves(read_log(args.run / "log.jsonl"), args.out or args.run / CURVES, step_cap))


if __name__ == "__main__":
    main()
