"""The bad-input table of docs/bad_inputs.md, row by row: every bad file, flag or argument of the CLI and the
Python API gives its clear error (CLI: exit status 2 and the message on stderr, no traceback)."""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file
from test_trainer import SMALL, models  # noqa: F401  (the module-scoped tiny models fixture)
from tiny_pipelines import tiny_sd3_pipeline

import rapid3
from rapid3.accel.controllers import FullCompute
from rapid3.accel.sampler import Sampler
from rapid3.baselines.steps import FixedIntervalCache, StaticSparse, TaylorSeerCache
from rapid3.cli import main
from rapid3.common import prompts
from rapid3.common.checkpoint import CheckpointError, load_checkpoint
from rapid3.common.run_lock import RunFolderBusy, RunLock
from rapid3.embedded.model import embedded_transformer_config
from rapid3.embedded.pipeline import EmbeddedPipeline, initial_noise
from rapid3.policy import RapidPolicy
from rapid3.train.config import TrainConfig
from rapid3.train.distributed import World, world_from_env
from rapid3.train.trainer import build_run, train

TABLE = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
WEIGHTS = "diffusion_pytorch_model"


@dataclass(frozen=True)
class Case:
    """One row of the table: a ``rapid3`` command line (``argv``) or a Python call (``call``) and its error."""

    id: str
    message: str
    argv: Callable[[Any], list[str]] | None = None
    call: Callable[[Any], object] | None = None
    error: type[Exception] = ValueError
    warns: bool = False
    """A warning, not a refusal: the command succeeds (exit 0) and says ``message`` on stderr."""


def pickled(folder: Path) -> Path:
    """``folder`` with its safetensors weights replaced by a pickled ``.bin`` of the same tensors."""
    weights = folder / f"{WEIGHTS}.safetensors"
    torch.save(load_file(weights), folder / f"{WEIGHTS}.bin")
    weights.unlink()
    return folder


