"""Figures of a benchmark run (matplotlib, Agg backend): the Pareto fronts, per-image action maps and
the adaptivity plot. Everything is drawn from the results dictionary that ``bench.py`` writes as
results.json, plus the example images' thumbnails."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

ACTION_COLORS = {"compute": "#1f4e79", "reuse": "#f28e2b", "sparse 1": "#8fd175", "sparse 2": "#3ea44a",
                 "sparse 3": "#1b6b2c", "partial": "#9467bd"}
QUALITY_PANELS = (("accuracy", "checker accuracy ↑"), ("ssim", "SSIM vs full compute ↑"),
                  ("fd_renders", "Fréchet distance to renders ↓"))
SPEEDUPS = (("speedup_latency", "speedup (median latency)"), ("speedup_flops", "speedup (FLOPs)"))
MAX_LABEL = 40
REFERENCE_METHODS = ("full", "peer_full")


def ok_rows(results: dict) -> list[dict]:
    """The entries that ran."""
    return [r for r in results["entries"] if r["status"] == "ok"]


def by_method(results: dict) -> dict[str, list[dict]]:
    """The entries that ran, grouped by method in run order."""
    groups: dict[str, list[dict]] = {}
    for row in ok_rows(results):
        groups.setdefault(row["method"], []).append(row)
    return groups


def representatives(results: dict) -> list[dict]:
    """One entry per method, the middle of its sweep (the peer harness's full compute is left out:
    it computes what the sampler's full compute does)."""
    return [rows[len(rows) // 2] for name, rows in by_method(results).items() if name != "peer_full"]


def knob_text(row: dict) -> str:
    """``knob=value`` of an entry, or "–" for a method without a knob."""
    return "–" if row["value"] is None else f"{row['knob']}={row['value']}"


def entry_label(row: dict) -> str:
    """The method's label with its knob setting."""
    return row["label"] if row["value"] is None else f"{row['label']} {knob_text(row)}"


def _short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def pareto_plot(results: dict, path: Path) -> None:
    """Quality against speedup, one curve per method over its knob; top row by latency, bottom by FLOPs."""
    groups = by_method(results)
    colors = _colors(list(groups))
    fig, axes = plt.subplots(len(SPEEDUPS), len(QUALITY_PANELS), squeeze=False,
                             figsize=(5.2 * len(QUALITY_PANELS), 4.2 * len(SPEEDUPS)))
    for (x_key, x_label), row_axes in zip(SPEEDUPS, axes):
        for (y_key, y_label), ax in zip(QUALITY_PANELS, row_axes):
            for name, rows in groups.items():
                _curve(ax, rows, x_key, y_key, colors[name], reference=name in REFERENCE_METHODS)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Quality vs speedup (each curve: one method over its knob; stars: full compute)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _curve(ax: plt.Axes, rows: list[dict], x_key: str, y_key: str, color: tuple, reference: bool) -> None:
    """One method's entries as a curve sorted by speedup, each point labelled with its knob value."""
    points = sorted(((r["metrics"][x_key], r["metrics"][y_key], r["value"]) for r in rows
                     if r["metrics"].get(x_key) is not None and r["metrics"].get(y_key) is not None),
                    key=lambda point: point[:2])
    if not points:
        return
    xs, ys, _ = zip(*points)
    style = {"marker": "*", "ms": 12, "ls": "none"} if reference else {"marker": "o", "ms": 4, "lw": 1.2}
    ax.plot(xs, ys, color=color, label=rows[0]["label"], **style)
    for x, y, knob in points:
        if knob is not None:
            ax.annotate(str(knob), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")


def action_map_plot(results: dict, thumbnails: dict[str, np.ndarray], examples: list[int], path: Path) -> None:
    """Per method (its middle knob) and example image: the image, then each executed step as a bar
    over sampler time t from 1 to 0, coloured by what the step did."""
    chosen = representatives(results)
    captions = [results["prompts"][i]["caption"] for i in examples]
    per_method = len(examples) + 1  # a spacer row after each method's images
    n_rows = len(chosen) * per_method - 1
    height = 0.42 * n_rows + 1.0
    fig = plt.figure(figsize=(12, height))
    heights = [1 if (r + 1) % per_method else 0.35 for r in range(n_rows)]
    grid = fig.add_gridspec(n_rows, 3, width_ratios=(5, 1, 16), height_ratios=heights, hspace=0.12, wspace=0.03,
                            top=1 - 0.75 / height, bottom=0.45 / height, left=0.01, right=0.95)
    for m, row in enumerate(chosen):
        for e, image_index in enumerate(examples):
            r = m * per_method + e
            label_ax, thumb_ax, ax = (fig.add_subplot(grid[r, c]) for c in range(3))
            label_ax.axis("off")
            if e == 0:
                label_ax.text(1, 0.5, _short(entry_label(row)), ha="right", va="center", fontsize=8,
                              transform=label_ax.transAxes)
            thumb_ax.imshow(thumbnails[row["key"]][e], interpolation="nearest")
            thumb_ax.axis("off")
            spans = row["metrics"]["action_maps"][str(image_index)]
            for t, next_t, action, _ in spans:
                ax.broken_barh([(next_t, t - next_t)], (0, 1), facecolors=ACTION_COLORS[action], edgecolors="white",
                               linewidth=0.5)
            ax.text(1.005, 0.5, f"K={sum(span[3] for span in spans):.1f}", transform=ax.transAxes, va="center",
                    fontsize=7)
            ax.set_xlim(1, 0)
            ax.set_yticks([])
            last = m == len(chosen) - 1 and e == len(examples) - 1
            ax.set_xticks(np.linspace(1, 0, 6) if last else [])
            if last:
                ax.set_xlabel("sampler time t (1 = noise, 0 = image)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ACTION_COLORS.values()]
    fig.legend(handles, list(ACTION_COLORS), loc="upper center", bbox_to_anchor=(0.5, 1), ncol=len(ACTION_COLORS),
               fontsize=8, frameon=False)
    fig.text(0.5, 1 - 0.45 / height, "images per method, top to bottom: " + " | ".join(captions), ha="center",
             fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def adaptivity_plot(results: dict, path: Path) -> None:
    """Mean equivalent steps K (± std over images) by prompt complexity, per method (middle knob)."""
    chosen = representatives(results)
    colors = _colors([r["method"] for r in chosen])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(chosen):
        means = row["metrics"]["equivalent_steps_by_complexity"]
        stds = row["metrics"]["equivalent_steps_std_by_complexity"]
        xs = sorted(int(c) for c in means)
        offset = (i - len(chosen) / 2) * 0.02  # keep overlapping flat lines distinguishable
        ax.errorbar([x + offset for x in xs], [means[_key(means, x)] for x in xs],
                    yerr=[stds[_key(stds, x)] for x in xs], fmt="-o", ms=4, capsize=2, color=colors[row["method"]],
                    label=_short(entry_label(row)))
    ax.set_xticks([1, 2, 3], ["1 object", "2 objects", "3 objects"])
    ax.set_xlabel("prompt complexity")
    ax.set_ylabel("equivalent steps K")
    ax.set_title("Adaptivity: compute spent by prompt complexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _key(mapping: dict, complexity: int):
    """Complexity keys are ints in memory and strings after a JSON round trip."""
    return complexity if complexity in mapping else str(complexity)


def write_all(out: Path, results: dict, thumbnails: dict[str, np.ndarray], examples: list[int]) -> dict[str, str]:
    """Draw every figure into ``out``; returns {figure: file name}."""
    figures = {"pareto": "pareto.png", "action_maps": "action_maps.png", "adaptivity": "adaptivity.png"}
    pareto_plot(results, out / figures["pareto"])
    action_map_plot(results, thumbnails, examples, out / figures["action_maps"])
    adaptivity_plot(results, out / figures["adaptivity"])
    return figures
