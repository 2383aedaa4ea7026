"""Real (diffusers) pipelines in the trainer and the CLI, on tiny offline SD3 / FLUX pipelines saved to disk:
a random policy through ``rapid3.accelerate``, the ``PipelineGenerator``, ``rapid3 train --pipeline`` end to end
then ``generate`` and ``bench`` with its policy, and the clear errors for bad input before any sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from tiny_clip import save_tiny_clip
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

import rapid3
from rapid3.accel.controllers import FullCompute
from rapid3.accel.sampler import Sampler
from rapid3.cli import main
from rapid3.common.checkpoint import load_checkpoint
from rapid3.policy import RapidPolicy
from rapid3.worlds import Generator
from rapid3.worlds.pipeline import PipelineGenerator, load_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square above a red circle"]
SIZE = {"height": 32, "width": 32}
TRAIN = ["--iterations", "2", "--prompts-per-iteration", "2", "--group-size", "2", "--step-cap", "4",
         "--hidden-dim", "8", "--disc-width", "8", "--disc-batch", "4", "--disc-steps", "1", "--replay-capacity", "8",
         "--eval-every", "1", "--eval-prompts", "2", "--eval-batch", "2", "--inner-epochs", "1", "--minibatches", "1",
         "--height", "32", "--width", "32", "--disc-warmup", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny SD3 and FLUX pipelines, a tiny CLIP and a prompt file, on disk as a user would pass them."""
    root = tmp_path_factory.mktemp("real")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    tiny_flux_pipeline().save_pretrained(root / "flux")
    save_tiny_clip(root / "clip")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module", params=["sd3", "flux"])
def generator(request, saved):
    generator = PipelineGenerator.from_pretrained(saved / request.param, **SIZE)
    yield generator
    generator.close()


def _rapid3_leftovers(transformer: torch.nn.Module) -> list[str]:
    """rapid3 hooks or attention processors still on ``transformer``."""
    hooks = [name for name, module in transformer.named_modules() if hasattr(module, "_diffusers_hook")
             and any(h.startswith("rapid3") for h in module._diffusers_hook.hooks)]
    return hooks + [n for n, p in transformer.attn_processors.items() if type(p).__module__.startswith("rapid3")]


@pytest.mark.parametrize("make", [tiny_sd3_pipeline, tiny_flux_pipeline], ids=["sd3", "flux"])
def test_a_random_policy_accelerates_records_stats_and_is_removed_cleanly(make):
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": PROMPTS[:2], "num_inference_steps": 6, "guidance_scale": 4.0, "output_type": "latent", **SIZE}
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with rapid3.accelerate(pipe, FullCompute()) as handle:
        torch.manual_seed(0)
        policy = RapidPolicy.for_backbone(handle.backbone, hidden_dim=8, init_concentration=2.0, init_reuse_prob=0.5)
        policy.sampling = True  # an untrained policy drawing its actions
        handle.controller = policy
        images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        stats = handle.last_stats
    assert images.shape == before.shape and torch.isfinite(images).all()
    assert [len(r) for r in stats.records] == stats.steps.tolist() and (stats.steps <= 6).all()
    assert (stats.equivalent_steps < 6).all() and handle.speedup_estimate > 1  # it skipped, reused or sparsified
    assert type(pipe) is type(make()) and not _rapid3_leftovers(pipe.transformer)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, before)


def test_the_generator_is_the_pipeline_with_per_image_seeds_and_a_trace(generator, saved):
    assert isinstance(generator, Generator)
    seeds = [3, 7, 3]
    full = generator.sample(PROMPTS[:3], seeds, FullCompute(), step_cap=4, guidance_scale=3.5)
    plain = load_pipeline(saved / generator.backbone.family)  # the pipeline's own loop, image by image, same seeds
    plain.set_progress_bar_config(disable=True)
    own = [plain(p, num_inference_steps=4, guidance_scale=3.5, output_type="pt", **SIZE,
                 generator=torch.Generator().manual_seed(s)).images for p, s in zip(PROMPTS, seeds)]
    torch.testing.assert_close(full.images, torch.cat(own) * 2 - 1, rtol=0, atol=1e-5)
    assert full.images.shape == (3, 3, 32, 32) and full.trace == [] and full.seconds > 0
    torch.manual_seed(0)
    policy = RapidPolicy.for_backbone(generator.backbone, hidden_dim=8)
    policy.sampling = True
    traced = generator.sample(PROMPTS[:2], [1, 2], policy, step_cap=4, guidance_scale=3.5, keep_trace=True)
    assert len(traced.trace) == int(traced.stats.steps.max())
    assert traced.trace[0][1].log_prob is not None and traced.trace[0][0].latents.shape[0] == 2


def test_image_size_shrinks_images_for_the_reward_models(saved):
    generator = PipelineGenerator.from_pretrained(saved / "sd3", height=64, width=32, image_size=16)
    try:
        out = generator.sample(PROMPTS[:1], [0], FullCompute(), step_cap=2, guidance_scale=1.0)
    finally:
        generator.close()
    assert out.images.shape == (1, 3, 32, 16) and out.images.abs().max() <= 1


