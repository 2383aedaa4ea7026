"""RapidPolicy: RAPID3's three lightweight heads on one shared trunk, as a sampler ``Controller``.

Trunk (per step, per sample):
  1. tokens = Linear(patch features): a patchify convolution (kernel = stride = patch) over
     [latent, refresh delta, last velocity] on the token grid (see ``features.py``);
  2. c = TimestepEmbedding(t) + Linear(pooled prompt) + Linear(spent/cap, step/cap, has_cache, change);
  3. AdaLN: LayerNorm(tokens) * (1 + scale(c)) + shift(c), SiLU, mean-pool over tokens, plus c;
  4. linear heads: Step-Skip (alpha, beta), Cache-Reuse (2 logits), Sparse-Attention (1 + N logits).

Step-Skip's ratio a in (0, 1) sets the next time. ``step_schedule="grid"`` (ours, the default):
advance 1/a intervals of the reference sampler's grid (``step_cap`` uniform steps), so a -> 1 is
the reference schedule and a = 0.5 skips every other point. ``"geometric"`` (the paper's): next t = a * t,
whose first step from t = 1 already spans a quarter of the trajectory at a = 0.75 — on the embedded
model that alone costs ~20 dB PSNR against the reference at the same step count (see the README).

Initialisation (near-neutral, and input-independent until trained): the AdaLN modulation and every
head's weights start at zero, and the head biases are set from the ``init_*`` config fields, so a
fresh policy's Beta has mode ``init_ratio`` (0.85) with alpha + beta - 2 = ``init_concentration``
(20: Beta(18, 4), std ~0.08), reuses with probability ``init_reuse_prob`` (0.2) when it can, and
runs dense with probability ``init_dense_prob`` (0.7).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..accel.actions import Actions, Observation, next_time_from_ratio, next_time_on_grid
from ..accel.controllers import UniformSteps
from ..backbones.diffusers_dit import DiffusersDiT
from ..backbones.sparse_attention import NUM_SPARSE_LEVELS
from ..common.weights_config import Fact, check_config_matches_weights
from . import heads
from .config import PolicyConfig
from .features import STATE_FEATURES, state_features, token_features
from .heads import ActionDistribution, Decision

DEFAULTS = PolicyConfig()
"""The defaults of the knobs a training run chooses."""


class RapidPolicy(ModelMixin, ConfigMixin):
    """Per-sample, per-step Step-Skip / Cache-Reuse / Sparse-Attention decisions for the sampler loop.

    ``decide`` is deterministic by default (Beta mode, argmax); set ``policy.sampling = True`` to
    draw actions and get their log-probabilities in ``Actions.log_prob`` (GRPO rollouts).
    ``log_prob`` and ``entropy`` recompute under the current weights, differentiably.

    Args:
        backbone_family: the DiT family the policy was built for ("sd3", "flux", ...); recorded.
        latent_channels, patch_size: the backbone's latent channels and patch size. Latents are
            (B, latent_channels, H, W), or packed (B, N, latent_channels * patch_size**2).
        pooled_dim: size of the pooled prompt embedding (``pooled_projections``).
        hidden_dim, step_skip, cache_reuse, sparse_attention, step_schedule, init_ratio, init_concentration,
            init_reuse_prob, init_dense_prob: the knobs a training run chooses, documented and defaulted
            once in :class:`rapid3.policy.config.PolicyConfig`. A disabled head means the uniform grid of
            ``default_steps`` / always recompute / always dense, adding 0 to the log-prob.
        num_sparse_levels: sparse levels beyond dense (the Sparse head has 1 + this many logits).
        default_steps: steps of the fixed grid used when Step-Skip is disabled (None: the step cap).
    """

    # Explicit arguments, not a PolicyConfig: diffusers' register_to_config writes each one into config.json,
    # which shipped policies load from. The defaults of a training run's knobs are PolicyConfig's.
    @register_to_config
    def __init__(self, backbone_family: str = "sd3", latent_channels: int = 16, patch_size: int = 2,
                 pooled_dim: int = 2048, hidden_dim: int = DEFAULTS.hidden_dim, step_skip: bool = DEFAULTS.step_skip,
                 cache_reuse: bool = DEFAULTS.cache_reuse, sparse_attention: bool = DEFAULTS.sparse_attention,
                 num_sparse_levels: int = NUM_SPARSE_LEVELS, default_steps: int | None = None,
                 init_ratio: float = DEFAULTS.init_ratio, init_concentration: float = DEFAULTS.init_concentration,
                 init_reuse_prob: float = DEFAULTS.init_reuse_prob, init_dense_prob: float = DEFAULTS.init_dense_prob,
                 step_schedule: str = DEFAULTS.step_schedule) -> None:
        super().__init__()
        PolicyConfig(hidden_dim=hidden_dim, step_skip=step_skip, cache_reuse=cache_reuse,  # checks the knobs
                     sparse_attention=sparse_attention, step_schedule=step_schedule, init_ratio=init_ratio,
                     init_concentration=init_concentration, init_reuse_prob=init_reuse_prob,
                     init_dense_prob=init_dense_prob)
        _check_config(step_skip=step_skip, cache_reuse=cache_reuse, sparse_attention=sparse_attention,
                      num_sparse_levels=num_sparse_levels, default_steps=default_steps)
        width = hidden_dim
        self.token_proj = nn.Linear(3 * latent_channels * patch_size**2, width)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.prompt_proj = nn.Linear(pooled_dim, width)
        self.state_proj = nn.Linear(len(STATE_FEATURES), width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = heads.biased_linear(width, [0.0] * (2 * width))  # AdaLN-zero: starts as plain LayerNorm
        self.step_head = heads.step_head(width, init_ratio, init_concentration) if step_skip else None
        self.cache_head = heads.cache_head(width, init_reuse_prob) if cache_reuse else None
        self.sparse_head = heads.sparse_head(width, num_sparse_levels, init_dense_prob) if sparse_attention else None
        self.sampling = False

    def place_on(self, backbone: DiffusersDiT) -> RapidPolicy:
        """:meth:`check_backbone`, then this policy moved to the backbone's device; returns it."""
        self.check_backbone(backbone)
        return self.to(backbone.device)

    @classmethod
    def for_backbone(cls, backbone: DiffusersDiT, **config) -> RapidPolicy:
        """A fresh policy shaped for a diffusers backbone adapter (``SD3Backbone``, ``FluxBackbone``)."""
        tc = backbone.transformer.config
        return cls(backbone_family=backbone.family, latent_channels=tc.in_channels, patch_size=tc.patch_size,
                   pooled_dim=tc.pooled_projection_dim, **config)

    def check_backbone(self, backbone: DiffusersDiT) -> None:
        """Raise ValueError unless this policy was built for ``backbone``'s family and shapes (clear, before
        sampling: a mismatch would otherwise surface as a shape error deep inside torch)."""
        family = self.config.backbone_family
        if family != backbone.family:
            raise ValueError(f"this policy was trained for {family!r} pipelines (its config.json records "
                             f"backbone_family={family!r}), but the pipeline is {backbone.family!r}. Train one for "
                             "it with `rapid3 train --pipeline ...`.")
        # A throwaway width-1 policy gives the backbone's shapes without restating for_backbone's mapping.
        expected = RapidPolicy.for_backbone(backbone, hidden_dim=1).config
        keys = ("latent_channels", "patch_size", "pooled_dim")
        wrong = [f"{key} {self.config[key]} (the pipeline needs {expected[key]})" for key in keys
                 if self.config[key] != expected[key]]
        if wrong:
            raise ValueError(f"this {family} policy was trained for another model of the family: {', '.join(wrong)}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> RapidPolicy:
        """diffusers' loader (safetensors + config.json; never a pickled .bin, which could run code). The
        policy is tiny, so it is loaded eagerly: no ``accelerate`` needed and no warning about its absence."""
        kwargs.setdefault("low_cpu_mem_usage", False)
        kwargs.setdefault("use_safetensors", True)
        _check_local_path(Path(pretrained_model_name_or_path))
        if Path(pretrained_model_name_or_path).is_dir():  # a hand-edited config.json: name the field
            check_config_matches_weights(pretrained_model_name_or_path, f"{WEIGHTS_NAME}.safetensors", cls,
                                         WEIGHT_FACTS)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def reset(self, batch_size: int) -> None:
        """Nothing to clear: everything the policy uses is in the observation."""

    @torch.no_grad()
    def decide(self, obs: Observation) -> Actions:
        """Mode actions, or sampled ones with their log-probs when ``self.sampling``."""
        dist = self.distribution(obs)
        decision = dist.sample() if self.sampling else dist.mode()
        device = obs.t.device
        return Actions(next_t=self._next_t(obs, decision.ratio), reuse=decision.reuse.to(device),
                       level=decision.level.to(device),
                       log_prob=dist.log_prob(decision).to(device) if self.sampling else None,
                       step_ratio=None if decision.ratio is None else decision.ratio.to(device))

    def log_prob(self, obs: Observation, actions: Actions) -> torch.Tensor:
        """Log-probability (B,) of ``actions`` at ``obs`` under the current weights (differentiable)."""
        dist = self.distribution(obs)
        return dist.log_prob(self._decision(obs, actions, dist.has_cache))

    def entropy(self, obs: Observation) -> torch.Tensor:
        """Entropy (B,) of the joint action distribution at ``obs`` (differentiable)."""
        return self.distribution(obs).entropy()

    def distribution(self, obs: Observation) -> ActionDistribution:
        """The heads' distribution over this step's actions for every row of ``obs``."""
        z = self._trunk(obs)
        alpha, beta = (None, None) if self.step_head is None else heads.beta_parameters(self.step_head(z))
        return ActionDistribution(
            alpha=alpha, beta=beta,
            cache_logits=None if self.cache_head is None else self.cache_head(z),
            sparse_logits=None if self.sparse_head is None else self.sparse_head(z),
            has_cache=obs.has_cache.to(z.device))

    def _trunk(self, obs: Observation) -> torch.Tensor:
        """(B, hidden_dim) features: patch tokens modulated by the conditioning, pooled, plus the conditioning."""
        config, weight = self.config, self.token_proj.weight
        if obs.pooled.shape[-1] != config.pooled_dim:
            raise ValueError(f"RapidPolicy was built for pooled prompts of size {config.pooled_dim}; "
                             f"got {obs.pooled.shape[-1]}.")
        cast = lambda x: x.to(weight.device, weight.dtype)  # noqa: E731
        tokens = self.token_proj(cast(token_features(obs, latent_channels=config.latent_channels,
                                                     patch_size=config.patch_size)))
        time = cast(self.time_proj(obs.t.to(weight.device) * 1000))  # diffusers' timestep scale
        c = self.time_embed(time) + self.prompt_proj(cast(obs.pooled)) + self.state_proj(cast(state_features(obs)))
        shift, scale = self.modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        pooled = F.silu(self.norm(tokens) * (1 + scale) + shift).mean(dim=1)
        return pooled + c

    def _next_t(self, obs: Observation, ratio: torch.Tensor | None) -> torch.Tensor:
        if ratio is None:  # Step-Skip disabled: the base sampler's own grid
            return UniformSteps(self.config.default_steps).decide(obs).next_t
        if self.config.step_schedule == "geometric":
            return next_time_from_ratio(obs.t, ratio.to(obs.t.device))
        return next_time_on_grid(obs.t, ratio.to(obs.t.device), obs.schedule.uniform_times(obs.step_cap))

    def _decision(self, obs: Observation, actions: Actions, has_cache: torch.Tensor) -> Decision:
        """Actions as head choices on the policy's device."""
        device = has_cache.device
        reuse = actions.reuse.to(device).bool()
        if bool((reuse & ~has_cache).any()) or (self.cache_head is None and bool(reuse.any())):
            raise ValueError("These actions reuse a cache the policy could not reuse (probability 0).")
        if self.step_head is not None and actions.step_ratio is None:
            raise ValueError("These actions carry no Step-Skip ratio (Actions.step_ratio): score actions that a "
                             "RapidPolicy with Step-Skip decided.")
        ratio = None if self.step_head is None else actions.step_ratio.to(device)
        return Decision(ratio, reuse, actions.level.to(device).long())


def _check_local_path(path: Path) -> None:
    """Refuse a file, or a missing path that cannot be a Hub id ("org/name"), before diffusers asks the Hub
    about it (offline: a minute of retries, then a message about internet connections)."""
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file; RapidPolicy.from_pretrained takes a policy folder (config.json "
                                 "+ safetensors), as `rapid3 train` exports to RUN/policy.")
    text = str(path)
    if not path.exists() and (path.is_absolute() or text.startswith((".", "~")) or len(path.parts) > 2):
        raise FileNotFoundError(f"no policy folder at {path}; give the folder `rapid3 train` exports (RUN/policy).")


WEIGHTS_NAME = "diffusion_pytorch_model"
WEIGHT_FACTS = [
    Fact("hidden_dim", lambda c: c["hidden_dim"], lambda w: w["token_proj.weight"][0]),
    Fact("pooled_dim", lambda c: c["pooled_dim"], lambda w: w["prompt_proj.weight"][1]),
    Fact("3 x latent_channels x patch_size^2", lambda c: 3 * c["latent_channels"] * c["patch_size"] ** 2,
         lambda w: w["token_proj.weight"][1]),
    Fact("step_skip", lambda c: c["step_skip"], lambda w: "step_head.weight" in w),
    Fact("cache_reuse", lambda c: c["cache_reuse"], lambda w: "cache_head.weight" in w),
    Fact("sparse_attention", lambda c: c["sparse_attention"], lambda w: "sparse_head.weight" in w),
    Fact("num_sparse_levels", lambda c: c["num_sparse_levels"], lambda w: w["sparse_head.weight"][0] - 1),
]
"""What a policy's config.json implies about its weights' tensors (``check_config_matches_weights``)."""


def _check_config(*, step_skip: bool, cache_reuse: bool, sparse_attention: bool, num_sparse_levels: int,
                  default_steps: int | None) -> None:
    """What PolicyConfig does not check: the arguments a training run does not choose, and that a head learns."""
    if not (step_skip or cache_reuse or sparse_attention):
        raise ValueError("RapidPolicy needs at least one head enabled (step_skip, cache_reuse, sparse_attention).")
    if not 1 <= num_sparse_levels <= NUM_SPARSE_LEVELS:
        raise ValueError(f"num_sparse_levels must be in 1..{NUM_SPARSE_LEVELS} (the sampler's sparse levels), "
                         f"got {num_sparse_levels}.")
    if default_steps is not None and (not isinstance(default_steps, int) or default_steps < 1):
        raise ValueError(f"default_steps must be None or a positive integer, got {default_steps!r}.")
