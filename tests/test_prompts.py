"""Prompt files for real pipelines: .txt and .jsonl, blank lines skipped, every problem named with its line."""

from __future__ import annotations

import json

import pytest

from rapid3.common.prompts import read_prompts, split_prompts


def test_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n   \n  two blue squares  \na cat, on a mat\n")
    assert read_prompts(path) == ["a red circle", "two blue squares", "a cat, on a mat"]


def test_jsonl_file_reads_the_prompt_field(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "a red circle", "id": 3}), "", json.dumps({"prompt": " a dog "})]
    path.write_text("\n".join(lines) + "\n")
    assert read_prompts(path) == ["a red circle", "a dog"]


@pytest.mark.parametrize("name, text, error, message", [
    ("p.txt", "\n  \n", ValueError, "holds no prompt"),
    ("p.jsonl", "", ValueError, "holds no prompt"),
    ("p.jsonl", '{"prompt": "ok"}\n{"text": "a cat"}\n', ValueError, "p.jsonl:2: expected"),
    ("p.jsonl", '{"prompt": "ok"}\nnot json\n', ValueError, "p.jsonl:2: not a JSON line"),
    ("p.jsonl", '{"prompt": ""}\n', ValueError, "p.jsonl:1: expected"),
    ("p.csv", "a,b\n", ValueError, "expected a .txt file"),
])
def test_bad_prompt_files_say_what_is_wrong(tmp_path, name, text, error, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(error, match=message):
        read_prompts(tmp_path / name)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        read_prompts(tmp_path / "absent.txt")


def test_split_holds_out_a_seeded_disjoint_set():
    prompts = [f"prompt {i}" for i in range(10)]
    train, heldout = split_prompts(prompts, 3, seed=1)
    assert len(heldout) == 3 and sorted(train + heldout) == sorted(prompts) and not set(train) & set(heldout)
    assert split_prompts(prompts, 3, seed=1) == (train, heldout)
    assert split_prompts(prompts, 3, seed=2) != (train, heldout)
    with pytest.raises(ValueError, match="cannot hold out 10 of 10"):
        split_prompts(prompts, 10)
