"""Procedural scenes with exact ground truth: the data of the embedded world.

A scene is 1-3 coloured shapes on a plain background at 32x32. Its caption comes from a
small grammar, and :func:`parse_caption` is the exact inverse of that grammar, so a caption
alone says what must be in the image (objects, count, relation) and a checker can verify it
from positions and colours.

Grammar (``NP`` = ``"a <colour> <shape>"``):

=========  ==========================================  ==========
kind       caption                                     objects
=========  ==========================================  ==========
single     ``a red circle``                            1
count      ``two blue squares`` / ``three ...``        2 or 3 identical
pair       ``NP and NP``                               2 different
relation   ``NP <left of|right of|above|below> NP``    2 different, subject first
triple     ``NP, NP and NP``                           3 pairwise different
=========  ==========================================  ==========

Two objects are *different* when their (shape, colour) differ. Positions: ``x`` grows to the
right and ``y`` grows downwards (image rows), so "above" means a smaller ``cy``.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Five saturated colours, pairwise >= 150 apart in RGB and >= 200 from the background; no
# colour word needs "an", which keeps the grammar to one article.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 90, 235),
    "yellow": (240, 200, 30),
    "purple": (180, 40, 190),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
# Half-extent in pixels: a shape covers [c - h, c + h] on both axes. Two large shapes still fit
# side by side with a gap inside 32 pixels, which every relation needs.
SIZES: dict[str, float] = {"small": 4.5, "large": 7.0}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
IMAGE_SIZE = 32
COUNT_WORDS = {2: "two", 3: "three"}

GAP = 2.0  # minimum background between the bounding boxes of two objects, in pixels
BORDER = 1.0  # minimum background between a bounding box and the image edge
# A relation holds when the boxes are separated along its axis by at least GAP and the offset
# across the axis is at most this fraction of the offset along it: no scene is ambiguous
# between "left of" and "above".
RELATION_CROSS_RATIO = 0.5
SUPERSAMPLE = 4  # render at 4x and average: light anti-aliasing, pure colours inside shapes
PLACE_ATTEMPTS = 10_000
SPLIT_SEED = 3
HELDOUT_FRACTION = 0.2
KINDS = ("single", "count", "pair", "relation", "triple")
# How often each kind is drawn for training: singles weigh most (their bar is highest), and
# the rare-per-caption kinds still get a steady share.
TRAIN_KIND_WEIGHTS = {"single": 0.25, "count": 0.15, "pair": 0.15, "relation": 0.25, "triple": 0.2}


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a caption: a shape in a colour."""

    shape: str
    color: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.color not in COLORS:
            raise ValueError(f"unknown object {self.color!r} {self.shape!r}")

    @property
    def phrase(self) -> str:
        """The noun phrase, e.g. ``"a red circle"``."""
        return f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]`` (indices into SceneSpec.objects)."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for. Build it with :func:`make_scene` or :func:`parse_caption`."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None
    caption: str

    @property
    def complexity(self) -> int:
        """Number of objects, 1..3 (a relation scene has 2)."""
        return len(self.objects)

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        if self.relation is not None:
            return "relation"
        if len(self.objects) == 1:
            return "single"
        if len(set(self.objects)) == 1:
            return "count"
        return "pair" if len(self.objects) == 2 else "triple"

    @property
    def composition(self) -> tuple:
        """What the scene contains, independent of word order.

        "A and B" equals "B and A"; "A left of B" equals "B right of A". Splits are made on
        this key, so no held-out composition is seen in training under another wording.
        """
        if self.relation is None:
            return (self.kind, tuple(sorted((o.shape, o.color) for o in self.objects)))
        subj, obj = self.objects[self.relation.subject], self.objects[self.relation.object]
        if self.relation.relation in ("right of", "below"):
            subj, obj = obj, subj
        axis = "x" if "of" in self.relation.relation else "y"
        return ("relation", axis, (subj.shape, subj.color), (obj.shape, obj.color))


@dataclass(frozen=True)
class Placement:
    """An object placed in the image: centre (cx, cy) in pixels, size a key of :data:`SIZES`."""

    obj: ObjectSpec
    size: str
    cx: float
    cy: float

    @property
    def half(self) -> float:
        """Half-extent in pixels."""
        return SIZES[self.size]


def caption_for(objects: tuple[ObjectSpec, ...], relation: Relation | None = None) -> str:
    """The grammar's caption for these objects; ValueError if the grammar has none."""
    n = len(objects)
    if relation is not None:
        if n != 2 or relation.relation not in RELATIONS or {relation.subject, relation.object} != {0, 1}:
            raise ValueError(f"bad relation {relation} for {n} objects")
        if objects[0] == objects[1]:
            raise ValueError("a relation needs two different objects")
        subj, obj = objects[relation.subject], objects[relation.object]
        return f"{subj.phrase} {relation.relation} {obj.phrase}"
    if n == 1:
        return objects[0].phrase
    if n in COUNT_WORDS and len(set(objects)) == 1:
        return f"{COUNT_WORDS[n]} {objects[0].color} {PLURALS[objects[0].shape]}"
    if n not in (2, 3) or len(set(objects)) != n:
        raise ValueError(f"no caption for objects {objects}: 1-3 objects, identical or all different")
    phrases = [o.phrase for o in objects]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_scene(objects: tuple[ObjectSpec, ...], relation: Relation | None = None) -> SceneSpec:
    """A SceneSpec with its caption filled in."""
    return SceneSpec(tuple(objects), relation, caption_for(tuple(objects), relation))


