"""Block-sparse attention: exactness of level 0, selection, masked-reference equality, FLOPs, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rapid3.backbones.sparse_attention import (
    NUM_SPARSE_LEVELS,
    SPARSE_KEEP_FRACTIONS,
    BlockLayout,
    attention_flops,
    check_level,
    default_block_size,
    select_key_blocks,
    sparse_attention,
)

SPARSE_LEVELS = range(1, NUM_SPARSE_LEVELS + 1)
# (n_txt, n_img, block_size, query_groups): divisible and equal groups; a partial last block
# (70 = 8 * 8 + 6) with unequal groups (9 blocks in 3 + 3 + 3 but the last short); unequal groups.
SHAPES = [(5, 64, 8, 4), (3, 70, 8, 3), (4, 48, 4, 5)]


def qkv(n_tokens: int, batch: int = 2, heads: int = 3, head_dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n_tokens, head_dim, generator=gen) for _ in range(3))


def image_start(n_txt: int, n_img: int, txt_first: bool) -> int:
    return n_txt if txt_first else 0


def text_slice(n_txt: int, n_img: int, txt_first: bool) -> slice:
    return slice(0, n_txt) if txt_first else slice(n_img, n_img + n_txt)


def reference_mask(kept: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(B, H, N, N) boolean mask of the kept pairs, written out loop by loop from the selection."""
    batch, heads, groups, _ = kept.shape
    n, img0 = layout.n_txt + layout.n_img, image_start(layout.n_txt, layout.n_img, layout.txt_first)
    txt = text_slice(layout.n_txt, layout.n_img, layout.txt_first)
    mask = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    mask[:, :, txt, :] = True
    mask[:, :, :, txt] = True
    for b in range(batch):
        for h in range(heads):
            for g, (start, end) in enumerate(layout.group_bounds):
                for block in kept[b, h, g].tolist():
                    k0 = block * layout.block_size
                    k1 = min(k0 + layout.block_size, layout.n_img)
                    mask[b, h, img0 + start : img0 + end, img0 + k0 : img0 + k1] = True
    return mask


def layout_for(n_txt: int, n_img: int, txt_first: bool, block_size: int, groups: int) -> BlockLayout:
    return BlockLayout.build(
        n_txt=n_txt, n_img=n_img, txt_first=txt_first, block_size=block_size, query_groups=groups
    )


# --- levels -------------------------------------------------------------------------------------


def test_levels_constants():
    assert SPARSE_KEEP_FRACTIONS == (0.5, 0.3, 0.2)
    assert NUM_SPARSE_LEVELS == 3


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_check_level_accepts_valid(level):
    assert check_level(level) == level


@pytest.mark.parametrize("level", [-1, 4, 10])
def test_check_level_rejects_out_of_range(level):
    with pytest.raises(ValueError, match=r"0\.\.3"):
        check_level(level)


@pytest.mark.parametrize("level", [1.0, "1", None, True])
def test_check_level_rejects_non_int(level):
    with pytest.raises(ValueError, match=r"int in 0\.\.3"):
        check_level(level)


# --- level 0 and dense fallbacks -----------------------------------------------------------------


@pytest.mark.parametrize("txt_first", [True, False])
def test_level0_is_bit_identical_to_sdpa(txt_first):
    q, k, v = qkv(5 + 64)
    out = sparse_attention(q, k, v, level=0, n_txt=5, txt_first=txt_first)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_level0_calls_sdpa_with_unchanged_inputs(monkeypatch):
    q, k, v = qkv(5 + 64)
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return torch.zeros(())

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    sparse_attention(q, k, v, level=0, n_txt=5, txt_first=True)
    assert len(calls) == 1
    (args, kwargs) = calls[0]
    assert args[0] is q and args[1] is k and args[2] is v and kwargs == {}


def test_level_keeping_every_block_is_dense():
    # 8 image tokens make a single block: every level keeps it, so the dense kernel runs.
    q, k, v = qkv(4 + 8)
    for level in SPARSE_LEVELS:
        out = sparse_attention(q, k, v, level=level, n_txt=4, txt_first=False)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


# --- layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_img, expected", [(256, 16), (1024, 64), (4096, 64), (2304, 64), (100, 5), (97, 8), (5, 5)]
)
def test_default_block_size(n_img, expected):
    assert default_block_size(n_img) == expected


@pytest.mark.parametrize("n_blocks, expected", [(10, (5, 3, 2)), (16, (8, 5, 4)), (64, (32, 20, 13)), (2, (1, 1, 1))])
def test_keep_count_is_ceil_of_fraction(n_blocks, expected):
    layout = layout_for(0, n_blocks * 4, True, 4, 1)
    assert tuple(layout.keep_count(level) for level in SPARSE_LEVELS) == expected
    assert layout.keep_count(0) == n_blocks


