"""Tiny, offline, randomly initialised diffusers pipelines for tests.

Everything is built in memory from configs (no model hub): byte-level CLIP tokenizers, a
Unigram T5 tokenizer, tiny CLIP / T5 text encoders, a tiny VAE (scale factor 2) and tiny
SD3 / FLUX transformers. All modules are float32 on CPU; ``torch.manual_seed(seed)`` is called
before each module is built, so a given seed always gives the same weights.

Default image sizes: SD3 32x32 (any multiple of 4 up to 128), FLUX any multiple of 4
(the FLUX pipeline's own default, 256x256, is large for CPU: pass ``height``/``width``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

CLIP_MAX_LENGTH = 77
T5_D_MODEL = 64
T5_WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle",
            "and", "of", "on", "left", "right", "above", "below", "small", "large")

SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,  # pipeline default: 16 latent px * VAE factor 2 = 32x32 images
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 3,  # the last block is context_pre_only, as in SD3
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_D_MODEL,  # >= 16 + 32, the two CLIP hidden sizes
    "caption_projection_dim": 32,  # = heads * head dim
    "pooled_projection_dim": 48,  # = 16 + 32, the two CLIP projection sizes
    "pos_embed_max_size": 32,  # latents up to 64x64, i.e. images up to 128x128
}

FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 VAE latent channels packed 2x2
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_D_MODEL,
    "pooled_projection_dim": 16,  # the CLIP hidden size (pooler output)
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
}


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level CLIP BPE tokenizer without merges: one token per character."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": i + len(alphabet) for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5TokenizerFast:
    """Unigram T5 tokenizer over a few scene words plus single lowercase letters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + word, -2.0) for word in T5_WORDS] + [("\u2581", -3.0)]
    letters = [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=specials + words + letters, extra_ids=0, model_max_length=512)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextConfig:
    """A 2-layer, 2-head CLIP text config whose special ids match ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_model(seed: int, tokenizer: CLIPTokenizer, hidden_size: int,
                     with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny CLIP text encoder (with a text projection when ``with_projection``)."""
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(tokenizer, hidden_size)).eval()


def _t5_encoder(seed: int, tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A tiny 2-layer T5 encoder with ``d_model = T5_D_MODEL``."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(seed: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A tiny 16-channel VAE with spatial factor 2 and no quant convs (SD3 / FLUX style)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_sd3_transformer(seed: int = 0, **overrides: Any) -> SD3Transformer2DModel:
    """A tiny SD3 MMDiT: ``SD3_TRANSFORMER_CONFIG`` updated with ``overrides``."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**SD3_TRANSFORMER_CONFIG, **overrides}).eval()


def tiny_flux_transformer(seed: int = 0, **overrides: Any) -> FluxTransformer2DModel:
    """A tiny FLUX transformer: ``FLUX_TRANSFORMER_CONFIG`` updated with ``overrides``."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX_TRANSFORMER_CONFIG, **overrides}).eval()


def tiny_sd3_pipeline(seed: int = 0, *, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` (two CLIP encoders, optional T5, shift-3 scheduler)."""
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer() if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_model(seed, clip_tokenizer, 16, with_projection=True),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_model(seed, clip_tokenizer, 32, with_projection=True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed, t5_tokenizer) if t5_tokenizer is not None else None,
        tokenizer_3=t5_tokenizer,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny ``FluxPipeline`` (CLIP + T5, guidance-distilled, dynamically shifted scheduler)."""
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_model(seed, clip_tokenizer, 16, with_projection=False),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5_encoder(seed, t5_tokenizer),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_flux_transformer(seed),
    )


def export_tiny_embedded(path, *, num_layers: int = 1, seed: int = 0):
    """Write a random-weight embedded model (fp16 transformer + scheduler config) as the generator's
    ``--export`` does, so tests can load it like the shipped one; returns ``path``."""
    from rapid3.embedded.model import embedded_scheduler_config, embedded_transformer_config

    torch.manual_seed(seed)
    SD3Transformer2DModel(**embedded_transformer_config(num_layers=num_layers)).to(torch.float16).save_pretrained(path)
    FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()).save_pretrained(path)
    return path