_NP = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_COUNT_RE = re.compile(rf"({'|'.join(COUNT_WORDS.values())}) ({'|'.join(COLORS)}) ({'|'.join(PLURALS.values())})")
_RELATION_RE = re.compile(rf"{_NP} ({'|'.join(RELATIONS)}) {_NP}")
_LIST_RE = re.compile(rf"{_NP}(?:, {_NP})? and {_NP}")
_SINGLE_RE = re.compile(_NP)


def parse_caption(caption: str) -> SceneSpec:
    """Inverse of the grammar: ``parse_caption(c).caption == c``; ValueError outside it."""
    if m := _SINGLE_RE.fullmatch(caption):
        spec = make_scene((ObjectSpec(m[2], m[1]),))
    elif m := _COUNT_RE.fullmatch(caption):
        n = {w: k for k, w in COUNT_WORDS.items()}[m[1]]
        shape = {p: s for s, p in PLURALS.items()}[m[3]]
        spec = make_scene((ObjectSpec(shape, m[2]),) * n)
    elif m := _RELATION_RE.fullmatch(caption):
        spec = make_scene((ObjectSpec(m[2], m[1]), ObjectSpec(m[5], m[4])), Relation(0, m[3], 1))
    elif m := _LIST_RE.fullmatch(caption):
        groups = [g for g in m.groups() if g is not None]
        objects = tuple(ObjectSpec(s, c) for c, s in zip(groups[0::2], groups[1::2]))
        if len(set(objects)) != len(objects):
            raise ValueError(f"caption lists the same object twice: {caption!r}")
        spec = make_scene(objects)
    else:
        raise ValueError(f"caption outside the grammar: {caption!r}")
    if spec.caption != caption:  # e.g. "a red circle and a red circle" would re-caption as a count
        raise ValueError(f"caption outside the grammar: {caption!r}")
    return spec


def canonical_caption(caption: str) -> str:
    """A "right of" / "below" caption reworded as its mirror ("A right of B" -> "B left of A"); others unchanged.

    Both wordings ask for the same image (they share a :attr:`SceneSpec.composition`). In the canonical one the
    object named first always goes left or up, so which side a colour goes to follows from word order alone, not
    from word order *and* the relation word together.
    """
    m = _RELATION_RE.fullmatch(caption)
    if m is None or m[3] not in ("right of", "below"):
        return caption
    return f"a {m[4]} {m[5]} {OPPOSITE_RELATION[m[3]]} a {m[1]} {m[2]}"


def relation_holds(subject: Placement, obj: Placement, relation: str) -> bool:
    """Whether ``subject`` is ``relation`` ``obj`` with a clear margin (see RELATION_CROSS_RATIO)."""
    dx, dy = obj.cx - subject.cx, obj.cy - subject.cy  # obj relative to subject
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= subject.half + obj.half + GAP and abs(across) <= RELATION_CROSS_RATIO * along


def separated(a: Placement, b: Placement) -> bool:
    """Whether the bounding boxes of a and b are at least GAP apart on some axis."""
    reach = a.half + b.half + GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def place(spec: SceneSpec, rng: np.random.Generator) -> tuple[Placement, ...]:
    """Random sizes and positions for the scene's objects, in the order of ``spec.objects``.

    Objects lie fully inside the image (BORDER), are pairwise separated (GAP) and satisfy the
    relation with a clear margin. Rejection sampling; each attempt redraws the sizes, so crowded
    scenes fall back to smaller shapes.
    """
    sizes = list(SIZES)
    for _ in range(PLACE_ATTEMPTS):
        placements = []
        for obj in spec.objects:
            size = sizes[rng.integers(len(sizes))]
            lo, hi = BORDER + SIZES[size], IMAGE_SIZE - BORDER - SIZES[size]
            placements.append(Placement(obj, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))))
        if _valid(spec, placements):
            return tuple(placements)
    raise RuntimeError(f"could not place {spec.caption!r} in {PLACE_ATTEMPTS} attempts")


def _valid(spec: SceneSpec, placements: list[Placement]) -> bool:
    if not all(separated(a, b) for a, b in itertools.combinations(placements, 2)):
        return False
    rel = spec.relation
    return rel is None or relation_holds(placements[rel.subject], placements[rel.object], rel.relation)


