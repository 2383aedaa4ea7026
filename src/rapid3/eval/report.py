"""The Markdown report of a benchmark run, rendered from its results dictionary (results.json)."""

from __future__ import annotations

from collections import Counter

from ..baselines.peers import PEERS
from .plots import entry_label, knob_text, representatives

MAX_ERROR = 90  # characters of a failure shown in the table (the Peers section has it whole)
PSNR_CAP = 100.0  # dB; identical images (PSNR = inf) count as this in the mean

DEFINITIONS = f"""\
## Definitions
- **Checker accuracy**: fraction of images that pass every sub-check of the embedded world's
  deterministic checker (each object present in its colour and shape, exact counts, the relation);
  also by prompt complexity (number of objects). No learned weights, so it cannot be gamed.
- **PSNR / SSIM**: against the full-compute image of the same prompt and seed (the 28-step sampler,
  "the original model"). PSNR = 10 log10(255² / MSE) per image, averaged, identical images counted
  as {PSNR_CAP:.0f} dB; SSIM with an 11×11 Gaussian window (σ 1.5), valid positions, per image, averaged.
- **FD renders / FD full**: Fréchet distance between Gaussians fitted to the features of the
  evaluator network (a small CNN trained only on ground-truth renders to name the colour/shape
  pairs and the object count; no training reward uses it) of the method's images and of (a) exact
  renders of the same captions, (b) the full-compute images. Few images make it noisy: compare
  entries of the same run only.
- **Reward / discriminator**: mean score of the reward model (`--reward`; by default the embedded
  world's shipped one, the q of training) / of an optional discriminator callable
  (`--discriminator`), "–" when none was given.
- **K (equivalent steps)**: Σ over executed steps of that step's FLOPs over a dense full-compute
  step's (both guidance branches): a reuse step counts only its embedding/output layers, a sparse
  step its attention saving, a probe (TeaCache, FirstBlockCache) is charged to its sample.
- **GFLOPs**: per image, counted by torch's FlopCounterMode plus the attention cores; peers on the
  peer harness are counted the same way around each transformer call.
- **Latency**: median (and range) of wall-clock seconds per image at batch 1 (one image, both CFG
  branches), after a warm-up of every entry, over repeated rounds that visit all entries in a
  rotated order so that machine drift spreads over all of them. **Speedups** are ratios of medians (or of mean FLOPs)
  from this same run, against the full compute of the same harness: rapid3's sampler loop for
  controllers, the peer harness (a plain Euler loop over the unhooked transformer) for diffusers'
  hooks, so each harness's own overhead cancels.
"""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _latency(m: dict) -> str:
    """Median seconds with the range of the timed samples, so noise shows."""
    if m["latency_s"] is None:
        return "–"
    low, high = m["latency_range_s"]
    return f"{m['latency_s']:.3f} ({low:.3f}–{high:.3f})"


def _per_complexity(values: dict, digits: int) -> str:
    return " / ".join(_fmt(values[k], digits) for k in sorted(values, key=int))


def _table(results: dict) -> list[str]:
    header = ("| method | knob | steps | K | K by objects (1/2/3) | GFLOPs/img | latency s (range) | speedup latency | "
              "speedup FLOPs | checker acc. | acc. by objects (1/2/3) | PSNR | SSIM | FD renders | FD full | "
              "reward | discr. |")
    lines = [header, "|" + "---|" * 17]
    for row in results["entries"]:
        knob = knob_text(row)
        if row["status"] != "ok":
            error = row["error"][:MAX_ERROR].replace("|", "/")  # a pipe would end the table cell
            lines.append(f"| {row['label']} | {knob} | could not run: `{error}` |" + " |" * 14)
            continue
        m = row["metrics"]
        lines.append(
            f"| {row['label']} | {knob} | {_fmt(m['steps'], 1)} | {_fmt(m['equivalent_steps'])} | "
            f"{_per_complexity(m['equivalent_steps_by_complexity'], 1)} | {_fmt(m['gflops'], 1)} | "
            f"{_latency(m)} | {_fmt(m['speedup_latency'])}× | {_fmt(m['speedup_flops'])}× | "
            f"{_fmt(m['accuracy'], 3)} | {_per_complexity(m['accuracy_by_complexity'], 2)} | {_fmt(m['psnr'], 1)} | "
            f"{_fmt(m['ssim'], 3)} | {_fmt(m['fd_renders'], 1)} | {_fmt(m['fd_full'], 1)} | "
            f"{_fmt(m['reward'], 3)} | {_fmt(m['discriminator'], 3)} |")
    return lines


