"""What a bad input or an interrupt leaves behind: images finished before Ctrl-C are on disk, a refusal writes
nothing, a resumed run keeps the recipe it started with, and a name means one policy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_trainer import SMALL, models  # noqa: F401  (the module-scoped tiny models fixture)
from tiny_pipelines import export_tiny_embedded

from rapid3.cli import main
from rapid3.common.history import HISTORY_FILE, read_history
from rapid3.eval import report
from rapid3.policy import RapidPolicy
from rapid3.policy.shipped import SHIPPED_POLICIES, policy_folder
from rapid3.train.config import TrainConfig
from rapid3.train.trainer import train
from rapid3.worlds.embedded import EmbeddedGenerator


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(export_tiny_embedded(tmp_path_factory.mktemp("embedded")))


def test_ctrl_c_keeps_the_finished_images_and_ends_in_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" * 5)
    real, calls = EmbeddedGenerator.sample, []

    def interrupted_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch denoises
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddedGenerator, "sample", interrupted_second_batch)
    out = tmp_path / "images"
    assert main(["generate", "--prompt-file", str(prompts), "--model", tiny_model, "--steps", "2", "--batch", "2",
                 "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"rapid3 generate: interrupted (Ctrl-C) after 2 of 5 images; they are in {out}." in err.splitlines()
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]  # whole PNGs, no temporary file


@pytest.mark.parametrize("line", ["a red circle above a blue square " * 4, "a red circle " * 200])
def test_a_refused_prompt_file_leaves_no_output_folder(tiny_model, tmp_path, line, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n{line}\n")
    out = tmp_path / "images"
    assert main(["generate", "--prompt-file", str(prompts), "--model", tiny_model, "--steps", "2", "--out",
                 str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_a_shipped_name_wins_over_a_folder_of_that_name_which_a_path_reaches(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    RapidPolicy(latent_channels=3, pooled_dim=384, hidden_dim=8).save_pretrained(tmp_path / "default")
    with caplog.at_level(logging.WARNING, logger="rapid3"):
        assert policy_folder("default") == SHIPPED_POLICIES / "default"
    assert "the folder ./default is not used (write ./default for it)" in caplog.text
    assert policy_folder("./default") == Path("./default")
    assert RapidPolicy.from_pretrained(policy_folder("./default")).config.hidden_dim == 8


def test_a_resume_with_changed_knobs_keeps_the_config_it_started_with(models, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = TrainConfig(**{**SMALL, "iterations": 1}, **models, out=str(out))
    train(cfg)
    train(cfg.replace(iterations=2, lr=0.01), resume=True)
    first, second = read_history(out)
    assert (first["lr"], first["iterations"]) == (1e-3, 1) and (second["lr"], second["iterations"]) == (0.01, 2)
    notes = [line for line in (out / HISTORY_FILE).read_text().splitlines() if line.startswith("---")]
    assert notes[0].startswith("--- # started at iteration 0") and notes[1].startswith("--- # resumed at iteration 1")
    assert TrainConfig.from_yaml(out / "config.yaml").lr == 0.01


def _entry(method: str, speedup: float, accuracy: float) -> dict:
    return {"method": method, "label": method, "status": "ok", "value": speedup, "knob": "k",
            "metrics": {"speedup_latency": speedup, "accuracy": accuracy, "psnr": 30.0}}


def test_the_bench_verdict_says_what_it_compared_or_that_nothing_was():
    unreached = {"entries": [_entry("rapid3", 5.0, 0.8), _entry("uniform", 2.0, 0.9), _entry("fora", 1.5, 0.9)]}
    text = report._claim(unreached)
    assert not any("at or above every method" in line for line in text)
    assert any(line.startswith("**Nothing compared**: no other method's sweep reaches") for line in text)
    reached = {"entries": [_entry("rapid3", 2.0, 0.95), _entry("uniform", 2.0, 0.9), _entry("fora", 1.5, 0.9)]}
    assert "RAPID3 is at or above every method whose sweep reaches its speedup (uniform)." in report._claim(reached)