def _coverage(p: Placement, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the shape on the (supersampled) sample grid xs, ys."""
    h, dx, dy = p.half, xs - p.cx, ys - p.cy
    if p.obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if p.obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # Upright isosceles triangle: apex at (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h).
    return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)


def render(placements: tuple[Placement, ...] | list[Placement], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image; positions are in IMAGE_SIZE pixels and scale with ``size``.

    Light anti-aliasing: SUPERSAMPLE^2 samples per pixel, so only edge pixels mix with the
    background and every interior pixel has the exact colour.
    """
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) * (IMAGE_SIZE / n)  # sample centres in IMAGE_SIZE pixel units
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    image = np.empty((n, n, 3), np.float32)
    image[:] = BACKGROUND
    for p in placements:  # objects never overlap, so drawing order does not matter
        image[_coverage(p, xs, ys)] = COLORS[p.obj.color]
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.rint(image).astype(np.uint8)


def all_scenes() -> list[SceneSpec]:
    """Every caption of the grammar, each word order included (3825 captions)."""
    objects = [ObjectSpec(s, c) for c in COLORS for s in SHAPES]
    scenes = [make_scene((o,)) for o in objects]
    scenes += [make_scene((o,) * n) for n in COUNT_WORDS for o in objects]
    scenes += [make_scene(pair) for pair in itertools.permutations(objects, 2)]
    scenes += [make_scene(pair, Relation(0, r, 1)) for pair in itertools.permutations(objects, 2) for r in RELATIONS]
    scenes += [make_scene(triple) for triple in itertools.permutations(objects, 3)]
    return scenes


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[SceneSpec, ...]]:
    compositions: dict[tuple, list[SceneSpec]] = {}
    for scene in all_scenes():
        compositions.setdefault(scene.composition, []).append(scene)
    rng = np.random.default_rng(SPLIT_SEED)
    heldout: set[tuple] = set()
    for kind in KINDS[1:]:  # every single-object caption stays in training
        keys = sorted(k for k in compositions if k[0] == kind)
        picked = rng.choice(len(keys), size=round(HELDOUT_FRACTION * len(keys)), replace=False)
        heldout.update(keys[i] for i in picked)
    split = {"train": [], "heldout": []}
    for key, scenes in compositions.items():
        split["heldout" if key in heldout else "train"].extend(scenes)
    return {name: tuple(scenes) for name, scenes in split.items()}


def prompt_splits() -> dict[str, list[SceneSpec]]:
    """Fixed train / held-out caption splits.

    Held out: a seeded 20% of the multi-object compositions of each kind (counts, pairs,
    relations, triples), with every wording of each; all single-object captions are in train.
    Deterministic: the same lists, in the same order, on every call and machine.
    """
    return {name: list(scenes) for name, scenes in _splits().items()}


@functools.lru_cache(maxsize=2)
def _by_kind(split: str) -> dict[str, tuple[SceneSpec, ...]]:
    groups: dict[str, list[SceneSpec]] = {kind: [] for kind in KINDS}
    for scene in _splits()[split]:
        groups[scene.kind].append(scene)
    return {kind: tuple(scenes) for kind, scenes in groups.items()}


def sample_scene(rng: np.random.Generator, split: str = "train",
                 kind_weights: Mapping[str, float] = TRAIN_KIND_WEIGHTS) -> SceneSpec:
    """A random caption of ``split``: kind by ``kind_weights`` (relative), then uniform within the kind."""
    groups = _by_kind(split)
    kinds = [k for k in KINDS if groups[k] and kind_weights.get(k, 0.0) > 0]
    weights = np.array([kind_weights[k] for k in kinds])
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    return groups[kind][rng.integers(len(groups[kind]))]


EVALUATION_KIND_ORDER = ("triple", "relation", "pair", "count")  # round-robin order of held-out kinds


def evaluation_prompts(heldout: int, singles: int) -> list[SceneSpec]:
    """The fixed evaluation prompts of the embedded world: ``heldout`` held-out captions, round-robin
    over kinds (a fixed shuffle within each kind), then ``singles`` single-object captions of the train
    split (the held-out split has none by design; cycled if more are asked than exist), so that
    every complexity 1-3 is measured."""
    rng = np.random.default_rng(0)
    split = prompt_splits()
    queues = {kind: [s for s in split["heldout"] if s.kind == kind] for kind in EVALUATION_KIND_ORDER}
    queues = {kind: [specs[i] for i in rng.permutation(len(specs))] for kind, specs in queues.items()}
    available = sum(len(q) for q in queues.values())
    if heldout > available:
        raise ValueError(f"asked for {heldout} held-out prompts; the held-out split has {available}.")
    picked: list[SceneSpec] = []
    while len(picked) < heldout:
        for kind in EVALUATION_KIND_ORDER:
            if queues[kind] and len(picked) < heldout:
                picked.append(queues[kind].pop(0))
    single = [s for s in split["train"] if s.kind == "single"]
    single = [single[i] for i in rng.permutation(len(single))]
    return picked + [single[i % len(single)] for i in range(singles)]