@pytest.mark.parametrize("n_img, block_size, groups", [(64, 8, 4), (70, 8, 3), (48, 4, 5), (16, 8, 7)])
def test_query_groups_are_contiguous_whole_block_bands(n_img, block_size, groups):
    layout = layout_for(3, n_img, True, block_size, groups)
    bounds = layout.group_bounds
    assert layout.query_groups == min(groups, layout.n_blocks)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_img
    assert all(end == nxt for (_, end), (nxt, _) in zip(bounds, bounds[1:]))
    assert all(start % block_size == 0 and start < end for start, end in bounds)
    block_counts = [math.ceil((end - start) / block_size) for start, end in bounds]
    assert max(block_counts) - min(block_counts) <= 1


# --- selection and output -------------------------------------------------------------------------


@pytest.mark.parametrize("txt_first", [True, False])
@pytest.mark.parametrize("n_txt, n_img, block_size, groups", SHAPES)
def test_selection_is_top_blocks_by_pooled_score(txt_first, n_txt, n_img, block_size, groups):
    q, k, _ = qkv(n_txt + n_img)
    layout = layout_for(n_txt, n_img, txt_first, block_size, groups)
    img0 = image_start(n_txt, n_img, txt_first)
    for level in SPARSE_LEVELS:
        n_keep = layout.keep_count(level)
        kept = select_key_blocks(q, k, layout, n_keep)
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                for g, (start, end) in enumerate(layout.group_bounds):
                    pooled_q = q[b, h, img0 + start : img0 + end].mean(0)
                    scores = [
                        pooled_q @ k[b, h, img0 + s : img0 + min(s + block_size, n_img)].mean(0)
                        for s in range(0, n_img, block_size)
                    ]
                    best = set(torch.tensor(scores).argsort(descending=True)[:n_keep].tolist())
                    assert set(kept[b, h, g].tolist()) == best


@pytest.mark.parametrize("txt_first", [True, False])
@pytest.mark.parametrize("n_txt, n_img, block_size, groups", SHAPES)
def test_output_equals_dense_attention_over_kept_keys(txt_first, n_txt, n_img, block_size, groups):
    q, k, v = qkv(n_txt + n_img)
    layout = layout_for(n_txt, n_img, txt_first, block_size, groups)
    for level in SPARSE_LEVELS:
        kept = select_key_blocks(q, k, layout, layout.keep_count(level))
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(kept, layout))
        out = sparse_attention(
            q, k, v, level=level, n_txt=n_txt, txt_first=txt_first, block_size=block_size, query_groups=groups
        )
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("txt_first", [True, False])
def test_kept_partial_last_block_uses_only_its_real_tokens(txt_first):
    n_txt, n_img, block_size = 3, 70, 8  # last block: tokens 64..69
    q, k, v = qkv(n_txt + n_img)
    img0 = image_start(n_txt, n_img, txt_first)
    # A shared query direction that only the partial block's keys follow: every group keeps it.
    q[:, :, img0 : img0 + n_img, 0] += 5.0
    k[:, :, img0 + 64 : img0 + 70, 0] = 50.0
    layout = layout_for(n_txt, n_img, txt_first, block_size, 3)
    kept = select_key_blocks(q, k, layout, layout.keep_count(3))
    assert (kept == 8).any(-1).all()
    out = sparse_attention(q, k, v, level=3, n_txt=n_txt, txt_first=txt_first, block_size=block_size, query_groups=3)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(kept, layout))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("txt_first", [True, False])
def test_text_keys_always_kept_and_text_queries_dense(txt_first):
    n_txt, n_img = 6, 64
    q, k, _ = qkv(n_txt + n_img, head_dim=4)
    txt = text_slice(n_txt, n_img, txt_first)
    # Text keys far from every query: a score-based choice would drop them, the kernel must not.
    k[:, :, txt] = -5 * q.mean(2, keepdim=True)
    v = torch.zeros_like(q)
    v[:, :, txt, 0] = 1.0  # output channel 0 = attention mass on text keys
    for level in SPARSE_LEVELS:
        out = sparse_attention(q, k, v, level=level, n_txt=n_txt, txt_first=txt_first, block_size=8)
        dense = F.scaled_dot_product_attention(q, k, v)
        assert (out[..., 0] > 0).all()
        layout = layout_for(n_txt, n_img, txt_first, 8, 8)
        kept = select_key_blocks(q, k, layout, layout.keep_count(level))
        logits = (q @ k.transpose(-1, -2) / 2).masked_fill(~reference_mask(kept, layout), float("-inf"))
        text_mass = logits.softmax(-1)[..., txt].sum(-1)
        torch.testing.assert_close(out[..., 0], text_mass, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[:, :, txt], dense[:, :, txt], rtol=1e-5, atol=1e-6)


