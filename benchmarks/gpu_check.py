"""The GPU check: run this first whenever a GPU machine is available (under 8 minutes on one H100).

What it measures, in order of priority (each phase is skipped, and says so, when the time budget left
is under its estimate; a phase that fails records its error and the next one runs):
1. attention: dense SDPA vs the block-sparse paths (FlexAttention ``BlockMask``, K/V gather) at the
   SD3-medium head shape and 1024² token count, and how far the two sparse paths disagree;
2. profile sd3-medium and flux-dev (random weights, published shapes) at 1024² in bf16, eager and with
   compiled blocks (full, sparse keep 0.2, reuse: the compiled graphs are what costs compile time);
3. the sampler loop (what ``rapid3.accelerate`` runs) on a random-weight full-size FLUX.1-dev
   transformer with each training-free controller and a freshly initialised policy: realized
   latency speedup against the FLOP-predicted one (step cap / equivalent steps K), peak memory.
It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` after every phase, so a run cut short
still leaves what it measured.

Without a GPU it runs the same phases at small scale on the CPU (fewer blocks of full width, 512²
images = 1024 image tokens, float32, 4 steps, one timed round) so that it is known to work: ``--small`` forces that.

The GPU machine has torch (2.11 there) but not diffusers. Carry the wheel (pure Python; its other
requirements are there) from the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1

then run, with ``carry: [".whl"]``:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --budget-s 450
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rapid3.accel.controllers import FullCompute, UniformSteps
from rapid3.accel.costs import interleaved_medians
from rapid3.accel.profile import profile_backbone, step_actions
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning
from rapid3.backbones.archs import get_arch, random_arch_setup
from rapid3.backbones.sparse_attention import NUM_SPARSE_LEVELS, BlockLayout, sparse_attention
from rapid3.baselines.first_block import FirstBlockCache
from rapid3.baselines.steps import FixedIntervalCache, StaticSparse
from rapid3.baselines.teacache import TeaCache
from rapid3.policy import RapidPolicy


@dataclass(frozen=True)
class Scale:
    """How big each phase runs: the real thing on a GPU, a small proof on a CPU."""

    name: str
    device: torch.device
    dtype: torch.dtype
    resolution: int
    layers: dict[str, int | None]
    steps: int
    repeats: int
    compile_backend: str


def scale_for(small: bool) -> Scale:
    if not small:
        return Scale("full (GPU)", torch.device("cuda"), torch.bfloat16, 1024, {"sd3-medium": None, "flux-dev": None},
                     28, 5, "inductor")
    # Inductor on a 2-core CPU takes minutes per full-width block graph; the eager backend runs the same
    # dynamo capture (graphs, guards, recompiles), which is what the small run has to prove.
    return Scale("small (CPU)", torch.device("cpu"), torch.float32, 512, {"sd3-medium": 2, "flux-dev": 2}, 4, 1,
                 "eager")


# -- phases ------------------------------------------------------------------------------------------
def attention_check(scale: Scale) -> dict[str, Any]:
    """Dense SDPA against the sparse paths at keep 0.2, SD3-medium heads (24 x 64), 333 text tokens."""
    n_img, n_txt = (scale.resolution // 16) ** 2, get_arch("sd3-medium").text_tokens
    q, k, v = (torch.randn(1, 24, n_img + n_txt, 64, device=scale.device, dtype=scale.dtype) for _ in range(3))
    level = NUM_SPARSE_LEVELS
    runs = {"sdpa dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "gather keep 0.2": lambda: sparse_attention(q, k, v, level=level, n_txt=n_txt, txt_first=False,
                                                        backend="gather"),
            "flex keep 0.2": lambda: sparse_attention(q, k, v, level=level, n_txt=n_txt, txt_first=False,
                                                      backend="flex")}
    times = {name: _median_seconds(run, scale) for name, run in runs.items()}
    disagreement = (runs["gather keep 0.2"]().float() - runs["flex keep 0.2"]().float()).abs().max().item()
    layout = BlockLayout.build(n_txt=n_txt, n_img=n_img, txt_first=False)
    return {"tokens": n_img + n_txt, "block_size": layout.block_size, "seconds": times,
            "speedup_vs_sdpa": {name: times["sdpa dense"] / t for name, t in times.items()},
            "max_abs_gather_vs_flex": disagreement}


def profile_check(arch: str, scale: Scale) -> dict[str, Any]:
    """``rapid3 profile`` of one architecture, eager and compiled (full, keep 0.2, reuse)."""
    backbone, noise, cond, uncond = random_arch_setup(arch, resolution=scale.resolution, layers=scale.layers[arch],
                                                      device=scale.device, dtype=scale.dtype)
    latents, branches = (noise, 1) if uncond is None else (torch.cat([noise, noise]), 2)
    cond = cond if uncond is None else Conditioning.cat([uncond, cond])
    actions = [a for a in step_actions() if a.level in (0, NUM_SPARSE_LEVELS)]
    profile = profile_backbone(backbone, latents, cond, branches=branches, repeats=scale.repeats,
                               compile_backend=scale.compile_backend, actions=actions, setup={"source": arch})
    return {**profile.to_dict(), "table": profile.table()}


def controllers_check(scale: Scale) -> dict[str, Any]:
    """The sampler on random-weight FLUX.1-dev: each training-free controller and a fresh policy."""
    backbone, noise, cond, _ = random_arch_setup("flux-dev", resolution=scale.resolution,
                                                 layers=scale.layers["flux-dev"], device=scale.device,
                                                 dtype=scale.dtype)
    policy = RapidPolicy.for_backbone(backbone, default_steps=scale.steps).to(scale.device).eval()
    n = scale.steps
    controllers = {"full compute": FullCompute(), f"uniform {n // 3} steps": UniformSteps(n // 3),
                   "FORA interval 3": FixedIntervalCache(3), "TeaCache 0.2": TeaCache(0.2),
                   "FirstBlockCache 0.1": FirstBlockCache(0.1), "static sparse keep 0.2": StaticSparse(NUM_SPARSE_LEVELS),
                   "fresh RapidPolicy": policy}
    sampler = Sampler(backbone, step_cap=n)
    rows = {name: {} for name in controllers}
    runners = {name: (lambda name=name: rows[name].update(_sample_once(sampler, noise, cond, controllers[name],
                                                                       scale)))
               for name in controllers}
    # Interleaved rounds after a warm-up round: machine drift hits every controller alike.
    seconds = interleaved_medians(runners, scale.repeats)
    for name, row in rows.items():
        row["seconds"] = seconds[name]
        row["realized_speedup"] = seconds["full compute"] / seconds[name]
        row["flop_predicted_speedup"] = n / row["equivalent_steps"]
    return {"steps": n, "image_tokens": noise.shape[1], "repeats": scale.repeats, "controllers": rows}


def _sample_once(sampler: Sampler, noise: torch.Tensor, cond: Conditioning, controller, scale: Scale) -> dict:
    """One batch: K, steps and (CUDA) peak memory; the caller times it."""
    if scale.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        stats = sampler.sample(noise, cond, controller).stats
    _sync(scale)  # the runner's clock stops after the device's queued work
    peak = torch.cuda.max_memory_allocated() if scale.device.type == "cuda" else None
    return {"equivalent_steps": stats.equivalent_steps.mean().item(), "steps": stats.steps.double().mean().item(),
            "peak_bytes": peak}


# -- plumbing ----------------------------------------------------------------------------------------
def _sync(scale: Scale) -> None:
    if scale.device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(run: Callable[[], object], scale: Scale) -> float:
    run()  # warm-up (and the flex kernel's compilation on CUDA)
    times = []
    for _ in range(scale.repeats):
        _sync(scale)
        tic = time.perf_counter()
        run()
        _sync(scale)
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def _free(scale: Scale) -> None:
    gc.collect()
    if scale.device.type == "cuda":
        torch.cuda.empty_cache()


def write_report(report: dict[str, Any], out: Path) -> None:
    """gpu_check.json (everything) and gpu_check.md (the tables)."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# GPU check: {report['device']}, torch {report['torch']}, {report['scale']}", ""]
    for name, result in report["phases"].items():
        lines += [f"## {name}", "", *_phase_markdown(result), ""]
    (out / "gpu_check.md").write_text("\n".join(lines))


