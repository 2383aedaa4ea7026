"""The adversarial discriminator: model, step/score, replay buffer, positive cache, protocol."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rapid3.rewards.discriminator import (
    Discriminator,
    ImageDiscriminator,
    ModuleDiscriminator,
    discriminator_score,
    discriminator_step,
)
from rapid3.rewards.train_embedded_reward import render_set
from rapid3.train.replay import ReplayBuffer

TINY = dict(channels=(16, 32, 64))


def degraded(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Clearly unlike a clean render: blurred, and visibly noisy (std 0.2 of the [-1, 1] range)."""
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return blurred + 0.2 * torch.randn(images.shape, generator=generator)


@pytest.fixture(scope="module")
def renders() -> torch.Tensor:
    return render_set(96, np.random.default_rng(0), split="train")[0]


def test_learns_clean_vs_degraded_in_a_few_dozen_steps(renders) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    disc = ModuleDiscriminator(ImageDiscriminator(**TINY), lr=3e-3)
    train, test = renders[:64], renders[64:]
    first = None
    for step in range(60):
        batch = train[torch.randperm(64, generator=gen)[:16]]
        stats = disc.step(batch, degraded(batch, gen))
        first = first or stats
    assert set(stats) == {"loss", "acc"} and stats["loss"] < first["loss"]
    clean, noisy = disc.score(test), disc.score(degraded(test, gen))
    accuracy = 0.5 * ((clean > 0.5).float().mean() + (noisy < 0.5).float().mean())
    assert accuracy > 0.9 and clean.mean() - noisy.mean() > 0.5, (clean.mean(), noisy.mean())


def test_score_is_a_probability_without_grad_and_keeps_mode(renders) -> None:
    model = ImageDiscriminator(**TINY).train()
    scores = discriminator_score(model, renders[:5])
    assert scores.shape == (5,) and bool(((scores >= 0) & (scores <= 1)).all()) and not scores.requires_grad
    assert model.training


def test_step_changes_weights_and_balances_classes(renders) -> None:
    torch.manual_seed(0)
    model = ImageDiscriminator(**TINY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # 1 positive vs 7 negatives: a constant logit 0 gives loss log 2 whatever the balance
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    stats = discriminator_step(model, optimizer, renders[:1], renders[1:8])
    assert stats["loss"] == pytest.approx(np.log(2), abs=1e-6) and stats["acc"] == pytest.approx(0.5)
    before = [p.detach().clone() for p in model.parameters()]
    discriminator_step(model, torch.optim.SGD(model.parameters(), lr=0.1), renders[:4], -renders[4:8])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("positives, negatives, match", [
    ((0, 3, 32, 32), (4, 3, 32, 32), "at least one positive"),
    ((4, 3, 32, 32), (0, 3, 32, 32), "at least one positive"),
    ((4, 3, 32, 32), (4, 3, 16, 16), "differ in image shape"),
    ((4, 3, 16, 16), (4, 3, 16, 16), r"\(B, 3, 32, 32\)"),
])
def test_step_rejects_bad_batches(positives, negatives, match) -> None:
    model = ImageDiscriminator(**TINY)
    with pytest.raises(ValueError, match=match):
        discriminator_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.zeros(positives),
                           torch.zeros(negatives))


def test_score_rejects_wrong_image_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        discriminator_score(ImageDiscriminator(**TINY), torch.zeros(2, 32, 32, 3))


def test_module_discriminator_is_a_discriminator_and_round_trips(renders) -> None:
    disc = ModuleDiscriminator(ImageDiscriminator(**TINY))
    assert isinstance(disc, Discriminator)
    disc.step(renders[:4], -renders[:4])
    other = ModuleDiscriminator(ImageDiscriminator(**TINY))
    other.load_state_dict(disc.state_dict())
    assert torch.equal(other.score(renders[:8]), disc.score(renders[:8]))
    torch.manual_seed(1)
    a = disc.step(renders[:4], -renders[:4])
    torch.manual_seed(1)
    assert other.step(renders[:4], -renders[:4]) == a  # optimizer state restored too


def test_image_discriminator_save_load(tmp_path, renders) -> None:
    model = ImageDiscriminator(**TINY)
    model.save_pretrained(tmp_path)
    loaded = ImageDiscriminator.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    assert torch.equal(discriminator_score(model, renders[:4]), discriminator_score(loaded, renders[:4]))


# ----------------------------------------------------------------------------- replay buffer


def labelled(start: int, n: int) -> torch.Tensor:
    """n images whose every pixel is its label, start..start+n-1."""
    return torch.arange(start, start + n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


def labels(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].long().tolist()


def test_replay_buffer_keeps_the_newest_in_order() -> None:
    buffer = ReplayBuffer(capacity=4)
    assert len(buffer) == 0
    buffer.push(labelled(0, 3))
    assert len(buffer) == 3 and labels(buffer.contents()) == [0, 1, 2]
    buffer.push(labelled(3, 3))
    assert len(buffer) == 4 and labels(buffer.contents()) == [2, 3, 4, 5]
    buffer.push(labelled(6, 9))  # more than capacity at once
    assert labels(buffer.contents()) == [11, 12, 13, 14]


def test_replay_buffer_samples_distinct_seeded() -> None:
    a, b = ReplayBuffer(8, seed=3), ReplayBuffer(8, seed=3)
    for buffer in (a, b):
        buffer.push(labelled(0, 8))
    picked = labels(a.sample(5))
    assert picked == labels(b.sample(5)) and len(set(picked)) == 5
    assert sorted(labels(a.sample(100))) == list(range(8))  # at most everything, once each
    other = ReplayBuffer(8, seed=4)
    other.push(labelled(0, 8))
    assert labels(other.sample(5)) != picked  # the seed matters


def test_replay_buffer_state_dict_round_trip() -> None:
    buffer = ReplayBuffer(5, seed=1)
    buffer.push(labelled(0, 7))
    buffer.sample(2)
    restored = ReplayBuffer(5, seed=99)
    restored.load_state_dict(buffer.state_dict())
    assert labels(restored.contents()) == labels(buffer.contents()) == [2, 3, 4, 5, 6]
    assert labels(restored.sample(3)) == labels(buffer.sample(3))
    restored.push(labelled(7, 1))
    buffer.push(labelled(7, 1))
    assert labels(restored.contents()) == labels(buffer.contents()) == [3, 4, 5, 6, 7]
    empty = ReplayBuffer(5)
    empty.load_state_dict(ReplayBuffer(5).state_dict())
    assert len(empty) == 0


def test_replay_buffer_errors() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    buffer = ReplayBuffer(4)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1)
    buffer.push(labelled(0, 2))
    with pytest.raises(ValueError, match="shape"):
        buffer.push(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3).load_state_dict(buffer.state_dict())
