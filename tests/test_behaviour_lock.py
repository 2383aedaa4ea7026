"""The shipped model with the shipped default policy draws exactly what it drew before the refactors of
issue 17 (module moves must not change one pixel or one count).

``tests/data/behaviour_lock.npz`` was written by ``python tests/test_behaviour_lock.py`` on commit 7dbe10d,
before anything moved; re-record it only when the shipped model or policy changes on purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from rapid3.embedded.pipeline import EmbeddedPipeline, to_uint8
from rapid3.policy.shipped import load_policy

REFERENCE = Path(__file__).resolve().parent / "data" / "behaviour_lock.npz"
PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "two green circles",
           "a red triangle, a blue circle and a green square"]
SEEDS = [3, 14, 15, 92]


def draw() -> dict[str, np.ndarray]:
    """Full compute and the shipped default policy on fixed prompts and seeds: images and per-image accounting."""
    torch.set_num_threads(1)
    pipe = EmbeddedPipeline.from_pretrained()
    policy = load_policy("default")

    out: dict[str, np.ndarray] = {}
    for name, controller in (("full", None), ("policy", policy)):
        if controller is None:
            result = pipe(PROMPTS, num_inference_steps=28, guidance_scale=4.0, seed=0)
            stats, images = result.stats, result.images
        else:
            sampled = pipe.sample(PROMPTS, SEEDS, controller, num_inference_steps=28, guidance_scale=4.0)
            stats, images = sampled.stats, to_uint8(sampled.latents)
        out[f"{name}_images"] = images
        out[f"{name}_steps"] = stats.steps.numpy()
        out[f"{name}_equivalent_steps"] = stats.equivalent_steps.double().numpy()
        out[f"{name}_flops"] = stats.flops.double().numpy()
    return out


def test_shipped_model_and_policy_draw_as_before_the_refactor():
    reference = np.load(REFERENCE)
    now = draw()
    assert sorted(now) == sorted(reference.files)
    for key, value in now.items():
        if key.endswith("images"):
            assert np.array_equal(value, reference[key]), f"{key} changed"
        else:
            np.testing.assert_allclose(value, reference[key], rtol=1e-9, err_msg=key)


if __name__ == "__main__":
    np.savez_compressed(REFERENCE, **draw())
    print(f"wrote {REFERENCE}", file=sys.stderr)
