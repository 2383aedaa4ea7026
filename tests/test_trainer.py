"""The GRPO trainer on a tiny exported model: `rapid3 train` end to end, resume, config, rewards, rollouts, learning."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from tiny_pipelines import export_tiny_embedded

from rapid3.baselines.steps import FixedIntervalCache
from rapid3.cli import build_parser, main
from rapid3.common.checkpoint import load_checkpoint
from rapid3.embedded.pipeline import EmbeddedPipeline
from rapid3.policy import RapidPolicy
from rapid3.rewards.composite import discounted_reward, fidelity
from rapid3.rewards.embedded_reward import RewardModel
from rapid3.train.config import TrainConfig, config_from_args
from rapid3.train.curves import main as curves_main
from rapid3.train.curves import read_log
from rapid3.train.rollout import rollout
from rapid3.train.trainer import build_run, rollout_rewards, train, train_iteration
from rapid3.worlds.embedded import EmbeddedGenerator, heldout_prompts

SMALL = {"iterations": 2, "prompts_per_iteration": 2, "group_size": 2, "step_cap": 4, "hidden_dim": 16,
         "disc_width": 8, "disc_batch": 4, "replay_capacity": 16, "eval_every": 1, "eval_prompts": 2, "eval_batch": 2,
         "disc_warmup": 0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A one-block embedded model and a tiny reward model, exported as `rapid3 train` reads them."""
    root = tmp_path_factory.mktemp("models")
    export_tiny_embedded(root / "model")
    RewardModel(channels=(8, 8, 8), text_hidden=8, head_hidden=8).save_pretrained(root / "reward")
    return {"model": str(root / "model"), "reward_model": str(root / "reward")}


@pytest.fixture(scope="module")
def small(models):
    return TrainConfig(**SMALL, **models)


@pytest.fixture(scope="module")
def full_run(small, tmp_path_factory):
    """An uninterrupted 2-iteration `rapid3 train`, knobs from a YAML file and flags."""
    out = tmp_path_factory.mktemp("full") / "run"
    config = out.parent / "small.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in small.to_dict().items() if k != "out"}))
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    return out


def weights(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_train_writes_checkpoint_logs_events_and_a_usable_policy(full_run, models, tmp_path):
    records = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for key in ("train/reward", "train/quality", "train/disc", "train/equivalent_steps", "policy/loss", "disc/loss",
                "eval/accuracy", "eval/speedup_flops", "eval/speedup_wall"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    assert all(0 < r["train/equivalent_steps"] <= 4 for r in records)
    curves = Image.open(full_run / "curves.png")  # redrawn after each evaluation
    assert curves.width > 3 * curves.height
    events = list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    state = load_checkpoint(full_run / "checkpoint.pt")
    assert state["iteration"] == 2 and {"policy", "optimizer", "disc", "torch_rng", "prompt_rng"} <= state.keys()
    assert TrainConfig.from_yaml(full_run / "config.yaml") == TrainConfig(**{**SMALL, **models, "out": str(full_run)})
    policy = RapidPolicy.from_pretrained(full_run / "policy")
    assert_same_weights(policy.state_dict(), state["policy"])
    png = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--model", models["model"], "--steps", "4", "--scale", "1",
                 "--out", str(png), "--policy", str(full_run / "policy")]) == 0
    assert Image.open(png).size == (32, 32)


