"""PSNR, SSIM, Fréchet distance, and the shipped evaluator network whose features it uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rapid3.embedded import scenes
from rapid3.eval.evaluator import PAIRS, image_features, load_evaluator, to_model_space
from rapid3.rewards.metrics import frechet_distance, psnr, ssim


def images(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    a = images(0)
    assert np.isinf(psnr(a, a)).all()
    assert ssim(a, a) == pytest.approx([1.0, 1.0, 1.0])


def test_psnr_of_a_known_error():
    a = np.full((2, 32, 32, 3), 100, np.uint8)
    b = a.copy()
    b[1] += 10  # MSE 100 on the second image only
    values = psnr(b, a)
    assert np.isinf(values[0]) and values[1] == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_falls_with_noise_and_is_symmetric():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:32, :32]
    base = np.stack([40 + 4 * x + 2 * y, 200 - 3 * y, 60 + 2 * x], axis=-1)[None].astype(float)  # a smooth image
    noisy = [np.clip(base + rng.normal(0, s, base.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    ref = base.astype(np.uint8)
    scores = [ssim(x, ref)[0] for x in noisy]
    assert 1 > scores[0] > scores[1] > scores[2]
    assert ssim(noisy[1], ref) == pytest.approx(ssim(ref, noisy[1]))
    # A brightness shift leaves structure alone: SSIM stays far above that of strong noise.
    shifted = np.clip(ref.astype(int) + 20, 0, 255).astype(np.uint8)
    assert ssim(shifted, ref)[0] > scores[1]


def test_metrics_reject_mismatched_batches():
    with pytest.raises(ValueError, match="same shape"):
        psnr(images(0, 2), images(0, 3))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(images(0)[:, :8, :8], images(1)[:, :8, :8])


def test_frechet_distance_closed_form():
    x = np.random.default_rng(3).normal(size=(500, 6)) + 1.0
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # For Y = 2X: |mu - 2mu|^2 + tr(C + 4C - 2 * 2C) = |mu|^2 + tr(C), exactly, for any sample X.
    expected = np.sum(x.mean(0) ** 2) + np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-9)
    # Translation: only the mean term.
    assert frechet_distance(x, x + 0.5) == pytest.approx(6 * 0.25, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], x)


def _shipped_evaluator_on_renders():
    model = load_evaluator()
    rng = np.random.default_rng(0)
    specs = scenes.all_scenes()[::97]
    renders = np.stack([scenes.render(scenes.place(spec, rng)) for spec in specs])
    presence, counts = model(to_model_space(renders))
    return model, specs, renders, (presence > 0).numpy(), counts.argmax(1).tolist()


def test_shipped_evaluator_counts_objects_and_gives_features():
    model, specs, renders, _, counts = _shipped_evaluator_on_renders()
    assert np.mean([count + 1 == len(spec.objects) for spec, count in zip(specs, counts)]) >= 0.95
    features = image_features(renders, model)
    assert features.shape == (len(specs), model.config.feature_dim) and features.dtype == np.float64


def test_shipped_evaluator_names_what_a_render_contains():
    # The shipped evaluator names every (colour, shape) pair of 81% of fresh renders exactly (training.json),
    # 29 of these 40 (mostly 3-object) scenes; its first training stage alone managed 15.
    _, specs, _, presence, _ = _shipped_evaluator_on_renders()
    right = [{PAIRS[i] for i in np.flatnonzero(row)} == {(o.color, o.shape) for o in spec.objects}
             for spec, row in zip(specs, presence)]
    assert np.mean(right) >= 0.65
