"""Adapter for diffusers' ``SD3Transformer2DModel`` (MMDiT, joint attention): SD3, SD3.5, and the
embedded pixel-space model."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention

from .base import Conditioning
from .diffusers_dit import DiffusersDiT, ForwardState
from .sparse_attention import sparse_attention


class SparseJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with the attention core made block-sparse at the call's level.

    Image tokens come first and text tokens last in SD3's joint sequence. Level 0 calls
    ``F.scaled_dot_product_attention`` exactly as diffusers does. Also serves SD3.5's image-only
    ``attn2`` (no text tokens).
    """

    def __init__(self, state: ForwardState) -> None:
        self.state = state

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        n_img = hidden_states.shape[1]
        query, key, value = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        n_txt = 0
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            context = _heads(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                             attn.norm_added_q, attn.norm_added_k)
            query, key, value = (torch.cat([a, b], dim=2) for a, b in zip((query, key, value), context))

        out = sparse_attention(query, key, value, level=self.state.level, n_txt=n_txt, txt_first=False)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(query.dtype)

        image, context_out = out[:, :n_img], out[:, n_img:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image, context_out


def _heads(attn: Attention, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
    """Project ``x`` to per-head (B, H, N, D) query, key, value, with the optional QK norms."""
    batch = x.shape[0]
    q, k, v = (proj(x) for proj in (to_q, to_k, to_v))
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


class SD3Backbone(DiffusersDiT):
    """``SD3Transformer2DModel`` on latents (B, C, H, W); its residual cache lives on the image stream."""

    family = "sd3"
    txt_first = False
    expected_class = SD3Transformer2DModel
    processor_cls = SparseJointAttnProcessor
    time_grid = "scheduler"

    def call_kwargs(self, sigma: torch.Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        # As StableDiffusion3Pipeline: timestep = sigma * 1000 in float32.
        timestep = sigma.float() * self.scheduler.config.num_train_timesteps
        return {"timestep": timestep, **{k: v.to(dtype) for k, v in cond.per_sample.items()}}

    def image_tokens(self, latents: torch.Tensor) -> int:
        p = self.transformer.config.patch_size
        return (latents.shape[-2] // p) * (latents.shape[-1] // p)

    def check_latents(self, latents: torch.Tensor) -> None:
        config = self.transformer.config
        if latents.ndim != 4 or latents.shape[1] != config.in_channels:
            raise ValueError(f"SD3 latents must be (batch, {config.in_channels}, height, width); "
                             f"got shape {tuple(latents.shape)}.")
        p, (h, w) = config.patch_size, latents.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"Latent height and width must be multiples of the patch size {p}; got {h}x{w}.")
        if max(h, w) // p > config.pos_embed_max_size:
            raise ValueError(f"Latents of {h}x{w} exceed the model's position grid "
                             f"({config.pos_embed_max_size} patches of {p} per side).")
