"""The ``rapid3`` command line: ``rapid3 info``, ``demo``, ``generate``, ``train`` (and the commands later issues add)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__

if TYPE_CHECKING:
    from .policy import RapidPolicy


def _add_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="versions, supported backbones and the sparsity levels")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import diffusers

    from .backbones import ADAPTERS
    from .backbones.sparse_attention import SPARSE_KEEP_FRACTIONS

    print(f"rapid3 {__version__} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print("backbones: " + ", ".join(f"{a.family} ({a.expected_class.__name__})" for a in ADAPTERS))
    print("sparse levels: 0 = dense, " + ", ".join(f"{i} = keep {k}" for i, k in enumerate(SPARSE_KEEP_FRACTIONS, 1)))
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="run the sampler loop with each controller on a random-weight SD3-architecture DiT",
        description="Times full compute against step reduction, FORA caching and static sparse attention on "
                    "one batch of a random-weight SD3-architecture transformer, all through rapid3's sampler "
                    "loop, and prints equivalent steps, FLOPs, wall-clock and the deviation from full compute.")
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens per sample (a square number)")
    parser.add_argument("--steps", type=int, default=28, help="step cap: the full-compute sampler's step count")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    parser.add_argument("--layers", type=int, default=6, help="transformer blocks (hidden 384)")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .accel.controllers import FullCompute, UniformSteps
    from .accel.sampler import Sampler
    from .backbones.random_sd3 import random_sd3_setup
    from .baselines.steps import FixedIntervalCache, StaticSparse

    backbone, noise, cond, uncond = random_sd3_setup(args.tokens, args.layers, args.batch)
    sampler = Sampler(backbone, step_cap=args.steps, progress=True)
    controllers = {"full compute": FullCompute(), f"uniform {args.steps // 3} steps": UniformSteps(args.steps // 3),
                   "FORA interval 3": FixedIntervalCache(3), "static sparse keep 0.2": StaticSparse(3)}
    print(f"random-weight SD3 MMDiT, {args.layers} blocks, {args.tokens} image tokens, batch {args.batch}, CFG 4.5")
    print("| controller | steps | equivalent steps K | GFLOPs/image | seconds | speedup (time / FLOPs) | "
          "max |x - x_full| |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for name, controller in controllers.items():
        tic = time.perf_counter()
        result = sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=4.5)
        seconds = time.perf_counter() - tic
        stats = result.stats
        if reference is None:
            reference = (result.latents, seconds, stats.flops.mean().item())
        flops = stats.flops.mean().item()
        deviation = (result.latents - reference[0]).abs().max().item()
        print(f"| {name} | {stats.steps.double().mean():.1f} | {stats.equivalent_steps.mean():.2f} | "
              f"{flops / 1e9:.1f} | {seconds:.2f} | {reference[1] / seconds:.2f}x / {reference[2] / flops:.2f}x | "
              f"{deviation:.3f} |")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate", help="generate images with the embedded model or a diffusers SD3 / FLUX pipeline",
        description="Generate an image from a prompt such as \"a red circle above a blue square\" with the "
                    "embedded pixel-space MMDiT (28-step CFG sampler unless accelerated), or, with --pipeline, "
                    "with a diffusers StableDiffusion3Pipeline / FluxPipeline, optionally accelerated by a policy "
                    "trained for it (`rapid3 train --pipeline`).")
    parser.add_argument("prompt", nargs="?", help="what to draw (or give --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, default=None,
                        help="one image per prompt of a .txt (one per line) or .jsonl ({\"prompt\": ...}) file; "
                             "--out is then a folder")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps (the step cap when accelerated)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i: seed + i)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default rapid3.png); with --prompt-file a folder (default rapid3-images)")
    parser.add_argument("--policy", default=None, metavar="NAME_OR_PATH",
                        help="accelerate with a trained RAPID3 policy: a shipped one by name ('default') or a "
                             "folder written by `rapid3 train` (RUN/policy)")
    embedded = parser.add_argument_group("the embedded model")
    embedded.add_argument("--model", type=Path, default=None, help="an exported embedded model folder "
                                                                    "(default: the weights shipped in the package)")
    embedded.add_argument("--scale", type=int, default=8, help="upscale the 32x32 image by this factor (nearest)")
    _add_pipeline_arguments(parser)
    parser.set_defaults(run=_run_generate)


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """--pipeline and how to run it: shared by `generate` and `bench`."""
    group = parser.add_argument_group("a diffusers pipeline instead of the embedded model")
    group.add_argument("--pipeline", default=None, metavar="PATH_OR_ID",
                       help="a StableDiffusion3Pipeline or FluxPipeline: local folder or Hugging Face Hub id")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="pipeline dtype (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    """Refuse pipeline-only flags without --pipeline, and --model with it, rather than ignore them."""
    if args.pipeline is None:
        given = [f"--{name}" for name in ("device", "dtype", "height", "width") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --pipeline.")
    elif args.model is not None:
        raise ValueError("give either --pipeline (a diffusers pipeline) or --model (an embedded model), not both.")


def _run_generate(args: argparse.Namespace) -> int:
    _check_pipeline_flags(args)
    prompts = _generate_prompts(args)
    paths = _output_paths(args, len(prompts))
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}.")
    from .policy.shipped import load_policy

    policy = None if args.policy is None else load_policy(args.policy)
    generate = _generate_with_pipeline if args.pipeline else _generate_embedded
    for path, (image, seconds, summary) in zip(paths, generate(args, prompts, policy)):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height}) in {seconds:.2f} s: {summary}")
    return 0


def _generate_prompts(args: argparse.Namespace) -> list[str]:
    """The positional prompt or the prompt file's, checked before any model loads."""
    from .common.prompts import read_prompts
    from .embedded.pipeline import check_prompt_text

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give a prompt or --prompt-file (one of them).")
    if args.prompt_file is not None:
        return read_prompts(args.prompt_file)
    check_prompt_text(args.prompt)
    return [args.prompt]


