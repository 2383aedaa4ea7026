"""The frozen MiniLM text encoder loads offline and gives SD3-shaped conditioning."""

import socket

import pytest
import torch

from rapid3.embedded.text_encoder import HIDDEN_DIM, MAX_TOKENS, MiniLMTextEncoder


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
