"""The published architectures: sizes counted on the meta device, and shapes a small build runs."""

import pytest
import torch

from rapid3.backbones.archs import build_transformer, get_arch, parameter_count, random_arch_setup


@pytest.mark.parametrize(("name", "billions"), [("sd3-medium", 2.03), ("sd3.5-large", 8.06), ("flux-dev", 11.90)])
def test_published_sizes_on_meta(name, billions):
    model = build_transformer(name, device="meta")
    assert next(model.parameters()).device.type == "meta"  # nothing allocated
    assert parameter_count(model) / 1e9 == pytest.approx(billions, abs=0.01)
    assert parameter_count(model) == pytest.approx(get_arch(name).published_params, rel=0.02)  # 2B, 8.1B, 11.9B


def test_fewer_layers_keep_the_width_and_flux_split():
    sd3 = build_transformer("sd3-medium", layers=2, device="meta")
    assert len(sd3.transformer_blocks) == 2 and sd3.config.num_attention_heads == 24
    flux = build_transformer("flux-dev", layers=6, device="meta")
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (2, 4)
    with pytest.raises(ValueError, match="layers"):
        get_arch("flux-dev").with_layers(0)


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError, match="sd3-medium"):
        get_arch("sdxl")


@pytest.mark.parametrize("name", ["sd3-medium", "flux-dev"])
def test_random_setup_runs_a_step_at_the_pipeline_shapes(name):
    arch = get_arch(name)
    backbone, noise, cond, uncond = random_arch_setup(name, resolution=128, layers=1, dtype=torch.bfloat16)
    assert backbone.token_counts(noise, cond) == (arch.image_tokens(128), arch.text_tokens)
    assert (uncond is None) == (arch.branches == 1)
    out = backbone.forward(noise, torch.full((1,), 0.5), cond)
    assert out.velocity.shape == noise.shape and out.residual.dtype == torch.bfloat16
