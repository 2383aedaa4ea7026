"""Deployment cost profiles: what one step of every action costs on a given backbone, resolution,
device and dtype, eager and compiled (``rapid3 profile``).

A policy trained anywhere can then price its actions as the target machine pays them: the trainer's
``step_costs`` takes a profile file, and :meth:`CostProfile.step_costs` turns it into the
``MeasuredStepCosts`` the sampler counts equivalent steps K with.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backbones.base import Conditioning
from ..backbones.sparse_attention import NUM_SPARSE_LEVELS, keep_fraction
from .costs import MeasuredStepCosts, interleaved_times

FORMAT = "rapid3-profile/1"
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class Action:
    """One thing a step can do to an image: recompute (at a sparsity level) or reuse the cache."""

    name: str
    reuse: bool
    level: int


def step_actions() -> list[Action]:
    """Every action the sampler can run: full, each sparse level, reuse."""
    sparse = [Action(f"sparse {keep_fraction(level):.1f}", False, level) for level in range(1, NUM_SPARSE_LEVELS + 1)]
    return [Action("full", False, 0), *sparse, Action("reuse", True, 0)]


@dataclass
class Timing:
    """Seconds of one step of one image (all its guidance branches): median and range over the repeats,
    and the median relative to the full step's in the same mode."""

    median_s: float
    min_s: float
    max_s: float
    relative: float = 1.0


@dataclass
class ActionProfile:
    """One action's timings per mode (``eager``, ``compiled``) and, on CUDA, the peak memory its step
    allocates above what was resident before it."""

    name: str
    reuse: bool
    level: int
    timings: dict[str, Timing] = field(default_factory=dict)
    peak_step_bytes: int | None = None


