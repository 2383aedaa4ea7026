"""A tiny, offline, randomly initialised CLIP (text + vision) saved as ``CLIPModel.from_pretrained`` reads it.

The tokenizer is the byte-level one of ``tiny_pipelines`` (one token per character); the text
config's special ids match it, so CLIP pools at the end-of-text token as it should.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_pipelines import CLIP_MAX_LENGTH, _clip_tokenizer
from transformers import CLIPConfig, CLIPModel

IMAGE_SIZE = 32


def tiny_clip_config(**vision: int) -> CLIPConfig:
    """2-layer text and vision towers of width 16, 32x32 images in 8x8 patches (``vision`` overrides)."""
    tokenizer = _clip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8, **vision}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_tiny_clip(path: str | Path, seed: int = 0, **vision: int) -> Path:
    """Build the tiny CLIP with ``seed`` and save it with its tokenizer to ``path``."""
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(**vision)).save_pretrained(path)
    _clip_tokenizer().save_pretrained(path)
    return Path(path)
