"""Policies by name or folder: the ones shipped in the package (``default``) or any ``rapid3 train`` export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rapid_policy import RapidPolicy

SHIPPED_POLICIES = Path(__file__).resolve().parent.parent / "policies"
"""Policies shipped in the package, one folder each (safetensors, config.json, rapid3_policy.json)."""


def policy_folder(name_or_path: str | Path) -> Path:
    """A policy folder, or the shipped policy of that name; FileNotFoundError saying how to get one."""
    path = Path(name_or_path) if Path(name_or_path).is_dir() else SHIPPED_POLICIES / str(name_or_path)
    if not (path / "config.json").is_file():
        shipped = sorted(p.parent.name for p in SHIPPED_POLICIES.glob("*/config.json"))
        raise FileNotFoundError(
            f"no policy {str(name_or_path)!r}: neither a policy folder nor a shipped one "
            f"(shipped: {', '.join(shipped) or 'none'}). Train one with `rapid3 train --out RUN` and pass "
            "--policy RUN/policy.")
    return path


def load_policy(name_or_path: str | Path) -> RapidPolicy:
    """``RapidPolicy.from_pretrained`` of :func:`policy_folder`, in deterministic (inference) mode."""
    return RapidPolicy.from_pretrained(policy_folder(name_or_path)).eval()


def training_info(folder: str | Path) -> dict[str, Any]:
    """What ``rapid3 train`` recorded beside a policy (iteration, train_config, last eval); {} if nothing."""
    info = Path(folder) / "rapid3_policy.json"
    return json.loads(info.read_text()) if info.is_file() else {}