@dataclass
class CostProfile:
    """A measured cost profile (see the module docstring); JSON with ``save`` / ``load``.

    ``setup``: what was profiled (architecture, layers, tokens, branches, device, dtype, torch version,
    repeats). ``cache_bytes_per_image_per_branch``: the cached block-stack residual of one image in one
    guidance branch (``cache_bytes_per_image`` covers all branches).
    """

    setup: dict[str, Any]
    actions: list[ActionProfile]
    cache_bytes_per_image_per_branch: int
    cache_bytes_per_image: int
    compile_seconds: float | None = None
    format: str = FORMAT

    def modes(self) -> list[str]:
        """The modes every action was timed in."""
        return [m for m in MODES if all(m in a.timings for a in self.actions)]

    def step_costs(self, mode: str | None = None) -> MeasuredStepCosts:
        """Each action's time over the full step's, in ``mode`` (default: compiled if timed, else eager)."""
        mode = mode or self.modes()[-1]
        if mode not in self.modes():
            raise ValueError(f"This profile has no {mode!r} timings; it has {', '.join(self.modes())}.")
        return MeasuredStepCosts({(a.reuse, a.level): a.timings[mode].relative for a in self.actions})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostProfile:
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a rapid3 cost profile (format {data.get('format')!r}, expected {FORMAT!r}).")
        actions = [ActionProfile(a["name"], a["reuse"], a["level"],
                                 {m: Timing(**t) for m, t in a["timings"].items()}, a["peak_step_bytes"])
                   for a in data["actions"]]
        return cls(data["setup"], actions, data["cache_bytes_per_image_per_branch"], data["cache_bytes_per_image"],
                   data.get("compile_seconds"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        """Read a profile written by ``save`` (``rapid3 profile --out``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No cost profile at {path}: write one with `rapid3 profile --out {path}`.")
        return cls.from_dict(json.loads(path.read_text()))

    def table(self) -> str:
        """A Markdown table: per action and mode, median ms [range] and the ratio to the full step."""
        modes = self.modes()
        head = ["action", *[f"{m} ms [min-max]" for m in modes], *[f"{m} / full" for m in modes]]
        if len(modes) == 2:
            head.append("compiled speedup")
        head.append("peak MiB")
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in self.actions:
            t = [a.timings[m] for m in modes]
            cells = [a.name, *[f"{x.median_s * 1e3:.1f} [{x.min_s * 1e3:.1f}-{x.max_s * 1e3:.1f}]" for x in t],
                     *[f"{x.relative:.3f}" for x in t]]
            if len(modes) == 2:
                cells.append(f"{t[0].median_s / t[1].median_s:.2f}x")
            cells.append("-" if a.peak_step_bytes is None else f"{a.peak_step_bytes / 2**20:.0f}")
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _synced(run: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def timed() -> object:
        out = run()
        if device.type == "cuda":  # queued kernels belong to this step's time
            torch.cuda.synchronize(device)
        return out

    return timed


@torch.no_grad()
def profile_backbone(backbone, latents: torch.Tensor, cond: Conditioning, *, branches: int, repeats: int = 5,
                     compile: bool = True, compile_backend: str = "inductor", actions: list[Action] | None = None,
                     setup: dict[str, Any] | None = None) -> CostProfile:
    """Time one step of every action on ``latents`` (one image's rows: ``branches`` of them, CFG
    branches stacked), eager and (``compile``) with compiled blocks, all interleaved.

    The compiled graphs are built in a first untimed round (its wall-clock is ``compile_seconds``).
    ``actions``: a subset of ``step_actions()`` (which must include "full", the unit), to bound compile time.
    """
    if latents.shape[0] != branches:
        raise ValueError(f"Profile one image: latents need {branches} rows (its guidance branches), "
                         f"got {latents.shape[0]}.")
    device = latents.device
    sigma = torch.full((branches,), 0.5, device=device)
    residual = backbone.forward(latents, sigma, cond).residual
    actions = step_actions() if actions is None else actions
    if not any(a.name == "full" for a in actions):
        raise ValueError("A profile needs the full step: every cost is relative to it.")

    def step(action: Action) -> Callable[[], object]:
        return _synced(lambda: backbone.forward(latents, sigma, cond, level=action.level,
                                                reuse_residual=residual if action.reuse else None), device)

    modes = list(MODES if compile else MODES[:1])
    compile_seconds = _compile(backbone, [step(a) for a in actions], compile_backend) if compile else None
    runners = {(mode, a.name): _in_mode(backbone, mode, compile_backend, step(a)) for a in actions for mode in modes}
    times = interleaved_times(runners, repeats)
    backbone.uncompile_blocks()
    profiles = []
    for a in actions:
        timings = {m: _timing(times[(m, a.name)], times[(m, "full")]) for m in modes}
        profiles.append(ActionProfile(a.name, a.reuse, a.level, timings, _peak_step_bytes(step(a), device)))
    per_branch = residual[0].numel() * residual.element_size()
    info = {"image_tokens": backbone.token_counts(latents, cond)[0], "text_tokens": backbone.token_counts(
        latents, cond)[1], "branches": branches, "device": str(device), "dtype": str(backbone.dtype()),
        "torch": torch.__version__, "repeats": repeats, "blocks": len(backbone.blocks()),
        "compile_backend": compile_backend if compile else None,
        "parameters": sum(p.numel() for p in backbone.transformer.parameters()), **(setup or {})}
    return CostProfile(info, profiles, per_branch, per_branch * branches, compile_seconds)


def _compile(backbone, steps: list[Callable[[], object]], backend: str) -> float:
    tic = time.perf_counter()
    backbone.compile_blocks(backend=backend)
    for run in steps:
        run()
    backbone.uncompile_blocks()
    return time.perf_counter() - tic


def _in_mode(backbone, mode: str, backend: str, run: Callable[[], object]) -> Callable[[], object]:
    """``run`` with the blocks compiled or eager (a flag flip: the compiled graphs stay cached)."""
    def switched() -> object:
        if mode == "compiled":
            backbone.compile_blocks(backend=backend)
        else:
            backbone.uncompile_blocks()
        return run()

    return switched


def _timing(times: list[float], full: list[float]) -> Timing:
    median = statistics.median(times)
    return Timing(median, min(times), max(times), median / statistics.median(full))


def _peak_step_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """CUDA peak allocation of one step above what was resident before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return torch.cuda.max_memory_allocated(device) - before