@pytest.fixture(scope="module")
def f(models, tmp_path_factory):  # noqa: F811
    """Every bad file of the table, next to good ones (``f.model``, ``f.reward``, ``f.run``: a 1-iteration run)."""
    root = tmp_path_factory.mktemp("bad")
    model, reward = Path(models["model"]), Path(models["reward_model"])
    corrupt = Path(shutil.copytree(model, root / "corrupt-model"))
    data = (corrupt / f"{WEIGHTS}.safetensors").read_bytes()
    (corrupt / f"{WEIGHTS}.safetensors").write_bytes(data[:len(data) // 2])
    other = root / "other-model"  # another backbone shape: patches of 4 pixels
    SD3Transformer2DModel(**embedded_transformer_config(num_layers=1, patch_size=4)).save_pretrained(other)
    shutil.copy(model / "scheduler_config.json", other)
    RapidPolicy(backbone_family="flux", latent_channels=16, pooled_dim=768, hidden_dim=8).save_pretrained(root / "flux")
    RapidPolicy(latent_channels=3, pooled_dim=384, hidden_dim=8).save_pretrained(root / "bin-policy")
    run = root / "run"
    train(TrainConfig(**{**SMALL, "iterations": 1}, **models, out=str(run)))
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (root / "prompts.csv").write_text("a red circle\n")
    (root / "big.txt").write_text("a red circle\n" * 4)
    (root / "not-yaml.yaml").write_text("lam: [0.5\n")
    (root / "typo.yaml").write_text("group_sise: 4\n")
    (root / "a-file").write_text("")
    torch.save({"iteration": 1}, root / "foreign.pt")
    bad_files(root)
    RapidPolicy(latent_channels=3, pooled_dim=384, hidden_dim=8).save_pretrained(root / "policy")
    edited(root / "policy", root / "policy-hidden", {"hidden_dim": 32})
    edited(root / "policy", root / "policy-empty", None)
    edited(root / "policy", root / "policy-typed", {"hidden_dim": "sixty-four"})
    edited(model, root / "model-layers", {"num_layers": 2})
    (root / "not-a-policy").mkdir()
    busy = root / "busy"
    busy.mkdir()
    lock = RunLock(busy).__enter__()  # held for the module: another run owns this folder
    yield SimpleNamespace(root=root, model=str(model), reward=str(reward), corrupt=str(corrupt), other=str(other),
                           bin_model=str(pickled(Path(shutil.copytree(model, root / "bin-model")))),
                           bin_reward=str(pickled(Path(shutil.copytree(reward, root / "bin-reward")))),
                           bin_policy=str(pickled(root / "bin-policy")), flux=str(root / "flux"), run=run)
    lock.__exit__(None, None, None)


def bad_files(root: Path) -> None:
    """Prompt files over the limits, a calibration.json that is not JSON."""
    (root / "many.txt").write_text("a red circle\n" * 100_001)  # 1.3 MB: over the 100,000-prompt limit
    (root / "long-line.txt").write_text("a red circle\n" + "a red circle " * 200 + "\n")
    (root / "calibration.json").write_text("{teacache: [1, 2]")


def edited(folder: Path, to: Path, config: dict | None) -> None:
    """A copy of ``folder`` whose config.json has ``config`` merged in (None: emptied to ``{}``)."""
    shutil.copytree(folder, to)
    saved = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({} if config is None else {**saved, **config}))


def torn_log_run(f, where: str) -> str:
    """A copy of the 1-iteration run whose log.jsonl has a bad line ``where``: 'middle' (then a good one)."""
    out = Path(shutil.copytree(f.run, f.root / "runs" / f"log-{where}"))
    good = (out / "log.jsonl").read_text()
    (out / "log.jsonl").write_text(good + '{"iteration": 1, "ti\n' + good)
    return str(out)


def train_in_locked_folder(f) -> object:
    """``train`` into a folder whose lock another holder has (here this process, through another descriptor)."""
    out = f.root / "locked"
    out.mkdir(exist_ok=True)
    with RunLock(out):
        return train(TrainConfig(**SMALL, model=f.model, reward_model=f.reward, out=str(out)))


def fresh(f, name: str) -> str:
    """A folder for one case's run (nothing in it)."""
    return str(f.root / "out" / name)


def damaged_run(f, name: str, checkpoint: bytes) -> str:
    """A copy of the 1-iteration run whose checkpoint.pt holds ``checkpoint``."""
    out = Path(shutil.copytree(f.run, f.root / "runs" / name))
    (out / "checkpoint.pt").write_bytes(checkpoint)
    return str(out)


def train_args(f, name: str, *more: str) -> list[str]:
    return ["train", "--out", fresh(f, name), "--model", f.model, "--reward-model", f.reward, *more]


def generate_args(f, *more: str) -> list[str]:
    return ["generate", "--model", f.model, "--steps", "2", "--out", str(f.root / "img.png"), *more]


def oversized_prompt_file(f) -> list[str]:
    with mock.patch.object(prompts, "MAX_BYTES", 16):  # a real one would be over 1 GiB
        return prompts.read_prompts(f.root / "big.txt")


def bench_args(f, *more: str) -> list[str]:
    return ["bench", "--quick", "--model", f.model, "--out", str(f.root / "bench"), *more]


def pipeline_args(f, *more: str) -> list[str]:
    return ["generate", "a red circle", "--pipeline", str(f.root), "--out", str(f.root / "img.png"), *more]


@functools.cache
def tiny_sd3() -> object:
    """A tiny random SD3 pipeline (built once: a few seconds)."""
    return tiny_sd3_pipeline(with_t5=False)


def accelerated_call(**kwargs: Any) -> object:
    """``pipe(...)`` on the tiny SD3 pipeline under ``rapid3.accelerate``."""
    with rapid3.accelerate(tiny_sd3(), FullCompute()):
        return tiny_sd3()("a red circle", num_inference_steps=2, output_type="pt", **kwargs)


def accelerate_twice() -> object:
    with rapid3.accelerate(tiny_sd3(), FullCompute()):
        return rapid3.accelerate(tiny_sd3(), FullCompute())


def sample_with_sparse_level(f, level: int) -> object:
    return EmbeddedPipeline.from_pretrained(f.model)("a red circle", num_inference_steps=2,
                                                     controller=StaticSparse(level))


class GreedyForecast(FixedIntervalCache):
    """Asks for an order-2 forecast on every cache step, whatever its samples' histories hold."""

    def decide(self, obs):
        actions = super().decide(obs)
        actions.order = torch.full_like(actions.level, 2)
        return actions


def sample_embedded(f, controller, solver: str = "euler") -> object:
    """Two steps of the embedded model at CFG 4 with ``controller`` and ``solver``."""
    pipe = EmbeddedPipeline.from_pretrained(f.model)
    cond, uncond = pipe.encode(["a red circle"])
    return Sampler(pipe.backbone, step_cap=3, solver=solver).sample(initial_noise(1, 0), cond, controller,
                                                                     uncond=uncond, guidance_scale=4.0)


def accelerate_heun(f) -> object:
    from diffusers import FlowMatchHeunDiscreteScheduler
    from tiny_pipelines import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    return rapid3.accelerate(pipe, FullCompute())


SAFETENSORS_ONLY = f"no file named {WEIGHTS}.safetensors"
CASES = [
    # --- rapid3 train: files
    Case("model-missing", "no embedded model at", argv=lambda f: ["train", "--out", fresh(f, "a"), "--model",
                                                                  str(f.root / "nothing")]),
    Case("model-truncated", "Unable to load weights from checkpoint file",
         argv=lambda f: train_args(f, "b", "--model", f.corrupt)),
    Case("model-pickle", SAFETENSORS_ONLY, argv=lambda f: train_args(f, "c", "--model", f.bin_model)),
    Case("reward-missing", "no reward model at", argv=lambda f: train_args(f, "d", "--reward-model",
                                                                           str(f.root / "nothing"))),
    Case("reward-pickle", SAFETENSORS_ONLY, argv=lambda f: train_args(f, "e", "--reward-model", f.bin_reward)),
    Case("checkpoint-truncated", "checkpoint.pt is corrupt or truncated and cannot be resumed",
         argv=lambda f: ["train", "--resume", "--out",
                         damaged_run(f, "torn", (f.run / "checkpoint.pt").read_bytes()[:999])]),
    Case("checkpoint-foreign", "is not a rapid3 training checkpoint",
         argv=lambda f: ["train", "--resume", "--out",
                         damaged_run(f, "foreign", (f.root / "foreign.pt").read_bytes())]),
    Case("resume-nothing", "holds no run", argv=lambda f: ["train", "--resume", "--out", fresh(f, "f")]),
    Case("run-exists", "already holds a run.*--resume", argv=lambda f: ["train", "--out", str(f.run)]),
    Case("resume-other-backbone", "policy was built for another model",
         argv=lambda f: ["train", "--resume", "--out", damaged_run(f, "other", (f.run / "checkpoint.pt").read_bytes()),
                         "--model", f.other]),
    Case("config-missing", "no config file at", argv=lambda f: ["train", "--config", str(f.root / "none.yaml")]),
    Case("config-not-yaml", "not-yaml.yaml is not a YAML file of knobs",
         argv=lambda f: ["train", "--config", str(f.root / "not-yaml.yaml")]),
    Case("config-unknown-knob", "unknown knob 'group_sise'. Did you mean 'group_size'",
         argv=lambda f: ["train", "--config", str(f.root / "typo.yaml")]),
    Case("out-unwritable", "cannot write the run folder .*choose another --out",
         argv=lambda f: train_args(f, "g", "--out", str(f.root / "a-file" / "run"))),
    # --- rapid3 train: knobs
    Case("lam-one", r"lam must lie strictly inside \(0, 1\), got 1.0",
         argv=lambda f: train_args(f, "h", "--lam", "1")),
    Case("lam-zero", r"lam must lie strictly inside \(0, 1\), got 0.0",
         argv=lambda f: train_args(f, "i", "--lam", "0")),
    Case("omega-negative", "omega must be >= 0", argv=lambda f: train_args(f, "j", "--omega", "-1")),
    Case("group-size-one", "group_size must be >= 2", argv=lambda f: train_args(f, "k", "--group-size", "1")),
    Case("step-cap-zero", "step_cap must be >= 1", argv=lambda f: train_args(f, "l", "--step-cap", "0")),
    Case("knob-type", "argument --group-size: invalid int value", argv=lambda f: train_args(f, "m", "--group-size",
                                                                                           "four")),
    Case("reward-terms", "reward must join distinct terms of q, d, f", argv=lambda f: train_args(f, "s", "--reward",
                                                                                            "q+clip")),
    Case("step-schedule", "step_schedule must be one of grid, geometric",
         argv=lambda f: train_args(f, "g", "--step-schedule", "linear")),
    Case("step-costs-pipeline", "step_costs 'measured' is implemented for the embedded model only",
         argv=lambda f: ["train", "--pipeline", str(f.root), "--prompt-file", str(f.root / "prompts.csv"),
                         "--reward-model", f.reward, "--step-costs", "measured", "--out", fresh(f, "t")]),
    # --- rapid3 train --pipeline: prompt files
    Case("pipeline-no-prompts", "a pipeline needs training prompts",
         argv=lambda f: ["train", "--pipeline", str(f.root), "--out", fresh(f, "n")]),
    Case("prompt-file-empty", "empty.txt holds no prompt",
         argv=lambda f: ["train", "--pipeline", str(f.root), "--prompt-file", str(f.root / "empty.txt"),
                         "--reward-model", f.reward, "--out", fresh(f, "o")]),
    Case("prompt-file-binary", "binary.txt is not UTF-8 text",
         argv=lambda f: ["train", "--pipeline", str(f.root), "--prompt-file", str(f.root / "binary.txt"),
                         "--reward-model", f.reward, "--out", fresh(f, "p")]),
    Case("prompt-file-suffix", "expected a .txt file .* got suffix '.csv'",
         argv=lambda f: ["train", "--pipeline", str(f.root), "--prompt-file", str(f.root / "prompts.csv"),
                         "--reward-model", f.reward, "--out", fresh(f, "q")]),
    Case("prompt-file-oversized", "big.txt is .* GiB; prompt files are read whole", call=oversized_prompt_file),
    # --- torchrun
    Case("prompts-not-divisible", r"prompts_per_iteration \(3\) must be a multiple of the number of processes \(2\)",
         call=lambda f: build_run(TrainConfig(**{**SMALL, "prompts_per_iteration": 3}, model=f.model,
                                              reward_model=f.reward, out=fresh(f, "r")), world=World(0, 2))),
    Case("torchrun-env-incomplete", "WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not",
         call=lambda f: world_from_env({"WORLD_SIZE": "2"})),
    # --- rapid3 generate
    Case("prompt-empty", "The prompt is empty", argv=lambda f: generate_args(f, " ")),
    Case("prompt-too-long", "tokens long; the embedded model reads at most 16",
         argv=lambda f: generate_args(f, "a red circle above a blue square " * 4)),
    Case("policy-other-backbone", "this policy was trained for 'flux' pipelines.*but the pipeline is 'sd3'",
         argv=lambda f: generate_args(f, "a red circle", "--policy", f.flux)),
    Case("policy-pickle", SAFETENSORS_ONLY, argv=lambda f: generate_args(f, "a red circle", "--policy", f.bin_policy)),
    Case("policy-unknown", "no policy 'fastest'",
         argv=lambda f: generate_args(f, "a red circle", "--policy", "fastest")),
    Case("out-folder-missing", "output folder .* does not exist",
         argv=lambda f: ["generate", "a red circle", "--out", str(f.root / "nothing" / "img.png")]),
    Case("steps-zero", "step_cap must be a positive integer, got 0",
         argv=lambda f: generate_args(f, "a red circle", "--steps", "0")),
    Case("guidance-nan", "--guidance must be a finite number, got nan",
         argv=lambda f: generate_args(f, "a red circle", "--guidance", "nan")),
    Case("guidance-inf-policy", "--guidance must be a finite number, got inf",
         argv=lambda f: generate_args(f, "a red circle", "--guidance", "inf", "--policy", "default")),
    Case("steps-over-limit", "--steps is 100,000,000, over its limit of 1,000 .*pass --beyond-limits",
         argv=lambda f: generate_args(f, "a red circle", "--steps", "100000000")),
    Case("scale-over-limit", "--scale is 2,000, over its limit of 64",
         argv=lambda f: generate_args(f, "a red circle", "--scale", "2000")),
    Case("scale-zero", "--scale must be >= 1, got 0", argv=lambda f: generate_args(f, "a red circle", "--scale", "0")),
    Case("batch-over-limit", "--batch is 5,000, over its limit of 1,024",
         argv=lambda f: generate_args(f, "a red circle", "--batch", "5000")),
    Case("batch-zero", "--batch must be >= 1, got 0", argv=lambda f: generate_args(f, "a red circle", "--batch", "0")),
    Case("height-over-limit", "--height is 100,000, over its limit of 4,096",
         argv=lambda f: pipeline_args(f, "--height", "100000")),
    Case("width-over-limit", "--width is 65,536, over its limit of 4,096",
         argv=lambda f: pipeline_args(f, "--width", "65536")),
    Case("prompts-over-limit", "the number of prompts is 100,001, over its limit of 100,000",
         argv=lambda f: ["generate", "--prompt-file", str(f.root / "many.txt"), "--out", str(f.root / "many")]),
    Case("prompt-chars-over-limit", "the length of the prompt .* is 2,599, over its limit of 2,000",
         argv=lambda f: ["generate", "--prompt-file", str(f.root / "long-line.txt"), "--out", str(f.root / "long")]),
    Case("out-is-folder", "--out .* is a folder; give an image file such as",
         argv=lambda f: generate_args(f, "a red circle", "--out", str(f.root))),
    Case("out-empty", r"--out \. is a folder", argv=lambda f: generate_args(f, "a red circle", "--out", "")),
    Case("out-no-extension", r"has no image extension PIL can write \(none\); end it in .png",
         argv=lambda f: generate_args(f, "a red circle", "--out", str(f.root / "picture"))),
    Case("out-folder-is-file", "--out .*a-file is a file; with --prompt-file, --out is a folder",
         argv=lambda f: ["generate", "--prompt-file", str(f.root / "big.txt"), "--out", str(f.root / "a-file")]),
    Case("seed-overflow", r"--seed must lie in 0..4294967295 \(a 32-bit seed\), got 99999999999999999999999",
         argv=lambda f: generate_args(f, "a red circle", "--seed", "99999999999999999999999")),
    Case("seed-negative", "--seed must lie in 0..4294967295", argv=lambda f: generate_args(f, "a red circle", "--seed",
                                                                                          "-1")),
    Case("policy-config-hidden", "config.json does not match its weights .*: hidden_dim is 32 but the weights have 8",
         argv=lambda f: generate_args(f, "a red circle", "--policy", str(f.root / "policy-hidden"))),
    Case("policy-config-empty", "pooled_dim is 2048 but the weights have 384",
         argv=lambda f: generate_args(f, "a red circle", "--policy", str(f.root / "policy-empty"))),
    Case("policy-config-type", "config.json: hidden_dim must be int, got 'sixty-four'",
         argv=lambda f: generate_args(f, "a red circle", "--policy", str(f.root / "policy-typed"))),
    Case("model-config-layers", "config.json does not match its weights .*: num_layers is 2 but the weights have 1",
         argv=lambda f: generate_args(f, "a red circle", "--model", str(f.root / "model-layers"))),
    Case("policy-folder-not-policy", r"not-a-policy is not a policy \(no config.json\)",
         argv=lambda f: generate_args(f, "a red circle", "--policy", str(f.root / "not-a-policy"))),
    Case("prompt-unknown-words", "warning: the embedded model never saw 'hexagon' .*expect noise or the wrong shape",
         argv=lambda f: generate_args(f, "a purple hexagon"), warns=True),
    # --- rapid3 train: more
    Case("run-folder-busy", r"busy is in use by another run \(PID \d+\); wait for it to end or stop it",
         argv=lambda f: train_args(f, "u", "--out", str(f.root / "busy"))),
    Case("run-folder-busy-python", r"is in use by another run \(PID \d+\)", call=train_in_locked_folder,
         error=RunFolderBusy),
    Case("guidance-scale-nan", "guidance_scale must be a finite number, got nan",
         argv=lambda f: train_args(f, "v", "--guidance-scale", "nan")),
    Case("lr-inf", "lr must be a finite number, got inf", argv=lambda f: train_args(f, "w", "--lr", "inf")),
    Case("seed-overflow-train", "seed must lie in 0..4294967295",
         argv=lambda f: train_args(f, "x", "--seed", "99999999999999999999999")),
    Case("step-cap-over-limit", "step_cap is 100,000, over its limit of 1,000",
         argv=lambda f: train_args(f, "y", "--step-cap", "100000")),
    Case("group-over-limit", r"trajectories per iteration \(prompts_per_iteration x group_size\) is 16,000",
         argv=lambda f: train_args(f, "z", "--group-size", "2000")),
    Case("log-bad-middle-line", r"log.jsonl:2 is not a JSON line .* and is not the last one.*repair or delete",
         argv=lambda f: ["train", "--resume", "--out", torn_log_run(f, "middle"), "--iterations", "2"]),
    Case("disc-warmup-never-updated", r"warning: disc_warmup \(100\) >= iterations \(1\): .*untrained",
         argv=lambda f: train_args(f, "warm", *small_flags(), "--iterations", "1", "--disc-warmup", "100"),
         warns=True),
    # --- rapid3 bench
    Case("bench-nothing", "--prompts 0 and --singles 0 give 0 images; the bench needs at least 2",
         argv=lambda f: bench_args(f, "--prompts", "0", "--singles", "0")),
    Case("bench-one-image", "--prompts 1 and --singles 0 give 1 images; the bench needs at least 2",
         argv=lambda f: bench_args(f, "--prompts", "1", "--singles", "0")),
    Case("bench-pipeline-nothing", "--prompts 0 leaves nothing to benchmark",
         argv=lambda f: ["bench", "--pipeline", str(f.root), "--prompts", "0"]),
    Case("bench-threads-zero", "--threads must be >= 1, got 0", argv=lambda f: bench_args(f, "--threads", "0")),
    Case("bench-sweep-negative", "--sweep fora: every value must be a positive number, got -1, 0",
         argv=lambda f: bench_args(f, "--sweep", "fora=-1,0")),
    Case("bench-calibration-not-json", "--calibration .*calibration.json is not JSON",
         argv=lambda f: bench_args(f, "--calibration", str(f.root / "calibration.json"))),
    Case("bench-calibration-missing", "--calibration: no file at",
         argv=lambda f: bench_args(f, "--calibration", str(f.root / "none.json"))),
    Case("bench-seed-overflow", "--seed must lie in 0..4294967295",
         argv=lambda f: bench_args(f, "--seed", "99999999999999999999999")),
    Case("bench-guidance-nan", "--guidance must be a finite number, got nan",
         argv=lambda f: bench_args(f, "--guidance", "nan")),
    Case("bench-steps-over-limit", "--steps is 5,000, over its limit of 1,000",
         argv=lambda f: bench_args(f, "--steps", "5000")),
    # --- Python API
    Case("sampler-guidance-nan", "guidance_scale must be a finite number, got nan",
         call=lambda f: EmbeddedPipeline.from_pretrained(f.model)("a red circle", num_inference_steps=2,
                                                                  guidance_scale=float("nan"))),
    Case("policy-config-python", "hidden_dim is 32 but the weights have 8",
         call=lambda f: RapidPolicy.from_pretrained(f.root / "policy-hidden")),
    Case("policy-path-missing-python", r"no policy folder at .*nothing/policy; give the folder `rapid3 train` exports",
         call=lambda f: RapidPolicy.from_pretrained(f.root / "nothing" / "policy"), error=FileNotFoundError),
    Case("policy-path-file-python", "a-file is a file; RapidPolicy.from_pretrained takes a policy folder",
         call=lambda f: RapidPolicy.from_pretrained(f.root / "a-file"), error=NotADirectoryError),
    Case("accelerate-guidance-nan", "guidance_scale must be a finite number, got nan",
         call=lambda f: accelerated_call(guidance_scale=float("nan"))),
    Case("accelerate-not-pipeline", "rapid3.accelerate supports StableDiffusion3Pipeline, FluxPipeline; got str",
         call=lambda f: rapid3.accelerate("stabilityai/stable-diffusion-3-medium", FullCompute()), error=TypeError),
    Case("accelerate-policy-name", r"got str. A policy by name or folder\? Load it first: .*load_policy",
         call=lambda f: rapid3.accelerate(tiny_sd3(), "default"), error=TypeError),
    Case("accelerate-twice", "already accelerated by rapid3 .* call `remove\\(\\)` on that handle first",
         call=lambda f: accelerate_twice(), error=RuntimeError),
    Case("config-nan-python", "omega must be a finite number, got nan", call=lambda f: TrainConfig(omega=float("nan"))),
    Case("config-lam", r"lam must lie strictly inside \(0, 1\)", call=lambda f: TrainConfig(lam=-0.5)),
    Case("policy-levels", "num_sparse_levels must be in 1..3", call=lambda f: RapidPolicy(num_sparse_levels=0)),
    Case("sparse-level", "sparsity level must be in 0..3, got 4", call=lambda f: sample_with_sparse_level(f, 4)),
    Case("policy-pickle-python", SAFETENSORS_ONLY, call=lambda f: RapidPolicy.from_pretrained(f.bin_policy),
         error=OSError),
    Case("checkpoint-empty-python", "is corrupt or truncated", error=CheckpointError,
         call=lambda f: load_checkpoint(damaged_run(f, "empty", b"") + "/checkpoint.pt")),
    Case("cache-mode-unknown", r"order must be a forecast order in 0..2 \(0 reuses",
         call=lambda f: TaylorSeerCache(3, 3)),
    Case("forecast-beyond-history", "asked for a forecast of order 2 from a cache holding 1 full computation",
         call=lambda f: sample_embedded(f, GreedyForecast(2))),
    Case("solver-unknown", "solver must be one of euler, multistep2",
         call=lambda f: sample_embedded(f, FullCompute(), solver="heun")),
    Case("scheduler-not-euler", "not the pipeline's FlowMatchHeunDiscreteScheduler: pass solver=", error=TypeError,
         call=accelerate_heun),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_its_clear_error(case, f, capsys):
    if case.call is not None:
        with pytest.raises(case.error, match=case.message):
            case.call(f)
        return
    argv = case.argv(f)
    before = files(f.root)
    assert exit_status(argv) == (0 if case.warns else 2)
    err = capsys.readouterr().err
    assert re.search(case.message, err), err
    assert "Traceback" not in err
    if not case.warns:  # a refusal writes nothing: no empty folder, no partial file, no rewritten config
        assert files(f.root) == before


def files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (folders: their existence; ``run.lock``
    aside: it holds the PID of the last run that tried the folder)."""
    return {p: (0, 0) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.name != "run.lock"}


def small_flags() -> list[str]:
    """The tiny test run's knobs as flags."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]


def exit_status(argv: list[str]) -> int:
    """What ``rapid3 argv`` exits with, argparse's usage errors included."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_the_table_in_the_docs_lists_exactly_these_cases():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", TABLE.read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(case.id for case in CASES)
