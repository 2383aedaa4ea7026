"""Distributed GRPO: a 2-process gloo run under torchrun (loopback) equals the 1-process run of the same global
batch, with identical parameters on both ranks after every update; the pieces that make it so, one by one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_trainer import SMALL, models  # noqa: F401  (the module-scoped tiny models fixture)

from rapid3.common.checkpoint import load_checkpoint
from rapid3.train.config import TrainConfig
from rapid3.train.distributed import GroupStreams, World, world_from_env
from rapid3.train.rollout import rollout
from rapid3.train.trainer import build_run, train

# Each process records every parameter after every optimizer step (policy and discriminator, in order).
WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(1)
    history = []
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: history.append(torch.cat(
        [p.detach().flatten().clone() for group in optimizer.param_groups for p in group["params"]])))
    from rapid3.cli import main

    code = main(sys.argv[1:])
    torch.save(history, os.path.join(os.environ["HISTORY"], f"rank{os.environ['RANK']}.pt"))
    sys.exit(code)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(worker, args: list[str], history, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc worker args`` on loopback (static rendezvous, gloo on lo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker), *args]
    env = {**os.environ, "HISTORY": str(history), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)


def flags(cfg: TrainConfig) -> list[str]:
    """``cfg`` as ``rapid3 train`` flags."""
    def flag(name: str, value) -> str:
        name = name.replace("_", "-")
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name}={value}"
    return [flag(name, value) for name, value in cfg.to_dict().items() if value is not None]


def test_two_gloo_processes_train_the_policy_one_process_trains(models, tmp_path):  # noqa: F811
    cfg = TrainConfig(**{**SMALL, "eval_every": 100}, **models)  # 2 prompts: one per rank
    (tmp_path / "worker.py").write_text(WORKER)
    two = torchrun(tmp_path / "worker.py", ["train", *flags(cfg.replace(out=str(tmp_path / "two")))], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # optimizer steps: the discriminator's every iteration, the policy's after the discriminator's warm-up
    steps = cfg.iterations * cfg.disc_steps + (cfg.iterations - cfg.disc_warmup) * cfg.inner_epochs * cfg.minibatches
    assert len(rank0) == len(rank1) == steps
    for after_step, (a, b) in enumerate(zip(rank0, rank1)):
        assert torch.equal(a, b), f"ranks differ after optimizer step {after_step}"

    one = train(cfg.replace(out=str(tmp_path / "one")))
    distributed = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    for key in ("policy", "disc"):
        reference = one.state_dict()[key]
        reference = reference if key == "policy" else reference["module"]
        trained = distributed[key] if key == "policy" else distributed[key]["module"]
        torch.testing.assert_close(trained, reference, rtol=1e-4, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]  # rank 0 alone writes the log
    assert (tmp_path / "two" / "policy" / "config.json").is_file()


def test_a_groups_trajectories_do_not_depend_on_the_batch_they_are_sampled_in(models):  # noqa: F811
    run = build_run(TrainConfig(**SMALL, **models, out="unused"))
    prompts, seeds = ["a red circle", "two blue squares"], [5, 9]

    def sample(prompts: list[str], seeds: list[int]):
        return rollout(run.source.generator, GroupStreams(run.policy, seeds, 3), prompts, seeds, group_size=3,
                       step_cap=5, guidance_scale=4.0)

    together = sample(prompts, seeds)
    apart = [sample([p], [s]) for p, s in zip(prompts, seeds)]
    for group, alone in enumerate(apart):
        rows = slice(3 * group, 3 * group + 3)
        assert torch.equal(together.mask[rows, :alone.mask.shape[1]], alone.mask)
        torch.testing.assert_close(together.old_log_probs[rows, :alone.mask.shape[1]], alone.old_log_probs)
        torch.testing.assert_close(together.images[rows], alone.images)
    assert not torch.equal(together.old_log_probs[0], together.old_log_probs[1])  # the group still explores
    assert not run.policy.sampling


def test_every_global_minibatch_is_the_union_of_the_ranks_shares(monkeypatch):
    counts = [6, 4]  # trajectories per rank (one rank dropped a group)
    monkeypatch.setattr(World, "_gather_counts", lambda self, count: counts)
    reference = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tensor_split(3)
    shares = [World(rank, 2).minibatches(counts[rank], 3, torch.Generator().manual_seed(3)) for rank in (0, 1)]
    for part, first, second in zip(reference, *shares):
        assert sorted(part.tolist()) == sorted(first.tolist() + (second + counts[0]).tolist())
        assert all(0 <= i < counts[0] for i in first.tolist()) and all(0 <= i < counts[1] for i in second.tolist())


def test_shards_and_shares_are_contiguous_and_equal():
    assert [World(rank, 3).shard("abcdef") for rank in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes"):
        World(0, 4).shard("abcdef")
    rows = torch.arange(7)
    assert [World(rank, 2).share(rows).tolist() for rank in (0, 1)] == [[0, 1, 2], [3, 4, 5]]
    single = World()
    assert single.is_main and single.sum(3) == 3 and single.mean({"a": 1.0}) == {"a": 1.0}


def test_the_world_comes_from_torchruns_environment():
    assert world_from_env({}) == World()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert world_from_env(env) == World(1, 2, 1)
    with pytest.raises(ValueError, match="MASTER_ADDR is not.*torchrun"):
        world_from_env({k: v for k, v in env.items() if k != "MASTER_ADDR"})
    with pytest.raises(ValueError, match="RANK must lie in"):
        world_from_env({**env, "RANK": "2"})
