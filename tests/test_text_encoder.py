"""The frozen MiniLM text encoder loads offline and gives SD3-shaped conditioning."""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from rapid3.embedded import scenes
from rapid3.embedded.pipeline import check_prompt
from rapid3.embedded.text_encoder import (
    HIDDEN_DIM,
    MAX_TOKENS,
    CaptionConditioning,
    MiniLMTextEncoder,
    PrecomputedTextEncoder,
    add_token_positions,
    ordered_pairs,
    save_encodings,
)


@pytest.fixture(scope="module")
def encoder() -> MiniLMTextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)  # any attempt to reach a hub fails loudly
        return MiniLMTextEncoder()


def _no_network(*args, **kwargs):
    raise AssertionError("the text encoder tried to open a network connection")


def test_frozen(encoder: MiniLMTextEncoder) -> None:
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_shapes_and_padding(encoder: MiniLMTextEncoder) -> None:
    prompts = ["a red circle", "a red circle, a blue square and a green triangle", ""]
    tokens, pooled = encoder.encode(prompts)
    assert tokens.shape == (3, MAX_TOKENS, HIDDEN_DIM) and pooled.shape == (3, HIDDEN_DIM)
    assert tokens.dtype == pooled.dtype == torch.float32 and not tokens.requires_grad
    n = encoder.tokenizer(prompts[0])["input_ids"]
    assert tokens[0, : len(n)].abs().sum(-1).gt(0).all() and tokens[0, len(n):].eq(0).all()
    assert torch.allclose(pooled[0], tokens[0, : len(n)].mean(0), atol=1e-5)


def test_independent_of_batch(encoder: MiniLMTextEncoder) -> None:
    alone = encoder.encode(["a blue square"])
    encoder._cache.clear()  # recompute, now padded and batched with a longer prompt
    together = encoder.encode(["two yellow circles", "a blue square"])
    assert torch.allclose(alone[0][0], together[0][1], atol=1e-5)
    assert torch.allclose(alone[1][0], together[1][1], atol=1e-5)


def test_paraphrase_closer_than_different_scene(encoder: MiniLMTextEncoder) -> None:
    _, pooled = encoder.encode(["a red circle", "a circle that is red", "a blue square"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0) + 0.2


def test_token_positions_tell_subject_from_object(encoder: MiniLMTextEncoder) -> None:
    # "red" is token 2 of the first caption and token 7 of the second
    tokens, _ = encoder.encode(["a red circle left of a blue square", "a blue square left of a red circle"])
    positioned = add_token_positions(tokens)
    cos = torch.nn.functional.cosine_similarity
    assert cos(tokens[0, 2], tokens[1, 7], dim=0) > 0.9  # MiniLM alone: nearly the same state
    assert cos(positioned[0, 2], positioned[1, 7], dim=0) < 0.85
    real = tokens.ne(0).any(-1)
    assert positioned[~real].eq(0).all() and not torch.equal(positioned[real], tokens[real])  # padding stays zero
    rms = (positioned - tokens)[real].pow(2).mean().sqrt()
    assert 0.1 < rms < 0.3  # a signal beside the token states, not over them (their RMS is ~0.42)


def test_ordered_pairs_tell_word_order_apart(encoder: MiniLMTextEncoder) -> None:
    captions = ["a red circle left of a blue square", "a blue square left of a red circle"]
    tokens, pooled = encoder.encode(captions)
    pairs = ordered_pairs(tokens)
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > 0.98  # the mean: nearly a bag of words
    assert cos(pairs[0], pairs[1], dim=0) < 0.7
    # antisymmetric in order: a caption's real tokens read backwards give the negated pooling
    n = int(tokens[0].ne(0).any(-1).sum())
    backwards = tokens.clone()
    backwards[0, :n] = tokens[0, :n].flip(0)
    assert torch.allclose(ordered_pairs(backwards)[0], -pairs[0], atol=1e-5)
    # padding adds nothing: the same caption padded to more tokens pools the same
    padded = torch.nn.functional.pad(tokens, (0, 0, 0, 5))
    assert torch.allclose(ordered_pairs(padded), pairs, atol=1e-6)
    assert 0.1 < pairs.pow(2).mean().sqrt() < 0.5  # beside the mean's scale (~0.29), not over it


def _side_probe(encoder: MiniLMTextEncoder, pool) -> float:
    """Ridge regression (lambda 10) from ``pool(tokens, mean)`` of the train split's left/right captions to the
    side each colour goes to (-1 left, +1 right); the share of held-out captions' colours it puts right."""
    def data(split: str) -> tuple[np.ndarray, np.ndarray]:
        specs = [s for s in scenes.prompt_splits()[split] if s.relation and s.relation.relation in ("left of", "right of")]
        sides = np.zeros((len(specs), len(scenes.COLORS)))
        for row, spec in zip(sides, specs):
            sign = -1 if spec.relation.relation == "left of" else 1
            row[list(scenes.COLORS).index(spec.objects[spec.relation.subject].color)] += sign
            row[list(scenes.COLORS).index(spec.objects[spec.relation.object].color)] -= sign
        return pool(*encoder.encode([s.caption for s in specs])).double().numpy(), sides
    (x, y), (x_test, y_test) = data("train"), data("heldout")
    mean, std = x.mean(0), x.std(0) + 1e-8
    x, x_test = (x - mean) / std, (x_test - mean) / std
    weights = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)
    present = y_test != 0
    return float((np.sign(x_test @ weights)[present] == y_test[present]).mean())


