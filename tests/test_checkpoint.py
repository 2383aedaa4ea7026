"""Checkpoints: atomic saves that a crash cannot tear, and clear errors for files that cannot be resumed."""

from __future__ import annotations

import pytest
import torch

from rapid3.cli import main
from rapid3.common import checkpoint
from rapid3.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rapid3.train.config import TrainConfig

STATE = {"iteration": 3, "policy": {"w": torch.arange(6.0)}, "rng": {"state": 2**100, "name": "PCG64"}}


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", STATE)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["iteration"] == 3 and loaded["rng"] == STATE["rng"]
    assert torch.equal(loaded["policy"]["w"], STATE["policy"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_crash_while_saving_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    good = path.read_bytes()

    def torn_save(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**STATE, "iteration": 4})
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path)["iteration"] == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_raise_a_clear_error_and_stay_untouched(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, STATE)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 999, "empty": b""}[damage])
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"c\.pt is corrupt or truncated"):
        load_checkpoint(path)
    assert path.read_bytes() == before


def test_other_files_are_not_mistaken_for_checkpoints(tmp_path):
    torch.save({"iteration": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a rapid3 training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resuming_a_corrupt_run_fails_before_any_work_and_keeps_the_file(tmp_path, capsys):
    TrainConfig(out=str(tmp_path), model=str(tmp_path / "no-model")).to_yaml(tmp_path / "config.yaml")
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt or truncated" in err and "no embedded model" not in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"PK\x03\x04 torn"
