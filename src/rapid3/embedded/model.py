"""The embedded text-to-image model: a pixel-space SD3 MMDiT on 32x32 RGB and its sampler config.

Size, chosen from CPU training cost (batch 64, forward + backward, bf16 autocast, 2 cores,
uncontended): hidden 128 / 6 layers (3.5M params) ~0.95 s per step; 8 layers 1.3 s; hidden 192
1.5 s; fp32 instead of bf16 ~1.6x slower; RMS q/k norm +25%. Hours of CPU training buy more
from more steps than from width, so the smallest of these, without q/k norm, is the default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rapid3.common.weights_config import Fact, check_config_matches_weights
from rapid3.embedded.scenes import IMAGE_SIZE
from rapid3.embedded.text_encoder import HIDDEN_DIM

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "embedded"
SAMPLING_STEPS = 28  # the "original model" every acceleration is measured against
GUIDANCE_SCALE = 4.0


def embedded_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``SD3Transformer2DModel`` for the embedded model (overrides win)."""
    config = dict(
        sample_size=IMAGE_SIZE,
        patch_size=2,  # 16 x 16 = 256 image tokens
        in_channels=3,
        out_channels=3,
        num_layers=6,
        num_attention_heads=4,
        attention_head_dim=32,
        caption_projection_dim=128,  # = heads x head dim: text tokens join image tokens at the hidden size
        joint_attention_dim=HIDDEN_DIM,
        pooled_projection_dim=HIDDEN_DIM,
        pos_embed_max_size=IMAGE_SIZE // 2,
        qk_norm=None,
    )
    config.update(overrides)
    return config


def embedded_scheduler_config() -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config for sampling the embedded model.

    shift 1.0: training draws t from a logit-normal centred on 0.5 with no shift, and the
    resolution shift SD3 uses exists for many more tokens than our 256; sampling the same
    unshifted time keeps train and test aligned.
    """
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def _blocks(shapes: dict[str, tuple[int, ...]]) -> int:
    return len({key.split(".")[1] for key in shapes if key.startswith("transformer_blocks.")})


WEIGHT_FACTS = [
    Fact("num_layers", lambda c: c["num_layers"], _blocks),
    Fact("num_attention_heads x attention_head_dim", lambda c: c["num_attention_heads"] * c["attention_head_dim"],
         lambda w: w["pos_embed.proj.weight"][0]),
    Fact("in_channels", lambda c: c["in_channels"], lambda w: w["pos_embed.proj.weight"][1]),
    Fact("patch_size", lambda c: c["patch_size"], lambda w: w["pos_embed.proj.weight"][3]),
    Fact("pos_embed_max_size^2", lambda c: c["pos_embed_max_size"] ** 2, lambda w: w["pos_embed.pos_embed"][1]),
    Fact("joint_attention_dim", lambda c: c["joint_attention_dim"], lambda w: w["context_embedder.weight"][1]),
    Fact("caption_projection_dim", lambda c: c["caption_projection_dim"], lambda w: w["context_embedder.weight"][0]),
    Fact("pooled_projection_dim", lambda c: c["pooled_projection_dim"],
         lambda w: w["time_text_embed.text_embedder.linear_1.weight"][1]),
    Fact("out_channels x patch_size^2", lambda c: c["out_channels"] * c["patch_size"] ** 2,
         lambda w: w["proj_out.weight"][0]),
]
"""What an embedded model's config.json implies about its weights' tensors (``check_config_matches_weights``)."""


def load_embedded(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load the shipped embedded model: ``(SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler)``.

    ``path`` defaults to ``rapid3/weights/embedded``; it holds the transformer's ``config.json``
    + safetensors and ``scheduler_config.json``, as written by
    ``rapid3 embedded train-generator --export PATH``. Loads offline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "config.json").is_file() or not (path / "scheduler_config.json").is_file():
        raise FileNotFoundError(
            f"no embedded model at {path} (need config.json, weights and scheduler_config.json); "
            "train one with `rapid3 embedded train-generator --out DIR` and export it with "
            "`--resume --steps 0 --export PATH`"
        )
    check_config_matches_weights(path, "diffusion_pytorch_model.safetensors", SD3Transformer2DModel, WEIGHT_FACTS)
    # safetensors only: a pickled .bin could run code on load. The model is tiny: load it eagerly, with no
    # `accelerate` needed and no warning about its absence.
    transformer = SD3Transformer2DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                        use_safetensors=True, low_cpu_mem_usage=False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, local_files_only=True)
    return transformer.eval().requires_grad_(False), scheduler


def embedded_info(path: str | Path | None = None) -> dict[str, Any]:
    """The training facts an export records beside its weights (``rapid3_embedded.json``; empty if absent)."""
    info_file = (Path(path) if path is not None else WEIGHTS_DIR) / "rapid3_embedded.json"
    return json.loads(info_file.read_text()) if info_file.is_file() else {}
