"""The one seam between the embedded world and a diffusers pipeline (see ``worlds.base``).

    world = build_world(WorldConfig(pipeline="black-forest-labs/FLUX.1-dev", quality=True, ...))
    world.generator.sample(prompts, seeds, controller, step_cap=28, guidance_scale=3.5)

``build_world`` is the only place that asks which world a config means; each world's module builds its
parts (``worlds.embedded``, ``worlds.pipeline``).
"""

from __future__ import annotations

from .base import Checker, Generation, Generator, ImageWorld, PromptPool, PromptSource, WorldConfig


def build_world(config: WorldConfig) -> ImageWorld:
    """The diffusers pipeline world when ``config.pipeline`` is set, else the embedded world."""
    if config.pipeline is not None:
        from .pipeline import build_pipeline_world  # imported here: diffusers' pipelines are slow to import

        return build_pipeline_world(config)
    from .embedded import build_embedded_world

    return build_embedded_world(config)


__all__ = ["Checker", "Generation", "Generator", "ImageWorld", "PromptPool", "PromptSource", "WorldConfig",
           "build_world"]
