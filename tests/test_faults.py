"""Faults during training: SIGTERM stops with a final checkpoint, SIGKILL loses at most the iteration in
progress, and a rollout with a NaN or infinity is dropped instead of poisoning the update."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_distributed import flags
from test_trainer import SMALL, Fixed, models  # noqa: F401  (the module-scoped tiny models fixture)

from rapid3.cli import main
from rapid3.common import checkpoint
from rapid3.common.checkpoint import load_checkpoint
from rapid3.common.signals import StopSignals
from rapid3.train.config import TrainConfig
from rapid3.train.faults import drop_nonfinite_groups
from rapid3.train.rollout import rollout
from rapid3.train.trainer import build_run, rollout_rewards, train_iteration


def start_training(cfg: TrainConfig) -> subprocess.Popen:
    """``python -m rapid3 train`` with ``cfg`` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rapid3", "train", *flags(cfg)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, child: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def logged_iterations(out) -> list[int]:
    log = out / "log.jsonl"
    return [json.loads(line)["iteration"] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def small(models, tmp_path):  # noqa: F811
    return TrainConfig(**{**SMALL, "eval_every": 1000}, **models, out=str(tmp_path / "run"))


def test_sigterm_ends_with_a_final_checkpoint_and_a_clean_exit(small, tmp_path):
    """(SIGINT goes through the same handler: see the StopSignals test.)"""
    out = tmp_path / "run"
    child = start_training(small.replace(iterations=1000))
    wait_for(lambda: len(logged_iterations(out)) >= 1, child)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err and "--resume" in err
    done = logged_iterations(out)[-1]
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == done  # the iteration in progress was finished
    assert not (out / "policy").exists()  # an unfinished run exports nothing
    assert main(["train", "--out", str(out), "--resume", "--iterations", str(done + 1)]) == 0


def test_a_killed_run_resumes_and_finishes(small, tmp_path):
    out = tmp_path / "run"
    child = start_training(small.replace(iterations=4))
    wait_for(lambda: (out / "checkpoint.pt").exists(), child)
    child.kill()  # SIGKILL: no handler runs
    child.communicate(timeout=60)
    saved = load_checkpoint(out / "checkpoint.pt")["iteration"]  # intact whenever the kill came
    assert 1 <= saved <= 4
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 4
    assert logged_iterations(out) == [1, 2, 3, 4]
    assert (out / "policy" / "config.json").is_file()


def test_the_stop_request_waits_for_the_loop_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop decides when to stop
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards a second signal: the first one stands
        assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_a_group_with_a_nan_is_dropped_with_a_warning(small, caplog):
    run = build_run(small)
    before = [p.detach().clone() for p in run.policy.parameters()]
    run.source.quality = Fixed([float("nan"), 1.0, 0.5, 0.2])  # the first trajectory of the first group
    with caplog.at_level(logging.WARNING, logger="rapid3.train"):
        metrics = train_iteration(run, ["a red circle", "a blue square"], [0, 1])
    assert "dropped the rollouts of 'a red circle' (seed 0)" in caplog.text
    assert metrics["train/dropped_fraction"] == 0.5 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    after = list(run.policy.parameters())
    assert all(p.isfinite().all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
    assert len(run.negatives) == small.group_size and run.negatives.contents().isfinite().all()

    run.source.quality = Fixed([float("inf")] * 4)
    with pytest.raises(ValueError, match="every rollout of iteration 1 has a NaN or infinity"):
        train_iteration(run, ["a red circle", "a blue square"], [0, 1])


def test_nan_images_and_log_probs_drop_their_group(small):
    run = build_run(small)
    prompts = ["a red circle", "a blue square", "two green circles"]
    rollouts = rollout(run.source.generator, run.policy, prompts, [0, 1, 2], group_size=2, step_cap=4,
                       guidance_scale=4.0)
    rollouts.images[1, 0, 3, 3] = float("nan")
    rollouts.old_log_probs[5, 0] = float("-inf")
    scores = rollout_rewards(rollouts, Fixed([0.5] * 6), None, lam=0.9, omega=1.0)
    kept, kept_scores, dropped = drop_nonfinite_groups(rollouts, scores)
    assert dropped == 2 and kept.prompts == ["a blue square"] * 2 and len(kept_scores["reward"]) == 2


# ----------------------------------------------------------------------------- injected faults: each leaves a
# resumable run and a one-line message


class FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once ``room`` bytes are written, as a full disk does mid-checkpoint."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def full_disk(path, mode: str) -> FullDisk:
    """``open`` on a disk with 4 KiB left (a checkpoint is larger)."""
    return FullDisk(open(path, mode), room=4096)


def error_lines(err: str) -> list[str]:
    """The lines of stderr that report an error (progress bars and warnings share the stream)."""
    return [line for line in err.splitlines() if ": error: " in line]


def test_a_full_disk_while_checkpointing_says_so_and_the_last_checkpoint_survives(small, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *flags(small.replace(iterations=1))]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)  # what save_checkpoint opens fills the disk
    assert main(["train", "--out", str(out), "--resume", "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err[-2000:]
    assert "the disk is full: could not write the checkpoint" in err and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "checkpoint.pt.tmp").exists()
    monkeypatch.undo()  # space freed
    assert main(["train", "--out", str(out), "--resume", "--iterations", "2"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2 and logged_iterations(out) == [1, 2]


def test_a_torn_last_log_line_is_dropped_on_resume(small, tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", *flags(small.replace(iterations=1))]) == 0
    with open(out / "log.jsonl", "a") as log:
        log.write('{"iteration": 2, "time": 17')  # killed mid-write: no newline, no closing brace
    with caplog.at_level(logging.WARNING, logger="rapid3"):
        assert main(["train", "--out", str(out), "--resume", "--iterations", "2"]) == 0
    assert "dropped a torn last line" in caplog.text
    assert logged_iterations(out) == [1, 2]


def test_a_second_run_into_a_live_runs_folder_is_refused_and_a_killed_runs_lock_is_not(small, tmp_path, capsys):
    out = tmp_path / "run"
    child = start_training(small.replace(iterations=1000))
    try:
        wait_for(lambda: len(logged_iterations(out)) >= 1, child)
        assert main(["train", *flags(small.replace(seed=1))]) == 2  # the issue's `--seed 1` into the same --out
        assert main(["train", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        busy = (f"rapid3 train: error: {out} is in use by another run (PID {child.pid}); wait for it to end or stop "
                "it, or choose another --out.")
        assert error_lines(err) == [busy, busy]
    finally:
        child.kill()  # SIGKILL: the lock file stays, the lock goes with the process
        child.communicate(timeout=60)
    assert (out / "run.lock").exists()
    done = load_checkpoint(out / "checkpoint.pt")["iteration"]
    assert main(["train", "--out", str(out), "--resume", "--iterations", str(done + 1)]) == 0
    assert logged_iterations(out) == list(range(1, done + 2))  # one run's iterations, not two interleaved
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0  # the refused run changed nothing
