"""`rapid3 bench`: every method side by side on the embedded model, or a policy against full compute on a
diffusers pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_limits_flag, add_pipeline_arguments, check_pipeline_flags, world_config


def add_bench(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmark acceleration methods on the embedded model: JSON, Markdown report, plots",
        description="Runs every registered method over its knob (uniform steps, FORA, TeaCache, FirstBlockCache, "
                    "static sparse attention on rapid3's sampler loop; diffusers' MagCache, TaylorSeer, PAB and "
                    "FirstBlockCache hooks on a peer harness) on the same prompts and seeds, and reports checker "
                    "accuracy, PSNR/SSIM against full compute, Frechet distance, equivalent steps, FLOPs and "
                    "interleaved median latency.")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the report, JSON and plots")
    parser.add_argument("--model", type=Path, default=None, help="an exported embedded model folder (default: shipped)")
    parser.add_argument("--quick", action="store_true", help="a few prompts and short sweeps: a few minutes")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default all; --list-methods)")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and their knobs")
    parser.add_argument("--sweep", action="append", metavar="METHOD=V1,V2",
                        help="a method's knob values instead of its default sweep (repeatable), e.g. --sweep fora=2,4")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts (default 200; --quick 4)")
    parser.add_argument("--wording", default="grammar", choices=("grammar", "unseen"),
                        help="caption the scenes in the grammar's words, or in words no training caption has "
                             "(synonyms, digits, reordered clauses; the checker scores the same scenes)")
    parser.add_argument("--singles", type=int, default=None, help="single-object prompts added (default 25; --quick 2)")
    parser.add_argument("--seed", type=int, default=None, help="image i is seeded SEED + i (default 0)")
    parser.add_argument("--repeats", type=int, default=None, help="latency rounds (default 5; --quick 2)")
    parser.add_argument("--timing-images", type=int, default=None, help="images timed per round (default 3; --quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="images per sampler call in the quality pass")
    parser.add_argument("--calibration", type=Path, default=None, help="reuse an earlier run's calibration.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscription on a busy machine")
    parser.add_argument("--policy", default=None, metavar="NAME_OR_PATH[,...]",
                        help="trained RAPID3 policies (shipped names or RUN/policy folders), benchmarked as one method "
                             "swept over the lambda each was trained with (default: the shipped 'default' policy); "
                             "with --pipeline, the one policy to compare with full compute")
    parser.add_argument("--tpdm", default=None, metavar="PATH[,...]",
                        help="step-only policies (`rapid3 train --no-cache-reuse --no-sparse-attention`): the TPDM "
                             "baseline")
    parser.add_argument("--reward", default="rapid3.rewards.embedded_reward:score_images", metavar="MODULE:FUNCTION",
                        help="reward model: f(uint8 images, prompts) -> scores (default: the shipped reward model)")
    parser.add_argument("--discriminator", default=None, metavar="MODULE:FUNCTION",
                        help="discriminator: f(images, prompts)")
    add_pipeline_arguments(parser)
    add_limits_flag(parser)
    group = parser.add_argument_group(
        "with --pipeline: a trained policy against full compute on a prompt file (equivalent steps, FLOP and "
        "denoiser wall-clock speedups, CLIP score); also reads --out, --prompts (first N, default all), --batch")
    group.add_argument("--prompt-file", type=Path, default=None, help=".txt (one per line) or .jsonl prompts")
    group.add_argument("--reward-model", default=None, metavar="PATH_OR_ID", help="a CLIPModel for the CLIP score")
    group.add_argument("--steps", type=int, default=28, help="step cap (use the policy's training step_cap)")
    group.add_argument("--guidance", type=float, default=4.0,
                       help="guidance scale (use the policy's training guidance_scale; default 4.0 as rapid3 train)")
    parser.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    _check_knobs(args)
    if args.pipeline is not None:
        return _bench_pipeline(args)
    from ..eval.bench import run_cli

    return run_cli(args)


def _check_knobs(args: argparse.Namespace) -> None:
    """Every sized or numeric flag, and the calibration file, before any model loads."""
    from ..common.limits import check_finite, check_limits, check_seed

    for flag in ("threads", "repeats", "timing_images", "batch", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
    for flag in ("prompts", "singles"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}.")
    if args.pipeline is not None and args.prompts == 0:
        raise ValueError("--prompts 0 leaves nothing to benchmark; give at least one prompt.")
    if args.pipeline is None:
        _check_image_count(args)
    check_finite("--guidance", args.guidance)
    if args.seed is not None:
        check_seed("--seed", args.seed)
    check_limits([("steps", "--steps", args.steps), ("batch", "--batch", args.batch),
                  ("prompts", "--prompts", args.prompts), ("prompts", "--singles", args.singles),
                  ("image_size", "--height", args.height), ("image_size", "--width", args.width)], args.beyond_limits)
    _check_sweeps(args.sweep)
    if args.calibration is not None:
        _check_calibration(args.calibration)


def _check_image_count(args: argparse.Namespace) -> None:
    """The embedded bench's held-out plus single-object images, its presets filled in: at least 2, for the
    Frechet distance's covariances (found out only after every method had run, before this check)."""
    from ..eval.bench import BenchConfig

    sized = BenchConfig.create(quick=args.quick, prompts=args.prompts, singles=args.singles)
    if sized.prompts + sized.singles < 2:
        total = sized.prompts + sized.singles
        raise ValueError(f"--prompts {sized.prompts} and --singles {sized.singles} give {total} "
                         "images; the bench needs at least 2 (its Frechet distance compares two sets of images).")