def test_half_precision_keeps_dtype():
    q, k, v = (t.bfloat16() for t in qkv(5 + 64))
    out = sparse_attention(q, k, v, level=2, n_txt=5, txt_first=True, block_size=8)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


# --- FLOPs ----------------------------------------------------------------------------------------


def test_attention_flops_dense_level():
    flops = attention_flops(batch=2, heads=3, head_dim=8, n_img=64, n_txt=5, level=0)
    assert flops == 4 * 2 * 3 * 69 * 69 * 8


@pytest.mark.parametrize("level, kept_blocks", [(1, 4), (2, 3), (3, 2)])
def test_attention_flops_scale_with_kept_blocks(level, kept_blocks):
    # 64 image tokens in 8 blocks of 8: ceil(0.5 * 8) = 4, ceil(0.3 * 8) = 3, ceil(0.2 * 8) = 2.
    batch, heads, dim, n_img, n_txt = 2, 3, 8, 64, 5
    n = n_txt + n_img
    pairs = n_txt * n + n_img * n_txt + n_img * kept_blocks * 8
    flops = attention_flops(
        batch=batch, heads=heads, head_dim=dim, n_img=n_img, n_txt=n_txt, level=level, block_size=8, query_groups=4
    )
    assert flops == 4 * batch * heads * dim * pairs


@pytest.mark.parametrize("txt_first", [True, False])
@pytest.mark.parametrize("level", SPARSE_LEVELS)
def test_attention_flops_count_exactly_the_kernels_kept_pairs(txt_first, level):
    n_txt, n_img, block_size, groups = 5, 64, 8, 4
    q, k, _ = qkv(n_txt + n_img)
    layout = layout_for(n_txt, n_img, txt_first, block_size, groups)
    kept = select_key_blocks(q, k, layout, layout.keep_count(level))
    pairs = int(reference_mask(kept, layout).sum())
    flops = attention_flops(
        batch=2, heads=3, head_dim=8, n_img=n_img, n_txt=n_txt, level=level, block_size=block_size, query_groups=groups
    )
    assert flops == 4 * 8 * pairs


def test_attention_flops_rejects_bad_level():
    with pytest.raises(ValueError, match=r"0\.\.3"):
        attention_flops(batch=1, heads=1, head_dim=8, n_img=64, n_txt=5, level=4)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 3, 69), (2, 3, 69), (2, 3, 69)), "batch, heads, tokens, head_dim"),
        (((2, 3, 69, 8), (2, 3, 68, 8), (2, 3, 69, 8)), "must share"),
        (((2, 3, 69, 8), (2, 3, 69, 4), (2, 3, 69, 8)), "must share"),
    ],
)
def test_bad_shapes_raise(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, v, level=1, n_txt=5, txt_first=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level": 4}, r"0\.\.3"),
        ({"level": 1.5}, "int"),
        ({"n_txt": 70}, "n_txt"),
        ({"n_txt": -1}, "n_txt"),
        ({"block_size": 0}, "block_size"),
        ({"query_groups": 0}, "query_groups"),
        ({"backend": "triton"}, "backend"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    q, k, v = qkv(5 + 64)
    args = {"level": 1, "n_txt": 5, "txt_first": True} | kwargs
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, v, **args)


# --- FlexAttention path ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("txt_first", [True, False])
@pytest.mark.parametrize("n_txt, n_img, block_size, groups", SHAPES)
def test_flex_backend_equals_gather_backend(txt_first, n_txt, n_img, block_size, groups):
    q, k, v = qkv(n_txt + n_img)
    for level in SPARSE_LEVELS:
        common = dict(level=level, n_txt=n_txt, txt_first=txt_first, block_size=block_size, query_groups=groups)
        flex = sparse_attention(q, k, v, backend="flex", **common)
        gather = sparse_attention(q, k, v, backend="gather", **common)
        torch.testing.assert_close(flex, gather, rtol=1e-5, atol=1e-5)


def test_attention_flops_count_padding_the_kernel_computes():
    # 70 tokens in blocks of 8: 9 blocks, the last of 6 tokens. Query groups: 4 blocks (32 tokens)
    # and 5 blocks (38 tokens), both computed as 38 rows. Each image row gets 2 kept blocks
    # (ceil(0.2 * 9)) = 16 key slots, padding included.
    n_txt, n_img = 3, 70
    flops = attention_flops(
        batch=1, heads=1, head_dim=8, n_img=n_img, n_txt=n_txt, level=3, block_size=8, query_groups=2
    )
    assert flops == 4 * 8 * (n_txt * (n_txt + n_img) + 2 * 38 * (n_txt + 16))
