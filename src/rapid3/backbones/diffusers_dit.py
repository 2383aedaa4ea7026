"""The shared adapter over a diffusers DiT: hooks that capture or reuse the block-stack residual,
attention processors that run dense or block-sparse, and FLOP accounting.

The transformer's own ``forward`` runs unchanged, so a dense full-compute call is diffusers' own
computation. Three kinds of diffusers ``ModelHook`` are installed (and removed by ``remove()``):
- on the first block: remember the image stream entering the block stack;
- on every block: when reusing, skip the block entirely (its inputs pass through, nothing is computed);
- on ``norm_out``: store ``residual = stack output - stack input``, or on reuse substitute
  ``stack input + cached residual`` for the stack output.
Family adapters (``sd3.py``, ``flux.py``) supply the attention processor and the call signature.

``compile_blocks()`` puts each block's own computation under ``torch.compile`` while the hooks stay
eager Python around it: the decisions (reuse, probe, residual bookkeeping) never enter a graph, so
they add no graph break inside a block, and every block of a class shares one compiled graph per
sparsity level (the block is an argument, its parameters graph inputs, the batch dimension dynamic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.flop_counter import FlopCounterMode

from .base import BackboneOutput, Conditioning, TimeSchedule
from .sparse_attention import NUM_SPARSE_LEVELS, attention_flops, check_level

_HOOK_BLOCK = "rapid3_block"
_HOOK_STACK_OUTPUT = "rapid3_stack_output"
PROBES = ("modulated_input", "first_block_residual")
GRAPHS_PER_LEVEL = 8
"""Compiled block graphs one sparsity level may need: up to 2 block kinds (SD3's last block,
FLUX's double and single blocks) x (batch 1, batch > 1: dynamo specialises size 1), with room to
spare. All levels share one code object, whose cache dynamo caps at 8 entries by default, fewer
than the 4 levels need; past the cap a block silently runs eager."""


class _ProbeDone(Exception):
    """Ends a probe forward as soon as its feature is known: nothing after it is computed."""


@dataclass
class ForwardState:
    """What one transformer call should do and what it did; shared by hooks and processors."""

    level: int = 0
    n_txt: int = 0
    reuse_residual: torch.Tensor | None = None
    probe: str | None = None
    probe_output: torch.Tensor | None = None
    stack_input: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    blocks_run: int = 0
    attention_flops: int = 0
    eager: bool = False  # set while FLOPs are counted: compiled blocks run their eager forward

    def begin(self, *, level: int, n_txt: int, reuse_residual: torch.Tensor | None, probe: str | None = None) -> None:
        self.level, self.n_txt, self.reuse_residual, self.probe = level, n_txt, reuse_residual, probe
        self.stack_input = self.residual = self.probe_output = None
        self.blocks_run = self.attention_flops = 0

    def count_block(self, block: torch.nn.Module, batch: int, n_img: int) -> None:
        """Add the attention-core FLOPs of one block on ``batch`` rows of ``n_img`` image tokens: its
        joint attention (``attn``) and, in SD3.5's dual-attention blocks, the image-only ``attn2``.

        Counted here, outside the block, rather than in the processors: a counter mutated inside a
        compiled block would be a guard on its running value and recompile the block on every call.
        """
        for attn, n_txt in ((block.attn, self.n_txt), (getattr(block, "attn2", None), 0)):
            if attn is not None:
                self.attention_flops += attention_flops(batch=batch, heads=attn.heads, n_img=n_img, n_txt=n_txt,
                                                        head_dim=attn.to_q.out_features // attn.heads, level=self.level)


class _BlockHook(ModelHook):
    """Runs the block, or skips it when the call reuses the cached residual; the first block also
    answers probes (TeaCache's modulated input, FirstBlockCache's first-block residual)."""

    def __init__(self, state: ForwardState, first: bool) -> None:
        super().__init__()
        self.state, self.first = state, first
        self.compiled: Any = None  # set by DiffusersDiT.compile_blocks

    def run_block(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """The block's own forward, compiled when ``compile_blocks`` asked for it; counts its attention."""
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.state.count_block(module, hidden_states.shape[0], hidden_states.shape[1])
        if self.compiled is None or self.state.eager:
            return self.fn_ref.original_forward(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim > 1:
                # Sub-batch sizes change from step to step: one graph for all of them.
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return self.compiled(module, self.fn_ref.original_forward, args, kwargs)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.first:
            self.state.stack_input = hidden_states
            if self.state.probe is not None:
                self._probe(module, hidden_states, args, kwargs)
        if self.state.reuse_residual is not None:
            encoder_hidden_states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            return encoder_hidden_states, hidden_states
        self.state.blocks_run += 1
        return self.run_block(module, args, kwargs)

    def _probe(self, module: torch.nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> None:
        state = self.state
        if state.probe == "modulated_input":
            temb = kwargs["temb"] if "temb" in kwargs else args[2]
            state.probe_output = module.norm1(hidden_states, emb=temb)[0]
        else:
            state.blocks_run += 1
            state.probe_output = self.run_block(module, args, kwargs)[1] - hidden_states
        raise _ProbeDone


class _StackOutputHook(ModelHook):
    """Sits on ``norm_out``: records the block-stack residual, or injects the cached one."""

    def __init__(self, state: ForwardState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        state = self.state
        if state.reuse_residual is not None:
            hidden_states = state.stack_input + state.reuse_residual
            state.residual = state.reuse_residual
        else:
            state.residual = hidden_states - state.stack_input
        return (hidden_states, *args), kwargs


class DiffusersDiT:
    """Base adapter: subclasses set ``family``, ``txt_first``, ``processor_cls`` and the call details."""

    family: str
    txt_first: bool
    expected_class: type
    processor_cls: type
    time_grid: str

    def __init__(self, transformer: torch.nn.Module, scheduler) -> None:
        if not isinstance(transformer, self.expected_class):
            raise TypeError(f"{type(self).__name__} needs a diffusers {self.expected_class.__name__}, "
                            f"got {type(transformer).__name__}.")
        self.transformer = transformer.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.state = ForwardState()
        self._flop_cache: dict[tuple, int] = {}
        self._compiled_fns: dict[tuple, Any] = {}
        self._original_processors = transformer.attn_processors
        self._install()

    @property
    def device(self) -> torch.device:
        """Where the transformer's weights are (a policy for it goes there too)."""
        return self.transformer.device

    # -- installation -------------------------------------------------------------------------
    def blocks(self) -> list[torch.nn.Module]:
        """Every transformer block, in execution order."""
        return list(self.transformer.transformer_blocks)

    def _install(self) -> None:
        self.transformer.set_attn_processor(self.processor_cls(self.state))
        for i, block in enumerate(self.blocks()):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self.state, i == 0), _HOOK_BLOCK)
        HookRegistry.check_if_exists_or_initialize(self.transformer.norm_out).register_hook(
            _StackOutputHook(self.state), _HOOK_STACK_OUTPUT)

    def remove(self) -> None:
        """Restore the transformer exactly: original attention processors, no hooks."""
        self.transformer.set_attn_processor(self._original_processors)
        for block in self.blocks():
            block._diffusers_hook.remove_hook(_HOOK_BLOCK, recurse=False)
        self.transformer.norm_out._diffusers_hook.remove_hook(_HOOK_STACK_OUTPUT, recurse=False)

    def compile_blocks(self, *, backend: str = "inductor", mode: str | None = None) -> None:
        """Run every transformer block under ``torch.compile`` (the hooks and everything outside the
        blocks stay eager). Compilation happens on the first call of each (block class, level, batch
        being 1 or more); after that, switching actions and sub-batch sizes recompiles nothing."""
        # One compiled function per (backend, mode), kept: switching back and forth between eager and
        # compiled (as `rapid3 profile` does) must find the same graphs, not compile new ones.
        if (backend, mode) not in self._compiled_fns:
            self._compiled_fns[(backend, mode)] = torch.compile(_call_block, backend=backend, mode=mode)
        compiled = self._compiled_fns[(backend, mode)]
        for block in self.blocks():
            block._diffusers_hook.get_hook(_HOOK_BLOCK).compiled = compiled

    @property
    def compiled(self) -> bool:
        """Whether ``compile_blocks`` is in effect."""
        return self.blocks()[0]._diffusers_hook.get_hook(_HOOK_BLOCK).compiled is not None

    def uncompile_blocks(self) -> None:
        """Back to eager blocks (the compiled graphs stay cached for a later ``compile_blocks``)."""
        for block in self.blocks():
            block._diffusers_hook.get_hook(_HOOK_BLOCK).compiled = None

    # -- the forward the sampler loop calls ----------------------------------------------------
    @torch.no_grad()
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *, level: int = 0,
                reuse_residual: torch.Tensor | None = None) -> BackboneOutput:
        check_level(level)
        if reuse_residual is not None and level != 0:
            raise ValueError("A reuse step runs no attention: its sparsity level must be 0.")
        n_txt = cond.per_sample["encoder_hidden_states"].shape[1]
        self.state.begin(level=level, n_txt=n_txt, reuse_residual=reuse_residual)
        dtype, sigma = self.dtype(), sigma.to(latents.device)  # the sampler keeps times on the host
        try:
            velocity = self._call(latents.to(dtype), self.call_kwargs(sigma, cond, dtype))[0]
        finally:
            self.state.reuse_residual, self.state.level = None, 0  # a direct transformer call runs in full
        state = self.state
        return BackboneOutput(velocity.float(), state.residual, state.blocks_run, state.attention_flops)

    @torch.no_grad()
    def probe(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
              kind: str) -> tuple[torch.Tensor, int]:
        """(feature, blocks run): a cheap feature of the current input for threshold-caching
        controllers; the forward stops as soon as it is known. ``modulated_input``: the first block's
        timestep-modulated input (TeaCache). ``first_block_residual``: the first block's output minus
        its input (FirstBlockCache)."""
        if kind not in PROBES:
            raise ValueError(f"Unknown probe {kind!r}; available: {', '.join(PROBES)}.")
        n_txt = cond.per_sample["encoder_hidden_states"].shape[1]
        self.state.begin(level=0, n_txt=n_txt, reuse_residual=None, probe=kind)
        dtype, sigma = self.dtype(), sigma.to(latents.device)
        try:
            self._call(latents.to(dtype), self.call_kwargs(sigma, cond, dtype))
        except _ProbeDone:
            return self.state.probe_output.float(), self.state.blocks_run
        finally:
            self.state.probe = None
        raise RuntimeError("The transformer never reached its first block.")

    def _call(self, latents: torch.Tensor, kwargs: dict[str, Any]) -> tuple:
        """The transformer's own forward; with compiled blocks, under a recompile budget that holds
        every graph the blocks need (see ``GRAPHS_PER_LEVEL``)."""
        if not self.compiled:
            return self.transformer(hidden_states=latents, **kwargs, return_dict=False)
        with torch._dynamo.config.patch(recompile_limit=GRAPHS_PER_LEVEL * (NUM_SPARSE_LEVELS + 1)):
            return self.transformer(hidden_states=latents, **kwargs, return_dict=False)

    def dtype(self) -> torch.dtype:
        """The transformer's dtype. Not ``ModelMixin.dtype``, which walks every module (~1 ms per call:
        as much as a whole cache-reuse step of the embedded model at batch 1)."""
        return next(self.transformer.parameters()).dtype

    def call_kwargs(self, sigma: torch.Tensor, cond: Conditioning, dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError

    def schedule(self, latents: torch.Tensor) -> TimeSchedule:
        n_img, _ = self.token_counts(latents, None)
        return TimeSchedule.from_scheduler(self.scheduler, image_seq_len=n_img, grid=self.time_grid)

    # -- FLOP accounting -----------------------------------------------------------------------
    def token_counts(self, latents: torch.Tensor, cond: Conditioning | None) -> tuple[int, int]:
        n_txt = 0 if cond is None else cond.per_sample["encoder_hidden_states"].shape[1]
        return self.image_tokens(latents), n_txt

    def image_tokens(self, latents: torch.Tensor) -> int:
        raise NotImplementedError

    def row_flops(self, latents: torch.Tensor, cond: Conditioning, *, level: int, reuse: bool) -> tuple[int, int]:
        """(FLOPs outside the attention core, attention-core FLOPs) of one row's forward.

        Counted once per shape and action on a real one-row forward: torch's ``FlopCounterMode``
        counts the projections, MLPs and embeddings; the processors count the attention cores they
        ran (CPU SDPA is invisible to the counter, and on GPU the counter's own SDPA count is dropped
        so nothing is counted twice).
        """
        one, row, sigma = latents[:1], cond.select(torch.tensor([0])), torch.ones(1)
        key = ("step", tuple(one.shape[1:]), row.per_sample["encoder_hidden_states"].shape[1], level, reuse)
        if key not in self._flop_cache:
            with _eager_blocks(self.state):  # a one-row count must not compile a batch-1 graph
                residual = self.forward(one, sigma, row).residual if reuse else None
            self._flop_cache[key] = _count_flops(self.state,
                lambda: self.forward(one, sigma, row, level=level, reuse_residual=residual).attention_flops)
        return self._flop_cache[key]

    def probe_flops(self, latents: torch.Tensor, cond: Conditioning, kind: str) -> int:
        """FLOPs of one row's ``probe(kind)``."""
        one, row = latents[:1], cond.select(torch.tensor([0]))
        key = ("probe", tuple(one.shape[1:]), row.per_sample["encoder_hidden_states"].shape[1], kind)
        if key not in self._flop_cache:
            def run() -> int:
                self.probe(one, torch.ones(1), row, kind)
                return self.state.attention_flops

            self._flop_cache[key] = _count_flops(self.state, run)
        return sum(self._flop_cache[key])


def _call_block(block: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
    """What ``compile_blocks`` compiles: one block's forward. The block is an argument rather than
    ``self`` of a compiled bound method, so dynamo guards on its structure, not its identity, and the
    blocks of a model share graphs instead of filling the recompile limit one block each."""
    return forward(*args, **kwargs)


@contextlib.contextmanager
def _eager_blocks(state: ForwardState) -> Iterator[None]:
    """Compiled blocks run their eager forward inside."""
    state.eager = True
    try:
        yield
    finally:
        state.eager = False


@torch.compiler.disable
def _count_flops(state: ForwardState, run) -> tuple[int, int]:
    """(FLOPs torch's counter saw outside attention, the attention FLOPs ``run()`` reports).

    Runs eager, with dynamo off and compiled blocks bypassed (``state.eager``): dynamo refuses a frame
    under a dispatch mode such as ``FlopCounterMode`` and marks its code "skip" for good, so one count
    under the counter would leave every block eager for the rest of the process (what a naive
    ``torch.compile`` of the blocks hit; ``compiler.disable`` alone does not stop an explicitly
    compiled function from starting dynamo again).
    """
    with _eager_blocks(state), FlopCounterMode(display=False) as counter:
        attention = run()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if "attention" not in str(op))), int(attention)
