"""Host reads of the accelerated loop: a step reads tensors into Python a fixed number of times per
sub-batch, whatever the batch size, and only host-side bookkeeping, so on a GPU the one device read
a step makes is the copy of the controller's actions (none when it decides on the host).

``torch.cuda.set_sync_debug_mode`` only exists on CUDA; here every Python-level read is counted by
patching the tensor methods that produce one."""

import contextlib
from collections import Counter

import pytest
import torch

from rapid3.accel.actions import Actions
from rapid3.accel.sampler import Sampler, _Run
from rapid3.backbones.random_sd3 import random_sd3_setup

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@contextlib.contextmanager
def counting_reads(counts: Counter):
    """Count the tensor->Python reads made inside ``_Run.step`` (the controller's own reads excluded)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    depth = {"step": 0, "controller": 0}

    def counted(name):
        def read(self, *args, **kwargs):
            if depth["step"] and not depth["controller"]:
                counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return read

    def inside(key, fn):
        def wrapped(*args, **kwargs):
            depth[key] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[key] -= 1
        return wrapped

    step = _Run.step
    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    _Run.step = inside("step", step)
    try:
        yield lambda controller: setattr(controller, "decide", inside("controller", controller.decide))
    finally:
        _Run.step = step
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class TwoGroups:
    """Even steps: even samples dense, odd samples sparse level 2 (two sub-batches); odd steps: all reuse."""

    def reset(self, batch_size):
        pass

    def decide(self, obs):
        next_t = obs.schedule.uniform_times(obs.step_cap)[obs.step_index + 1]
        reuse = (obs.step_index % 2 == 1) & obs.has_cache
        return Actions(next_t=next_t, reuse=reuse, level=torch.where(reuse, 0, (obs.sample_ids % 2) * 2))


@pytest.mark.parametrize("batch", [2, 6])
def test_reads_per_step_are_one_per_step_plus_eight_per_sub_batch(batch):
    backbone, noise, cond, uncond = random_sd3_setup(tokens=16, layers=1, batch=batch)
    sampler, controller = Sampler(backbone, step_cap=4), TwoGroups()
    sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=4.0)  # FLOPs counted once, outside
    counts = Counter()
    with counting_reads(counts) as exclude:
        exclude(controller)
        result = sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=4.0)
    groups = sum(len({(r.reuse, r.level) for r in records}) for records in zip(*result.stats.records))
    assert groups == 2 + 1 + 2 + 1
    # Per step: which samples are active (nonzero), the actions' validity (one bool), the sub-batches
    # (unique -> tolist); per sub-batch: its rows (nonzero) and the accounting columns (7 tolist).
    assert sum(counts.values()) == 4 * 3 + groups * 8, counts
    assert set(counts) == {"nonzero", "tolist", "__bool__"}


def test_device_actions_are_copied_to_the_host_once():
    """The actions' three tensors reach the host in one copy (a single device->host transfer on GPU)."""
    from rapid3.accel.sampler import _on_host

    copies = Counter()
    original = torch.Tensor.cpu
    torch.Tensor.cpu = lambda self, *a, **k: (copies.update(["cpu"]), original(self, *a, **k))[1]
    try:
        next_t, reuse, level = _on_host(Actions(next_t=torch.tensor([0.5, 0.25]), reuse=torch.tensor([True, False]),
                                                level=torch.tensor([0, 3])))
    finally:
        torch.Tensor.cpu = original
    assert copies["cpu"] == 1
    assert next_t.dtype == torch.float64 and reuse.tolist() == [True, False] and level.tolist() == [0, 3]