def test_resume_continues_at_the_next_iteration_and_matches_the_uninterrupted_run(full_run, small, tmp_path):
    out = tmp_path / "run"
    train(small.replace(out=str(out), iterations=1))
    saved = load_checkpoint(out / "checkpoint.pt")
    with open(out / "log.jsonl", "a") as log:  # the killed run had logged iteration 2 before dying
        log.write(json.dumps({"iteration": 2, "train/reward": -1.0}) + "\n")
    resumed = build_run(small.replace(out=str(out)), resume=True)
    assert resumed.iteration == 1
    assert_same_weights(resumed.policy.state_dict(), saved["policy"])
    assert main(["train", "--out", str(out), "--resume", "--iterations", "2"]) == 0
    final, reference = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(full_run / "checkpoint.pt")
    assert final["iteration"] == 2
    assert_same_weights(final["policy"], reference["policy"])
    assert_same_weights(final["disc"]["module"], reference["disc"]["module"])
    assert [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_is_never_overwritten_and_resume_needs_a_checkpoint(full_run, small, tmp_path, capsys):
    assert main(["train", "--out", str(full_run), "--iterations", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot change hidden_dim"):
        build_run(small.replace(out=str(full_run), hidden_dim=32), resume=True)


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(out="x", model=None, lr=1e-5, group_size=4, reward="d", sparse_attention=False)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert "# compute discount lambda" in (tmp_path / "c.yaml").read_text()  # every knob is documented there
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "s.yaml").write_text("lr: 3e-4\nomega: 2\n")  # YAML 1.1 reads 3e-4 as a string; 2 is an int
    loaded = TrainConfig.from_yaml(tmp_path / "s.yaml")
    assert loaded.lr == 3e-4 and loaded.omega == 2.0 and isinstance(loaded.omega, float)


@pytest.mark.parametrize("text, message", [
    ("group_sise: 4\n", "Did you mean 'group_size'"),
    ("group_size: four\n", "group_size must be int"),
    ("step_skip: 1\n", "step_skip must be bool"),
    ("lam: 1.5\n", "lam must lie strictly inside"),
    ("reward: q*d\n", "reward must join distinct terms"),
    ("- lr\n", "must map knob names"),
])
def test_bad_yaml_is_rejected_with_the_reason(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_command_line_overrides_yaml_overrides_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("group_size: 6\nlr: 0.001\nsparse_attention: true\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--group-size", "4",
                                      "--no-sparse-attention", "--reward", "q", "--model", "m"])
    cfg = config_from_args(args)
    assert (cfg.group_size, cfg.lr, cfg.sparse_attention, cfg.reward, cfg.model) == (4, 0.001, False, "q", "m")
    assert cfg.lam == TrainConfig().lam
    # --resume starts from the run's own config.yaml; only the flags given change it
    cfg.replace(out=str(tmp_path / "run")).to_yaml((tmp_path / "run").mkdir() or tmp_path / "run" / "config.yaml")
    resumed = config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--resume",
                                                          "--iterations", "7"]))
    assert (resumed.group_size, resumed.lr, resumed.iterations) == (4, 0.001, 7)


