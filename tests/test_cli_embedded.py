"""`rapid3 embedded PROGRAM`: each program of the embedded world through the one entry point."""

from __future__ import annotations

import json

import pytest
from tiny_pipelines import export_tiny_embedded

from rapid3.cli import main
from rapid3.cli.embedded import PROGRAMS


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_each_program_explains_itself(program, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["embedded", program, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: rapid3 embedded {program}") and "--out" in shown


def test_the_group_lists_its_programs(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["embedded", "--help"])
    shown = capsys.readouterr().out
    assert all(program in shown for program in PROGRAMS)


def test_evaluate_runs_through_the_entry_point(tmp_path) -> None:
    model = export_tiny_embedded(tmp_path / "model")
    assert main(["embedded", "evaluate", "--model", str(model), "--prompts", "2", "--singles", "1", "--steps", "2",
                 "--batch", "3", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["2"]["n"] == 3


def test_train_reward_runs_and_resumes_through_the_entry_point(tmp_path, capsys) -> None:
    run = ["embedded", "train-reward", "--out", str(tmp_path / "run"), "--batch", "4", "--eval-images", "2"]
    assert main([*run, "--steps", "1"]) == 0
    assert main([*run, "--steps", "2", "--resume", "--export", str(tmp_path / "export")]) == 0
    assert "stopped at step 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "export" / "rapid3_reward.json").read_text())["step"] == 2


def test_a_bad_value_is_one_line(tmp_path, capsys) -> None:
    assert main(["embedded", "train-generator", "--out", str(tmp_path), "--workers", "-1"]) == 2
    assert "rapid3 embedded: error: --workers -1" in capsys.readouterr().err
    assert main(["embedded", "word-order", "--colours", "red"]) == 2
    assert "two different colours" in capsys.readouterr().err
