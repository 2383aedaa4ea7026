"""What a training run writes into its folder: the per-iteration log (JSONL + TensorBoard), the exported
policy, and the folder itself, proven writable before anything is loaded."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ..common.jsonl import read_records, rewrite_records
from ..policy import RapidPolicy

LOG, TENSORBOARD, EXPORT = "log.jsonl", "tensorboard", "policy"


class RunLog:
    """One JSONL record and TensorBoard scalars per iteration. On resume, the records of the
    interrupted run past the checkpoint are dropped from both, so the logs read as one run."""

    def __init__(self, out: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.path = out / LOG
        if self.path.exists():  # the checkpoint is the truth: a torn tail or records past it are dropped
            rewrite_records(self.path, [r for r in read_records(self.path) if r.get("iteration", 0) <= start])
        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start + 1)

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"iteration": iteration, "time": time.time(), **metrics}) + "\n")
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def export_policy(policy: RapidPolicy, path: Path, *, iteration: int, train_config: dict[str, Any],
                  last_eval: dict[str, float]) -> None:
    """The policy as safetensors + config.json, with the run's config and last evaluation beside it."""
    policy.save_pretrained(path)
    info = {"iteration": iteration, "train_config": train_config, "eval": last_eval}
    (path / "rapid3_policy.json").write_text(json.dumps(info, indent=2) + "\n")


def make_run_folder(out: Path) -> None:
    """Create the run folder and prove it writable, before anything is loaded or computed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write the run folder {out} ({error.strerror or error}); choose another --out.") \
            from error