def _phase_markdown(result: dict[str, Any]) -> list[str]:
    if "error" in result or "skipped" in result:
        return _status_markdown(result)
    if "table" in result:
        return _profile_markdown(result)
    if "controllers" in result:
        return _controllers_markdown(result)
    return _attention_markdown(result)


def _status_markdown(result: dict[str, Any]) -> list[str]:
    status = "skipped" if "skipped" in result else "failed"
    why = result.get("skipped") or result["error"].splitlines()[-1]
    return [f"**{status}** ({result['phase_seconds']:.0f} s): {why}"]


def _profile_markdown(result: dict[str, Any]) -> list[str]:
    setup = result["setup"]
    note = (f"{setup['blocks']} blocks, {setup['image_tokens']} image + {setup['text_tokens']} text tokens, "
            f"{setup['dtype']}; compiled = torch.compile backend {setup.get('compile_backend')}; cache "
            f"{result['cache_bytes_per_image_per_branch'] / 2**20:.1f} MiB per image and branch; compile "
            f"{result['compile_seconds']:.0f} s; phase {result['phase_seconds']:.0f} s")
    return [result["table"], "", note]


def _controllers_markdown(result: dict[str, Any]) -> list[str]:
    rows = ["| controller | steps | K | seconds | realized speedup | FLOP-predicted | peak GiB |",
            "|---|---|---|---|---|---|---|"]
    for name, r in result["controllers"].items():
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f}"
        rows.append(f"| {name} | {r['steps']:.0f} | {r['equivalent_steps']:.2f} | {r['seconds']:.2f} | "
                    f"{r['realized_speedup']:.2f}x | {r['flop_predicted_speedup']:.2f}x | {peak} |")
    note = (f"{result['image_tokens']} image tokens, step cap {result['steps']}, batch 1, median of "
            f"{result['repeats']} interleaved rounds; phase {result['phase_seconds']:.0f} s")
    return [*rows, "", note]


