"""The evaluator network whose feature space the benchmark's Fréchet distance is measured in.

Why our own network and not Inception: nothing can be downloaded here, and Inception's features
describe photographs, not 32x32 renders of flat shapes. This is a small CNN trained on exact
ground-truth renders of the embedded world (every caption of the grammar, any position) to say
which (colour, shape) pairs are present and how many objects there are, so its penultimate layer
encodes exactly what the images are about: colours, shapes, counts and (through the un-pooled 4x4
grid) layout. No training reward uses it, so no policy can have been optimised against it.

Train and ship it (~2 min on a few CPU cores, ~0.3 MB in fp16):

    python -m rapid3.eval.evaluator --out src/rapid3/weights/evaluator
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..embedded import scenes
from ..embedded.pipeline import to_model_space

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "evaluator"
PAIRS = [(color, shape) for color in scenes.COLORS for shape in scenes.SHAPES]
MAX_OBJECTS = 3


class AttributeEvaluator(ModelMixin, ConfigMixin):
    """A small CNN on 32x32 RGB in [-1, 1]: presence logits for every (colour, shape) pair and
    object-count logits (1..3) from a ``feature_dim`` penultimate layer, the Fréchet feature space."""

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 64, num_pairs: int = len(PAIRS),
                 max_objects: int = MAX_OBJECTS) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 16 x 16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8 x 8
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4 x 4: keeps coarse layout
            nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_pairs + max_objects)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim) of images (B, 3, 32, 32) in [-1, 1]."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(presence logits (B, num_pairs), count logits (B, max_objects))."""
        logits = self.head(self.features(images))
        return logits[:, :self.config.num_pairs], logits[:, self.config.num_pairs:]


def load_evaluator(path: str | Path | None = None) -> AttributeEvaluator:
    """The shipped evaluator (or one saved at ``path``), in float32 eval mode."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no evaluator at {path}; train one with "
                                f"`python -m rapid3.eval.evaluator --out {path}`")
    model = AttributeEvaluator.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def image_features(images: np.ndarray, model: AttributeEvaluator, batch: int = 256) -> np.ndarray:
    """Evaluator features (N, feature_dim), float64, of uint8 images (N, H, W, 3)."""
    chunks = [model.features(to_model_space(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(chunks).double().numpy()


def targets(spec: scenes.SceneSpec) -> tuple[np.ndarray, int]:
    """(presence vector over PAIRS, object count - 1) of a scene."""
    present = {(obj.color, obj.shape) for obj in spec.objects}
    return np.array([pair in present for pair in PAIRS], np.float32), len(spec.objects) - 1


def render_pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` renders of uniformly drawn captions (every kind, both splits): images, presence, counts."""
    rng = np.random.default_rng(seed)
    every = scenes.all_scenes()
    specs = [every[i] for i in rng.integers(len(every), size=n)]
    images = np.stack([scenes.render(scenes.place(spec, rng)) for spec in specs])
    presence, counts = zip(*(targets(spec) for spec in specs))
    return images, np.stack(presence), np.array(counts)


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random pixel noise and blur, so that features move smoothly as generated images degrade."""
    b = x.shape[0]
    noise_std = 0.15 * torch.rand(b, 1, 1, 1, generator=generator)
    blur_mix = 0.5 * torch.rand(b, 1, 1, 1, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.lerp(x, blurred, blur_mix)
    return (x + noise_std * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def train(steps: int = 2000, batch: int = 128, lr: float = 2e-3, pool: int = 16_000, seed: int = 0,
          init: Path | None = None) -> tuple[AttributeEvaluator, dict]:
    """Train (from scratch, or on from the evaluator saved at ``init``) on a pool of renders with
    degradations; returns the model and its accuracy on fresh clean renders."""
    torch.manual_seed(seed)
    model = AttributeEvaluator() if init is None else load_evaluator(init).train().requires_grad_(True)
    images, presence, counts = render_pool(pool, seed)
    x_all, p_all, c_all = to_model_space(images), torch.from_numpy(presence), torch.from_numpy(counts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=generator)
        presence_logits, count_logits = model(degrade(x_all[idx], generator))
        loss = (F.binary_cross_entropy_with_logits(presence_logits, p_all[idx])
                + F.cross_entropy(count_logits, c_all[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval().requires_grad_(False), validate(model, seed + 1)


@torch.no_grad()
def validate(model: AttributeEvaluator, seed: int, n: int = 2000) -> dict:
    """Accuracy on fresh clean renders: every pair's presence right, and the object count right."""
    images, presence, counts = render_pool(n, seed)
    presence_logits, count_logits = model(to_model_space(images))
    exact = ((presence_logits > 0).numpy() == (presence > 0.5)).all(axis=1)
    return {"presence_exact": float(exact.mean()),
            "count": float((count_logits.argmax(1).numpy() == counts).mean())}


def main(argv: list[str] | None = None) -> None:
    """CLI: train the evaluator and save it (fp16 safetensors + config.json + training.json)."""
    parser = argparse.ArgumentParser(prog="python -m rapid3.eval.evaluator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder to save the evaluator in")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", type=int, default=16_000, help="renders to train on (degraded afresh each draw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue training the evaluator saved here")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    model, accuracy = train(args.steps, args.batch, args.lr, args.pool, args.seed, args.init)
    model.to(torch.float16).save_pretrained(args.out)
    info = {"validation": accuracy, "steps": args.steps, "batch": args.batch, "lr": args.lr, "pool": args.pool,
            "seed": args.seed, "init": None if args.init is None else str(args.init),
            "seconds": round(time.perf_counter() - tic, 1)}
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