def test_ordered_pairs_make_a_relations_sides_linear(encoder: MiniLMTextEncoder) -> None:
    assert _side_probe(encoder, lambda tokens, mean: mean) < 0.75  # nearly a bag of words
    assert _side_probe(encoder, lambda tokens, mean: torch.cat([mean, ordered_pairs(tokens)], -1)) > 0.97


def test_caption_conditioning(encoder: MiniLMTextEncoder) -> None:
    tokens, pooled = encoder.encode(["a red circle"])
    plain = CaptionConditioning()
    assert plain == CaptionConditioning.from_info({}) and plain.pooled_dim == HIDDEN_DIM  # exports before the flags
    assert all(torch.equal(a, b) for a, b in zip(plain.apply(tokens, pooled), (tokens, pooled)))
    both = CaptionConditioning.from_info({"token_positions": True, "ordered_pairs": True})
    got_tokens, got_pooled = both.apply(tokens, pooled)
    assert torch.equal(got_tokens, add_token_positions(tokens)) and got_pooled.shape == (1, both.pooled_dim)
    assert torch.equal(got_pooled, torch.cat([pooled, ordered_pairs(tokens)], -1))  # pairs of the states, not positions
    assert all(torch.equal(a, b) for a, b in zip(plain.encode(encoder, ["a red circle"]), (tokens, pooled)))


def test_canonical_relations_encode_the_mirrored_wording(encoder: MiniLMTextEncoder) -> None:
    canonical = CaptionConditioning.from_info({"canonical_relations": True})
    assert canonical == CaptionConditioning(canonical_relations=True)
    mirrored = ["a red circle right of a blue square", "a red circle below a blue square", "two red circles"]
    wanted = ["a blue square left of a red circle", "a blue square above a red circle", "two red circles"]
    for got, want in zip(canonical.encode(encoder, mirrored), encoder.encode(wanted)):
        assert torch.equal(got, want)
    as_written = CaptionConditioning().encode(encoder, mirrored[:1])[0]
    assert not torch.equal(as_written, encoder.encode(wanted[:1])[0])


def test_precomputed_encodings_match_minilm(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    prompts = ["a red circle", "two blue squares and a green triangle", "", "a red circle"]
    save_encodings(encoder, prompts, tmp_path / "enc.safetensors")
    precomputed = PrecomputedTextEncoder(tmp_path / "enc.safetensors")
    for got, want in zip(precomputed.encode(prompts), encoder.encode(prompts)):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # stored in fp16
    assert [precomputed.count_tokens(p) for p in prompts] == [encoder.count_tokens(p) for p in prompts]


def test_precomputed_refuses_other_prompts(tmp_path: Path, encoder: MiniLMTextEncoder) -> None:
    save_encodings(encoder, ["a red circle"], tmp_path / "enc.safetensors")
    precomputed = PrecomputedTextEncoder(tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match="'a blue square'.*save_encodings"):
        precomputed.encode(["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="not among the 1 precomputed"):
        check_prompt(precomputed, "a blue square")


def test_precomputed_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--save-text-encodings"):
        PrecomputedTextEncoder(tmp_path / "missing.safetensors")