def _attention_markdown(result: dict[str, Any]) -> list[str]:
    rows = ["| attention | ms | vs SDPA |", "|---|---|---|"]
    rows += [f"| {n} | {s * 1e3:.2f} | {result['speedup_vs_sdpa'][n]:.2f}x |" for n, s in result["seconds"].items()]
    note = (f"{result['tokens']} tokens, block {result['block_size']}; max |gather - flex| "
            f"{result['max_abs_gather_vs_flex']:.2e}; phase {result['phase_seconds']:.0f} s")
    return [*rows, "", note]


def run_phases(phases: list[tuple[str, float, Callable[[], dict]]], budget_s: float, report: dict,
               out: Path, scale: Scale) -> None:
    """Each phase if its estimate fits the time left; results written after every phase."""
    start = time.perf_counter()
    for name, estimate_s, phase in phases:
        left = budget_s - (time.perf_counter() - start)
        tic = time.perf_counter()
        if estimate_s > left:
            report["phases"][name] = {"skipped": f"estimate {estimate_s:.0f} s > {left:.0f} s left"}
        else:
            try:
                report["phases"][name] = phase()
            except Exception:  # noqa: BLE001 -- a check reports what broke, and the next phase still runs
                report["phases"][name] = {"error": traceback.format_exc()}
        report["phases"][name]["phase_seconds"] = time.perf_counter() - tic
        print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)
        _free(scale)
        write_report(report, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/gpu_check"), help="output folder")
    parser.add_argument("--small", action="store_true", help="CPU scale even with a GPU (default without one)")
    parser.add_argument("--budget-s", type=float, default=450, help="time budget; phases that do not fit are skipped")
    args = parser.parse_args(argv)
    scale = scale_for(args.small or not torch.cuda.is_available())
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if scale.device.type == "cuda" else "CPU"
    report = {"device": device, "torch": torch.__version__, "scale": scale.name, "phases": {}}
    gpu = scale.device.type == "cuda"
    phases = [("attention: SDPA vs sparse", 30 if gpu else 60, lambda: attention_check(scale)),
              ("profile sd3-medium", 150 if gpu else 300, lambda: profile_check("sd3-medium", scale)),
              ("profile flux-dev", 200 if gpu else 400, lambda: profile_check("flux-dev", scale)),
              ("controllers on flux-dev", 150 if gpu else 600, lambda: controllers_check(scale))]
    run_phases(phases, args.budget_s, report, args.out, scale)
    print((args.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
