"""Block-sparse joint (text + image) attention: the executor of the Sparse-Attention head.

Image keys are cut into blocks of ``block_size`` contiguous tokens (raster order of the patch
grid). Image queries are cut into ``query_groups`` contiguous bands of whole blocks. Each
(batch, head, query group) scores every key block by the dot product of the group's mean query
with the block's mean key, and keeps the top ``ceil(keep_fraction * n_blocks)`` blocks. Text keys
are always kept and text queries attend densely to everything.

Why one key subset per query *group* rather than per query block: on CPU, gathering K/V once per
query block costs more than the attention it saves, while gathering once for a band of many
queries and running one ``F.scaled_dot_product_attention`` on it is several times faster than
dense (see ``docs/sparse_attention.md`` for the measurements behind the defaults).

Two executors encode the same selection: ``"gather"`` (index the kept K/V, then SDPA; the CPU
path) and ``"flex"`` (a FlexAttention ``BlockMask``; compiled on CUDA, eager elsewhere).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # flex_attention is imported lazily: only the flex backend needs it
    from torch.nn.attention.flex_attention import BlockMask

SPARSE_KEEP_FRACTIONS: tuple[float, ...] = (0.5, 0.3, 0.2)
"""Fraction of image key blocks kept at levels 1..3; level 0 is dense."""

NUM_SPARSE_LEVELS = len(SPARSE_KEEP_FRACTIONS)
"""Number of sparse levels; valid levels are ``0..NUM_SPARSE_LEVELS``."""

DEFAULT_QUERY_GROUPS = 8
"""Query bands per image: the measured best error at >= 2x speed for keep 0.2 at 4096 tokens."""

Backend = Literal["auto", "gather", "flex"]
_BACKENDS = ("auto", "gather", "flex")


def check_level(level: int) -> int:
    """Return ``level`` as an ``int`` if it names a sparsity level, else raise ``ValueError``."""
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):
        raise ValueError(
            f"sparsity level must be an int in 0..{NUM_SPARSE_LEVELS}, got {level!r} "
            f"({type(level).__name__})"
        )
    if not 0 <= level <= NUM_SPARSE_LEVELS:
        raise ValueError(f"sparsity level must be in 0..{NUM_SPARSE_LEVELS}, got {level}")
    return int(level)


def keep_fraction(level: int) -> float:
    """Fraction of image key blocks kept at ``level`` (1.0 for the dense level 0)."""
    level = check_level(level)
    return 1.0 if level == 0 else SPARSE_KEEP_FRACTIONS[level - 1]


def default_block_size(n_img: int) -> int:
    """Key-block size for ``n_img`` image tokens: about ``n_img // 16``, within 8..64.

    16 blocks at 256 tokens, 64 blocks at 4096. A size dividing ``n_img`` is preferred (searched
    down to half the target) so that no block is partial; otherwise the last block is partial.
    """
    target = min(max(n_img // 16, 8), 64)
    if target >= n_img:
        return max(n_img, 1)
    for size in range(target, max(target // 2, 1) - 1, -1):
        if n_img % size == 0:
            return size
    return target


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BlockLayout:
    """Where the text tokens, image key blocks and image query groups sit in a joint sequence."""

    n_txt: int
    n_img: int
    txt_first: bool
    block_size: int
    query_groups: int  # effective count: never more than there are blocks

    @classmethod
    def build(
        cls,
        *,
        n_txt: int,
        n_img: int,
        txt_first: bool,
        block_size: int | None = None,
        query_groups: int | None = None,
    ) -> BlockLayout:
        """Resolve defaults and validate; ``query_groups`` is capped at the number of blocks."""
        for name, value in (("n_txt", n_txt), ("n_img", n_img)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        size = default_block_size(n_img) if block_size is None else _positive_int("block_size", block_size)
        groups = DEFAULT_QUERY_GROUPS if query_groups is None else _positive_int("query_groups", query_groups)
        n_blocks = max(math.ceil(n_img / size), 1)
        return cls(int(n_txt), int(n_img), bool(txt_first), size, min(groups, n_blocks))

    @property
    def n_tokens(self) -> int:
        return self.n_txt + self.n_img

    @property
    def n_blocks(self) -> int:
        return max(math.ceil(self.n_img / self.block_size), 1)

    @property
    def img_start(self) -> int:
        return self.n_txt if self.txt_first else 0

    @property
    def txt_start(self) -> int:
        return 0 if self.txt_first else self.n_img

    @property
    def group_bounds(self) -> tuple[tuple[int, int], ...]:
        """Image-token ``[start, end)`` of each query group: whole blocks, sizes within one block."""
        edges = [g * self.n_blocks // self.query_groups for g in range(self.query_groups + 1)]
        tokens = [min(e * self.block_size, self.n_img) for e in edges]
        return tuple(zip(tokens[:-1], tokens[1:]))

    def keep_count(self, level: int) -> int:
        """Image key blocks kept per query group at ``level`` (at least one)."""
        kept = math.ceil(keep_fraction(level) * self.n_blocks)
        return min(max(kept, 1), self.n_blocks)

    def is_dense(self, level: int) -> bool:
        """True when ``level`` keeps every key, so the exact dense kernel is used."""
        return self.n_img == 0 or self.keep_count(level) == self.n_blocks


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q, k, v must share (batch, heads, tokens) and q, k the head_dim; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


@dataclass(frozen=True)
class _Tables:
    """Index tensors of one layout on one device (cached: the same layout recurs every step)."""

    group_of_block: torch.Tensor  # (n_blocks,) query group each image block belongs to
    group_sum: torch.Tensor  # (G, n_blocks) 0/1: which blocks' query sums make up each group
    block_tokens: torch.Tensor  # (n_blocks,) real tokens per block (the last may be partial)
    group_tokens: torch.Tensor  # (G,) image tokens per query group
    query_rows: torch.Tensor  # (G, rows) sequence positions of each group's queries, padded by repeats
    unpad: torch.Tensor  # (n_img,) position of each image token in the flattened (G * rows)
    uniform: bool  # all groups have equal size: grouping is a reshape, no padding


@functools.lru_cache(maxsize=64)
def _tables(layout: BlockLayout, device: torch.device) -> _Tables:
    starts = torch.tensor([s for s, _ in layout.group_bounds], device=device)
    ends = torch.tensor([e for _, e in layout.group_bounds], device=device)
    blocks = torch.arange(layout.n_blocks, device=device)
    group_of_block = torch.bucketize(blocks * layout.block_size, starts, right=True) - 1
    block_tokens = (layout.n_img - blocks * layout.block_size).clamp(max=layout.block_size)
    image = torch.arange(layout.n_img, device=device)
    group_of_token = group_of_block[image // layout.block_size]
    # From the layout's Python ints, not `(ends - starts).max()`: a tensor read here would be a host
    # sync, and a graph break inside a compiled block.
    rows = max(end - start for start, end in layout.group_bounds)
    # Every group is padded to the longest one so that all groups run as one SDPA batch; padded
    # rows repeat the group's last query and `unpad` drops their outputs.
    query_rows = torch.minimum(starts[:, None] + torch.arange(rows, device=device), ends[:, None] - 1)
    return _Tables(
        group_of_block=group_of_block,
        group_sum=F.one_hot(group_of_block, layout.query_groups).T.float(),
        block_tokens=block_tokens,
        group_tokens=ends - starts,
        query_rows=query_rows + layout.img_start,
        unpad=group_of_token * rows + image - starts[group_of_token],
        uniform=rows * layout.query_groups == layout.n_img,
    )


def _image_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(B, H, N, D) -> image tokens as (B, H, n_blocks, block_size, D), a partial last block zero-padded."""
    img = x[:, :, layout.img_start : layout.img_start + layout.n_img]
    pad = layout.n_blocks * layout.block_size - layout.n_img
    if pad:
        img = F.pad(img, (0, 0, 0, pad))
    return img.unflatten(2, (layout.n_blocks, layout.block_size))


