"""The embedded pipeline and `rapid3 generate`, on a tiny exported model (the shipped one has its own test)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_pipelines import export_tiny_embedded

from rapid3.cli import main
from rapid3.embedded.pipeline import EmbeddedPipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return export_tiny_embedded(tmp_path_factory.mktemp("embedded"))


def test_pipeline_images_do_not_depend_on_the_batch(tiny_model):
    pipe = EmbeddedPipeline.from_pretrained(tiny_model)
    both = pipe(["a red circle", "two blue squares"], num_inference_steps=4, seed=3)
    second = pipe(["two blue squares"], num_inference_steps=4, seed=4)
    assert both.images.shape == (2, 32, 32, 3) and both.images.dtype == np.uint8
    assert (both.latents[1] - second.latents[0]).abs().max().item() <= 1e-5
    assert both.stats.steps.tolist() == [4, 4]


def test_generate_writes_png(tiny_model, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a green triangle above a yellow circle", "--model", str(tiny_model), "--steps", "3",
                 "--out", str(out), "--scale", "4"]) == 0
    assert Image.open(out).size == (128, 128)
    printed = capsys.readouterr().out
    assert str(out) in printed and " s:" in printed


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ("a red circle " * 10, "tokens long"),
])
def test_generate_rejects_bad_prompts(tiny_model, tmp_path, capsys, prompt, message):
    assert main(["generate", prompt, "--model", str(tiny_model), "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err


def test_generate_without_model_says_how_to_get_one(tmp_path, capsys):
    assert main(["generate", "a red circle", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no embedded model" in capsys.readouterr().err


def test_generate_on_the_embedded_model_loads_no_sd3_or_flux_pipeline(tiny_model, tmp_path):
    # Importing diffusers' SD3/FLUX pipelines pulls transformers' image processors, which warn about
    # torchvision on every run; the embedded model needs none of them.
    code = ("import sys; from rapid3.cli import main; "
            f"assert main(['generate', 'a red circle', '--model', {str(tiny_model)!r}, '--steps', '2', "
            f"'--policy', 'default', '--out', {str(tmp_path / 'a.png')!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith('diffusers.pipelines.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pipeline_flux" not in done.stdout and "pipeline_stable_diffusion_3" not in done.stdout, done.stdout
    assert "torchvision" not in done.stderr
