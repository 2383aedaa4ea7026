"""The shared adapter over a diffusers DiT: hooks that capture or reuse the block-stack residual,
attention processors that run dense or block-sparse, and FLOP accounting.

The transformer's own ``forward`` runs unchanged, so a dense full-compute call is diffusers' own
computation. Three kinds of diffusers ``ModelHook`` are installed (and removed by ``remove()``):
- on the first block: remember the image stream entering the block stack;
- on every block: when reusing, skip the block entirely (its inputs pass through, nothing is computed);
- on ``norm_out``: store ``residual = stack output - stack input``, or on reuse substitute
  ``stack input + cached residual`` for the stack output.
Family adapters (``sd3.py``, ``flux.py``) supply the attention processor and the call signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.flop_counter import FlopCounterMode

from .base import BackboneOutput, Conditioning, TimeSchedule
from .sparse_attention import attention_flops, check_level

_HOOK_BLOCK = "rapid3_block"
_HOOK_STACK_OUTPUT = "rapid3_stack_output"
PROBES = ("modulated_input", "first_block_residual")


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

    def begin(self, *, level: int, n_txt: int, reuse_residual: torch.Tensor | None, probe: str | None = None) -> None:
        self.level, self.n_txt, self.reuse_residual, self.probe = level, n_txt, reuse_residual, probe
        self.stack_input = self.residual = self.probe_output = None
        self.blocks_run = self.attention_flops = 0

    def count_attention(self, q: torch.Tensor, n_txt: int) -> None:
        batch, heads, n, head_dim = q.shape
        self.attention_flops += attention_flops(batch=batch, heads=heads, head_dim=head_dim, n_img=n - n_txt,
                                                n_txt=n_txt, level=self.level)


class _BlockHook(ModelHook):
    """Runs the block, or skips it when the call reuses the cached residual; the first block also
    answers probes (TeaCache's modulated input, FirstBlockCache's first-block residual)."""

    def __init__(self, state: ForwardState, first: bool) -> None:
        super().__init__()
        self.state, self.first = state, first

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
        return self.fn_ref.original_forward(*args, **kwargs)

    def _probe(self, module: torch.nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> None:
        state = self.state
        if state.probe == "modulated_input":
            temb = kwargs["temb"] if "temb" in kwargs else args[2]
            state.probe_output = module.norm1(hidden_states, emb=temb)[0]
        else:
            state.blocks_run += 1
            state.probe_output = self.fn_ref.original_forward(*args, **kwargs)[1] - hidden_states
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

    # -- the forward the sampler loop calls ----------------------------------------------------
    @torch.no_grad()
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, *, level: int = 0,
                reuse_residual: torch.Tensor | None = None) -> BackboneOutput:
        check_level(level)
        if reuse_residual is not None and level != 0:
            raise ValueError("A reuse step runs no attention: its sparsity level must be 0.")
        n_txt = cond.per_sample["encoder_hidden_states"].shape[1]
        self.state.begin(level=level, n_txt=n_txt, reuse_residual=reuse_residual)
        dtype = self.dtype()
        try:
            velocity = self.transformer(hidden_states=latents.to(dtype), **self.call_kwargs(sigma, cond, dtype),
                                        return_dict=False)[0]
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
        dtype = self.dtype()
        try:
            self.transformer(hidden_states=latents.to(dtype), **self.call_kwargs(sigma, cond, dtype), return_dict=False)
        except _ProbeDone:
            return self.state.probe_output.float(), self.state.blocks_run
        finally:
            self.state.probe = None
        raise RuntimeError("The transformer never reached its first block.")

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
            residual = self.forward(one, sigma, row).residual if reuse else None
            self._flop_cache[key] = _count_flops(
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

            self._flop_cache[key] = _count_flops(run)
        return sum(self._flop_cache[key])


def _count_flops(run) -> tuple[int, int]:
    """(FLOPs torch's counter saw outside attention, the attention FLOPs ``run()`` reports)."""
    with FlopCounterMode(display=False) as counter:
        attention = run()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if "attention" not in str(op))), int(attention)
