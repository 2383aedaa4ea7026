"""CLIP reward models for real pipelines: the quality term q and the adversarial discriminator d.

    quality = CLIPScore.from_pretrained("openai/clip-vit-large-patch14")     # a QualityModel
    disc = CLIPAdapterDiscriminator.from_pretrained("openai/clip-vit-large-patch14")  # a Discriminator
    q = quality.score(images, prompts)    # images (B, 3, H, W) in [-1, 1]
    d = disc.score(images)

Both take images of any size: they resize the shorter side to the CLIP input size, centre-crop
and normalise as ``CLIPImageProcessor`` does, in torch (batched, on the model's device). Both
load from a local folder or a Hub id and raise ``FileNotFoundError`` naming it when neither works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .discriminator import ModuleDiscriminator

CLIP_SCORE_WEIGHT = 2.5
"""Hessel et al.'s CLIPScore weight w in w * max(cos, 0): matching pairs (cos ~0.3) land near 0.75."""


@dataclass(frozen=True)
class CLIPPixels:
    """CLIP's image preprocessing in torch: [-1, 1] images -> normalised (B, 3, size, size) pixels."""

    size: int
    mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)

    @classmethod
    def for_model(cls, path: str | Path, size: int) -> CLIPPixels:
        """The model's own mean and std when it ships a preprocessor config, else OpenAI CLIP's."""
        try:
            processor = CLIPImageProcessor.from_pretrained(path)
        except OSError:  # no preprocessor_config.json: every public CLIP uses OpenAI's statistics
            return cls(size)
        return cls(size, tuple(processor.image_mean), tuple(processor.image_std))

    def __call__(self, images: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
        x = images.to(device, torch.float32).add(1).div(2)
        height, width = x.shape[-2:]
        scale = self.size / min(height, width)
        x = F.interpolate(x, size=(max(self.size, round(height * scale)), max(self.size, round(width * scale))),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))
        return ((x - mean) / std).to(dtype)


class CLIPScore:
    """The quality term q for real pipelines: q = min(1, w * max(cos(image, prompt), 0)) with CLIP embeddings.

    A ``QualityModel`` (``score(images, prompts)``). ``w`` defaults to CLIPScore's 2.5 (Hessel et
    al., 2021), which spreads the usual cosines (0.2-0.4) over [0.5, 1] while keeping q in [0, 1],
    as the reward's discount needs. Prompt embeddings are cached: GRPO scores each prompt G times.
    """

    def __init__(self, model: CLIPModel, tokenizer: Any, pixels: CLIPPixels, weight: float = CLIP_SCORE_WEIGHT):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.pixels, self.weight = pixels, weight
        self._text: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        weight: float = CLIP_SCORE_WEIGHT) -> CLIPScore:
        """A ``CLIPModel`` and its tokenizer from a folder or Hub id (float32, on ``device``)."""
        model = _load(CLIPModel, path, "CLIP reward model (--reward-model)").to(device)
        tokenizer = _load(AutoTokenizer, path, "tokenizer of the CLIP reward model (--reward-model)")
        return cls(model, tokenizer, CLIPPixels.for_model(path, model.config.vision_config.image_size), weight)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Quality (B,) in [0, 1] of each image (B, 3, H, W) in [-1, 1] for its prompt (on CPU, float32)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; give one prompt per image.")
        device, dtype = self.model.device, self.model.dtype
        image = self.model.get_image_features(pixel_values=self.pixels(images, device, dtype)).pooler_output
        text = self._text_features(prompts)
        cosine = F.cosine_similarity(image.float(), text, dim=-1)
        return (self.weight * cosine).clamp(0, 1).cpu()

    def _text_features(self, prompts: list[str]) -> Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text))
        if missing:
            # CLIP reads 77 tokens: longer prompts are scored on their beginning, as CLIP-based metrics do.
            tokens = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt",
                                    max_length=self.model.config.text_config.max_position_embeddings)
            features = self.model.get_text_features(**tokens.to(self.model.device)).pooler_output.float()
            self._text.update(zip(missing, features))
        return torch.stack([self._text[p] for p in prompts])


