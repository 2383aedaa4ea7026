"""Deterministic GenEval-style checker for the embedded world.

Reads an image and says whether each object, colour, count and relation of a caption's
:class:`~rapid3.embedded.scenes.SceneSpec` is there. No learned weights, so the score can be
trusted as an evaluation metric and cannot be gamed by a reward model's blind spots.

Canonical input: an RGB ``numpy.uint8`` array of shape ``(H, W, 3)`` (what
:func:`~rapid3.embedded.scenes.render` returns). Model outputs (float, CHW, torch) are converted
with :func:`to_uint8_hwc`, e.g. ``to_uint8_hwc(x, value_range=(-1, 1))``.

Detection:

1. Each pixel goes to the nearest palette colour (the shape colours plus the background) if it is
   within :data:`COLOR_RADIUS`; farther pixels (muddy or off-palette colours, blended edges) are
   "unknown" and belong to no object.
2. 4-connected components of equal shape colour are objects; components smaller than
   :data:`MIN_AREA_FRACTION` of the smallest object's bounding box are noise and dropped.
3. The shape comes from geometry: the component is compared (intersection over union) with an
   axis-aligned square, a circle and an upright (apex-up) isosceles triangle, each with the
   component's centroid and second moments; the best overlap names the shape, and components
   that overlap every template less than :data:`MIN_SHAPE_IOU` are ignored.

Semantics (GenEval's, with counts made exact for every kind the caption names):

- *objects*: each (shape, colour) kind the caption names is detected at least once;
- *counts*: each named kind is detected exactly as often as the caption says ("a" means one), so
  an extra or a missing instance fails; kinds the caption does not name are ignored everywhere;
- *relation*: GenEval's rule on bounding boxes: the offset between box centres, shrunk per axis
  by :data:`POSITION_MARGIN` times the summed box extents, must point within 60 degrees of the
  named direction ("left of" means the subject's x is smaller; image y grows downwards, so "above"
  means smaller y). It passes if some detected subject/object pair satisfies it; with exact counts
  a passing image has exactly one such pair.

``score`` is the fraction of these sub-checks (one presence and one count check per named kind,
plus the relation) that pass; ``passed`` requires all of them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from rapid3.embedded.scenes import BACKGROUND, COLORS, IMAGE_SIZE, OPPOSITE_RELATION, SIZES, SceneSpec

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Shape colours first, background last: a pixel's class is its row index here, -1 for unknown.
_PALETTE = np.array([*COLORS.values(), BACKGROUND], dtype=np.float64)
_BACKGROUND_CLASS = len(_COLOR_NAMES)
_UNKNOWN_CLASS = -1

#: Largest RGB distance at which a pixel still counts as a palette colour: half the distance
#: between the two closest palette entries, so no pixel can be within reach of two colours.
COLOR_RADIUS: float = 0.5 * min(
    float(np.linalg.norm(a - b)) for a, b in combinations(_PALETTE, 2)
)
#: Components smaller than this fraction of the smallest object's bounding box are noise (an
#: eighth of the box is about a quarter of the smallest triangle).
MIN_AREA_FRACTION: float = 0.125
#: GenEval's POSITION_THRESHOLD: per-axis dead zone, as a fraction of the two objects' extents.
POSITION_MARGIN: float = 0.1
#: Components overlapping their best shape template less than this are no recognisable shape
#: (smears, rings, merged objects) and are ignored; clean renders score about 0.9 or more.
MIN_SHAPE_IOU: float = 0.7
#: Anti-aliasing for the shape templates: samples per pixel side.
TEMPLATE_SUBSAMPLES: int = 4


@dataclass(frozen=True)
class DetectedObject:
    """One detected object. Coordinates are pixels, x rightwards and y downwards."""

    shape: str
    color: str
    cx: float  #: centre of the bounding box
    cy: float
    area: int  #: pixel count
    bbox: tuple[int, int, int, int]  #: (x0, y0, x1, y1), end-exclusive
    shape_iou: float  #: overlap with the best-fitting shape template, 1 for a perfect shape


@dataclass(frozen=True)
class CheckResult:
    """Verdict on one image against one scene spec (see the module docstring for the rules)."""

    passed: bool
    score: float
    objects_ok: bool
    counts_ok: bool
    relation_ok: bool | None  #: None when the caption has no relation
    detected: tuple[DetectedObject, ...]
    reasons: tuple[str, ...]  #: one line per failed sub-check


def to_uint8_hwc(image, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Convert an RGB image to the checker's canonical ``uint8 (H, W, 3)`` numpy array.

    Accepts numpy arrays or torch tensors, channels-last ``(H, W, 3)`` or channels-first
    ``(3, H, W)``. ``uint8`` input is taken as is; any other dtype is mapped linearly from
    ``value_range`` (e.g. ``(-1, 1)`` for a diffusion model's output) to 0..255 and clipped.
    """
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    low, high = value_range
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Find the coloured shapes in a canonical ``uint8 (H, W, 3)`` image, largest first."""
    _require_canonical(image)
    classes = _classify_pixels(image)
    labels = _label_components(classes)
    min_area = _min_area(classes.shape)
    objects = []
    for label in np.unique(labels[labels >= 0]):
        mask = labels == label
        area = int(mask.sum())
        if area < min_area:
            continue
        obj = _describe(mask, _COLOR_NAMES[int(classes[mask][0])], area)
        if obj.shape_iou >= MIN_SHAPE_IOU:
            objects.append(obj)
    return sorted(objects, key=lambda obj: -obj.area)


def check(image: np.ndarray, spec: SceneSpec) -> CheckResult:
    """Check a canonical ``uint8 (H, W, 3)`` image against ``spec``."""
    detected = tuple(detect_objects(image))
    wanted = Counter((obj.shape, obj.color) for obj in spec.objects)
    found = Counter((obj.shape, obj.color) for obj in detected)
    reasons = []
    presence, counts = [], []
    for (shape, color), n in wanted.items():
        presence.append(found[shape, color] > 0)
        counts.append(found[shape, color] == n)
        if not presence[-1]:
            reasons.append(f"no {color} {shape} found")
        if not counts[-1]:
            reasons.append(f"expected {n} {color} {shape}, found {found[shape, color]}")
    relation_ok = None
    if spec.relation is not None:
        relation_ok = _relation_holds(detected, spec)
        if not relation_ok:
            reasons.append(f"relation not satisfied: {spec.caption!r}")
    subchecks = presence + counts + ([relation_ok] if relation_ok is not None else [])
    return CheckResult(
        passed=all(subchecks),
        score=sum(subchecks) / len(subchecks),
        objects_ok=all(presence),
        counts_ok=all(counts),
        relation_ok=relation_ok,
        detected=detected,
        reasons=tuple(reasons),
    )


def checker_accuracy(images: Sequence[np.ndarray], specs: Sequence[SceneSpec]) -> dict:
    """Check ``images[i]`` against ``specs[i]``; summarise overall and per scene complexity.

    Returns ``{"accuracy", "mean_score", "n", "by_complexity": {complexity: {"accuracy",
    "mean_score", "n"}}}``, where accuracy is the fraction of images that pass every sub-check.
    """
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    results = [check(image, spec) for image, spec in zip(images, specs)]
    groups: dict[int, list[CheckResult]] = defaultdict(list)
    for spec, result in zip(specs, results):
        groups[spec.complexity].append(result)
    summary = _summarise(results)
    summary["by_complexity"] = {c: _summarise(groups[c]) for c in sorted(groups)}
    return summary


def _require_canonical(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[-1] == 3):
        raise TypeError("expected a uint8 numpy array (H, W, 3); convert with to_uint8_hwc()")


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """Palette class per pixel: a colour index, the background class, or unknown."""
    distances = np.linalg.norm(image[:, :, None, :].astype(np.float64) - _PALETTE, axis=-1)
    nearest = distances.argmin(axis=-1)
    return np.where(distances.min(axis=-1) <= COLOR_RADIUS, nearest, _UNKNOWN_CLASS)


def _label_components(classes: np.ndarray) -> np.ndarray:
    """Label 4-connected regions of equal shape colour; background and unknown get -1.

    Every pixel points at the smallest pixel index reachable so far; edges pull both ends down
    to the smaller pointer and pointer jumping (``labels[labels]``) shortcuts long chains, so
    this converges in a handful of vectorised sweeps.
    """
    flat = classes.ravel()
    index = np.arange(flat.size).reshape(classes.shape)
    a = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    b = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    is_object = (flat >= 0) & (flat != _BACKGROUND_CLASS)
    joined = is_object[a] & (flat[a] == flat[b])
    a, b = a[joined], b[joined]
    labels = np.arange(flat.size)
    while True:
        previous = labels
        low = np.minimum(labels[a], labels[b])
        labels = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        labels = labels[labels]
        if np.array_equal(labels, previous):
            break
    return np.where(is_object, labels, -1).reshape(classes.shape)


def _min_area(shape: tuple[int, ...]) -> float:
    """Noise floor in pixels, scaled with the image size like the renderer scales objects."""
    scale = shape[0] / IMAGE_SIZE
    smallest_box = (2.0 * min(SIZES.values()) * scale) ** 2
    return MIN_AREA_FRACTION * smallest_box


def _describe(mask: np.ndarray, color: str, area: int) -> DetectedObject:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    shape, iou = _classify_shape(mask.astype(np.float64), xs, ys)
    return DetectedObject(
        shape=shape,
        color=color,
        cx=(x0 + x1) / 2,
        cy=(y0 + y1) / 2,
        area=area,
        bbox=(x0, y0, x1, y1),
        shape_iou=iou,
    )


def _classify_shape(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[str, float]:
    """Best-overlapping upright template among those with the component's first two moments.

    Matching moments rather than the bounding box keeps a stray edge pixel from reshaping the
    template, and matching each shape's own moments adapts to blur that shrinks or grows it.
    """
    # Pixel centres sit at +0.5; a continuous shape's variance exceeds its pixels' by 1/12.
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    vx, vy = xs.var() + 1 / 12, ys.var() + 1 / 12
    dx, dy = _subpixel_offsets(mask.shape, mx, my)
    ious = {}
    for shape, inside in _TEMPLATES.items():
        coverage = _pool(inside(dx, dy, vx, vy), TEMPLATE_SUBSAMPLES)
        ious[shape] = float(np.minimum(mask, coverage).sum() / np.maximum(mask, coverage).sum())
    best = max(ious, key=ious.get)
    return best, ious[best]


def _subpixel_offsets(
    shape: tuple[int, ...], mx: float, my: float
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from (mx, my) of a TEMPLATE_SUBSAMPLES-per-side grid of points in every pixel."""
    fractions = (np.arange(TEMPLATE_SUBSAMPLES) + 0.5) / TEMPLATE_SUBSAMPLES
    y = (np.arange(shape[0])[:, None] + fractions).ravel() - my
    x = (np.arange(shape[1])[:, None] + fractions).ravel() - mx
    return x[None, :], y[:, None]


