"""The ablation runner on a tiny model: each variant trains with its one change, resumes, and lands in the tables."""

from __future__ import annotations

import json

from test_trainer import SMALL, models  # noqa: F401  (the tiny model and reward model fixtures)

from rapid3.policy import RapidPolicy
from rapid3.train import ablation
from rapid3.train.config import TrainConfig


def test_variants_train_once_and_fill_their_tables(models, tmp_path, monkeypatch):  # noqa: F811
    base = TrainConfig(**{**SMALL, "iterations": 1}, **models)
    summary = ablation.run_ablation(base, tmp_path, ["step", "step+cache+sparse", "q", "geometric"], eval_prompts=2)
    step = RapidPolicy.from_pretrained(tmp_path / "step" / "policy").config
    assert step.step_skip and not step.cache_reuse and not step.sparse_attention
    assert RapidPolicy.from_pretrained(tmp_path / "geometric" / "policy").config.step_schedule == "geometric"
    assert "\nreward: q\n" in (tmp_path / "q" / "config.yaml").read_text()
    results = summary["results"]
    assert set(results) == {"step", "step+cache+sparse", "q", "geometric"}
    assert all(0 < r["eval/equivalent_steps"] <= SMALL["step_cap"] and r["train_minutes"] > 0 for r in results.values())
    report = (tmp_path / "ablation.md").read_text()
    assert "## Heads (reward q+d)" in report and "| step+cache+sparse |" in report and "| q+d (base) |" in report
    assert "## Step-Skip schedule" in report and "| geometric |" in report and "| grid (base) |" in report
    assert json.loads((tmp_path / "ablation.json").read_text())["variants"]["q"] == {"reward": "q"}

    trained = []  # a second run finds every policy exported and trains nothing
    monkeypatch.setattr(ablation, "train", lambda cfg, resume: trained.append(cfg.out))
    ablation.run_ablation(base, tmp_path, ["step", "q"], eval_prompts=2)
    assert trained == []
