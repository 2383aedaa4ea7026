"""Faults during training: SIGTERM stops with a final checkpoint, SIGKILL loses at most the iteration in
progress, and a rollout with a NaN or infinity is dropped instead of poisoning the update."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_distributed import flags
from test_trainer import SMALL, Fixed, models  # noqa: F401  (the module-scoped tiny models fixture)

from rapid3.cli import main
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