@pytest.fixture(scope="module")
def trained(saved, tmp_path_factory):
    """`rapid3 train --pipeline` on the tiny SD3 pipeline: 2 iterations, CLIP score and CLIP-adapter discriminator."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--pipeline", str(saved / "sd3"), "--prompt-file", str(saved / "prompts.txt"),
                 "--reward-model", str(saved / "clip"), "--out", str(out), *TRAIN]) == 0
    return out


def test_train_with_a_pipeline_end_to_end(trained):
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for key in ("train/reward", "train/quality", "train/disc", "policy/loss", "disc/loss", "eval/reward",
                "eval/quality", "eval/quality_full", "eval/disc", "eval/equivalent_steps", "eval/speedup_flops"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    assert not any("accuracy" in key for r in records for key in r)  # no checker for open prompts
    policy = RapidPolicy.from_pretrained(trained / "policy")
    assert policy.config.backbone_family == "sd3"
    state = load_checkpoint(trained / "checkpoint.pt")
    assert set(state["disc"]["module"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the adapter only
    assert json.loads((trained / "policy" / "rapid3_policy.json").read_text())["train_config"]["pipeline"]


def test_a_pipeline_run_resumes_from_its_config(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    assert main(["train", "--out", str(run), "--resume", "--iterations", "3"]) == 0
    assert [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 3


def test_generate_and_bench_with_the_trained_policy(trained, saved, tmp_path, capsys):
    png = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--pipeline", str(saved / "sd3"), "--policy", str(trained / "policy"),
                 "--steps", "4", "--height", "32", "--width", "32", "--out", str(png)]) == 0
    assert Image.open(png).size == (32, 32) and "equivalent steps" in capsys.readouterr().out
    assert main(["generate", "--prompt-file", str(saved / "prompts.txt"), "--pipeline", str(saved / "sd3"),
                 "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"{i:04d}.png" for i in range(4)]
    assert main(["bench", "--pipeline", str(saved / "sd3"), "--policy", str(trained / "policy"), "--prompt-file",
                 str(saved / "prompts.txt"), "--prompts", "2", "--reward-model", str(saved / "clip"), "--steps", "4",
                 "--height", "32", "--width", "32", "--out", str(tmp_path / "bench")]) == 0
    metrics = json.loads((tmp_path / "bench" / "pipeline_bench.json").read_text())["metrics"]
    assert 0 < metrics["eval/equivalent_steps"] <= 4 and 0 <= metrics["eval/quality"] <= 1


def test_a_policy_for_another_backbone_is_refused_before_sampling(saved, tmp_path, capsys, monkeypatch):
    flux = PipelineGenerator.from_pretrained(saved / "flux", **SIZE)
    RapidPolicy.for_backbone(flux.backbone, hidden_dim=8).save_pretrained(tmp_path / "flux-policy")
    flux.close()
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled"))
    png = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--pipeline", str(saved / "sd3"), "--policy",
                 str(tmp_path / "flux-policy"), "--out", str(png)]) == 2
    assert "trained for 'flux' pipelines" in capsys.readouterr().err and not png.exists()
    sd3 = load_pipeline(saved / "sd3")
    with rapid3.accelerate(sd3, FullCompute()) as handle:
        embedded_shaped = RapidPolicy(backbone_family="sd3", latent_channels=3, pooled_dim=384, hidden_dim=8)
        with pytest.raises(ValueError, match="latent_channels 3 \\(the pipeline needs 16\\)"):
            embedded_shaped.check_backbone(handle.backbone)


def test_unsupported_pipelines_and_missing_models_fail_before_any_sampling(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled"))
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(TypeError, match="StableDiffusionXLPipeline; rapid3 accelerates StableDiffusion3Pipeline"):
        load_pipeline(tmp_path / "sdxl")
    with pytest.raises(FileNotFoundError, match="no-such-pipeline"):
        load_pipeline(tmp_path / "no-such-pipeline")
    common = ["train", "--pipeline", str(saved / "sd3"), "--prompt-file", str(saved / "prompts.txt"), *TRAIN]
    # the CLIP models load before the pipeline, so a missing one is reported without loading it
    monkeypatch.setattr("rapid3.worlds.pipeline.load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline"))
    cases = [
        (["--reward-model", str(tmp_path / "no-clip"), "--out", str(tmp_path / "a")], "no-clip"),
        (["--reward", "d", "--disc-model", str(tmp_path / "no-disc-clip"), "--out", str(tmp_path / "b")],
         "no-disc-clip"),
        (["--out", str(tmp_path / "c")], "give --reward-model"),
        (["--reward-model", str(saved / "clip"), "--prompt-file", str(tmp_path / "none.txt"),
          "--out", str(tmp_path / "d")], "no prompt file"),
    ]
    for flags, message in cases:
        assert main([*common, *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--prompt-file", str(saved / "prompts.txt"), "--out", str(tmp_path / "e")]) == 2
    assert "only with a pipeline" in capsys.readouterr().err
