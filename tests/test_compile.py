"""torch.compile of the transformer blocks: graphs are shared, recompiles stop after warm-up, the hooks
break no graph, and a compiled run computes what the eager run does.

Counted with dynamo's own counters on the ``eager`` backend: recompiles and graph breaks are decided
by dynamo before any backend runs, so the count is the one inductor would see, in seconds not minutes.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from rapid3.accel.actions import Actions
from rapid3.accel.controllers import UniformSteps
from rapid3.accel.sampler import Sampler
from rapid3.backbones.random_sd3 import random_sd3_setup
from rapid3.backbones.sparse_attention import NUM_SPARSE_LEVELS


class MixedActions(UniformSteps):
    """Every sample cycles through full, each sparse level and reuse, out of phase with its batch mates,
    so each step runs several sub-batches whose sizes change from step to step."""

    def __init__(self, num_steps: int, phase: int = 0) -> None:
        super().__init__(num_steps)
        self.phase = phase

    def decide(self, obs):
        code = (obs.sample_ids * (self.phase + 1) + obs.step_index + self.phase) % (NUM_SPARSE_LEVELS + 2)
        reuse = (code == NUM_SPARSE_LEVELS + 1) & obs.has_cache
        return Actions(next_t=self.next_times(obs), reuse=reuse, level=torch.where(reuse, 0, code.clamp_max(3)))


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _sample(sampler, noise, cond, uncond, controller):
    return sampler.sample(noise, cond, controller, uncond=uncond, guidance_scale=4.0)


def test_no_recompiles_after_warm_up_and_no_graph_breaks(fresh_dynamo):
    backbone, noise, cond, uncond = random_sd3_setup(tokens=64, layers=1, batch=5)
    sampler = Sampler(backbone, step_cap=6)
    eager = _sample(sampler, noise, cond, uncond, MixedActions(6))  # FLOPs counted first, as in real runs
    backbone.compile_blocks(backend="eager")
    warm = _sample(sampler, noise, cond, uncond, MixedActions(6))
    graphs = counters["stats"]["unique_graphs"]
    # One graph per sparsity level, whatever the sub-batch sizes (one block kind: a 1-layer SD3).
    assert graphs == NUM_SPARSE_LEVELS + 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(warm.latents, eager.latents)

    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile now raises
        result = _sample(sampler, noise[:4], cond.select(torch.arange(4)), uncond.select(torch.arange(4)),
                         MixedActions(6, phase=1))
    groups = {(r.reuse, r.level) for records in result.stats.records for r in records}
    assert len(groups) == NUM_SPARSE_LEVELS + 2  # every action ran again, in other sub-batch sizes
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_flop_counting_before_compiling_leaves_blocks_compilable(fresh_dynamo):
    """FlopCounterMode is a dispatch mode, under which dynamo marks frames 'skip' for good; the
    counting runs with dynamo off, so blocks first seen under the counter still compile later."""
    backbone, noise, cond, _ = random_sd3_setup(tokens=16, layers=3, batch=2)
    backbone.compile_blocks(backend="eager")
    backbone.row_flops(noise, cond, level=0, reuse=True)
    assert counters["stats"]["unique_graphs"] == 0
    backbone.forward(noise, torch.full((2,), 0.5), cond)
    # Three blocks, two graphs: the blocks share one, SD3's last (context_pre_only) block has its own.
    assert counters["stats"]["unique_graphs"] == 2


def test_uncompile_restores_eager_blocks(fresh_dynamo):
    backbone, noise, cond, _ = random_sd3_setup(tokens=16, layers=1, batch=2)
    backbone.compile_blocks(backend="eager")
    assert backbone.compiled
    backbone.uncompile_blocks()
    assert not backbone.compiled
    backbone.forward(noise, torch.full((2,), 0.5), cond)
    assert counters["stats"]["unique_graphs"] == 0


def test_accelerate_compile_flag_compiles_the_blocks_and_removal_restores(fresh_dynamo):
    from tiny_pipelines import tiny_sd3_pipeline

    import rapid3
    from rapid3.accel.controllers import FullCompute

    pipe = tiny_sd3_pipeline()
    forward = pipe.transformer.transformer_blocks[0].forward
    with rapid3.accelerate(pipe, FullCompute(), compile=True) as handle:
        assert handle.backbone.compiled
    assert pipe.transformer.transformer_blocks[0].forward == forward
    with rapid3.accelerate(pipe, FullCompute()) as handle:
        assert not handle.backbone.compiled
