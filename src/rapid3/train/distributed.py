"""GRPO on several processes: ``torchrun --nproc_per_node N -m rapid3 train ...`` (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 8 -m rapid3 train --pipeline PATH --prompt-file prompts.txt ...
    torchrun --nnodes 2 --node_rank 0|1 --master_addr HOST0 --master_port 29500 --nproc_per_node 8 \
        -m rapid3 train ...

Each process uses GPU ``LOCAL_RANK`` (leave ``--device`` unset or ``cuda``). ``prompts_per_iteration``
is the global batch and must be a multiple of the number of processes. Rank 0 writes the run
folder; every rank reads its checkpoint on ``--resume``, so across nodes ``--out`` must be on a
shared file system. The checkpoint does not depend on the number of processes: a run may resume on
more or fewer. For a clean stop on SIGTERM, give torchrun a ``--shutdown-timeout`` longer than an
iteration (it sends SIGKILL after it).

A W-process run computes the same policy as a 1-process run of the same global batch and seed,
up to float rounding, because nothing it does depends on how the work is split:

- every rank draws the same global prompts and seeds (one seeded generator) and rolls out its
  contiguous block of them (``shard``), so a GRPO group never spans ranks;
- a trajectory's actions come from its group's own random stream (``GroupStreams``), not from a
  stream shared by whatever batch the trajectory happens to be sampled in;
- minibatches are cut from one permutation of every rank's trajectories, the same on all ranks
  (``World.minibatches``); each rank weights its per-decision loss by its share of the minibatch's
  decisions, so the averaged gradient is that of the global minibatch's per-decision mean;
- the discriminator's replay buffers hold every rank's images (``World.gather_rows``), so they are
  identical everywhere; each rank trains on an equal share of every sampled batch
  (``World.share``), with gradients averaged before each step (``AveragedGradients``).

Gradients are averaged with one explicit all-reduce per optimizer step rather than through
``DistributedDataParallel``: a rank may hold no trajectory of a minibatch (it must still join the
reduction), the loss weights need the global decision count, and the policy's gradient clipping
must see the averaged gradient. Rank 0 alone writes checkpoints, logs and the exported policy.
The global ``torch`` RNG is reseeded every iteration from (seed, iteration, rank): distinct per
rank, reproducible, and the same after ``--resume`` without saving every rank's state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..accel.actions import Actions, Observation
from ..policy import RapidPolicy
from .rollout import select_rows

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 evaluates while the others wait in their next collective; a held-out evaluation of a
# large pipeline can outlast NCCL's 10-minute default.
TIMEOUT = timedelta(hours=2)
ACTIONS, MINIBATCHES, RANKS = 1, 2, 3
"""Tags that keep the random streams ``stream_seed`` derives apart."""


def stream_seed(tag: int, *keys: int) -> int:
    """A 63-bit seed for the random stream named by ``tag`` and ``keys`` (any ints), well mixed."""
    entropy = [tag, *(key % 2**64 for key in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class World:
    """This process's place in a training job: ``rank`` of ``size`` (one process: rank 0 of 1).

    The collectives below are no-ops on a single process, so the trainer calls them unconditionally.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives run: the local GPU for NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of ``items`` (whose length must be a multiple of ``size``)."""
        if len(items) % self.size:
            raise ValueError(f"{len(items)} items cannot be split evenly over {self.size} processes.")
        block = len(items) // self.size
        return list(items[self.rank * block:(self.rank + 1) * block])

    def sum(self, value: float) -> float:
        """``value`` summed over ranks."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        """The largest ``value`` of any rank."""
        return self._reduce(value, dist.ReduceOp.MAX)

    def _reduce(self, value: float, op: dist.ReduceOp) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.item()

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's ``rows`` (any number each, same trailing shape), concatenated in rank order."""
        if self.size == 1:
            return rows
        counts = self._gather_counts(len(rows))
        padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=self.device)
        padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(rows.device)

    def share(self, rows: Tensor) -> Tensor:
        """This rank's equal share of ``rows`` (identical on every rank); a remainder of < ``size`` rows is left out."""
        per_rank = len(rows) // self.size
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def minibatches(self, count: int, parts: int, generator: torch.Generator) -> list[Tensor]:
        """This rank's trajectories (local indices, of ``count``) in each of ``parts`` global minibatches.

        The minibatches split one permutation of all ranks' trajectories (rank-major, the order of
        the global batch) drawn from ``generator``, which must be in the same state on every rank.
        """
        counts = self._gather_counts(count)
        start = sum(counts[:self.rank])
        order = torch.randperm(sum(counts), generator=generator)
        return [part[(part >= start) & (part < start + count)] - start for part in order.tensor_split(parts)]

    def _gather_counts(self, count: int) -> list[int]:
        if self.size == 1:
            return [count]
        counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([count], device=self.device))
        return [int(c.item()) for c in counts]

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks, in one all-reduce.

        A rank without a gradient for a parameter (no trajectory in this minibatch) counts zeros; a
        parameter no rank has a gradient for keeps none, as it would on one process.
        """
        if self.size == 1:
            return
        params = [p for p in parameters if p.requires_grad]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.flatten() for g in grads] + [present]).to(self.device)
        dist.all_reduce(flat)
        values, present = flat[:-len(params)] / self.size, flat[-len(params):] > 0
        for param, grad, has in zip(params, values.split([p.numel() for p in params]), present.tolist()):
            param.grad = grad.view_as(param).to(param.device, param.dtype) if has else None

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the ranks that report it (what rank 0 logs)."""
        if self.size == 1:
            return metrics
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, metrics)
        keys = dict.fromkeys(key for part in gathered for key in part)
        return {key: float(np.mean([part[key] for part in gathered if key in part])) for key in keys}


