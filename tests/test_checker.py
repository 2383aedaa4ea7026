"""Tests for the deterministic GenEval-style checker of the embedded world.

Ground truth comes from the scene generator itself (place + render with seeded generators); each
failure mode is produced by editing the placements of a correct scene and rendering again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from rapid3.embedded import scenes
from rapid3.embedded.checker import check, checker_accuracy, detect_objects, relation_outcome, to_uint8_hwc

N_SCENES = 500
N_EDITED = 200  # scenes per failure mode / perturbation: enough for the rates, keeps it fast
NOISE_SIGMA = 10.0  # on the 0..255 scale
BLUR_SIGMA = 0.6  # pixels


@dataclass(frozen=True)
class Case:
    spec: scenes.SceneSpec
    placements: tuple[scenes.Placement, ...]
    image: np.ndarray


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(N_SCENES):
        spec = scenes.sample_scene(rng)
        placements = scenes.place(spec, rng)
        out.append(Case(spec, placements, scenes.render(placements)))
    return out


def _pass_rate(images: list[np.ndarray], specs: list[scenes.SceneSpec]) -> float:
    return float(np.mean([check(image, spec).passed for image, spec in zip(images, specs)]))


def test_ground_truth_renders_pass(cases: list[Case]) -> None:
    rate = _pass_rate([c.image for c in cases], [c.spec for c in cases])
    print(f"\nground-truth pass rate: {rate:.4f} on {len(cases)} scenes")
    assert rate >= 0.99


def test_ground_truth_objects_are_detected_as_drawn(cases: list[Case]) -> None:
    drawn = sum(len(c.placements) for c in cases)
    matched = 0
    for case in cases:
        detected = detect_objects(case.image)
        for p in case.placements:
            nearest = min(detected, key=lambda d: (d.cx - p.cx) ** 2 + (d.cy - p.cy) ** 2)
            matched += (nearest.shape, nearest.color) == (p.obj.shape, p.obj.color)
    print(f"\nobjects detected with the right shape and colour: {matched / drawn:.4f} of {drawn}")
    assert matched / drawn >= 0.995


# --- failure modes: each edit changes what the caption asks for, so the check must fail -------


def _recolour(case: Case, rng: np.random.Generator) -> tuple[scenes.Placement, ...]:
    i = int(rng.integers(len(case.placements)))
    p = case.placements[i]
    colour = str(rng.choice([c for c in scenes.COLORS if c != p.obj.color]))
    return _replace_at(case.placements, i, replace(p, obj=replace(p.obj, color=colour)))


def _reshape(case: Case, rng: np.random.Generator) -> tuple[scenes.Placement, ...]:
    i = int(rng.integers(len(case.placements)))
    p = case.placements[i]
    shape = str(rng.choice([s for s in scenes.SHAPES if s != p.obj.shape]))
    return _replace_at(case.placements, i, replace(p, obj=replace(p.obj, shape=shape)))


def _drop_one(case: Case, rng: np.random.Generator) -> tuple[scenes.Placement, ...]:
    i = int(rng.integers(len(case.placements)))
    return case.placements[:i] + case.placements[i + 1 :]


def _add_copy(case: Case, rng: np.random.Generator) -> tuple[scenes.Placement, ...] | None:
    """One more instance of a named object, small, in a free spot (None if there is none)."""
    obj = case.placements[int(rng.integers(len(case.placements)))].obj
    size = min(scenes.SIZES, key=scenes.SIZES.get)
    half, gap = scenes.SIZES[size], 2.0
    for cx, cy in rng.permutation(_grid(half)):
        if all(
            max(abs(cx - p.cx), abs(cy - p.cy)) > half + scenes.SIZES[p.size] + gap
            for p in case.placements
        ):
            return case.placements + (scenes.Placement(obj, size, float(cx), float(cy)),)
    return None


def _grid(half: float) -> np.ndarray:
    """Candidate centres that keep an object of this half-extent a pixel inside the image."""
    ticks = np.arange(np.ceil(half + 1), scenes.IMAGE_SIZE - half - 1 + 1e-9, 1.0)
    return np.stack(np.meshgrid(ticks, ticks), axis=-1).reshape(-1, 2)


def _replace_at(placements: tuple, i: int, new: scenes.Placement) -> tuple:
    return placements[:i] + (new,) + placements[i + 1 :]


@pytest.mark.parametrize(
    "edit", [_recolour, _reshape, _drop_one, _add_copy], ids=lambda f: f.__name__
)
def test_wrong_object_or_count_fails(
    cases: list[Case], edit: Callable[[Case, np.random.Generator], tuple | None]
) -> None:
    rng = np.random.default_rng(7)
    results = []
    for case in cases[:N_EDITED]:
        edited = edit(case, rng)
        if edited is not None:
            results.append(check(scenes.render(edited), case.spec))
    caught = np.mean([not r.passed and not r.counts_ok for r in results])
    print(f"\n{edit.__name__}: {caught:.4f} of {len(results)} edited scenes fail")
    assert len(results) >= N_EDITED // 4
    assert caught >= 0.99


def test_swapped_relation_fails_on_relation_alone(cases: list[Case]) -> None:
    relational = [c for c in cases if c.spec.relation is not None]
    results = []
    for case in relational:
        rel = case.spec.relation
        subject, target = case.placements[rel.subject], case.placements[rel.object]
        assert subject.obj == case.spec.objects[rel.subject]  # placements follow spec order
        assert target.obj == case.spec.objects[rel.object]
        # Exchange identities, keep positions and sizes: same layout, opposite relation.
        swapped = _replace_at(case.placements, rel.subject, replace(subject, obj=target.obj))
        swapped = _replace_at(swapped, rel.object, replace(target, obj=subject.obj))
        results.append(check(scenes.render(swapped), case.spec))
    caught = np.mean([r.objects_ok and r.counts_ok and r.relation_ok is False for r in results])
    print(f"\nswapped relations failing on the relation alone: {caught:.4f} of {len(results)}")
    assert len(results) >= 20
    assert caught >= 0.99
    assert np.mean([relation_outcome(r, c.spec) == "reversed" for r, c in zip(results, relational)]) >= 0.99
    assert all(relation_outcome(check(c.image, c.spec), c.spec) == "holds" for c in relational)


def test_relation_needs_the_dominant_axis() -> None:
    first, second = list(scenes.COLORS)[:2]
    spec = scenes.parse_caption(f"a {first} triangle above a {second} circle")
    small = min(scenes.SIZES, key=scenes.SIZES.get)
    triangle, circle = spec.objects[spec.relation.subject], spec.objects[spec.relation.object]
    below = scenes.Placement(circle, small, 9.0, 22.0)
    straight_above = scenes.Placement(triangle, small, 11.0, 8.0)
    mostly_right = scenes.Placement(triangle, small, 24.0, 17.0)  # a little higher, far right
    assert check(scenes.render((straight_above, below)), spec).passed
    result = check(scenes.render((mostly_right, below)), spec)
    assert result.objects_ok and result.counts_ok and result.relation_ok is False
    assert relation_outcome(result, spec) == "other"
    assert relation_outcome(check(scenes.render((below,)), spec), spec) == "missing"
    assert relation_outcome(result, scenes.parse_caption(f"a {first} triangle")) is None


def test_blank_background_fails(cases: list[Case]) -> None:
    blank = np.full((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), scenes.BACKGROUND, dtype=np.uint8)
    for case in cases[:50]:
        result = check(blank, case.spec)
        assert not result.passed and result.score == 0.0 and result.detected == ()


def test_specks_and_smears_are_not_objects() -> None:
    image = np.full((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), scenes.BACKGROUND, dtype=np.uint8)
    colour = next(iter(scenes.COLORS.values()))
    image[2:30:6, 2:30:6] = colour  # isolated pixels: below the minimum area
    yy, xx = np.mgrid[: scenes.IMAGE_SIZE, : scenes.IMAGE_SIZE]
    radius2 = (xx - 16) ** 2 + (yy - 16) ** 2
    image[(radius2 <= 64) & (radius2 >= 20)] = colour  # a ring: no shape template fits it
    assert detect_objects(image) == []


# --- robustness: a small generative model's images are a little noisy and blurry ------------


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image + rng.normal(0.0, NOISE_SIGMA, image.shape)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian blur, edge-padded (``rng`` unused: perturbations share a signature)."""
    offsets = np.arange(-2, 3)
    kernel = np.exp(-(offsets**2) / (2 * BLUR_SIGMA**2))
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (2, 2)
        padded = np.pad(image, pad, mode="edge")
        n = image.shape[axis]
        taps = (k * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
        image = sum(taps)
    return image


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _noise(_blur(image, rng), rng)


@pytest.mark.parametrize("perturb", [_noise, _blur, _blur_and_noise], ids=lambda f: f.__name__)
def test_mildly_degraded_renders_still_pass(
    cases: list[Case], perturb: Callable[[np.ndarray, np.random.Generator], np.ndarray]
) -> None:
    rng = np.random.default_rng(11)
    degraded = [
        np.clip(np.round(perturb(c.image.astype(np.float64), rng)), 0, 255).astype(np.uint8)
        for c in cases[:N_EDITED]
    ]
    assert not np.array_equal(degraded[0], cases[0].image)
    rate = _pass_rate(degraded, [c.spec for c in cases[:N_EDITED]])
    print(f"\n{perturb.__name__}: pass rate {rate:.4f} on {len(degraded)} scenes")
    assert rate >= 0.95


# --- input conversion and the summary ---------------------------------------------------------


def test_model_output_converts_to_the_canonical_image(cases: list[Case]) -> None:
    image = cases[0].image
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # a model's [-1, 1] CHW
    assert np.array_equal(to_uint8_hwc(chw, value_range=(-1.0, 1.0)), image)
    assert np.array_equal(to_uint8_hwc(image.astype(np.float32) / 255.0), image)
    with pytest.raises(TypeError, match="to_uint8_hwc"):
        check(chw.numpy(), cases[0].spec)


def test_checker_accuracy_summarises_by_complexity(cases: list[Case]) -> None:
    subset = cases[:100]
    blank = np.full_like(subset[0].image, scenes.BACKGROUND)
    images = [c.image if i % 3 else blank for i, c in enumerate(subset)]  # a third must fail
    specs = [c.spec for c in subset]
    summary = checker_accuracy(images, specs)
    passed = [check(image, spec).passed for image, spec in zip(images, specs)]
    assert summary["n"] == len(subset)
    assert summary["accuracy"] == pytest.approx(np.mean(passed))
    assert summary["accuracy"] <= 2 / 3 + 1e-9
    for complexity, group in summary["by_complexity"].items():
        members = [ok for ok, spec in zip(passed, specs) if spec.complexity == complexity]
        assert group["n"] == len(members)
        assert group["accuracy"] == pytest.approx(np.mean(members))
    assert sum(g["n"] for g in summary["by_complexity"].values()) == len(subset)
    with pytest.raises(ValueError):
        checker_accuracy(images, specs[:-1])