def _peers(results: dict) -> list[str]:
    intro = ("Run through diffusers' code (`diffusers.hooks`) on a plain copy of the same transformer, same "
             "prompts and seeds, image by image (each hook decides once per call for the whole batch).")
    lines = ["## Peers: diffusers' own hooks", "", intro, ""]
    rows = {}
    for row in results["entries"]:
        if row["method"] in PEERS:
            rows.setdefault(row["method"], []).append(row)
    for name, entries in rows.items():
        failed = [r for r in entries if r["status"] != "ok"]
        function = f"`{PEERS[name].function}`"
        if not failed:
            lines.append(f"- {function}: ran at {PEERS[name].knob} = {', '.join(str(r['value']) for r in entries)}.")
            continue
        why = failed[0].get("explanation")
        lines.append(f"- {function}: **could not run on this backbone** ({len(failed)} of {len(entries)} settings). "
                     f"Error: `{failed[0]['error']}`." + (f" Why: {why}." if why else ""))
    return lines + [""]


def _adaptivity(results: dict) -> list[str]:
    lines = ["Equivalent steps for 3-object over 1-object prompts (1.00 = no adaptivity), middle knob of each method:",
             ""]
    for row in representatives(results):
        k = row["metrics"]["equivalent_steps_by_complexity"]
        keys = sorted(k, key=int)
        if len(keys) > 1 and k[keys[0]]:
            lines.append(f"- {entry_label(row)}: {k[keys[-1]] / k[keys[0]]:.2f}")
    return lines + [""]


LEARNED = ("rapid3",)  # the project's claim is about these methods' curves
CLAIM_METRICS = (("accuracy", "checker acc.", 3), ("psnr", "PSNR", 1))
MATCH_TOLERANCE = 0.05  # a single-setting method is compared where its speedup is within 5% of RAPID3's


def _interpolate(rows: list[dict], speedup: float, metric: str) -> float | None:
    """``metric`` of a method's sweep at ``speedup`` (latency), linear between its two nearest settings;
    None where the sweep does not reach that speedup."""
    points = sorted((r["metrics"]["speedup_latency"], r["metrics"][metric]) for r in rows
                    if r["metrics"]["speedup_latency"] is not None and r["metrics"][metric] is not None)
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= speedup <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (speedup - s0) / (s1 - s0)
    close = [v for s, v in points if abs(s - speedup) <= MATCH_TOLERANCE * speedup]
    return close[0] if close else None


def matched_speedup_comparison(results: dict) -> list[dict]:
    """Per learned entry and other method: each claim metric of the method at the entry's latency speedup,
    beside the entry's own (``None`` where the method's sweep does not reach that speedup)."""
    groups: dict[str, list[dict]] = {}
    for row in _accelerated_entries(results):
        groups.setdefault(row["method"], []).append(row)
    comparisons = []
    for learned in (r for name in LEARNED for r in groups.get(name, [])):
        speedup = learned["metrics"]["speedup_latency"]
        for name, rows in groups.items():
            if name in LEARNED or speedup is None:
                continue
            comparisons.append({"learned": entry_label(learned), "speedup": speedup, "method": rows[0]["label"],
                                "range": (min(r["metrics"]["speedup_latency"] for r in rows),
                                          max(r["metrics"]["speedup_latency"] for r in rows)),
                                **{metric: (learned["metrics"][metric], _interpolate(rows, speedup, metric))
                                   for metric, _, _ in CLAIM_METRICS}})
    return comparisons


def dominating_entries(results: dict) -> list[tuple[dict, dict]]:
    """(learned entry, other entry) pairs where the other is faster in latency and at or above it on every claim
    metric: what interpolation along sweeps misses when a method's sweep does not reach the learned speedup."""
    rows = _accelerated_entries(results)
    learned = [r for r in rows if r["method"] in LEARNED]
    return [(ours, other) for ours in learned for other in rows if other["method"] not in LEARNED
            and other["metrics"]["speedup_latency"] > ours["metrics"]["speedup_latency"]
            and all(other["metrics"][metric] >= ours["metrics"][metric] for metric, _, _ in CLAIM_METRICS)]


def _accelerated_entries(results: dict) -> list[dict]:
    """The entries that ran, full compute left out."""
    return [r for r in results["entries"] if r["status"] == "ok" and r["method"] not in ("full", "peer_full")]