def _output_paths(args: argparse.Namespace, n: int) -> list[Path]:
    """Where each image goes: --out itself, or numbered PNGs in the --out folder (made if missing)."""
    if args.prompt_file is None:
        out = args.out or Path("rapid3.png")
        _writable(out)
        return [out]
    folder = args.out or Path("rapid3-images")
    folder.mkdir(parents=True, exist_ok=True)
    _writable(folder / "0.png")
    return [folder / f"{i:04d}.png" for i in range(n)]


def _generate_embedded(args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt from the embedded model, in one batch (seconds: the batch's share)."""
    from PIL import Image

    from .embedded.model import GUIDANCE_SCALE
    from .embedded.pipeline import EmbeddedPipeline

    # A 3.5M-parameter model's ops are too small to split across threads, and on a busy 2-core
    # machine a second thread stalls every op (measured: 28 steps in 4.7 s on one thread, 80 s on two).
    torch.set_num_threads(1)
    pipe = EmbeddedPipeline.from_pretrained(args.model)
    if policy is not None:
        policy.check_backbone(pipe.backbone)
    guidance = GUIDANCE_SCALE if args.guidance is None else args.guidance
    tic = time.perf_counter()
    output = pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance, seed=args.seed,
                  controller=policy, progress=True)
    seconds = (time.perf_counter() - tic) / len(prompts)
    stats = output.stats
    for i in range(len(prompts)):
        image = Image.fromarray(output.images[i])
        image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
        yield image, seconds, f"{int(stats.steps[i])} steps, {stats.equivalent_steps[i]:.1f} equivalent steps"


def _generate_with_pipeline(args: argparse.Namespace, prompts: list[str], policy: RapidPolicy | None):
    """(image, seconds, summary) per prompt from a diffusers pipeline under ``rapid3.accelerate``, one call each."""
    from .accel.controllers import FullCompute
    from .generators import load_pipeline
    from .pipelines import accelerate

    pipe = load_pipeline(args.pipeline, device=args.device, dtype=args.dtype)
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
    with accelerate(pipe, policy or FullCompute()) as handle:
        if policy is not None:
            policy.check_backbone(handle.backbone)
            policy.to(pipe.device)
        for i, prompt in enumerate(prompts):
            tic = time.perf_counter()
            image = pipe(prompt, num_inference_steps=args.steps, height=args.height, width=args.width,
                         generator=torch.Generator().manual_seed(args.seed + i), **guidance).images[0]
            stats = handle.last_stats
            yield image, time.perf_counter() - tic, (
                f"{int(stats.steps[0])} steps, {stats.equivalent_steps[0]:.1f} equivalent steps "
                f"({handle.speedup_estimate:.2f}x fewer transformer FLOPs than {args.steps} steps)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.config import add_arguments

    parser = sub.add_parser(
        "train", help="train a RAPID3 policy with GRPO for the embedded model or a diffusers SD3 / FLUX pipeline",
        description="GRPO training of the three acceleration heads: rollout groups from shared noise, reward "
                    "(q + omega*d)(1 - lam^K)/(K(1 - lam)) from a quality model q and an adversarial discriminator "
                    "d, clipped per-decision surrogate, held-out evaluation against full compute. On the embedded "
                    "model (default) q is its learned reward model and prompts come from its scene grammar; with "
                    "--pipeline PATH_OR_ID, prompts come from --prompt-file, q is a CLIP score (--reward-model) and "
                    "d a frozen CLIP vision tower with a trainable adapter (--disc-model, default the same CLIP). "
                    "Knobs come from the defaults, then --config, then the flags.")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of knobs (see RUN/config.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint and config.yaml")
    add_arguments(parser)
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.config import config_from_args
    from .train.trainer import EXPORT, train

    cfg = config_from_args(args)
    run = train(cfg, resume=args.resume)
    if run.stopped_by:  # checkpointed and resumable, but not finished: exit as a shell reports the signal
        return 128 + run.stopped_by
    if run.world.is_main:
        print(f"trained {run.iteration} iterations; policy in {Path(cfg.out) / EXPORT}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--reward", default="rapid3.embedded.reward:score_images", metavar="MODULE:FUNCTION",
                        help="reward model: f(uint8 images, prompts) -> scores (default: the shipped reward model)")
    parser.add_argument("--discriminator", default=None, metavar="MODULE:FUNCTION",
                        help="discriminator: f(images, prompts)")
    _add_pipeline_arguments(parser)
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
    if args.pipeline is not None:
        return _bench_pipeline(args)
    from .eval.bench import run_cli

    return run_cli(args)


def _bench_pipeline(args: argparse.Namespace) -> int:
    """`rapid3 bench --pipeline`: the trainer's held-out evaluation, on the prompt file, written as JSON."""
    import json

    from .common.prompts import read_prompts
    from .generators import PipelineGenerator, resolve_device
    from .policy.shipped import load_policy
    from .rewards.clip import CLIPScore
    from .train.config import TrainConfig
    from .train.trainer import evaluate

    _check_pipeline_flags(args)
    if args.prompt_file is None or args.policy is None:
        raise ValueError("bench --pipeline compares a policy with full compute: give --prompt-file and --policy.")
    prompts = read_prompts(args.prompt_file)[:args.prompts]
    cfg = TrainConfig(step_cap=args.steps, guidance_scale=args.guidance, eval_batch=args.batch or 4)
    policy = load_policy(args.policy)
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    quality = None if args.reward_model is None else CLIPScore.from_pretrained(args.reward_model, device=device)
    generator = PipelineGenerator.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype,
                                                  height=args.height, width=args.width)
    policy.check_backbone(generator.backbone)
    metrics = evaluate(generator, policy.to(device), prompts, cfg, quality)
    settings = {"pipeline": args.pipeline, "policy": args.policy, "prompts": len(prompts), "steps": args.steps,
                "guidance": args.guidance, "reward_model": args.reward_model}
    (args.out / "pipeline_bench.json").write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2))
    print("| method | equivalent steps | FLOP speedup | wall-clock speedup | CLIP score |\n|---|---|---|---|---|")
    clip = lambda key: "-" if key not in metrics else f"{metrics[key]:.3f}"  # noqa: E731
    print(f"| full compute | {args.steps} | 1.00x | 1.00x | {clip('eval/quality_full')} |")
    print(f"| rapid3 policy | {metrics['eval/equivalent_steps']:.2f} | {metrics['eval/speedup_flops']:.2f}x | "
          f"{metrics['eval/speedup_wall']:.2f}x | {clip('eval/quality')} |")
    print(f"wrote {args.out / 'pipeline_bench.json'}")
    return 0


def _writable(path: Path) -> None:
    """Fail before any work is lost if ``path`` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"The output folder {folder} does not exist; create it or choose another --out.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"The output folder {folder} is not writable; choose another --out.")


COMMANDS = [_add_info, _add_demo, _add_generate, _add_train, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapid3", description="Learned per-image, per-step acceleration for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"rapid3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"rapid3 {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