class CLIPAdapter(nn.Module):
    """Frozen CLIP vision tower -> small trainable MLP -> logit (B,) of "from the full-compute sampler".

    Features: the class token and the mean patch token of ``feature_layers`` hidden layers (by
    default four, evenly spaced to the last), so the adapter sees low-level layers, where blur and
    noise show, as well as the semantic last one. Only the adapter trains; the tower stays in eval mode.
    """

    def __init__(self, vision: nn.Module, pixels: CLIPPixels, hidden: int = 32,
                 feature_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.vision, self.pixels = vision.eval().requires_grad_(False), pixels
        depth = vision.config.num_hidden_layers
        self.feature_layers = feature_layers or tuple(sorted({round(depth * k / 4) for k in (1, 2, 3, 4)}))
        width = 2 * vision.config.hidden_size * len(self.feature_layers)
        self.adapter = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def train(self, mode: bool = True) -> CLIPAdapter:
        super().train(mode)
        self.vision.eval()  # frozen: no dropout, whatever the adapter does
        return self

    def features(self, images: Tensor) -> Tensor:
        """(B, 2 * hidden * layers) float32 features of the frozen tower (no grad)."""
        device, dtype = self.adapter[0].weight.device, next(self.vision.parameters()).dtype
        with torch.no_grad():
            pixels = self.pixels(images, device, dtype)
            states = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        parts = [torch.cat([states[i][:, 0], states[i][:, 1:].mean(1)], dim=-1) for i in self.feature_layers]
        return torch.cat(parts, dim=-1).float()

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B,)."""
        return self.adapter(self.features(images)).squeeze(1)


class CLIPAdapterDiscriminator(ModuleDiscriminator):
    """RAPID3's discriminator for real pipelines: a :class:`CLIPAdapter` trained with its own AdamW.

    A ``Discriminator`` (``score``, ``step``). Its ``state_dict`` holds the adapter and optimizer
    only: the frozen CLIP tower is reloaded from its path, so checkpoints stay small.
    """

    def __init__(self, adapter: CLIPAdapter, lr: float = 1e-4, weight_decay: float = 0.0) -> None:
        super().__init__(adapter, lr=lr, weight_decay=weight_decay)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", hidden: int = 32,
                        lr: float = 1e-4, weight_decay: float = 0.0) -> CLIPAdapterDiscriminator:
        """The vision tower of a ``CLIPModel`` or a ``CLIPVisionModel`` (folder or Hub id), a fresh adapter."""
        vision = load_clip_vision(path)
        adapter = CLIPAdapter(vision, CLIPPixels.for_model(path, vision.config.image_size), hidden)
        return cls(adapter.to(device), lr=lr, weight_decay=weight_decay)

    def state_dict(self) -> dict[str, Any]:
        """Adapter and optimizer state, for the trainer's checkpoint."""
        return {"module": self.module.adapter.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.adapter.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


def load_clip_vision(path: str | Path) -> nn.Module:
    """The vision tower of the CLIP at ``path``, whether it holds a whole ``CLIPModel`` or a ``CLIPVisionModel``."""
    what = "CLIP vision encoder of the discriminator (--disc-model)"
    config = _load(AutoConfig, path, what)
    if config.model_type == "clip_vision_model":
        return _load(CLIPVisionModel, path, what)
    if config.model_type != "clip":
        raise ValueError(f"{path} holds a {config.model_type!r} model; the discriminator needs a CLIP model.")
    return _load(CLIPModel, path, what).vision_model


def _load(cls: Any, path: str | Path, what: str) -> Any:
    """``cls.from_pretrained(path)``, with a missing model reported as such (not as a Hub connection error)."""
    try:
        return cls.from_pretrained(path)
    except OSError as error:
        local = "" if Path(path).exists() else " It is neither a local folder nor a model the Hub could provide."
        raise FileNotFoundError(f"cannot load the {what} from {str(path)!r}.{local} ({error})") from error