def _check_sweeps(specs: list[str] | None) -> None:
    """Every --sweep value a positive, finite number: each method's knob (steps, interval, threshold, level) is."""
    import math

    from ..eval.bench import default_methods, parse_sweeps

    methods = default_methods()  # a learned method's knob is a policy, not a number: run_cli checks it
    for method, values in parse_sweeps([s for s in specs or [] if s.partition("=")[0] in methods], methods).items():
        bad = [v for v in values if isinstance(v, (int, float)) and not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"--sweep {method}: every value must be a positive number, got "
                             f"{', '.join(map(str, bad))}.")


def _check_calibration(path: Path) -> None:
    """A calibration.json written by an earlier bench: a JSON object, named in the error if not."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"--calibration: no file at {path}; give the calibration.json of an earlier "
                                "`rapid3 bench --out` folder.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--calibration {path} is not JSON ({error}); give the calibration.json of an earlier "
                         "`rapid3 bench --out` folder.") from None
    if not isinstance(data, dict):
        raise TypeError(f"--calibration {path} must hold a JSON object of calibrations (method -> values), got "
                         f"{type(data).__name__}.")


def _bench_pipeline(args: argparse.Namespace) -> int:
    """`rapid3 bench --pipeline`: a policy against full compute side by side on the prompt file, written as JSON."""
    import dataclasses
    import json

    from ..common.prompts import read_prompts
    from ..eval.side_by_side import SideBySideSettings, comparison_table, side_by_side
    from ..policy.shipped import load_policy
    from ..worlds import build_world

    check_pipeline_flags(args)
    if args.prompt_file is None or args.policy is None:
        raise ValueError("bench --pipeline compares a policy with full compute: give --prompt-file and --policy.")
    prompts = read_prompts(args.prompt_file)[:args.prompts]
    policy = load_policy(args.policy)
    args.out.mkdir(parents=True, exist_ok=True)
    world = build_world(dataclasses.replace(world_config(args), reward_model=args.reward_model,
                                            quality=args.reward_model is not None))
    policy.place_on(world.generator.backbone)
    settings = SideBySideSettings(step_cap=args.steps, guidance_scale=args.guidance, batch=args.batch or 4)
    metrics = side_by_side(world.generator, policy, prompts, settings, world.quality)
    run_settings = {"pipeline": args.pipeline, "policy": args.policy, "prompts": len(prompts), "steps": args.steps,
                    "guidance": args.guidance, "reward_model": args.reward_model}
    (args.out / "pipeline_bench.json").write_text(json.dumps({"settings": run_settings, "metrics": metrics}, indent=2))
    print(comparison_table(metrics, args.steps))
    print(f"wrote {args.out / 'pipeline_bench.json'}")
    return 0
