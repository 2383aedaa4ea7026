"""The words the embedded model was trained on: its scene grammar's, and nothing else.

MiniLM reads any text, so "a dog" or "a purple hexagon" is drawn without complaint, as noise or
the nearest shape it knows. ``unknown_words`` lets the CLI warn (not refuse: a paraphrase such as
"a crimson circle" can still land near "a red circle") and name what the model never saw.
"""

from __future__ import annotations

import re

from .scenes import COLORS, COUNT_WORDS, PLURALS, RELATIONS, SHAPES

VOCABULARY = frozenset({"a", "and", *COLORS, *SHAPES, *PLURALS.values(), *COUNT_WORDS.values(),
                        *(word for relation in RELATIONS for word in relation.split())})
"""Every word of every caption the grammar writes (``scenes.caption_for``)."""


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` outside ``VOCABULARY``, in order, each once (punctuation is not a word)."""
    words = re.findall(r"[^\s,.;:!?\"']+", prompt.lower())
    return list(dict.fromkeys(word for word in words if word not in VOCABULARY))


def vocabulary_warning(prompt: str) -> str | None:
    """A one-line warning naming ``prompt``'s unknown words, or None when the model knows them all."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    shapes = ", ".join(PLURALS[shape] for shape in SHAPES[:-1]) + f" and {PLURALS[SHAPES[-1]]}"
    return (f"the embedded model never saw {', '.join(map(repr, unknown))} (in {prompt!r}): it draws only "
            f"{'/'.join(COLORS)} {shapes}, so expect noise or the wrong shape.")
