"""Forecasting caches and the multistep2 solver on the shipped embedded model (issue 18).

Every method samples the same held-out prompts (``evaluation_prompts(N, 0)``, image i from seed i) and is
scored against the 28-step Euler full-compute image of the same prompt and seed: PSNR and SSIM
(``rapid3.rewards.metrics``), the deterministic checker's accuracy, equivalent steps K (FLOPs) and
seconds per image (the sampler's own per-image accounting, one thread; speedup = full compute's seconds
per image, timed on ``--timing-prompts`` prompts in the same run, over the method's). Results accumulate in ``--out`` (JSON, keyed by
method, so the sweep can run in short pieces) and the whole table is rewritten next to it as Markdown.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/forecast.py --methods fora3 fora3-f1 --out docs/bench/forecast.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rapid3.accel.actions import Controller
from rapid3.accel.controllers import FullCompute, UniformSteps
from rapid3.baselines.first_block import DBCacheStyle
from rapid3.baselines.steps import FixedIntervalCache, TaylorSeerCache
from rapid3.embedded.checker import checker_accuracy
from rapid3.embedded.model import GUIDANCE_SCALE, SAMPLING_STEPS
from rapid3.embedded.pipeline import EmbeddedPipeline, to_uint8
from rapid3.embedded.scenes import evaluation_prompts
from rapid3.rewards.metrics import psnr, ssim


def _methods() -> dict[str, tuple[Callable[[], Controller], str]]:
    """Method name -> (controller factory, solver)."""
    methods: dict[str, tuple[Callable[[], Controller], str]] = {"full": (FullCompute, "euler")}
    for interval in (3, 4, 6, 8):
        methods[f"fora{interval}"] = (lambda n=interval: FixedIntervalCache(n), "euler")
        for order in (1, 2):
            methods[f"fora{interval}-f{order}"] = (lambda n=interval, k=order: TaylorSeerCache(n, k), "euler")
    for steps in (4, 5, 7, 10):
        for solver in ("euler", "multistep2"):
            methods[f"uniform{steps}-{solver}"] = (lambda n=steps: UniformSteps(n), solver)
    for threshold in (0.1, 0.2, 0.4, 0.8):
        for order in (0, 1):
            methods[f"dbcache{threshold}-f{order}"] = (lambda d=threshold, k=order: DBCacheStyle(d, order=k), "euler")
            methods[f"dbcache{threshold}-f{order}-s14"] = (  # on a 14-step grid: past 6x, where 28 probes cannot go
                lambda d=threshold, k=order: DBCacheStyle(d, 14, order=k), "euler")
    return methods


METHODS = _methods()


def run(pipe: EmbeddedPipeline, prompts: list[str], name: str, batch: int) -> dict:
    """Sample every prompt with method ``name``; images and per-image accounting."""
    factory, solver = METHODS[name]
    images, k, seconds = [], [], []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        result = pipe.sample(part, range(start, start + len(part)), factory(), num_inference_steps=SAMPLING_STEPS,
                             guidance_scale=GUIDANCE_SCALE, solver=solver)
        images.append(to_uint8(result.latents.clamp(-1, 1)))
        k.append(result.stats.equivalent_steps)
        seconds.append(result.stats.seconds)
    return {"images": np.concatenate(images), "k": torch.cat(k).numpy(), "seconds": torch.cat(seconds).numpy()}


def score(out: dict, reference: dict, specs, full_seconds: float) -> dict:
    return {"k": float(out["k"].mean()), "seconds": float(out["seconds"].mean()),
            "speedup": float(full_seconds / out["seconds"].mean()),
            "psnr": float(np.mean(np.minimum(psnr(out["images"], reference["images"]), 60.0))),
            "ssim": float(np.mean(ssim(out["images"], reference["images"]))),
            "accuracy": float(checker_accuracy(list(out["images"]), specs)["accuracy"])}


def reference_run(pipe: EmbeddedPipeline, prompts: list[str], args: argparse.Namespace) -> dict:
    """Full compute on ``prompts``, or the one stored in ``args.reference`` (written on first use)."""
    if args.reference is not None and args.reference.exists():
        return dict(np.load(args.reference))
    reference = run(pipe, prompts, "full", args.batch)
    if args.reference is not None:
        np.savez(args.reference, **reference)
    return reference


def table(results: dict) -> str:
    lines = ["| method | K | speedup (28 / K) | speedup (time) | PSNR dB | SSIM | checker acc. |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda item: -item[1]["k"]):
        lines.append(f"| {name} | {r['k']:.2f} | {SAMPLING_STEPS / r['k']:.2f}x | {r['speedup']:.2f}x | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), required=True)
    parser.add_argument("--prompts", type=int, default=48, help="held-out evaluation prompts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="JSON to update; the .md beside it is rewritten")
    parser.add_argument("--timing-prompts", type=int, default=8,
                        help="prompts on which full compute is timed again in this run, for the speedups")
    parser.add_argument("--reference", type=Path, default=None,
                        help="an .npz of the full-compute images and seconds to reuse (written if missing), so "
                             "that a sweep in pieces samples the reference once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = EmbeddedPipeline.from_pretrained()
    specs = evaluation_prompts(args.prompts, 0)
    prompts = [s.caption for s in specs]
    tic = time.perf_counter()
    reference = reference_run(pipe, prompts, args)
    full_seconds = float(run(pipe, prompts[:args.timing_prompts], "full", args.batch)["seconds"].mean())
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if previous.get("prompts") != args.prompts:
        previous = {"prompts": args.prompts, "results": {}}
    results = previous["results"]
    results["full"] = score(reference, reference, specs, float(reference["seconds"].mean()))
    for name in args.methods:
        results[name] = score(run(pipe, prompts, name, args.batch), reference, specs, full_seconds)
        print(name, results[name], flush=True)
    previous["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"
    previous["command"] = ("PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/forecast.py --reference ref.npz "
                           "--out docs/bench/forecast.json --methods METHOD ... (in pieces of ~5 minutes)")
    args.out.write_text(json.dumps(previous, indent=1))
    write_markdown(args.out, args.batch)
    print(table(results), f"\n{time.perf_counter() - tic:.0f} s")


def write_markdown(out: Path, batch: int) -> None:
    """The Markdown table of everything in ``out`` (JSON), written beside it."""
    data = json.loads(out.read_text())
    out.with_suffix(".md").write_text(
        f"# Forecasting caches and multistep2, embedded model, {data['prompts']} held-out prompts\n\n"
        "PSNR/SSIM against the 28-step Euler full-compute image (PSNR capped at 60 dB); K counts FLOPs; the time "
        "speedup is seconds per image against full compute timed in the same run (one thread, batch "
        f"{batch}) on a 2-core machine shared with other jobs: time ratios moved by tens of percent between "
        "runs, K did not. Narrative and what did not pay: ../forecast.md.\n\n"
        f"{table(data['results'])}\n\nCommand: `{data['command']}`\n")


if __name__ == "__main__":
    main()
