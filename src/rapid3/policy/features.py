"""What the policy reads from an ``Observation``: per-token inputs on the patch grid and a few scalars.

Token inputs are the current latent, the change since the last cache refresh (X_t - X_tc) and the
last model output, cut into the backbone's patches: a spatial latent (B, C, H, W) is
pixel-unshuffled by ``patch_size`` into (B, N, 3 * C * p * p); a FLUX-style packed latent
(B, N, C * p * p) already holds one patch per token (FLUX packs 2x2 patches channel-major, the
same order as ``pixel_unshuffle``), so both layouts of the same latent give the same features and
no grid size is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..accel.actions import Observation

STATE_FEATURES: tuple[str, ...] = ("spent_fraction", "step_fraction", "has_cache", "refresh_change")
"""Scalar state features, in order: equivalent steps spent / step cap, executed steps / step cap,
whether a cache exists, and the relative L1 change of the latent since the last refresh (TeaCache's signal)."""


def token_features(obs: Observation, *, latent_channels: int, patch_size: int) -> torch.Tensor:
    """(B, N, 3 * latent_channels * patch_size**2): [latent, refresh delta, last velocity] per patch token."""
    check_latents(obs.latents, latent_channels=latent_channels, patch_size=patch_size)
    parts = (obs.latents, obs.refresh_delta, obs.last_velocity)
    if obs.latents.ndim == 3:
        return torch.cat(parts, dim=-1)
    patches = F.pixel_unshuffle(torch.cat(parts, dim=1), patch_size)
    return patches.flatten(2).transpose(1, 2)


def state_features(obs: Observation) -> torch.Tensor:
    """(B, len(STATE_FEATURES)) float32 scalars describing the compute spent and the cache."""
    dims = tuple(range(1, obs.latents.ndim))
    change = obs.refresh_delta.abs().mean(dims) / obs.latents.abs().mean(dims).clamp_min(1e-6)
    counters = torch.stack([obs.spent.double() / obs.step_cap, obs.step_index.double() / obs.step_cap,
                            obs.has_cache.double()], dim=1)
    # A huge change just means "recompute"; its exact size adds nothing, so it is capped.
    return torch.cat([counters.to(change.device, torch.float32), change.clamp_max(10.0).float()[:, None]], dim=1)


def check_latents(latents: torch.Tensor, *, latent_channels: int, patch_size: int) -> None:
    """Raise ``ValueError`` unless ``latents`` is (B, C, H, W) with H, W multiples of the patch, or packed (B, N, C*p*p)."""
    packed_dim = latent_channels * patch_size**2
    expected = (f"(B, {latent_channels}, H, W) with H and W multiples of {patch_size}, "
                f"or FLUX-style packed (B, N, {packed_dim})")
    spatial_ok = (latents.ndim == 4 and latents.shape[1] == latent_channels
                  and latents.shape[2] % patch_size == 0 and latents.shape[3] % patch_size == 0)
    packed_ok = latents.ndim == 3 and latents.shape[2] == packed_dim
    if not (spatial_ok or packed_ok):
        raise ValueError(f"RapidPolicy expects latents {expected}; got shape {tuple(latents.shape)}.")
