"""Unseen wordings: the same scenes as the grammar's captions, in words no training caption contains."""

from __future__ import annotations

import re

import pytest

from rapid3.embedded.scenes import all_scenes, evaluation_prompts, parse_caption, prompt_splits
from rapid3.embedded.train_generator import training_captions
from rapid3.embedded.wordings import COLOR_SYNONYMS, unseen_wordings, wordings


def _grammar_captions() -> set[str]:
    return {spec.caption for spec in all_scenes()}


@pytest.mark.parametrize("synonyms", [False, True])
def test_no_wording_is_a_caption_the_grammar_produces(synonyms):
    grammar = _grammar_captions()
    for spec in all_scenes():
        for wording in wordings(spec, synonyms=synonyms):
            assert wording not in grammar, wording
            with pytest.raises(ValueError):
                parse_caption(wording)


def test_the_evaluation_split_never_overlaps_what_training_sees():
    """Generator and policy training only ever see grammar captions (the policy's: the train split's); none of
    those is an unseen wording, and no synonym appears as a word in any of them."""
    specs = unseen_wordings(evaluation_prompts(200, 25))
    trained = set(training_captions()) | {s.caption for s in prompt_splits()["train"]}
    assert not {s.caption for s in specs} & trained
    words = {w for caption in trained for w in re.findall(r"[a-z]+", caption)}
    assert not set(COLOR_SYNONYMS.values()) & words


def test_each_wording_asks_for_the_same_scene():
    """Same objects, count and relation as the grammar caption (the checker reads these), new caption."""
    grammar = evaluation_prompts(40, 8)
    reworded = unseen_wordings(grammar)
    for before, after in zip(grammar, reworded):
        assert (after.objects, after.relation) == (before.objects, before.relation)
        assert after.caption != before.caption
    assert unseen_wordings(grammar) == reworded  # fixed seed: every evaluation sees the same prompts
    assert any(any(c in s.caption for c in COLOR_SYNONYMS.values()) for s in reworded)


def test_a_relation_wording_keeps_subject_and_object():
    spec = parse_caption("a red circle below a blue square")
    assert "a red circle beneath a blue square" in wordings(spec)
    assert "below a blue square is a red circle" in wordings(spec)