def _pool(inside: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each pixel's k x k subsamples that are inside."""
    h, w = inside.shape[0] // k, inside.shape[1] // k
    return inside.reshape(h, k, w, k).mean(axis=(1, 3))


# Squares and circles keep their aspect ratio of 1 (the mean variance sets their size) so an
# elongated blob fits neither; triangles take their proportions from the component.


def _inside_square(dx: np.ndarray, dy: np.ndarray, vx: float, vy: float) -> np.ndarray:
    # A uniform interval of half-width a has variance a^2 / 3.
    half = np.sqrt(3 * (vx + vy) / 2)
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)


def _inside_circle(dx: np.ndarray, dy: np.ndarray, vx: float, vy: float) -> np.ndarray:
    # A uniform disc of radius r has variance r^2 / 4 along each axis.
    return dx**2 + dy**2 <= 4 * (vx + vy) / 2


def _inside_triangle(dx: np.ndarray, dy: np.ndarray, vx: float, vy: float) -> np.ndarray:
    # Apex up, base down: base b and height h give variances b^2 / 24 and h^2 / 18, and the
    # centroid lies two thirds of the height below the apex.
    base, height = np.sqrt(24 * vx), np.sqrt(18 * vy)
    depth = (dy + 2 * height / 3) / height  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * base / 2)


