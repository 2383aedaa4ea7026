"""CLIP reward models for real pipelines, on a tiny offline CLIP: the CLIP score q, the CLIP-adapter discriminator d."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_clip import IMAGE_SIZE, save_tiny_clip
from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

from rapid3.rewards.clip import CLIPAdapterDiscriminator, CLIPPixels, CLIPScore
from rapid3.rewards.discriminator import Discriminator

PROMPTS = ["a red circle", "two blue squares", "a red circle"]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixels_follow_the_clip_image_processor():
    """Shorter side resized, centre crop, CLIP normalisation: as CLIPImageProcessor, up to PIL vs torch resampling."""
    image = images(1, seed=1)[:, :, :48, :]  # 48x32: portrait, so the crop matters
    image = F.interpolate(image, size=(96, 64), mode="nearest")  # blocky content survives resampling differences
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    expected = processor(images=pil, return_tensors="pt").pixel_values
    ours = CLIPPixels(32)(image, torch.device("cpu"), torch.float32)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.05


def test_clip_score_is_the_weighted_clamped_cosine(clip_path):
    quality = CLIPScore.from_pretrained(clip_path)
    batch = images(3)
    scores = quality.score(batch, PROMPTS)
    model = CLIPModel.from_pretrained(clip_path)
    tokens = quality.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output
        image = model.get_image_features(pixel_values=CLIPPixels(IMAGE_SIZE)(batch, "cpu", torch.float32)).pooler_output
    expected = (2.5 * F.cosine_similarity(image, text, dim=-1)).clamp(0, 1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    assert len(quality._text) == 2  # one cached embedding per distinct prompt
    torch.testing.assert_close(quality.score(batch, PROMPTS), scores)
    with pytest.raises(ValueError, match="one prompt per image"):
        quality.score(batch, PROMPTS[:2])


def test_missing_models_are_named(tmp_path):
    for load in (CLIPScore.from_pretrained, CLIPAdapterDiscriminator.from_pretrained):
        with pytest.raises(FileNotFoundError, match="absent-clip"):
            load(tmp_path / "absent-clip")


def test_the_discriminator_trains_its_adapter_only_and_learns(clip_path):
    torch.manual_seed(0)
    disc = CLIPAdapterDiscriminator.from_pretrained(clip_path, hidden=16, lr=1e-2)
    assert isinstance(disc, Discriminator)
    frozen = {k: v.clone() for k, v in disc.module.vision.state_dict().items()}
    smooth = images(8, size=4).repeat_interleave(8, -1).repeat_interleave(8, -2) * 0.5  # "original": clean, blocky
    noisy = images(8, seed=1)  # "accelerated": noise
    before = disc.score(noisy)
    assert before.shape == (8,) and ((before >= 0) & (before <= 1)).all()
    for _ in range(30):
        stats = disc.step(smooth, noisy)
    assert stats["acc"] == 1.0 and disc.score(smooth).mean() > 0.8 and disc.score(noisy).mean() < 0.2
    assert all(torch.equal(v, frozen[k]) for k, v in disc.module.vision.state_dict().items())
    assert not disc.module.vision.training  # stays in eval mode while the adapter trains
    state = disc.state_dict()
    assert set(state["module"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the adapter, not the CLIP tower
    fresh = CLIPAdapterDiscriminator.from_pretrained(clip_path, hidden=16)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.score(noisy), disc.score(noisy))


def test_the_discriminator_reads_a_vision_only_checkpoint_and_refuses_other_models(clip_path, tmp_path):
    CLIPModel.from_pretrained(clip_path).vision_model.save_pretrained(tmp_path / "vision")
    assert isinstance(CLIPAdapterDiscriminator.from_pretrained(tmp_path / "vision").module.vision, CLIPVisionModel)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="needs a CLIP model"):
        CLIPAdapterDiscriminator.from_pretrained(tmp_path / "other")


def test_any_image_size_is_read(clip_path):
    quality = CLIPScore.from_pretrained(clip_path)
    wide = images(2, size=64)[..., :48]  # 64x48
    assert quality.score(wide, PROMPTS[:2]).shape == (2,)
    assert np.isfinite(quality.score(wide, PROMPTS[:2]).numpy()).all()
