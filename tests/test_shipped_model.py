"""The embedded model shipped in the package loads offline and draws."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from rapid3.cli import main
from rapid3.embedded import scenes
from rapid3.embedded.model import WEIGHTS_DIR, load_embedded
from rapid3.embedded.pipeline import to_model_space
from rapid3.embedded.text_encoder import MiniLMTextEncoder
from rapid3.rewards.embedded_reward import load_reward_model


def test_shipped_weights_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformer, scheduler = load_embedded()
    info = json.loads((WEIGHTS_DIR / "rapid3_embedded.json").read_text())
    assert info["step"] > 0 and transformer.config.in_channels == 3 and scheduler.config.shift == 1.0


def test_generate_with_shipped_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle", "--steps", "6", "--out", str(out), "--scale", "1"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3)
    assert image.std() > 10  # a drawing, not a flat or empty canvas
    assert str(out) in capsys.readouterr().out


def test_shipped_reward_model_prefers_the_right_colour(monkeypatch):
    """The reward model `rapid3 train` uses by default loads offline and reads colour (0.98 held-out pair accuracy)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    specs = [scenes.parse_caption(c) for c in ("a red circle", "a blue square", "a green triangle", "a yellow circle")]
    images = to_model_space(np.stack([scenes.render(scenes.place(spec, rng)) for spec in specs]))
    right = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    wrong = ["a blue circle", "a red square", "a yellow triangle", "a green circle"]
    model, encoder = load_reward_model(), MiniLMTextEncoder()
    assert (model.score(images, right, encoder) > model.score(images, wrong, encoder)).all()


def test_generate_with_the_shipped_default_policy(monkeypatch, tmp_path, capsys):
    """The README's quick start: the default policy loads offline and spends fewer equivalent steps than 28."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle above a blue square", "--policy", "default", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    equivalent = float(printed.split(" steps, ")[-1].split(" equivalent")[0])
    assert Image.open(out).size == (256, 256) and 0 < equivalent < 28


def test_bench_scores_images_with_the_shipped_reward_model():
    from rapid3.rewards.embedded_reward import score_images

    rng = np.random.default_rng(1)
    image = scenes.render(scenes.place(scenes.parse_caption("a blue square"), rng))
    right, wrong = score_images(np.stack([image, image]), ["a blue square", "a red square"])
    assert 0 <= wrong < right <= 1
