"""Upper bounds on every user-sized knob, checked before any work, with a deliberate way past them.

A typo (``--steps 100000000``, ``--scale 2000``) should cost one line, not an hour of CPU or 16 GB of
memory. Each bound is far above any sensible use (docs/bad_inputs.md, "Limits"); ``--beyond-limits``
lifts them all for whoever really means it. Lower bounds and types are each command's own checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OVERRIDE_FLAG = "--beyond-limits"


@dataclass(frozen=True)
class Limit:
    """The largest sensible value of a knob, and why."""

    maximum: int
    why: str


LIMITS = {
    "steps": Limit(1000, "diffusion samplers use 1-100 steps; 1000 is a training schedule's full length"),
    "scale": Limit(64, "32 x 64 = 2048 pixels a side"),
    "batch": Limit(1024, "images held in memory at once"),
    "prompts": Limit(100_000, "images written by one command"),
    "image_size": Limit(4096, "pixels a side; SD3 and FLUX are trained at 1024"),
    "prompt_chars": Limit(2000, "characters of one prompt; text encoders read 77 to 512 tokens"),
}
SEED_MAX = 2**32 - 1
"""Seeds are 32-bit (numpy's and torch's generators both take them; image i of a batch is seeded seed + i)."""


def check_limits(values: list[tuple[str, str, int | None]], override: bool = False) -> None:
    """``values``: (knob of ``LIMITS``, what the user gave as they would name it, its value or None). ValueError
    for the first value over its limit, naming it, the limit and the way past it; nothing when ``override``."""
    if override:
        return
    for knob, label, value in values:
        limit = LIMITS[knob]
        if value is not None and value > limit.maximum:
            raise ValueError(f"{label} is {value:,}, over its limit of {limit.maximum:,} ({limit.why}); pass "
                             f"{OVERRIDE_FLAG} if you mean it.")


def check_finite(flag: str, value: float | None) -> None:
    """ValueError for a NaN or infinite number (a NaN passes every comparison-based range check silently)."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}.")


def check_seed(flag: str, seed: int) -> None:
    """ValueError unless ``seed`` is a 32-bit seed (0 .. 2**32 - 1)."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{flag} must lie in 0..{SEED_MAX} (a 32-bit seed), got {seed}.")
