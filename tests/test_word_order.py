"""The word-order screen: what its two tasks ask of a model, and its CLI on a tiny one."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_pipelines import export_tiny_embedded

from rapid3.embedded import scenes, word_order
from rapid3.embedded.checker import check, relation_outcome


def _words(spec: scenes.SceneSpec) -> Counter:
    return Counter(spec.caption.split())


def _render(spec: scenes.SceneSpec, rng: np.random.Generator) -> np.ndarray:
    return scenes.render(scenes.place(spec, rng))


def test_order_captions_come_in_same_word_mirror_pairs() -> None:
    rng = np.random.default_rng(0)
    order = word_order.task_scenes("order", ("red", "blue"))
    assert len({s.caption for s in order}) == 4
    for spec in order:  # only word order separates a caption from its twin, whose scene is the mirror image
        twins = [t for t in order if t is not spec and _words(t) == _words(spec)]
        assert len(twins) == 1
        assert relation_outcome(check(_render(spec, rng), twins[0]), twins[0]) == "reversed"


def test_bag_captions_differ_in_words_and_agree_on_the_layout() -> None:
    rng = np.random.default_rng(0)
    first, second = word_order.task_scenes("bag", ("green", "yellow"))
    assert _words(first) != _words(second)
    for a, b in ((first, second), (second, first)):
        assert relation_outcome(check(_render(a, rng), b), b) == "holds"


def test_cli_fine_tunes_both_tasks_and_writes_the_curves(tmp_path, capsys) -> None:
    model = export_tiny_embedded(tmp_path / "model")
    before = (tmp_path / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    torch.set_num_threads(1)
    result = word_order.main(["--model", str(model), "--steps", "2", "--eval-every", "1", "--samples", "1",
                              "--token-positions", "--out", str(tmp_path / "w.json")])
    assert json.loads((tmp_path / "w.json").read_text()) == result
    assert result["token_positions"] is True and set(result["tasks"]) == set(word_order.TASKS)
    for curve in result["tasks"].values():
        assert [p["step"] for p in curve] == [0, 1, 2] and all(0 <= p["holds"] <= 1 for p in curve)
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split() == ["step", "order", "bag"]
    assert printed.err.count("step 2: the relation holds in") == 2  # each evaluation as it comes, per task
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == before  # a copy was tuned


@pytest.mark.parametrize("argv, message", [
    (["--colours", "red"], "two different colours"),
    (["--colours", "red,red"], "two different colours"),
    (["--colours", "red,mauve"], "two different colours"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_are_refused(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        word_order.parse_args(argv)
    assert message in capsys.readouterr().err


def test_fine_tune_trains_the_pipeline_transformer(tmp_path) -> None:
    from rapid3.embedded.pipeline import EmbeddedPipeline

    pipe = EmbeddedPipeline.from_pretrained(export_tiny_embedded(tmp_path / "model"))
    model = pipe.backbone.transformer.float()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    curve = word_order.fine_tune(pipe, word_order.task_scenes("order"), steps=1, eval_every=1, samples=1, batch=2)
    assert [p["step"] for p in curve] == [0, 1]
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())  # back to sampling
