"""The scene grammar, placement, renderer and prompt splits of the embedded world."""

import itertools

import numpy as np
import pytest

from rapid3.embedded import scenes
from rapid3.embedded.scenes import BACKGROUND, COLORS, IMAGE_SIZE, ObjectSpec, Relation, parse_caption


@pytest.mark.parametrize(
    "caption, kind, n",
    [
        ("a red circle", "single", 1),
        ("two blue squares", "count", 2),
        ("three green triangles", "count", 3),
        ("a red circle and a blue square", "pair", 2),
        ("a green triangle above a yellow circle", "relation", 2),
        ("a red circle, a blue square and a green triangle", "triple", 3),
    ],
)
def test_examples_parse(caption: str, kind: str, n: int) -> None:
    spec = parse_caption(caption)
    assert (spec.caption, spec.kind, spec.complexity) == (caption, kind, n)


def test_relation_subject_first() -> None:
    spec = parse_caption("a green triangle above a yellow circle")
    assert spec.relation == Relation(0, "above", 1)
    assert spec.objects == (ObjectSpec("triangle", "green"), ObjectSpec("circle", "yellow"))


@pytest.mark.parametrize(
    "caption",
    ["a red circle and a red circle", "two red circle", "a red circle left of a red circle", "an orange circle",
     "a red circle, a blue square, a green triangle", "one red circle", "A red circle", "a red circle "],
)
def test_outside_grammar_raises(caption: str) -> None:
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_every_caption_round_trips() -> None:
    all_scenes = scenes.all_scenes()
    assert len({s.caption for s in all_scenes}) == len(all_scenes)
    assert all(parse_caption(s.caption) == s for s in all_scenes)


def test_colours_separated() -> None:
    for a, b in itertools.combinations(list(COLORS.values()) + [BACKGROUND], 2):
        assert np.linalg.norm(np.subtract(a, b)) > 140


def _pixels_of(image: np.ndarray, color: str) -> int:
    return int((image == COLORS[color]).all(-1).sum())


def test_placements_valid_and_rendered() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = scenes.sample_scene(rng)
        placed = scenes.place(spec, rng)
        assert tuple(p.obj for p in placed) == spec.objects
        for p in placed:  # fully inside the image
            assert scenes.BORDER + p.half <= min(p.cx, p.cy) and max(p.cx, p.cy) <= IMAGE_SIZE - scenes.BORDER - p.half
        assert all(scenes.separated(a, b) for a, b in itertools.combinations(placed, 2))
        if spec.relation is not None:
            r = spec.relation
            assert scenes.relation_holds(placed[r.subject], placed[r.object], r.relation)
        image = scenes.render(placed)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        for obj in spec.objects:  # every colour of the caption is painted, pure, inside its shapes
            assert _pixels_of(image, obj.color) > 0
        assert {o.color for o in spec.objects} == {c for c in COLORS if _pixels_of(image, c) > 0}


def test_relation_directions() -> None:
    """Image y grows downwards: "above" is a smaller cy; "left of" a smaller cx."""
    rng = np.random.default_rng(1)
    for relation, axis, sign in [("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1)]:
        spec = scenes.make_scene((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), Relation(0, relation, 1))
        for _ in range(20):
            subj, obj = scenes.place(spec, rng)
            d = np.subtract((subj.cx, subj.cy), (obj.cx, obj.cy))
            assert np.sign(d[axis]) == sign and abs(d[axis]) > abs(d[1 - axis])


def test_count_objects_separate() -> None:
    """Identical objects of a count caption render as separate blobs: background between boxes."""
    spec = parse_caption("three red squares")
    placed = scenes.place(spec, np.random.default_rng(2))
    image = scenes.render(placed)
    # squares of half-extent h cover at least (2h - 1)^2 pure pixels each
    assert _pixels_of(image, "red") >= sum((2 * p.half - 1) ** 2 for p in placed)


def test_triangle_is_upright() -> None:
    placed = (scenes.Placement(ObjectSpec("triangle", "green"), "large", 16.0, 16.0),)
    mask = (scenes.render(placed) != BACKGROUND).any(-1)
    widths = mask.sum(1)[mask.any(1)]
    assert widths[0] < widths[-1] and widths[-1] >= 13  # narrow apex on top, full base below


def test_splits_fixed_and_disjoint() -> None:
    splits = scenes.prompt_splits()
    assert splits == scenes.prompt_splits()
    train, heldout = splits["train"], splits["heldout"]
    assert len(train) + len(heldout) == len(scenes.all_scenes())
    assert {s.composition for s in train}.isdisjoint({s.composition for s in heldout})
    assert {s.kind for s in heldout} == {"count", "pair", "relation", "triple"}
    singles = {s.caption for s in scenes.all_scenes() if s.kind == "single"}
    assert len(singles) == len(scenes.SHAPES) * len(COLORS)
    assert singles <= {s.caption for s in train}


def test_composition_ignores_wording() -> None:
    a = parse_caption("a red circle left of a blue square")
    b = parse_caption("a blue square right of a red circle")
    assert a.composition == b.composition
    assert parse_caption("a red circle above a blue square").composition != a.composition
    assert parse_caption("a red circle and a blue square").composition == parse_caption(
        "a blue square and a red circle").composition


def test_canonical_caption_mirrors_right_of_and_below() -> None:
    assert scenes.canonical_caption("a red circle right of a blue square") == "a blue square left of a red circle"
    assert scenes.canonical_caption("a red circle below a blue square") == "a blue square above a red circle"
    for kept in ("a red circle left of a blue square", "a red circle above a blue square", "two red circles",
                 "a red circle and a blue square", "not a caption"):
        assert scenes.canonical_caption(kept) == kept
    train = {s.caption for s in scenes.prompt_splits()["train"]}
    for spec in scenes.all_scenes():
        canonical = parse_caption(scenes.canonical_caption(spec.caption))
        assert canonical.composition == spec.composition  # the same image is asked for
        assert canonical.relation is None or canonical.relation.relation in ("left of", "above")
        assert (canonical.caption in train) == (spec.caption in train)  # no held-out wording enters training


def test_sample_scene_deterministic_and_from_train() -> None:
    first = [scenes.sample_scene(np.random.default_rng(5)).caption for _ in range(3)]
    assert len(set(first)) == 1
    train = {s.caption for s in scenes.prompt_splits()["train"]}
    rng = np.random.default_rng(6)
    drawn = [scenes.sample_scene(rng) for _ in range(500)]
    assert all(s.caption in train for s in drawn)
    assert {s.kind for s in drawn} == set(scenes.KINDS)
