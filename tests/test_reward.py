"""The embedded world's learned reward model: negatives, model, training, save/load, CLI run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sigterm import sigterm_during

from rapid3.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rapid3.embedded import scenes
from rapid3.embedded.scenes import parse_caption
from rapid3.embedded.text_encoder import MiniLMTextEncoder
from rapid3.rewards import embedded_reward
from rapid3.rewards import train_embedded_reward as reward
from rapid3.rewards.embedded_reward import RewardModel
from rapid3.rewards.train_embedded_reward import RewardTrainConfig

TINY = dict(channels=(16, 32, 32), text_hidden=64, head_hidden=64)
SINGLES_AND_COUNTS = [s for s in scenes.prompt_splits()["train"] if s.kind in ("single", "count")]


@pytest.fixture(scope="module")
def encoder() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def renders() -> tuple[torch.Tensor, list[scenes.SceneSpec]]:
    return reward.render_set(6, np.random.default_rng(1), split="train")


# ----------------------------------------------------------------------------- negatives


def test_hard_negatives_change_one_attribute_and_contradict() -> None:
    for spec in scenes.all_scenes()[::7]:  # every kind, a seventh of the captions: a second, not six
        for attribute, variants in reward.hard_negatives(spec).items():
            for neg in variants:
                assert parse_caption(neg.caption) == neg
                if attribute == "relation":
                    assert neg.objects == spec.objects and neg.relation.relation == scenes.OPPOSITE_RELATION[spec.relation.relation]
                else:
                    assert reward.contradicts(neg, spec), (spec.caption, neg.caption)
                if attribute in ("colour", "shape"):  # only that attribute of the changed object(s) differs
                    changed = [(a, b) for a, b in zip(spec.objects, neg.objects, strict=True) if a != b]
                    kept = "shape" if attribute == "colour" else "color"
                    assert changed and all(getattr(a, kept) == getattr(b, kept) for a, b in changed)


def test_hard_negative_examples() -> None:
    captions = {a: {s.caption for s in v} for a, v in reward.hard_negatives(parse_caption("two blue squares")).items()}
    assert captions["count"] == {"a blue square", "three blue squares"}
    assert "two red squares" in captions["colour"] and "two blue circles" in captions["shape"]
    relation = reward.hard_negatives(parse_caption("a red circle above a blue square"))
    assert [s.caption for s in relation["relation"]] == ["a red circle below a blue square"]
    # "a red circle and a red square" -> changing the circle to a square would merge the two objects
    pair = reward.hard_negatives(parse_caption("a red circle and a red square"))
    assert "two red squares" not in {s.caption for s in pair["shape"]}


def test_hard_negatives_within_a_split() -> None:
    train = set(scenes.prompt_splits()["train"])
    for spec in scenes.prompt_splits()["train"][::7]:
        within = reward.hard_negatives(spec, "train")
        assert within and all(v in train for variants in within.values() for v in variants)
        assert all(set(within.get(a, ())) <= set(v) for a, v in reward.hard_negatives(spec).items())
    heldout_only = next(s for s in scenes.all_scenes() if s.complexity == 2 and s.kind == "count" and s not in train)
    single = scenes.make_scene(heldout_only.objects[:1])
    assert heldout_only in reward.hard_negatives(single)["count"]
    assert heldout_only not in reward.hard_negatives(single, "train").get("count", ())
    with pytest.raises(ValueError, match="no hard negative by relation"):
        reward.sample_hard_negative(single, np.random.default_rng(0), "relation")


def test_random_negative_contradicts_and_contradicts_semantics() -> None:
    pair = parse_caption("a red circle and a blue square")
    assert not reward.contradicts(parse_caption("a red circle"), pair)  # unnamed objects are ignored
    assert reward.contradicts(parse_caption("two red circles"), pair)
    rng = np.random.default_rng(0)
    assert all(reward.contradicts(reward.sample_random_negative(pair, rng), pair) for _ in range(50))


# ----------------------------------------------------------------------------- model


def test_score_shape_range_and_gradient(encoder, renders) -> None:
    images, specs = renders
    model = RewardModel(**TINY)
    scores = model.score(images, [s.caption for s in specs], encoder)
    assert scores.shape == (6,) and bool(((scores >= 0) & (scores <= 1)).all()) and not scores.requires_grad
    images = images.clone().requires_grad_(True)
    model(images, encoder.encode([s.caption for s in specs])[0]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 32, 32, 3), (3, 32, 32), (0, 3, 32, 32)])
def test_bad_image_shapes_raise(encoder, shape) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        RewardModel(**TINY).score(torch.zeros(shape), ["a red circle"] * shape[0], encoder)


def test_caption_count_and_embedding_mismatch_raise(encoder) -> None:
    model = RewardModel(**TINY)
    with pytest.raises(ValueError, match="one caption per image"):
        model.score(torch.zeros(2, 3, 32, 32), ["a red circle"], encoder)
    with pytest.raises(ValueError, match="text_tokens"):
        model(torch.zeros(2, 3, 32, 32), torch.zeros(3, 16, 384))
    with pytest.raises(ValueError, match="text_tokens"):
        model(torch.zeros(2, 3, 32, 32), torch.zeros(2, 384))  # pooled, not tokens
    with pytest.raises(ValueError, match="float tensor"):
        model.score(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a red circle"] * 2, encoder)


def test_save_load_round_trip_scores_identically(tmp_path, encoder, renders) -> None:
    images, specs = renders
    model = RewardModel(**TINY).eval()
    torch.nn.init.normal_(model.films[0].weight)  # non-default weights, FiLM included
    model.save_pretrained(tmp_path)
    loaded = embedded_reward.load_reward_model(tmp_path)
    captions = [s.caption for s in specs]
    assert torch.equal(model.score(images, captions, encoder), loaded.score(images, captions, encoder))
    public = lambda m: {k: tuple(v) if isinstance(v, list) else v for k, v in m.config.items() if not k.startswith("_")}
    assert public(loaded) == public(model) and not loaded.training


def test_missing_weights_say_how_to_train(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="rapid3 embedded train-reward"):
        embedded_reward.load_reward_model(tmp_path / "nowhere")
    monkeypatch.setattr(embedded_reward, "REWARD_WEIGHTS_DIR", tmp_path / "shipped")
    with pytest.raises(FileNotFoundError, match="shipped"):
        embedded_reward.load_reward_model()


# ----------------------------------------------------------------------------- training


def test_short_training_separates_matched_from_colour_mismatched(tmp_path, encoder) -> None:
    """200 tiny steps on single-object and count captions (45, all cheap to encode and each met as
    both positive and negative). Colour is learnt first (0.85 pair accuracy against colour-changed
    captions here, 0.52 untrained); shape and count need thousands of steps (see the real run)."""
    torch.manual_seed(0)
    cfg = RewardTrainConfig(out=tmp_path, lr=3e-3, warmup=20, hard_fraction=1.0,
                            model=dict(channels=(16, 32, 64), text_hidden=64, head_hidden=64))
    run = reward.build(cfg)
    rng = np.random.default_rng(0)
    pool = [SINGLES_AND_COUNTS[i] for i in rng.integers(len(SINGLES_AND_COUNTS), size=256)]
    images = reward.render_specs(pool, rng)  # rendering dominates a tiny step: render once, degrade afresh
    untrained = reward.pair_accuracy(run["model"], encoder, images[:60], pool[:60])
    for _ in range(200):
        picked = rng.integers(len(pool), size=16)
        reward.train_step(run, encoder, cfg, reward.degrade(images[picked]), [pool[i] for i in picked])
    fresh = [SINGLES_AND_COUNTS[i] for i in rng.integers(len(SINGLES_AND_COUNTS), size=60)]
    accuracy = reward.pair_accuracy(run["model"], encoder, reward.render_specs(fresh, rng), fresh)
    assert accuracy["hard/colour"] > 0.75 and accuracy["hard/colour"] > untrained["hard/colour"] + 0.2, \
        (accuracy, untrained)


def test_train_exports_evaluates_and_resumes(tmp_path, encoder) -> None:
    cfg = RewardTrainConfig(out=tmp_path / "run", steps=2, batch=4, eval_every=2, eval_images=4, model=TINY,
                            export=tmp_path / "export")
    run = reward.train(cfg, encoder)
    assert run["step"] == 2 and [e["step"] for e in run["evals"]] == [2]
    assert all(set(run["evals"][0][split]) >= {"hard", "random"} for split in ("heldout", "train"))
    info = json.loads((tmp_path / "export" / "rapid3_reward.json").read_text())
    assert info["step"] == 2 and info["evaluation"] == run["evals"][0]
    exported = embedded_reward.load_reward_model(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), run["model"].state_dict().values()))
    resumed = reward.train(RewardTrainConfig(out=tmp_path / "run", steps=3, batch=4, eval_every=2, eval_images=4,
                                             resume=True), encoder)
    assert resumed["step"] == 3 and [e["step"] for e in resumed["evals"]] == [2, 3]
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["eval"]["step"] for e in logged if "eval" in e] == [2, 3]


def test_cli_resume_without_checkpoint_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(SystemExit, match="reward: error: --resume: no checkpoint at .*; start the run without"):
        reward.main(["--out", str(tmp_path / "run"), "--resume"])
    assert not (tmp_path / "run").exists()


def test_a_generator_checkpoint_is_not_resumed_as_a_reward_model(tmp_path) -> None:
    save_checkpoint(tmp_path / reward.CHECKPOINT, {"step": 1}, "rapid3-generator-checkpoint/1")
    with pytest.raises(CheckpointError, match="rapid3-generator-checkpoint/1.*expected 'rapid3-reward-checkpoint/1'"):
        reward.build(RewardTrainConfig(out=tmp_path, resume=True))


def test_generator_samples_join_batches_and_are_cached(tmp_path, encoder) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from rapid3.embedded.model import embedded_scheduler_config, embedded_transformer_config

    generator = tmp_path / "generator"
    tiny = embedded_transformer_config(num_layers=1, num_attention_heads=1, attention_head_dim=8,
                                       caption_projection_dim=8)
    SD3Transformer2DModel(**tiny).save_pretrained(generator)
    FlowMatchEulerDiscreteScheduler(**embedded_scheduler_config()).save_pretrained(generator)
    cfg = RewardTrainConfig(out=tmp_path / "run", steps=1, batch=4, generator=generator, generated=3,
                            generated_fraction=0.5, eval_images=2, model=TINY)
    run = reward.build(cfg)
    generated = reward.generated_samples(generator, encoder, 3, 0, tmp_path / "generated.pt")
    assert generated[0].shape == (3, 3, 32, 32) and len(generated[1]) == 3
    images, specs = reward.training_batch(run, cfg, generated)
    assert len(images) == len(specs) == 4
    from_generator = [any(torch.equal(image, g) for g in generated[0]) for image in images]
    assert from_generator == [False, False, True, True]
    (tmp_path / "generated.pt").write_bytes(b"torn")  # a torn cache is made again, not an error
    remade = reward.generated_samples(generator, encoder, 3, 0, tmp_path / "generated.pt")
    assert torch.equal(remade[0], generated[0])
    shutil.rmtree(generator)  # from here on only the cache can answer
    cached = reward.generated_samples(generator, encoder, 3, 0, tmp_path / "generated.pt")
    assert torch.equal(cached[0], generated[0]) and cached[1] == generated[1]


def test_parse_args_defaults_and_flags() -> None:
    cfg = reward.parse_args(["--out", "x", "--steps", "5", "--generator", "g", "--export", "e"])
    assert cfg.out == Path("x") and cfg.steps == 5 and cfg.generator == Path("g") and cfg.export == Path("e")
    assert not cfg.resume and cfg.batch == RewardTrainConfig(out=Path(".")).batch


def test_sigterm_stops_after_the_step_and_checkpoints(tmp_path, encoder, monkeypatch) -> None:
    monkeypatch.setattr(reward, "train_step", sigterm_during(reward.train_step))
    run = reward.train(RewardTrainConfig(out=tmp_path, steps=5, batch=4, eval_every=5, eval_images=4, model=TINY),
                       encoder)
    assert run["step"] == 1 and [e["step"] for e in run["evals"]] == [1]
    assert load_checkpoint(tmp_path / reward.CHECKPOINT, reward.CHECKPOINT_FORMAT)["step"] == 1