def select_key_blocks(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, n_keep: int) -> torch.Tensor:
    """Indices (B, H, query_groups, n_keep) of the image key blocks each query group keeps.

    Scores are the mean query of the group · the mean key of the block (a partial last block is
    averaged over its real tokens). Sums run in float32 so half-precision inputs rank alike.
    """
    tables = _tables(layout, q.device)
    q_sums = _image_blocks(q, layout).sum(3, dtype=torch.float32)
    pooled_q = (tables.group_sum @ q_sums) / tables.group_tokens[:, None]
    pooled_k = _image_blocks(k, layout).sum(3, dtype=torch.float32) / tables.block_tokens[:, None]
    return (pooled_q @ pooled_k.transpose(-1, -2)).topk(n_keep, dim=-1).indices


def _kept_keys(x: torch.Tensor, layout: BlockLayout, kept: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) keys or values -> (B, H * G, n_txt + n_keep * block_size, D): text + kept blocks.

    Blocks are taken with ``index_select`` on a (B * H * n_blocks, block_size * D) view, which
    copies whole rows; advanced indexing over (batch, head, block) was 3-4x slower here.
    """
    batch, heads, groups, n_keep = kept.shape
    bank = _image_blocks(x, layout).reshape(-1, layout.block_size * x.shape[-1])
    first_block = torch.arange(batch * heads, device=x.device).view(batch, heads, 1, 1) * layout.n_blocks
    kept_blocks = bank.index_select(0, (first_block + kept).flatten())
    kept_blocks = kept_blocks.view(batch, heads, groups, n_keep * layout.block_size, x.shape[-1])
    text = x[:, :, None, layout.txt_start : layout.txt_start + layout.n_txt].expand(-1, -1, groups, -1, -1)
    return torch.cat([text, kept_blocks], dim=3).flatten(1, 2)


def _padding_mask(layout: BlockLayout, kept: torch.Tensor) -> torch.Tensor | None:
    """Boolean (B, H * G, 1, keys) mask of real keys, or None when no block is partial.

    None in the divisible case keeps SDPA on its unmasked kernel.
    """
    if layout.n_img % layout.block_size == 0:
        return None
    offsets = torch.arange(layout.block_size, device=kept.device)
    real = (kept[..., None] * layout.block_size + offsets < layout.n_img).flatten(3)
    text = real.new_ones(real.shape[:3] + (layout.n_txt,))
    return torch.cat([text, real], dim=3).flatten(1, 2)[:, :, None, :]


def _grouped_queries(q: torch.Tensor, layout: BlockLayout, tables: _Tables) -> torch.Tensor:
    """(B, H, N, D) -> image queries as (B, H * G, rows, D), groups padded to equal rows."""
    if tables.uniform:
        img = q[:, :, layout.img_start : layout.img_start + layout.n_img]
        return img.unflatten(2, (layout.query_groups, -1)).flatten(1, 2)
    return q[:, :, tables.query_rows].flatten(1, 2)


def _ungrouped(out: torch.Tensor, heads: int, layout: BlockLayout, tables: _Tables) -> torch.Tensor:
    """Inverse of `_grouped_queries` on the attention output: (B, H, n_img, D), padding dropped."""
    out = out.unflatten(1, (heads, layout.query_groups)).flatten(2, 3)
    return out if tables.uniform else out[:, :, tables.unpad]


def _gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, kept: torch.Tensor
) -> torch.Tensor:
    """Gather the kept K/V once per query group, then one SDPA over all (head, group) pairs.

    A few large ops rather than a loop over groups: on a shared CPU every op pays a thread-sync
    cost, and SDPA's fused CPU kernel only takes 4-D inputs, so (H, G) are flattened together.
    """
    tables = _tables(layout, q.device)
    queries = _grouped_queries(q, layout, tables)
    mask = _padding_mask(layout, kept)
    img_out = F.scaled_dot_product_attention(queries, _kept_keys(k, layout, kept), _kept_keys(v, layout, kept),
                                             attn_mask=mask)
    img_out = _ungrouped(img_out, q.shape[1], layout, tables)
    txt_out = F.scaled_dot_product_attention(q[:, :, layout.txt_start : layout.txt_start + layout.n_txt], k, v)
    return torch.cat([txt_out, img_out] if layout.txt_first else [img_out, txt_out], dim=2)


def build_block_mask(layout: BlockLayout, kept: torch.Tensor) -> BlockMask:
    """FlexAttention ``BlockMask`` with exactly the selection of ``kept`` (text rows/cols dense)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, heads = kept.shape[:2]
    table = torch.zeros(batch, heads, layout.query_groups, layout.n_blocks, dtype=torch.bool, device=kept.device)
    table.scatter_(3, kept, True)
    tables = _tables(layout, kept.device)
    # Per sequence position: query group / key block, -1 for text (text rows and columns are dense).
    image_block = torch.arange(layout.n_img, device=kept.device) // layout.block_size
    group = torch.full((layout.n_tokens,), -1, dtype=torch.long, device=kept.device)
    block = group.clone()
    group[layout.img_start : layout.img_start + layout.n_img] = tables.group_of_block[image_block]
    block[layout.img_start : layout.img_start + layout.n_img] = image_block

    def mask_mod(b, h, q_idx, kv_idx):
        qg, kb = group[q_idx], block[kv_idx]
        return (qg < 0) | (kb < 0) | table[b, h, qg.clamp(min=0), kb.clamp(min=0)]

    n = layout.n_tokens
    on_cuda = kept.device.type == "cuda"
    return create_block_mask(mask_mod, batch, heads, n, n, device=kept.device, _compile=on_cuda)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, kept: torch.Tensor
) -> torch.Tensor:
    """FlexAttention with the block mask; fused (compiled) on CUDA, eager reference elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, k, v, block_mask=build_block_mask(layout, kept))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    level: int,
    n_txt: int,
    txt_first: bool,
    block_size: int | None = None,
    query_groups: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Joint text+image attention at sparsity ``level``; a drop-in for ``F.scaled_dot_product_attention``.

    Args:
        q, k, v: (B, H, N, D) with N = n_txt + n_img.
        level: 0 (dense, exactly ``F.scaled_dot_product_attention(q, k, v)``) to NUM_SPARSE_LEVELS.
        n_txt: number of text tokens; they are the first ``n_txt`` tokens if ``txt_first``
            (FLUX) and the last ``n_txt`` otherwise (SD3 joint attention).
        block_size: image tokens per key block (default: ``default_block_size(n_img)``).
        query_groups: contiguous image query bands sharing one key selection
            (default ``DEFAULT_QUERY_GROUPS``, capped at the number of blocks).
        backend: "gather" (index K/V, SDPA), "flex" (FlexAttention BlockMask), or "auto"
            (flex on CUDA, gather elsewhere).

    Returns:
        (B, H, N, D) attention output.
    """
    level = check_level(level)
    _check_qkv(q, k, v)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(n_txt, numbers.Integral) or not 0 <= n_txt <= q.shape[2]:
        raise ValueError(f"n_txt must be an int in 0..{q.shape[2]} (the sequence length), got {n_txt!r}")
    layout = BlockLayout.build(
        n_txt=n_txt, n_img=q.shape[2] - n_txt, txt_first=txt_first, block_size=block_size, query_groups=query_groups
    )
    if level == 0 or layout.is_dense(level):
        return F.scaled_dot_product_attention(q, k, v)
    kept = select_key_blocks(q, k, layout, layout.keep_count(level))
    use_flex = backend == "flex" or (backend == "auto" and q.device.type == "cuda")
    return (_flex_attention if use_flex else _gather_attention)(q, k, v, layout, kept)


