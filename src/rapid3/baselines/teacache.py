"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model",
2024) as a controller on the pipeline's uniform grid.

Each step the first block's timestep-modulated input is probed (``obs.probe("modulated_input")``:
the prompt branch, charged to the sample). Its relative L1 change since the previous step is mapped by a polynomial,
fitted on the backbone by :func:`calibrate`, to an estimate of the relative change of the model
output, and accumulated. While the accumulated estimate stays below ``threshold`` the step reuses
the cached residual; once it reaches the threshold the step recomputes and the accumulator resets.
The first and the last step always recompute, as in TeaCache. State is kept per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..accel.actions import Actions, Observation
from ..accel.controllers import FullCompute, UniformSteps
from ..accel.sampler import Sampler
from ..backbones.base import Conditioning

IDENTITY = (1.0, 0.0)  # rescaling polynomial of an uncalibrated TeaCache: the raw relative change


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per row: ``mean |current - previous| / mean |previous|`` over all but the batch dimension."""
    change = (current - previous).abs().flatten(1).mean(1)
    return change / previous.abs().flatten(1).mean(1).clamp_min(1e-12)


class TeaCache(UniformSteps):
    """Reuse the cached residual while the accumulated, rescaled change of the modulated input
    stays below ``threshold``.

    ``coefficients`` is the rescaling polynomial, highest degree first (``numpy.polyval``), from
    :func:`calibrate`; the default uses the raw relative change.
    """

    def __init__(self, threshold: float, coefficients: Sequence[float] = IDENTITY,
                 num_steps: int | None = None) -> None:
        super().__init__(num_steps)
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}.")
        self.threshold = float(threshold)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.previous: torch.Tensor | None = None  # each sample's modulated input at its previous step
        self.accumulated = torch.zeros(0, dtype=torch.float64)

    def reset(self, batch_size: int) -> None:
        self.previous = None
        self.accumulated = torch.zeros(batch_size, dtype=torch.float64)

    def rescale(self, change: torch.Tensor) -> torch.Tensor:
        """The calibrated estimate of the output's relative change (never negative)."""
        return torch.from_numpy(np.polyval(self.coefficients, change.double().numpy())).clamp_min(0.0)

    def decide(self, obs: Observation) -> Actions:
        feature = obs.probe("modulated_input")
        ids, next_t = obs.sample_ids, self.next_times(obs)
        if self.previous is None:
            self.previous = feature.new_zeros((len(self.accumulated), *feature.shape[1:]))
        seen, last = obs.step_index > 0, next_t == 0
        if bool(seen.any()):
            self.accumulated[ids[seen]] += self.rescale(relative_l1(feature[seen], self.previous[ids[seen]]))
        reuse = obs.has_cache & seen & ~last & (self.accumulated[ids] < self.threshold)
        self.accumulated[ids[~reuse]] = 0.0
        self.previous[ids] = feature
        return Actions(next_t=next_t, reuse=reuse, level=torch.zeros(len(obs), dtype=torch.long))


class _ChangeRecorder(FullCompute):
    """Full compute that records, per step, each sample's modulated input and last model output."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def decide(self, obs: Observation) -> Actions:
        self.inputs.append(obs.probe("modulated_input"))
        self.outputs.append(obs.last_velocity.clone())  # the output of the previous step
        return super().decide(obs)


def calibrate(sampler: Sampler, noise: torch.Tensor, cond: Conditioning, *, uncond: Conditioning | None = None,
              guidance_scale: float = 1.0, degree: int = 4) -> np.ndarray:
    """Fit TeaCache's rescaling polynomial on a backbone (``numpy.polyfit``, highest degree first).

    Runs full compute on ``noise`` (a few images suffice) and pairs, for every sample and step, the
    relative L1 change of the modulated input with that of the guided model output (velocity)
    between the same consecutive steps.
    """
    recorder = _ChangeRecorder()
    sampler.sample(noise, cond, recorder, uncond=uncond, guidance_scale=guidance_scale)
    inputs, outputs = recorder.inputs, recorder.outputs
    # outputs[k + 1] is the velocity computed at step k, so step k's output change is
    # relative_l1(outputs[k + 1], outputs[k]), defined from k = 1 to the second-to-last step.
    x = torch.cat([relative_l1(inputs[k], inputs[k - 1]) for k in range(1, len(outputs) - 1)])
    y = torch.cat([relative_l1(outputs[k + 1], outputs[k]) for k in range(1, len(outputs) - 1)])
    if len(x) <= degree:
        raise ValueError(f"calibration has {len(x)} points, too few for a degree-{degree} fit: "
                         "use more steps or images.")
    return np.polyfit(x.double().numpy(), y.double().numpy(), degree)
