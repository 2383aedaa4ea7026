"""The one sampler loop: rectified-flow Euler with classifier-free guidance, driven per sample by a
controller, with sub-batching so that no skipped work is computed and cost accounting as it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone, Conditioning, TimeSchedule
from ..backbones.sparse_attention import NUM_SPARSE_LEVELS
from ..common.limits import check_finite
from .actions import Actions, Controller, Observation
from .cache import MAX_FORECAST_ORDER, ResidualCache, cache_mode, check_forecast_order, forecast_flops
from .costs import MeasuredStepCosts, SampleStats, StepRecord
from .solvers import check_solver, multistep2_velocity


@dataclass
class SampleResult:
    """Final latents, per-sample cost accounting, and (if asked) every observation and decision."""

    latents: torch.Tensor
    stats: SampleStats
    trace: list[tuple[Observation, Actions]] = field(default_factory=list, repr=False)


class Sampler:
    """Runs a batch from noise to t = 0 on a backbone, as a controller decides step by step.

    Every sample keeps its own time. Each step, active samples are grouped by (cache mode, sparsity
    level) and each group runs as one sub-batch (both guidance branches of an image together), so
    samples that reuse or forecast compute no block and an image's result does not depend on its batch
    mates. ``step_cap`` bounds the executed steps per sample: the last one goes to t = 0.
    Equivalent steps count FLOPs, or measured wall-clock when ``step_costs`` are given.
    ``solver`` integrates each step (``rapid3.accel.solvers``): "euler" (the pipelines' own, the default)
    or "multistep2".
    """

    def __init__(self, backbone: Backbone, *, step_cap: int = 28, progress: bool = False,
                 step_costs: MeasuredStepCosts | None = None, solver: str = "euler") -> None:
        if not isinstance(step_cap, int) or step_cap < 1:
            raise ValueError(f"step_cap must be a positive integer, got {step_cap!r}.")
        self.backbone, self.step_cap, self.progress, self.step_costs = backbone, step_cap, progress, step_costs
        self.solver = check_solver(solver)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning, controller: Controller, *,
               uncond: Conditioning | None = None, guidance_scale: float = 1.0,
               keep_trace: bool = False) -> SampleResult:
        """Denoise ``noise`` (t = 1) to t = 0; classifier-free guidance when ``uncond`` is given."""
        branches = self._check_inputs(noise, cond, uncond, guidance_scale)
        schedule = self.backbone.schedule(noise)
        run = _Run(self, noise, branches, guidance_scale, schedule, controller)
        trace = []
        with tqdm(total=self.step_cap, desc="denoising", unit="step", disable=not self.progress, leave=False) as bar:
            while bool((run.t > 0).any()):
                obs, actions = run.step()
                if keep_trace:
                    trace.append((obs, actions))
                bar.update(1)
        return SampleResult(run.x, run.stats, trace)

    def _check_inputs(self, noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                      guidance_scale: float) -> list[Conditioning]:
        self.backbone.check_latents(noise)
        check_finite("guidance_scale", guidance_scale)  # NaN guidance would give black images, exit 0
        if len(cond) != noise.shape[0]:
            raise ValueError(f"The conditioning has {len(cond)} samples but the latents have {noise.shape[0]}.")
        if uncond is None:
            if guidance_scale != 1.0:
                raise ValueError("guidance_scale != 1 needs `uncond` (the negative-prompt conditioning).")
            return [cond]
        if len(uncond) != len(cond):
            raise ValueError(f"`uncond` has {len(uncond)} samples but `cond` has {len(cond)}.")
        return [uncond, cond]


class _Run:
    """The state of one batch being sampled."""

    def __init__(self, sampler: Sampler, noise: torch.Tensor, branches: list[Conditioning], guidance_scale: float,
                 schedule: TimeSchedule, controller: Controller) -> None:
        self.backbone, self.step_cap, self.step_costs = sampler.backbone, sampler.step_cap, sampler.step_costs
        self.solver = sampler.solver
        self.branches, self.guidance_scale = branches, guidance_scale
        self.schedule, self.controller = schedule, controller
        batch = noise.shape[0]
        self.x = noise.float().clone()
        self.t = torch.ones(batch, dtype=torch.float64)
        self.steps = torch.zeros(batch, dtype=torch.long)
        self.refresh_latents = self.x.clone()
        self.last_velocity = torch.zeros_like(self.x)
        self.last_h = torch.zeros(batch, dtype=torch.float64)  # sigma step of each sample's previous step (0: none)
        self.forecast_order = check_forecast_order(getattr(controller, "forecast_order", 0),
                                                   name=f"{type(controller).__name__}.forecast_order")
        self.cache = ResidualCache(batch, len(branches), depth=self.forecast_order + 1)
        self.cond = Conditioning.cat(branches)  # branch-major: row b * batch + i
        self.probe_flops = torch.zeros(batch, dtype=torch.float64)  # charged to the sample's next step
        self.probe_seconds = torch.zeros(batch, dtype=torch.float64)
        self.probe_blocks = torch.zeros(batch, dtype=torch.long)
        self.stats = SampleStats.empty(batch, self._flops_per_image(noise, level=0, reuse=False))
        controller.reset(batch)

    def _flops_per_image(self, latents: torch.Tensor, *, level: int, reuse: bool) -> float:
        non_attention, attention = self.backbone.row_flops(latents, self.cond, level=level, reuse=reuse)
        return float((non_attention + attention) * len(self.branches))

    def step(self) -> tuple[Observation, Actions]:
        """One step of every running sample. The bookkeeping (times, step counts, cache flags, accounting)
        lives on the host, so the device is read once a step: the controller's actions, in one copy
        (none when it decides on the host); on CUDA, timing adds one synchronisation per sub-batch."""
        active = (self.t > 0).nonzero().squeeze(1)
        obs = self._observe(active)
        tic = _clock(self.x)
        actions = self.controller.decide(obs)
        controller_seconds = (_clock(self.x) - tic) / len(active)
        next_t, mode, level = self._validate(actions, obs)
        velocity = torch.empty_like(obs.latents)
        group_of_row = mode.long() * (NUM_SPARSE_LEVELS + 1) + level  # one read of the groups, not one per row
        for group in torch.unique(group_of_row).tolist():
            group_mode, group_level = divmod(group, NUM_SPARSE_LEVELS + 1)
            rows = (group_of_row == group).nonzero().squeeze(1)
            velocity[rows] = self._run_group(active[rows], obs.t[rows], next_t[rows], group_mode, group_level,
                                             controller_seconds)
        self._advance(active, obs, next_t, velocity)
        self.t[active] = next_t
        self.steps[active] += 1
        self.stats.controller_seconds[active] += controller_seconds
        return obs, actions

    def _advance(self, active: torch.Tensor, obs: Observation, next_t: torch.Tensor, velocity: torch.Tensor) -> None:
        """Move the active samples to ``next_t`` with the solver; remember the velocity and step size."""
        h = (self.schedule.sigma(next_t) - obs.sigma).double()
        step_velocity = velocity
        if self.solver == "multistep2":
            step_velocity = multistep2_velocity(velocity, self.last_velocity[active], h, self.last_h[active])
        # Euler: exactly the pipelines' float32 update x + (sigma_next - sigma) * v.
        self.x[active] = obs.latents + h.float().view(-1, *[1] * (velocity.ndim - 1)) * step_velocity
        self.last_velocity[active] = velocity
        self.last_h[active] = h

    def _observe(self, active: torch.Tensor) -> Observation:
        x = self.x[active]
        return Observation(
            sample_ids=active, latents=x, t=self.t[active], sigma=self.schedule.sigma(self.t[active]),
            step_index=self.steps[active], refresh_delta=x - self.refresh_latents[active],
            last_velocity=self.last_velocity[active], has_cache=self.cache.filled[active],
            spent=self.stats.equivalent_steps[active].clone(), pooled=self.branches[-1].pooled[active],
            step_cap=self.step_cap, schedule=self.schedule, probe=lambda kind: self._probe(active, kind),
            cache_depth=self.cache.count[active].clone())

    def _probe(self, active: torch.Tensor, kind: str) -> torch.Tensor:
        x, cond = self.x[active], self.branches[-1].select(active)
        tic = _clock(x)
        features, blocks = self.backbone.probe(x, self.schedule.sigma(self.t[active]), cond, kind)
        self.probe_seconds[active] += (_clock(x) - tic) / len(active)
        self.probe_blocks[active] += blocks
        self.probe_flops[active] += self.backbone.probe_flops(x, cond, kind)
        return features

    def _validate(self, actions: Actions, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name, n = type(self.controller).__name__, len(obs)
        for field_name in ("next_t", "reuse", "level"):
            shape = tuple(getattr(actions, field_name).shape)
            if shape != (n,):
                raise ValueError(f"{name} returned {field_name} of shape {shape}; expected ({n},), one per sample.")
        next_t, reuse, level = _on_host(actions)
        bad_time = ~torch.isfinite(next_t) | (next_t < 0) | (next_t >= obs.t)
        bad_level = (level < 0) | (level > NUM_SPARSE_LEVELS)
        no_cache = reuse & ~obs.has_cache
        if bool((bad_time | bad_level | no_cache).any()):  # one read when all is well
            if bool(bad_time.any()):
                raise ValueError(f"{name} returned next_t outside [0, t): every step must move strictly toward "
                                 "t = 0.")
            if bool(bad_level.any()):
                raise ValueError(f"{name} returned a sparsity level outside 0..{NUM_SPARSE_LEVELS}: "
                                 f"{level.tolist()}.")
            raise ValueError(f"{name} asked to reuse the cache for samples that have none yet (their first step).")
        mode = self._check_order(actions, obs, reuse)
        last = (obs.step_index + 1 >= self.step_cap) | (next_t < self.schedule.t_min / 2)
        next_t = torch.where(last, torch.zeros_like(next_t), next_t)
        return next_t, mode, torch.where(reuse, torch.zeros_like(level), level)

    def _check_order(self, actions: Actions, obs: Observation, reuse: torch.Tensor) -> torch.Tensor:
        """The cache mode of each row; ValueError for a forecast order the rows' histories cannot give."""
        name, order = type(self.controller).__name__, actions.order
        if order is None:
            return cache_mode(reuse, None)
        if tuple(order.shape) != (len(obs),) or bool((order < 0).any()) or bool((order > MAX_FORECAST_ORDER).any()):
            raise ValueError(f"{name} returned forecast orders {order.tolist()}; expected one per sample in "
                             f"0..{MAX_FORECAST_ORDER} (0 reuse, 1 and 2 forecast).")
        beyond = reuse & (order.long() >= obs.cache_depth)
        if bool(beyond.any()):
            wanted, held = int(order[beyond].max()), int(obs.cache_depth[beyond].min())
            fix = (f"set {name}.forecast_order = {wanted} so the sampler keeps {wanted + 1}"
                   if wanted > self.forecast_order else "ask at most Observation.forecast_orders() per sample")
            raise ValueError(f"{name} asked for a forecast of order {wanted} from a cache holding {held} full "
                             f"computation(s), but order k needs k + 1: {fix}.")
        return cache_mode(reuse, order)

    def _run_group(self, idx: torch.Tensor, t: torch.Tensor, next_t: torch.Tensor, mode: int, level: int,
                   controller_seconds: float) -> torch.Tensor:
        """Run one sub-batch (all guidance branches) in one cache mode, update its cache, account for it,
        return velocities. The forecast, if any, is timed with the forward: it is part of the step's cost."""
        k, n_branches = len(idx), len(self.branches)
        rows = idx.repeat(n_branches) + torch.arange(n_branches).repeat_interleave(k) * len(self.t)
        latents = self.x[idx].repeat(n_branches, *[1] * (self.x.ndim - 1))
        sigma = self.schedule.sigma(t)
        reuse, order = mode > 0, max(mode - 1, 0)
        tic = _clock(latents)
        residual = self.cache.rows(idx, sigma, order) if reuse else None
        out = self.backbone.forward(latents, sigma.repeat(n_branches), self.cond.select(rows), level=level,
                                    reuse_residual=residual)
        seconds = (_clock(latents) - tic) / k
        if not reuse:
            self.cache.store(idx, out.residual, sigma)
            self.refresh_latents[idx] = self.x[idx]
        velocity = out.velocity.unflatten(0, (n_branches, k))
        guided = velocity[0] if n_branches == 1 else velocity[0] + self.guidance_scale * (velocity[1] - velocity[0])
        self._account(idx, t, next_t, (reuse, level, order), out.blocks_run, out.attention_flops / k,
                      seconds + controller_seconds)
        return guided

    def _account(self, idx: torch.Tensor, t: torch.Tensor, next_t: torch.Tensor, action: tuple[bool, int, int],
                 blocks: int, attention_flops: float, seconds: float) -> None:
        """Charge one group's step to its samples: the forward's FLOPs, a forecast's elementwise FLOPs (every
        guidance branch), and any probe run for the sample's decision."""
        reuse, level, order = action
        non_attention, _ = self.backbone.row_flops(self.x[idx[:1]], self.cond, level=level, reuse=reuse)
        forecast = forecast_flops(order, self.cache.row_numel) * len(self.branches)
        flops = non_attention * len(self.branches) + attention_flops + forecast + self.probe_flops[idx]
        seconds = seconds + self.probe_seconds[idx]
        blocks = blocks + self.probe_blocks[idx]
        equivalent = flops / self.stats.full_step_flops
        if self.step_costs is not None:
            equivalent = self.step_costs.of(reuse, level, order) + self.probe_flops[idx] / self.stats.full_step_flops
        for pending in (self.probe_flops, self.probe_seconds, self.probe_blocks):
            pending[idx] = 0
        columns = zip(idx.tolist(), t.tolist(), next_t.tolist(), blocks.tolist(), flops.tolist(),
                      equivalent.tolist(), seconds.tolist())  # host tensors, read once per sub-batch
        for sample, t_i, next_i, blocks_i, flops_i, equivalent_i, seconds_i in columns:
            self.stats.add(sample, StepRecord(
                t=t_i, next_t=next_i, reuse=reuse, level=level, blocks=blocks_i, flops=flops_i,
                attention_flops=attention_flops, equivalent_steps=equivalent_i, seconds=seconds_i, order=order))


def _on_host(actions: Actions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next_t float64, reuse bool, level long) on the host, copied in one transfer: the one device read
    a step needs, since grouping samples into sub-batches is decided in Python."""
    parts = (actions.next_t, actions.reuse, actions.level)
    device = next((p.device for p in parts if p.device.type != "cpu"), torch.device("cpu"))
    host = torch.stack([p.to(device, torch.float64) for p in parts]).cpu()
    return host[0], host[1].bool(), host[2].long()


def _clock(reference: torch.Tensor) -> float:
    """Wall-clock time, after the device has finished queued work (honest GPU timings)."""
    if reference.is_cuda:
        torch.cuda.synchronize(reference.device)
    return time.perf_counter()