def _claim(results: dict) -> list[str]:
    """The project's claim, checked: is RAPID3 above every other curve at its own wall-clock speedup?"""
    comparisons = matched_speedup_comparison(results)
    if not comparisons:
        return []
    lines = ["## RAPID3 against every other method at matched speedup", "",
             "Each other method's quality at the RAPID3 entry's latency speedup, interpolated linearly along its "
             "sweep (Δ = RAPID3 minus the method).", "",
             "| RAPID3 entry | speedup | method (speedup range) | " +
             " | ".join(f"{label} RAPID3 / method (Δ)" for _, label, _ in CLAIM_METRICS) + " |",
             "|---|---|---|" + "---|" * len(CLAIM_METRICS)]
    below, unreached, compared = [], [], []
    for c in comparisons:
        if all(c[metric][1] is None for metric, _, _ in CLAIM_METRICS):
            unreached.append(f"{c['method']} ({c['range'][0]:.2f}–{c['range'][1]:.2f}×) at {c['speedup']:.2f}×")
            continue
        cells = []
        for metric, label, digits in CLAIM_METRICS:
            ours, theirs = c[metric]
            if theirs is None or ours is None:
                cells.append("–")
                continue
            cells.append(f"{ours:.{digits}f} / {theirs:.{digits}f} ({ours - theirs:+.{digits}f})")
            if ours < theirs:
                below.append(f"{label} below {c['method']} by {theirs - ours:.{digits}f} at {c['speedup']:.2f}×")
        compared.append(c["method"])
        low, high = c["range"]
        lines.append(f"| {c['learned']} | {c['speedup']:.2f}× | {c['method']} ({low:.2f}–{high:.2f}×) | "
                     + " | ".join(cells) + " |")
    verdict = _verdict(below, list(dict.fromkeys(compared)))
    unmatched = ["", "Not compared (their sweeps do not reach that speedup): " + "; ".join(unreached) + "."] \
        if unreached else []
    dominated = [f"{entry_label(other)} ({other['metrics']['speedup_latency']:.2f}×) over {entry_label(ours)} "
                 f"({ours['metrics']['speedup_latency']:.2f}×)" for ours, other in dominating_entries(results)]
    dominance = ["", "**Faster and at least as good on every metric**: " + "; ".join(dominated) + "."] \
        if dominated else []
    return lines + unmatched + ["", verdict] + dominance + [""]


def _verdict(below: list[str], compared: list[str]) -> str:
    """The claim's one-sentence verdict, naming what was compared: an empty comparison proves nothing."""
    if below:
        return "**Not above every curve**: " + "; ".join(below) + "."
    if not compared:
        return ("**Nothing compared**: no other method's sweep reaches RAPID3's speedup, so the claim is unchecked; "
                "extend their sweeps (`--sweep METHOD=V1,V2`) to reach it.")
    return f"RAPID3 is at or above every method whose sweep reaches its speedup ({', '.join(compared)})."


def render(results: dict, figures: dict[str, str]) -> str:
    """The whole report as Markdown; ``figures`` maps figure names to files beside the report."""
    config, model, machine = results["config"], results["model"], results["machine"]
    kinds = Counter(p["kind"] for p in results["prompts"])
    n_timing = len(results["timing_images"])
    threads = f"{machine['threads']} thread" + ("s" if machine["threads"] != 1 else "")
    head = [
        "# rapid3 bench", "",
        f"Model: `{model['path']}`" + (f", training step {model['step']}" if "step" in model else "") + ". "
        f"{config['steps']} Euler steps, CFG {config['guidance']}. torch {machine['torch']}, {threads}, "
        f"{'CUDA' if machine['cuda'] else 'CPU'} ({machine['processor']}). "
        f"Bench wall time {results['bench_seconds']:.0f} s" + (" (`--quick`)." if config["quick"] else "."), "",
        f"Images: {len(results['prompts'])}, image i from noise seeded {config['seed']} + i: "
        + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        + ". Multi-object captions are from the held-out split; single-object captions from the train split "
          "(the held-out split has none by design)."
        + (" Every scene is captioned in words no training caption has (`--wording unseen`: synonyms, digits, "
           "reordered clauses; rapid3.embedded.wordings); the checker scores the same scenes."
           if config.get("wording") == "unseen" else ""), "",
        f"Latency: {config['repeats']} rounds × {n_timing} image(s) at batch 1 per entry; see Definitions.", "",
        "## Results", "",
    ]
    figure_lines = ["## Figures", "",
                    f"![Quality vs speedup]({figures['pareto']})", "",
                    f"![Per-image action maps]({figures['action_maps']})", "",
                    f"![Equivalent steps by prompt complexity]({figures['adaptivity']})", ""]
    calibration = ["## Calibration", "", "Fitted on full-compute runs of train-split prompts (calibration.json):", ""]
    calibration += [f"- `{name}`: {', '.join(f'{v:.4g}' for v in values)}"
                    for name, values in results["calibration"].items()]
    return "\n".join(head + _table(results) + [""] + _claim(results) + _peers(results) + ["## Adaptivity", ""]
                     + _adaptivity(results)
                     + figure_lines + calibration + ["", DEFINITIONS])
