"""The block-stack residual cache: each sample's last full computations, per guidance branch, and what a
cache step makes of them — the last residual as it is (reuse, FORA's order 0) or its extrapolation in
time (forecast of order 1 or 2, TaylorSeer's form).

Cache modes, as the sampler records them (``CACHE_MODES[mode]``): 0 recompute, 1 reuse (order 0),
2 forecast order 1, 3 forecast order 2. A controller asks for a cache step with ``Actions.reuse`` and
for its order with ``Actions.order`` (None: order 0, today's reuse), so ``mode = reuse * (1 + order)``.

The forecast is Newton's divided-difference polynomial through the sample's last ``order + 1``
residuals at their actual (uneven) noise levels sigma, evaluated at the current sigma: exact for
residuals that are polynomials of degree <= order in sigma. TaylorSeer writes the same polynomial as a
Taylor series whose derivatives are finite differences; on uneven steps divided differences are the
form that stays exact. Sigma, not t, is the variable because it is the time the model is conditioned on.
"""

from __future__ import annotations

import torch

CACHE_MODES = ("recompute", "reuse", "forecast1", "forecast2")
MAX_FORECAST_ORDER = len(CACHE_MODES) - 2


def check_forecast_order(order: int, *, name: str = "order") -> int:
    """``order`` if it is a forecast order the cache knows (0..MAX_FORECAST_ORDER), else ValueError."""
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_FORECAST_ORDER:
        raise ValueError(f"{name} must be a forecast order in 0..{MAX_FORECAST_ORDER} (0 reuses the cached "
                         f"residual as it is; 1 and 2 extrapolate it in time), got {order!r}.")
    return order


def cache_mode(reuse: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Per sample, the index into ``CACHE_MODES`` of ``reuse`` (bool) with forecast ``order`` (None: 0)."""
    order = torch.zeros_like(reuse, dtype=torch.long) if order is None else order.long()
    return torch.where(reuse.bool(), 1 + order, torch.zeros_like(order))


def forecast_flops(order: int, numel: int) -> int:
    """Elementwise FLOPs of one forecast of ``numel`` residual values: the order * (order + 1) / 2 divided
    differences (a subtraction and a division each), then a multiply-add per Newton term; order 0 is a copy."""
    return order * (order + 1) * numel + 2 * order * numel


class ResidualCache:
    """The block-stack residuals of each sample's last ``depth`` full computations, one per guidance branch,
    newest first, with the noise level each was computed at.

    ``depth`` is the highest forecast order the sampler allows plus one; with depth 1 this is the
    single-residual cache of plain reuse. Rows of samples never mix: every operation indexes samples.
    """

    def __init__(self, batch_size: int, branches: int, depth: int = 1) -> None:
        self.branches, self.depth = branches, depth
        self.count = torch.zeros(batch_size, dtype=torch.long)
        self.sigmas = torch.zeros(depth, batch_size, dtype=torch.float64)
        self.residuals: torch.Tensor | None = None  # (depth, batch, branches, ...)

    @property
    def filled(self) -> torch.Tensor:
        """Which samples have at least one full computation cached."""
        return self.count > 0

    @property
    def row_numel(self) -> int:
        """Values in one sample's residual of one branch (0 before anything is stored)."""
        return 0 if self.residuals is None else self.residuals[0, 0, 0].numel()

    def store(self, idx: torch.Tensor, residual_rows: torch.Tensor, sigma: torch.Tensor) -> None:
        """``residual_rows`` is (branches * k, ...) in branch-major order, as the rows were run; ``sigma`` (k,)."""
        per_sample = residual_rows.unflatten(0, (self.branches, len(idx))).transpose(0, 1)
        if self.residuals is None:
            self.residuals = per_sample.new_zeros((self.depth, len(self.count), *per_sample.shape[1:]))
        if self.depth > 1:  # age the history by one: the oldest residual falls off
            self.residuals[1:, idx] = self.residuals[:-1, idx].clone()
            self.sigmas[1:, idx] = self.sigmas[:-1, idx].clone()
        self.residuals[0, idx] = per_sample
        self.sigmas[0, idx] = sigma.double()
        self.count[idx] = (self.count[idx] + 1).clamp_max(self.depth)

    def rows(self, idx: torch.Tensor, sigma: torch.Tensor | None = None, order: int = 0) -> torch.Tensor:
        """The residual for a cache step of the samples ``idx`` at noise levels ``sigma``, in the branch-major
        row order the backbone runs: the newest residual itself for order 0 (bit for bit today's reuse),
        else its order-``order`` extrapolation to ``sigma``."""
        if order == 0:
            return self.residuals[0, idx].transpose(0, 1).flatten(0, 1)
        if bool((self.count[idx] <= order).any()):
            raise ValueError(f"A forecast of order {order} needs {order + 1} cached full computations; "
                             f"some samples hold fewer ({self.count[idx].min().item()}).")
        forecast = newton_forecast(self.residuals[:order + 1, idx], self.sigmas[:order + 1, idx], sigma.double())
        return forecast.transpose(0, 1).flatten(0, 1)


def newton_forecast(values: torch.Tensor, nodes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The interpolating polynomial through ``values[j]`` at ``nodes[j]`` (j = 0..n, per sample along dim 1),
    evaluated at ``at`` (per sample), in Newton's form; ``values`` (n+1, k, ...), ``nodes`` (n+1, k).

    The node products are formed in float64 per sample; the differences run in the residuals' dtype."""
    n = values.shape[0] - 1
    shape = (-1, *[1] * (values.ndim - 2))
    table = list(values.unbind(0))  # table[j] becomes the divided difference f[x_0..x_j] (in place, newest first)
    for level in range(1, n + 1):
        for j in range(n, level - 1, -1):
            gap = (nodes[j - level] - nodes[j]).float().view(shape)
            table[j] = (table[j - 1] - table[j]) / gap
    result, weight = table[0], torch.ones_like(at)
    for j in range(1, n + 1):
        weight = weight * (at - nodes[j - 1])
        result = result + weight.float().view(shape) * table[j]
    return result
