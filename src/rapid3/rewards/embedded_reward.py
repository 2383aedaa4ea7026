"""The embedded world's learned reward model and its inference: how well a 32x32 image agrees with its caption.

It plays the role ImageReward plays for SD3 in RAPID3's reward (the quality term q in [0, 1]).
The deterministic checker (:mod:`rapid3.embedded.checker`) is the *evaluation*; this model is the
*training* reward, so the gap between the two shows reward hacking. Its training program is
:mod:`rapid3.rewards.train_embedded_reward` (``rapid3 embedded train-reward``); the shipped weights are
in ``rapid3/weights/reward``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from rapid3.embedded import scenes
from rapid3.embedded.pipeline import to_model_space
from rapid3.embedded.text_encoder import HIDDEN_DIM, MAX_TOKENS, MiniLMTextEncoder
from rapid3.rewards.shared import check_images

REWARD_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "reward"


class RewardModel(ModelMixin, ConfigMixin):
    """Image-caption agreement: a conv net over the image, modulated by the caption.

    Caption: a few learned queries attend over the MiniLM token states (plus a learned position
    embedding), so the caption vector keeps who is where in the sentence ("A left of B" is not
    "B left of A"), which a mean-pooled embedding blurs. Image: a caption-independent stem (with
    two coordinate channels, so positions are visible for relations) halves the resolution; then
    each stage's features get a per-channel scale and shift from the caption (FiLM), so they are
    computed *for* the caption (which colour, which shape to look for). The last feature map is
    flattened (not averaged, which would lose where things are) and an MLP over it and the
    caption gives a logit; :meth:`score` is its sigmoid. Training scores several captions per
    image on one stem pass (:meth:`image_features` then :meth:`fuse`).
    """

    @register_to_config
    def __init__(self, image_size: int = scenes.IMAGE_SIZE, channels: tuple[int, ...] = (32, 64, 128),
                 text_dim: int = HIDDEN_DIM, max_tokens: int = MAX_TOKENS, text_queries: int = 4,
                 text_hidden: int = 128, head_hidden: int = 256) -> None:
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{len(channels)} (one halving per stage)")
        self.text_norm = nn.LayerNorm(text_dim)
        self.token_positions = nn.Parameter(torch.zeros(max_tokens, text_dim))
        self.token_queries = nn.Parameter(torch.randn(text_queries, text_dim) / text_dim**0.5)
        self.text = nn.Sequential(nn.Linear(text_queries * text_dim, text_hidden), nn.SiLU())
        self.stem = nn.Sequential(nn.Conv2d(5, channels[0], 3, padding=1), nn.SiLU(),  # RGB + (x, y)
                                  nn.Conv2d(channels[0], channels[0], 3, stride=2, padding=1))
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in channels)
        self.films = nn.ModuleList(nn.Linear(text_hidden, 2 * c) for c in channels)
        for film in self.films:  # start as plain normalisation: scale 1, shift 0
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        side = image_size // 2 ** len(channels)
        self.head = nn.Sequential(nn.Linear(channels[-1] * side * side + text_hidden, head_hidden), nn.SiLU(),
                                  nn.Linear(head_hidden, 1))

    def forward(self, images: Tensor, text_tokens: Tensor) -> Tensor:
        """Logits (B,) for images (B, 3, S, S) in [-1, 1] and caption token states (B, max_tokens, text_dim)."""
        return self.fuse(self.image_features(images), text_tokens)

    def image_features(self, images: Tensor) -> Tensor:
        """The caption-independent stem: (B, channels[0], S/2, S/2)."""
        check_images(images, self.config.image_size)
        return self.stem(torch.cat([images, _coordinates(images)], dim=1))

    def encode_text(self, text_tokens: Tensor) -> Tensor:
        """(B, text_hidden) from token states that are zero past each caption's end (as MiniLMTextEncoder gives)."""
        present = text_tokens.abs().sum(-1) > 0
        x = self.text_norm(text_tokens) + self.token_positions
        attention = torch.einsum("qd,btd->bqt", self.token_queries, x) / x.shape[-1] ** 0.5
        attention = attention.masked_fill(~present[:, None, :], float("-inf")).softmax(-1)
        return self.text(torch.einsum("bqt,btd->bqd", attention, x).flatten(1))

    def fuse(self, features: Tensor, text_tokens: Tensor) -> Tensor:
        """Logits (B,) for stem features (B, ...) and one caption's token states (B, max_tokens, text_dim) each."""
        expected = (features.shape[0], self.config.max_tokens, self.config.text_dim)
        if text_tokens.shape != expected:
            raise ValueError(f"text_tokens must be {expected}, one caption per image, got {tuple(text_tokens.shape)}.")
        text = self.encode_text(text_tokens)
        x = features
        for i, (norm, film) in enumerate(zip(self.norms, self.films)):
            if i:
                x = self.convs[i - 1](x)
            scale, shift = film(text)[:, :, None, None].chunk(2, dim=1)
            x = F.silu(norm(x) * (1 + scale) + shift)
        return self.head(torch.cat([x.flatten(1), text], dim=1)).squeeze(1)

    @torch.no_grad()
    def score(self, images: Tensor, captions: list[str], encoder: MiniLMTextEncoder) -> Tensor:
        """Agreement in [0, 1], shape (B,), of each image with its caption (one caption per image)."""
        check_images(images, self.config.image_size)
        if len(captions) != len(images):
            raise ValueError(f"got {len(captions)} captions for {len(images)} images; give one caption per image.")
        tokens = encoder.encode(list(captions))[0]
        return torch.sigmoid(self(images, tokens.to(images.device, images.dtype)))


def _coordinates(images: Tensor) -> Tensor:
    """(B, 2, H, W) x and y in [-1, 1]."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype),
                            torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype), indexing="ij")
    return torch.stack([xs, ys]).expand(b, -1, -1, -1)


def load_reward_model(path: str | Path | None = None) -> RewardModel:
    """Load a reward model exported with ``--export`` (default: the shipped ``rapid3/weights/reward``), in eval mode."""
    path = Path(path) if path is not None else REWARD_WEIGHTS_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no reward model at {path} (need config.json and the safetensors weights); train one with "
            "`rapid3 embedded train-reward --out DIR` and export it with `--resume --steps 0 --export PATH`")
    # low_cpu_mem_usage=False: the model is tiny, and it spares a warning when `accelerate` is absent
    model = RewardModel.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False,
                                        use_safetensors=True)  # never a pickled .bin: it could run code
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[RewardModel, MiniLMTextEncoder]:
    return load_reward_model(), MiniLMTextEncoder()


@torch.no_grad()
def score_images(images: np.ndarray, prompts: list[str]) -> list[float]:
    """The shipped reward model's q in [0, 1] of uint8 images (N, H, W, 3) for their prompts: the
    reward ``rapid3 bench`` reports by default (``--reward rapid3.rewards.embedded_reward:score_images``)."""
    model, encoder = _shipped()
    return model.score(to_model_space(np.asarray(images)), list(prompts), encoder).tolist()

