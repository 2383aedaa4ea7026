"""`rapid3 profile`: every action timed in both modes, a JSON that round-trips, and K priced by it."""

import json

import pytest
import torch
from test_trainer import SMALL
from tiny_pipelines import export_tiny_embedded

from rapid3.accel.costs import MeasuredStepCosts
from rapid3.accel.profile import ActionProfile, CostProfile, Timing, profile_backbone, step_actions
from rapid3.accel.sampler import Sampler
from rapid3.backbones import Conditioning
from rapid3.backbones.random_sd3 import random_sd3_setup
from rapid3.baselines.steps import FixedIntervalCache
from rapid3.cli import main
from rapid3.rewards.embedded_reward import RewardModel
from rapid3.train.config import TrainConfig
from rapid3.train.trainer import build_run


def made_up_profile(reuse: float, sparse: float) -> CostProfile:
    """A profile whose relative costs are chosen, not measured: K must follow them exactly."""
    actions = [ActionProfile(a.name, a.reuse, a.level, {"eager": Timing(1.0, 1.0, 1.0, 1.0 if a.level == 0 else sparse),
                                                        "compiled": Timing(0.5, 0.5, 0.5, 1.0)}) for a in step_actions()]
    actions[-1].timings["eager"].relative = reuse
    actions[-1].timings["compiled"].relative = reuse / 2
    return CostProfile({"source": "made up"}, actions, 4, 8)


def test_profile_times_every_action_in_both_modes_and_round_trips(tmp_path):
    backbone, noise, cond, uncond = random_sd3_setup(tokens=16, layers=1, batch=1)
    profile = profile_backbone(backbone, torch.cat([noise, noise]), Conditioning.cat([uncond, cond]), branches=2,
                               repeats=1, compile_backend="eager")
    assert [(a.reuse, a.level) for a in profile.actions] == [(a.reuse, a.level) for a in step_actions()]
    assert profile.modes() == ["eager", "compiled"] and not backbone.compiled
    full = profile.actions[0].timings
    assert full["eager"].relative == full["compiled"].relative == 1.0
    reuse = profile.actions[-1].timings["eager"]
    assert reuse.min_s <= reuse.median_s <= reuse.max_s and 0 < reuse.relative < 1
    assert profile.cache_bytes_per_image_per_branch == 16 * 384 * 4  # image tokens x hidden x float32
    assert profile.cache_bytes_per_image == 2 * profile.cache_bytes_per_image_per_branch
    profile.save(tmp_path / "p.json")
    assert CostProfile.load(tmp_path / "p.json") == profile
    assert "| reuse |" in profile.table()
    with pytest.raises(ValueError, match="guidance branches"):
        profile_backbone(backbone, noise, cond, branches=2)


def test_step_costs_follow_the_profiles_mode(tmp_path):
    profile = made_up_profile(reuse=0.1, sparse=0.6)
    assert profile.step_costs().of(True, 0) == 0.05  # compiled when timed
    assert profile.step_costs("eager").of(True, 0) == 0.1 and profile.step_costs("eager").of(False, 2) == 0.6
    data = profile.to_dict() | {"format": "something else"}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Not a rapid3 cost profile"):
        CostProfile.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="rapid3 profile"):
        CostProfile.load(tmp_path / "none.json")


def test_training_prices_k_with_a_profile_file(tmp_path):
    """Profile JSON -> TrainConfig.step_costs -> the run's sampler: K is the profile's numbers."""
    export_tiny_embedded(tmp_path / "model")
    RewardModel(channels=(8, 8, 8), text_hidden=8, head_hidden=8).save_pretrained(tmp_path / "reward")
    made_up_profile(reuse=0.1, sparse=0.6).save(tmp_path / "target.json")
    cfg = TrainConfig(**SMALL, model=str(tmp_path / "model"), reward_model=str(tmp_path / "reward"),
                      out=str(tmp_path / "run"), step_costs=str(tmp_path / "target.json"))
    run = build_run(cfg)
    assert run.source.generator.step_costs == MeasuredStepCosts({**{(False, lv): 1.0 for lv in range(4)}, (True, 0): 0.05})
    reuse_after_first = FixedIntervalCache(interval=4)  # recompute step 1, reuse steps 2-4
    stats = run.source.generator.sample(["a red circle"], [0], reuse_after_first, step_cap=4, guidance_scale=4.0).stats
    assert stats.equivalent_steps.item() == pytest.approx(1 + 3 * 0.05)
    with pytest.raises(ValueError, match="profile .json"):
        TrainConfig(step_costs="fast")


def test_sampler_k_is_the_profiles_relative_costs():
    backbone, noise, cond, _ = random_sd3_setup(tokens=16, layers=1, batch=1)
    costs = made_up_profile(reuse=0.2, sparse=0.6).step_costs("eager")
    stats = Sampler(backbone, step_cap=4, step_costs=costs).sample(noise, cond, FixedIntervalCache(2)).stats
    assert [r.equivalent_steps for r in stats.records[0]] == [1.0, 0.2, 1.0, 0.2]


def test_cli_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "emb.json"
    export_tiny_embedded(tmp_path / "model")
    assert main(["profile", "--model", str(tmp_path / "model"), "--repeats", "1", "--no-compile", "--levels", "3",
                 "--out", str(out)]) == 0
    profile = CostProfile.load(out)
    assert profile.modes() == ["eager"] and profile.setup["branches"] == 2
    assert [a.name for a in profile.actions] == ["full", "sparse 0.2", "reuse"]
    assert "| full |" in out.with_suffix(".md").read_text() and "| sparse 0.2 |" in capsys.readouterr().out
