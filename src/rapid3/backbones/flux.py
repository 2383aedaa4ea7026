"""Adapter for diffusers' ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .base import Conditioning
from .diffusers_dit import DiffusersDiT, ForwardState
from .sparse_attention import sparse_attention


class SparseFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` with the attention core made block-sparse at the call's level.

    FLUX puts text tokens first. Double-stream blocks pass the text stream separately; single-stream
    blocks pass the joint sequence, so the text length comes from the call's state.
    """

    def __init__(self, state: ForwardState) -> None:
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if attention_mask is not None:
            raise ValueError("rapid3's FLUX attention does not support attention masks.")
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        n_txt = self.state.n_txt
        if attn.added_kv_proj_dim is not None:
            enc_q, enc_k, enc_v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (enc_q, enc_k, enc_v))
            enc_q, enc_k = attn.norm_added_q(enc_q), attn.norm_added_k(enc_k)
            query, key, value = (torch.cat([e, x], dim=1) for e, x in zip((enc_q, enc_k, enc_v), (query, key, value)))
            n_txt = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # (B, H, N, D)
        out = sparse_attention(query, key, value, level=self.state.level, n_txt=n_txt, txt_first=True)
        out = out.permute(0, 2, 1, 3).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        context_out, image = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context_out.contiguous())


class FluxBackbone(DiffusersDiT):
    """``FluxTransformer2DModel`` on packed latents (B, N, C); per-sample ``guidance`` when the model
    embeds it; position ids shared by the batch."""

    family = "flux"
    txt_first = True
    expected_class = FluxTransformer2DModel
    processor_cls = SparseFluxAttnProcessor
    time_grid = "flux"

    def blocks(self) -> list[torch.nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def call_kwargs(self, sigma: torch.Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        # As FluxPipeline: timestep = (sigma * 1000) / 1000; the transformer scales it back up.
        timestep = sigma.float() * self.scheduler.config.num_train_timesteps / 1000
        kwargs = {k: v.to(dtype) for k, v in cond.per_sample.items()}
        if "guidance" in kwargs:
            kwargs["guidance"] = cond.per_sample["guidance"].float()
        return {"timestep": timestep.to(dtype), **kwargs, **cond.shared}

    def image_tokens(self, latents: torch.Tensor) -> int:
        return latents.shape[1]

    def check_latents(self, latents: torch.Tensor) -> None:
        channels = self.transformer.config.in_channels
        if latents.ndim != 3 or latents.shape[-1] != channels:
            raise ValueError(f"FLUX latents must be packed as (batch, tokens, {channels}); "
                             f"got shape {tuple(latents.shape)}.")
