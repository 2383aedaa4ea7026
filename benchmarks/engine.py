"""Engine benchmark: wall-clock vs FLOPs of each action on a random-weight SD3-architecture DiT.

For each image-token count, one transformer step is timed as a full step, a reuse step (every
block skipped), a forecast step of order 1 and 2 (every block skipped, the residual extrapolated from
2 or 3 cached ones) and at each sparse level, interleaved round by round so machine drift hits all of
them alike; the attention kernel alone is timed the same way (dense SDPA vs each level). Every
ratio is taken from medians of the same run. Writes JSON (``--out``) and prints a Markdown table.

    python benchmarks/engine.py --quick --out engine.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from rapid3.accel.cache import ResidualCache, forecast_flops
from rapid3.accel.costs import interleaved_medians
from rapid3.backbones import Conditioning, SD3Backbone
from rapid3.backbones.random_sd3 import HEAD_DIM, HEADS, TEXT_TOKENS, random_sd3_setup
from rapid3.backbones.sparse_attention import SPARSE_KEEP_FRACTIONS, sparse_attention

ACTIONS = ["full", "reuse", "forecast1", "forecast2"] + [f"keep{k}" for k in SPARSE_KEEP_FRACTIONS]
CACHE_ORDERS = {"full": None, "reuse": 0, "forecast1": 1, "forecast2": 2}  # None: no cache step


def build_inputs(tokens: int, layers: int) -> tuple[SD3Backbone, torch.Tensor, Conditioning]:
    """One row of inputs (batch 1, no CFG) for the random-weight backbone."""
    backbone, noise, cond, _ = random_sd3_setup(tokens, layers, batch=1)
    return backbone, noise, cond


def filled_cache(backbone: SD3Backbone, latents: torch.Tensor, cond: Conditioning) -> ResidualCache:
    """A one-sample cache holding three full computations at distinct noise levels, as a run leaves it."""
    cache = ResidualCache(1, 1, depth=3)
    for sigma in (0.9, 0.8, 0.7):
        sigma = torch.tensor([sigma])
        cache.store(torch.tensor([0]), backbone.forward(latents, sigma, cond).residual, sigma)
    return cache


def step_runners(backbone: SD3Backbone, latents: torch.Tensor, cond: Conditioning) -> dict:
    sigma, cache, row = torch.tensor([0.6]), filled_cache(backbone, latents, cond), torch.tensor([0])
    runners = {"full": lambda: backbone.forward(latents, sigma, cond)}
    for name, order in CACHE_ORDERS.items():  # the forecast is part of the step, so it is timed with it
        if order is not None:
            runners[name] = lambda order=order: backbone.forward(latents, sigma, cond,
                                                                 reuse_residual=cache.rows(row, sigma, order))
    for level, keep in enumerate(SPARSE_KEEP_FRACTIONS, start=1):
        runners[f"keep{keep}"] = lambda level=level: backbone.forward(latents, sigma, cond, level=level)
    return runners


def attention_runners(tokens: int) -> dict:
    q, k, v = (torch.randn(1, HEADS, tokens + TEXT_TOKENS, HEAD_DIM) for _ in range(3))
    runners = {"full": lambda: F.scaled_dot_product_attention(q, k, v)}
    for level, keep in enumerate(SPARSE_KEEP_FRACTIONS, start=1):
        runners[f"keep{keep}"] = lambda level=level: sparse_attention(q, k, v, level=level, n_txt=TEXT_TOKENS,
                                                                      txt_first=False)
    return runners


def measure_size(tokens: int, layers: int, repeats: int) -> dict:
    backbone, latents, cond = build_inputs(tokens, layers)
    flops = {}
    levels = {name: 0 for name in CACHE_ORDERS} | {f"keep{k}": lv for lv, k in enumerate(SPARSE_KEEP_FRACTIONS, 1)}
    residual_values = filled_cache(backbone, latents, cond).row_numel
    for name in ACTIONS:
        order = CACHE_ORDERS.get(name)
        non_attention, attention = backbone.row_flops(latents, cond, level=levels[name], reuse=order is not None)
        extra = 0 if order is None else forecast_flops(order, residual_values)
        flops[name] = {"total": non_attention + attention + extra, "attention": attention}
    with torch.no_grad():
        step = interleaved_medians(step_runners(backbone, latents, cond), repeats)
        attention = interleaved_medians(attention_runners(tokens), repeats)
    rows = {}
    for name in ACTIONS:
        flop_speedup = flops["full"]["total"] / flops[name]["total"]
        time_speedup = step["full"] / step[name]
        rows[name] = {
            "step_seconds": step[name], "step_speedup": time_speedup, "flop_speedup": flop_speedup,
            "realized_over_predicted": time_speedup / flop_speedup, "gflops": flops[name]["total"] / 1e9,
        }
        if CACHE_ORDERS.get(name) is not None:  # residuals kept per sample and guidance branch (float32)
            rows[name]["cache_mib_per_sample_branch"] = 4 * residual_values * (CACHE_ORDERS[name] + 1) / 2**20
        if name in attention:
            rows[name]["attention_seconds"] = attention[name]
            rows[name]["attention_speedup"] = attention["full"] / attention[name]
            rows[name]["attention_flop_speedup"] = flops["full"]["attention"] / flops[name]["attention"]
    return rows


def table(results: dict[int, dict]) -> str:
    header = ("| image tokens | action | step ms | step speedup | FLOP speedup | realized/predicted | "
              "attention speedup (time / FLOPs) | cache MiB per sample and branch |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for tokens, rows in results.items():
        for name, r in rows.items():
            attn = (f"{r['attention_speedup']:.2f}x / {r['attention_flop_speedup']:.2f}x"
                    if "attention_speedup" in r and name != "full" else "")
            memory = f"{r['cache_mib_per_sample_branch']:.2f}" if "cache_mib_per_sample_branch" in r else ""
            lines.append(f"| {tokens} | {name} | {1000 * r['step_seconds']:.1f} | {r['step_speedup']:.2f}x | "
                         f"{r['flop_speedup']:.2f}x | {r['realized_over_predicted']:.2f} | {attn} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="image tokens per row")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (hidden is 6 x 64 = 384)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="3 rounds per size: a few minutes on 2 CPU cores")
    parser.add_argument("--out", type=Path, default=Path("bench-out/engine.json"), help="JSON output path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    results = {}
    for tokens in args.sizes:
        print(f"measuring {tokens} image tokens ...", flush=True)
        results[tokens] = measure_size(tokens, args.layers, repeats)
    largest = max(results)
    summary = {
        "reuse_over_full": results[largest]["reuse"]["step_seconds"] / results[largest]["full"]["step_seconds"],
        "config": {"hidden": HEADS * HEAD_DIM, "heads": HEADS, "layers": args.layers, "text_tokens": TEXT_TOKENS,
                   "batch": 1, "repeats": repeats, "threads": torch.get_num_threads(),
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
        "sizes": {str(k): v for k, v in results.items()},
    }
    if 4096 in results:
        summary["sparse_keep0.2_attention_speedup_4096"] = results[4096]["keep0.2"]["attention_speedup"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(table(results))
    print(f"reuse/full step time at {largest} tokens: {summary['reuse_over_full']:.3f}")
    if "sparse_keep0.2_attention_speedup_4096" in summary:
        print(f"keep-0.2 attention speedup at 4096 tokens: {summary['sparse_keep0.2_attention_speedup_4096']:.2f}x")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