_TEMPLATES = {"circle": _inside_circle, "square": _inside_square, "triangle": _inside_triangle}


def relation_outcome(result: CheckResult, spec: SceneSpec) -> str | None:
    """What the objects of a relation caption show: ``"holds"``; ``"reversed"`` (the opposite relation
    holds: subject and object swapped places, the mistake of a model that reads the axis but not who
    goes where); ``"other"``; ``"missing"`` (subject or object not found). None without a relation."""
    if spec.relation is None:
        return None
    found = _relations_found(result.detected, spec)
    if found is None:
        return "missing"
    if spec.relation.relation in found:
        return "holds"
    return "reversed" if OPPOSITE_RELATION[spec.relation.relation] in found else "other"


def _relation_holds(detected: Sequence[DetectedObject], spec: SceneSpec) -> bool:
    return spec.relation.relation in (_relations_found(detected, spec) or set())


def _relations_found(detected: Sequence[DetectedObject], spec: SceneSpec) -> set[str] | None:
    """Relations that hold between any detected subject and object of ``spec``'s relation (None: one is missing)."""
    relation = spec.relation
    subject, target = spec.objects[relation.subject], spec.objects[relation.object]
    subjects = [d for d in detected if (d.shape, d.color) == (subject.shape, subject.color)]
    targets = [d for d in detected if (d.shape, d.color) == (target.shape, target.color)]
    if not subjects or not targets:
        return None
    return set().union(*(_relative_position(s, t) for s in subjects for t in targets if s is not t))


def _relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """GenEval's ``relative_position``: the relations of ``a`` to ``b`` that hold."""
    offset = np.array([a.cx - b.cx, a.cy - b.cy])
    extents = np.array([a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0],
                        a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]], dtype=np.float64)
    shrunk = np.maximum(np.abs(offset) - POSITION_MARGIN * extents, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _summarise(results: Sequence[CheckResult]) -> dict:
    n = len(results)
    return {
        "accuracy": sum(r.passed for r in results) / n if n else float("nan"),
        "mean_score": sum(r.score for r in results) / n if n else float("nan"),
        "n": n,
    }