class Fixed:
    """A quality model or discriminator with a fixed score per image that records being called."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls = torch.tensor(values), 0

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.calls += 1
        return self.values


@pytest.mark.parametrize("reward", ["q+d", "q", "d", "q+d+f"])
def test_reward_options_use_exactly_their_terms(small, reward, tmp_path):
    run = build_run(small.replace(out=str(tmp_path), reward=reward, omega=0.5,
                                  reward_model=small.reward_model if "q" in reward else str(tmp_path / "absent")))
    assert (run.source.quality is None) == ("q" not in reward) and (run.source.discriminator is None) == ("d" not in reward)
    rollouts = rollout(run.source.generator, run.policy, ["a red circle", "a blue square"], [0, 1], group_size=2, step_cap=4,
                       guidance_scale=4.0)
    q, d = Fixed([0.9, 0.6, 0.3, 0.2]), Fixed([0.2, 0.4, 0.8, 1.0])
    scores = rollout_rewards(rollouts, q if run.source.quality else None, d if run.source.discriminator else None, lam=0.9, omega=0.5)
    expected_q = q.values if "q" in reward else torch.zeros(4)
    expected_d = d.values if "d" in reward else torch.zeros(4)
    expected = discounted_reward(expected_q, expected_d, rollouts.equivalent_steps, lam=0.9, omega=0.5)
    torch.testing.assert_close(scores["reward"], expected)
    assert (q.calls, d.calls) == ("q" in reward, "d" in reward)
    metrics = train_iteration(run, ["a red circle"], [3])
    assert ("train/quality" in metrics, "disc/loss" in metrics) == ("q" in reward, "d" in reward)


def test_rollout_groups_share_noise_and_stack_into_the_padded_layout(small):
    pipe = EmbeddedPipeline.from_pretrained(small.model)
    generator = EmbeddedGenerator(pipe)
    torch.manual_seed(0)
    policy = RapidPolicy.for_backbone(pipe.backbone, hidden_dim=16, init_concentration=4.0, init_reuse_prob=0.5)
    prompts = ["a red circle", "two blue squares"]
    rollouts = rollout(generator, policy, prompts, [5, 9], group_size=3, step_cap=5, guidance_scale=4.0)
    assert rollouts.prompts == [prompts[0]] * 3 + [prompts[1]] * 3 and not policy.sampling
    first = rollouts.decisions.latents[rollouts.step == 0][rollouts.trajectory[rollouts.step == 0].argsort()]
    assert all(torch.equal(first[i], first[3 * (i // 3)]) for i in range(6))  # one noise per group
    assert not torch.equal(first[0], first[3])
    assert not torch.equal(rollouts.images[0], rollouts.images[1])  # ... and the actions make the difference
    # the pipeline's seeding: seeds s, s + 1 give pipe(prompts, seed=s)
    torch.testing.assert_close(generator.sample(prompts, [5, 6], policy, step_cap=5, guidance_scale=4.0).images,
                               pipe(prompts, num_inference_steps=5, seed=5, controller=policy).latents.clamp(-1, 1))
    lengths = rollouts.mask.sum(1)
    assert torch.equal(rollouts.mask, torch.arange(rollouts.mask.shape[1]) < lengths[:, None])  # steps first, then padding
    assert len(rollouts.trajectory) == int(lengths.sum()) and (lengths >= 1).all() and (lengths <= 5).all()
    new = rollouts.log_probs(policy)
    torch.testing.assert_close(new[rollouts.mask], rollouts.old_log_probs[rollouts.mask], rtol=1e-5, atol=1e-5)
    assert (new[~rollouts.mask] == 0).all() and (rollouts.old_log_probs[~rollouts.mask] == 0).all()
    index = torch.tensor([4, 1])
    part = rollouts.subset(index)
    torch.testing.assert_close(part.log_probs(policy), new[index])
    assert part.prompts == [prompts[1], prompts[0]] and torch.equal(part.mask, rollouts.mask[index])
    with pytest.raises(RuntimeError, match="released"):  # no closure keeps the sampler's state alive
        rollouts.decisions.probe("modulated_input")


def test_the_loop_learns_to_spend_less_when_only_compute_is_rewarded(small, tmp_path):
    """Constant quality: r falls with K alone, so GRPO must raise reuse and sparsity."""
    run = build_run(small.replace(out=str(tmp_path), reward="q", group_size=4, lr=3e-2, lam=0.7))
    run.source.quality = Fixed([1.0] * 8)
    probe = rollout(run.source.generator, run.policy, ["a red circle", "two blue squares"], [0, 1], group_size=4, step_cap=4,
                    guidance_scale=4.0)

    def reuse_and_dense() -> tuple[float, float]:
        with torch.no_grad():
            dist = run.policy.distribution(probe.decisions)
        return (dist.cache_logits.softmax(-1)[:, 1][probe.decisions.has_cache].mean().item(),
                dist.sparse_logits.softmax(-1)[:, 0].mean().item())

    assert reuse_and_dense() == pytest.approx((0.2, 0.7))
    for _ in range(3):
        metrics = train_iteration(run, *run.source.training_prompts(run.prompt_rng, 2))
    reuse, dense = reuse_and_dense()
    assert reuse > 0.5 and dense < 0.5
    assert metrics["train/equivalent_steps"] < 3.0


def test_generate_names_the_missing_policy_and_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("rapid3.policy.shipped.SHIPPED_POLICIES", tmp_path / "policies")
    assert main(["generate", "a red circle", "--policy", "default", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no policy 'default'" in err and "rapid3 train" in err and not (tmp_path / "x.png").exists()


def test_the_discriminator_warms_up_before_the_policy_moves(small, tmp_path):
    run = build_run(small.replace(out=str(tmp_path), disc_warmup=1))
    initial = weights(run.policy.state_dict())
    metrics = train_iteration(run, ["a red circle"], [0])
    run.iteration += 1
    assert "disc/loss" in metrics and "policy/loss" not in metrics
    assert_same_weights(run.policy.state_dict(), initial)
    assert "policy/loss" in train_iteration(run, ["a red circle"], [1])
    assert not all(torch.equal(v, initial[k]) for k, v in run.policy.state_dict().items())


def test_measured_step_costs_price_k_and_survive_resume(small, tmp_path):
    cfg = small.replace(out=str(tmp_path / "run"), step_costs="measured", iterations=1)
    train(cfg)
    run = build_run(cfg, resume=True)
    costs = run.source.generator.step_costs
    assert costs.of(False, 0) == 1.0 and 0 < costs.of(True, 0) < 1  # dense is the unit; reuse skips every block
    assert costs.to_rows() == load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step_costs"]
    reuse_after_first = FixedIntervalCache(interval=4)  # recompute step 1, reuse steps 2-4
    stats = run.source.generator.sample(["a red circle"], [0], reuse_after_first, step_cap=4, guidance_scale=4.0).stats
    assert stats.equivalent_steps.item() == pytest.approx(1 + 3 * costs.of(True, 0))
    with pytest.raises(ValueError, match="embedded model only"):
        TrainConfig(pipeline="x", prompt_file="p.txt", reward="d", disc_model="c", step_costs="measured")


def test_curves_command_redraws_a_runs_png(full_run, tmp_path, capsys):
    curves_main([str(full_run), "--out", str(tmp_path / "c.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").width > 3 * Image.open(tmp_path / "c.png").height


def test_curves_need_a_log_with_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="rapid3 train"):
        read_log(tmp_path / "log.jsonl")
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="no iteration yet"):
        read_log(tmp_path / "log.jsonl")


def test_fidelity_rewards_closeness_to_full_compute(small, tmp_path):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert fidelity(images, images).tolist() == pytest.approx([1.0] * 3)
    assert (fidelity(images, torch.rand(3, 3, 32, 32) * 2 - 1) < 0.2).all()
    assert (fidelity(images, -images) == 0).all()  # negative SSIM is clipped: the reward stays non-negative
    run = build_run(small.replace(out=str(tmp_path), reward="f", psi=2.0))
    assert run.source.quality is None and run.source.discriminator is None
    rollouts = rollout(run.source.generator, run.policy, ["a red circle"], [0], group_size=2, step_cap=4, guidance_scale=4.0)
    originals = rollouts.images[:1].clone()  # trajectory 0 is its own reference
    scores = rollout_rewards(rollouts, None, None, lam=0.9, omega=1.0, originals=originals, psi=2.0)
    assert scores["fidelity"][0] == pytest.approx(1.0)
    torch.testing.assert_close(scores["reward"], discounted_reward(0.0, 0.0, rollouts.equivalent_steps, lam=0.9,
                                                                   omega=1.0, fidelity=scores["fidelity"], psi=2.0))
    metrics = train_iteration(run, ["a red circle"], [3])
    assert 0 <= metrics["train/fidelity"] <= 1 and "train/quality" not in metrics and "train/disc" not in metrics


@pytest.mark.parametrize("reward", ["q+q", "x", "q+d+", ""])
def test_reward_terms_are_checked(reward):
    with pytest.raises(ValueError, match="distinct terms of q, d, f"):
        TrainConfig(reward=reward)


def test_the_shipped_default_policy_was_trained_by_the_documented_config():
    from pathlib import Path

    from rapid3.policy.shipped import policy_folder, training_info

    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / "embedded-policy.yaml")
    shipped = TrainConfig(**training_info(policy_folder("default"))["train_config"])
    assert shipped.replace(out=cfg.out) == cfg


def test_evaluation_prompts_cover_every_complexity():
    from rapid3.embedded.scenes import parse_caption
    specs = heldout_prompts(16)
    assert sum(s.kind == "single" for s in specs) == 2
    assert {parse_caption(s.caption).complexity for s in specs} == {1, 2, 3}
