"""Prompt files for real pipelines: ``.txt`` (one prompt per line) or ``.jsonl`` (``{"prompt": ...}`` per line).

    prompts = read_prompts("coco_captions.txt")
    train, heldout = split_prompts(prompts, heldout=64, seed=0)

Blank lines are skipped in both formats; surrounding whitespace is stripped. Every problem (no
file, an unknown suffix, a JSONL line without a ``"prompt"`` string, no prompt at all) is a
``ValueError`` or ``FileNotFoundError`` naming the file and line, raised before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUFFIXES = (".txt", ".jsonl")
MAX_BYTES = 1 << 30
"""Largest prompt file read (1 GiB, tens of millions of captions): anything bigger is not a prompt list."""


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in a ``.txt`` or ``.jsonl`` file, in file order (duplicates kept: they weight sampling)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"prompt file {path}: expected a .txt file (one prompt per line) or a .jsonl file "
                         f"({{\"prompt\": ...}} per line), got suffix {path.suffix or '(none)'!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"prompt file {path} is {path.stat().st_size / 2**30:.1f} GiB; prompt files are read whole, "
                         f"up to {MAX_BYTES / 2**30:.0f} GiB: is it the right file? Give a sample of the prompts.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {error.start}: {error.reason}).") from None
    read = _jsonl_prompt if path.suffix == ".jsonl" else _text_prompt
    prompts = [read(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt: write one prompt per line.")
    return prompts


def split_prompts(prompts: list[str], heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out): ``heldout`` prompts drawn at random (seeded) for evaluation, the rest for training."""
    if not 0 < heldout < len(prompts):
        raise ValueError(f"cannot hold out {heldout} of {len(prompts)} prompts for evaluation and train on the "
                         "rest: give more prompts, fewer evaluation prompts, or a separate evaluation prompt file.")
    picked = set(np.random.default_rng(seed).choice(len(prompts), size=heldout, replace=False).tolist())
    train = [p for i, p in enumerate(prompts) if i not in picked]
    return train, [prompts[i] for i in sorted(picked)]


def _text_prompt(line: str, where: str) -> str:
    return line.strip()


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not a JSON line ({error.msg}); write {{\"prompt\": \"...\"}}.") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: expected {{\"prompt\": \"<non-empty text>\"}}, got {line.strip()[:80]}")
    return prompt.strip()
