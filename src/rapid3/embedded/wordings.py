"""Prompts worded as the scene grammar never words them, each paired with the scene it asks for.

Real users do not type the training captions. Each wording here asks for exactly what a grammar caption
asks for (the same objects, count and relation, so the checker scores it with the same ``SceneSpec``), in
words the grammar does not produce: digits for counts, other joiners ("together with", "plus"), reordered
clauses ("to the left of B is A"), other relation words ("over", "beneath"), extra words ("a single",
"on a plain background") and colour synonyms the model's training captions never contain ("crimson",
"violet"). No wording is a caption of the grammar (a test checks it against every caption), so no
training run, which only ever sees grammar captions, has seen one.

    specs = unseen_wordings(evaluation_prompts(200, 25))   # same scenes, new words: spec.caption is the wording
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .scenes import COUNT_WORDS, PLURALS, ObjectSpec, SceneSpec

WORDING_SEED = 7
"""Seed of the choice of wording per scene: fixed, so every evaluation sees the same prompts."""
COLOR_SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "purple": "violet"}
"""A colour word outside the training captions for each of the grammar's colours."""
SYNONYM_FRACTION = 0.3
"""Share of scenes whose colours are named by their synonyms (on top of the reworded structure)."""

Color = Callable[[str], str]


def _single(o: ObjectSpec, color: Color) -> list[str]:
    c, s = color(o.color), o.shape
    return [f"one {c} {s}", f"a single {c} {s}", f"a {s} in {c}", f"{c.capitalize()} {s}.",
            f"a {c} {s} on a plain background"]


def _count(o: ObjectSpec, n: int, color: Color) -> list[str]:
    c, plural = color(o.color), PLURALS[o.shape]
    together = "both" if n == 2 else "all"
    word = COUNT_WORDS[n]
    return [f"{n} {c} {plural}", f"{word} {plural}, {together} {c}", f"{c} {plural}, {word} of them"]


RELATION_WORDINGS = {
    "left of": ("{a} to the left of {b}", "to the left of {b} is {a}", "{a} is left of {b}"),
    "right of": ("{a} to the right of {b}", "to the right of {b} is {a}", "{a} on the right side of {b}"),
    "above": ("{a} over {b}", "{a} on top of {b}", "above {b} is {a}"),
    "below": ("{a} under {b}", "{a} beneath {b}", "below {b} is {a}"),
}
"""Each grammar relation in words the grammar does not use; {a} is the subject, {b} the object."""


def wordings(spec: SceneSpec, *, synonyms: bool = False) -> list[str]:
    """Every unseen wording of ``spec`` (colours as their synonyms when ``synonyms``)."""
    color: Color = COLOR_SYNONYMS.__getitem__ if synonyms else str
    objects = spec.objects
    if spec.kind == "single":
        return _single(objects[0], color)
    if spec.kind == "count":
        return _count(objects[0], len(objects), color)
    phrases = [f"a {color(o.color)} {o.shape}" for o in objects]
    if spec.kind == "relation":
        a, b = phrases[spec.relation.subject], phrases[spec.relation.object]
        return [w.format(a=a, b=b) for w in RELATION_WORDINGS[spec.relation.relation]]
    if spec.kind == "pair":
        return [f"{phrases[0]} together with {phrases[1]}", f"{phrases[0]} plus {phrases[1]}",
                f"both {phrases[0]} and {phrases[1]}"]
    a, b, c = phrases
    return [f"{a}, {b}, and {c}", f"{a} with {b} and {c}", f"{a}, {b} plus {c}"]


def unseen_wordings(specs: list[SceneSpec], seed: int = WORDING_SEED) -> list[SceneSpec]:
    """Each scene with its caption replaced by one of its unseen wordings, chosen at random (seeded)."""
    rng = np.random.default_rng(seed)
    reworded = []
    for spec in specs:
        options = wordings(spec, synonyms=bool(rng.random() < SYNONYM_FRACTION))
        reworded.append(dataclasses.replace(spec, caption=options[rng.integers(len(options))]))
    return reworded
