"""Policies by name or folder: the ones shipped in the package (``default``) or any ``rapid3 train`` export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .rapid_policy import RapidPolicy

logger = logging.getLogger("rapid3")
SHIPPED_POLICIES = Path(__file__).resolve().parent.parent / "policies"
"""Policies shipped in the package, one folder each (safetensors, config.json, rapid3_policy.json)."""


def policy_folder(name_or_path: str | Path) -> Path:
    """The shipped policy of that name, or a policy folder; FileNotFoundError saying how to get one.

    Precedence: a bare shipped name (``default``) is the shipped policy even when the working directory
    holds a folder of that name; write the folder as a path (``./default``) to use it instead.
    """
    text = str(name_or_path)
    shipped = sorted(p.parent.name for p in SHIPPED_POLICIES.glob("*/config.json"))
    if text in shipped and not isinstance(name_or_path, Path):
        if Path(text).is_dir():
            logger.warning("--policy %s is the shipped policy; the folder ./%s is not used (write ./%s for it).",
                           text, text, text)
        return SHIPPED_POLICIES / text
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"the folder {path} is not a policy (no config.json); give the policy folder a run "
                                "exports (RUN/policy) or a shipped name (" + (", ".join(shipped) or "none") + ").")
    if not path.is_dir():
        raise FileNotFoundError(
            f"no policy {text!r}: neither a policy folder nor a shipped one (shipped: {', '.join(shipped) or 'none'}). "
            "Train one with `rapid3 train --out RUN` and pass --policy RUN/policy.")
    return path


def load_policy(name_or_path: str | Path) -> RapidPolicy:
    """``RapidPolicy.from_pretrained`` of :func:`policy_folder`, in deterministic (inference) mode."""
    return RapidPolicy.from_pretrained(policy_folder(name_or_path)).eval()


def training_info(folder: str | Path) -> dict[str, Any]:
    """What ``rapid3 train`` recorded beside a policy (iteration, train_config, last eval); {} if nothing."""
    info = Path(folder) / "rapid3_policy.json"
    return json.loads(info.read_text()) if info.is_file() else {}