def attention_flops(
    *,
    batch: int,
    heads: int,
    head_dim: int,
    n_img: int,
    n_txt: int,
    level: int,
    block_size: int | None = None,
    query_groups: int | None = None,
) -> int:
    """FLOPs of the attention core (QK^T and PV, 4*D per query-key pair) the gather kernel computes.

    Text queries see all N keys; each image query sees the text keys plus its group's kept blocks,
    ``keep_count * block_size`` key slots. This is exactly the kept pairs whenever ``block_size``
    divides ``n_img`` and the query groups have equal sizes (the defaults at 256, 1024 and 4096
    image tokens). Otherwise the kernel also computes padding (a kept partial last block is padded
    and masked; shorter query groups are padded to the longest one) and that is counted too.
    Level 0, or a level keeping every block, is dense: ``4 * B * H * N * N * D``.
    """
    level = check_level(level)
    layout = BlockLayout.build(
        n_txt=n_txt, n_img=n_img, txt_first=True, block_size=block_size, query_groups=query_groups
    )
    n = layout.n_tokens
    if layout.is_dense(level):
        pairs = n * n
    else:
        query_rows = layout.query_groups * max(end - start for start, end in layout.group_bounds)
        pairs = n_txt * n + query_rows * (n_txt + layout.keep_count(level) * layout.block_size)
    return 4 * batch * heads * head_dim * pairs