@contextmanager
def joined_world() -> Iterator[World]:
    """The job torchrun started, joined for the duration (left at exit); one process outside torchrun.

    Reads torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    The backend is NCCL when CUDA is available (each process on GPU ``LOCAL_RANK``), else gloo.
    A process group the caller already initialised is used as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
        return
    world = world_from_env(os.environ)
    if world.size == 1:
        yield world
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK is {world.local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (--nproc_per_node).")
        torch.cuda.set_device(world.local_rank)  # so "cuda" means this process's GPU for the trainer too
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    try:
        yield World(world.rank, world.size, world.local_rank, backend)
    finally:
        dist.destroy_process_group()


def world_from_env(env: dict[str, str] | os._Environ) -> World:
    """The ``World`` torchrun's environment variables describe; a single process without ``WORLD_SIZE``."""
    if "WORLD_SIZE" not in env:
        return World()
    missing = [name for name in TORCHRUN_ENV if name not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch distributed training with "
                         "`torchrun --nproc_per_node N -m rapid3 train ...`, which sets them all.")
    try:
        rank, size, local_rank = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({error}).") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE); got RANK={rank}, WORLD_SIZE={size}.")
    return World(rank, size, local_rank)


class GroupStreams:
    """A sampling ``RapidPolicy`` whose actions for each GRPO group come from that group's own random stream.

    Sample i of a rollout batch belongs to group ``i // group_size``; at the sampler's k-th step
    the group's actions are drawn with the stream seeded by (its noise seed ``seeds[group]``, k).
    So a trajectory depends on its prompt, seed and the policy only, never on the rank or batch it
    is sampled in. Pass it to ``rollout`` in place of the policy (``sampling`` is the policy's).
    The policy decides each group's rows on their own; it must not ``probe`` (RapidPolicy does not).
    """

    def __init__(self, policy: RapidPolicy, seeds: list[int], group_size: int) -> None:
        self.policy, self.seeds, self.group_size = policy, seeds, group_size
        self._step = 0

    @property
    def sampling(self) -> bool:
        """The wrapped policy's ``sampling`` flag."""
        return self.policy.sampling

    @sampling.setter
    def sampling(self, value: bool) -> None:
        self.policy.sampling = value

    def reset(self, batch_size: int) -> None:
        """Start a batch: the streams begin again at step 0."""
        self.policy.reset(batch_size)
        self._step = 0

    def decide(self, obs: Observation) -> Actions:
        """The policy's actions, each group's drawn from its own stream."""
        groups = obs.sample_ids.long().cpu() // self.group_size
        decided = []
        for group in groups.unique().tolist():
            rows = (groups == group).nonzero().squeeze(1)
            with torch.random.fork_rng(devices=_cuda_devices()):
                torch.manual_seed(stream_seed(ACTIONS, self.seeds[group], self._step))
                decided.append((rows, self.policy.decide(select_rows(obs, rows.to(obs.sample_ids.device)))))
        self._step += 1
        return _merge(decided, len(obs))


def _merge(decided: list[tuple[Tensor, Actions]], rows: int) -> Actions:
    """One ``Actions`` for ``rows`` rows from the actions of disjoint row sets."""
    first = decided[0][1]
    merged = {}
    for f in fields(first):
        value = getattr(first, f.name)
        if value is None:
            merged[f.name] = None
            continue
        merged[f.name] = value.new_empty((rows, *value.shape[1:]))
        for index, actions in decided:
            merged[f.name][index.to(value.device)] = getattr(actions, f.name)
    return Actions(**merged)


def _cuda_devices() -> list[int]:
    """The CUDA device whose generator a policy on the GPU draws from ([] when CUDA is not in use)."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


class AveragedGradients:
    """An optimizer whose ``step`` first averages the gradients over ranks; everything else is the wrapped one's.

    For update code that steps its own optimizer (``ModuleDiscriminator.step``): wrapping its
    optimizer makes the update data-parallel without changing that code.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, world: World) -> None:
        self.optimizer, self.world = optimizer, world

    def step(self, closure: Any = None) -> Any:
        """Average the gradients over ranks, then the wrapped optimizer's step."""
        self.world.average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        return self.optimizer.step(closure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
