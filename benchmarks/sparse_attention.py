"""Block-sparse attention vs dense SDPA: wall-clock and output error per level and query_groups.

Times the gather kernel (the CPU path) against ``F.scaled_dot_product_attention`` on joint
text+image attention, with interleaved repeats (every configuration once per round, median over
rounds) so that load from other processes hits all configurations alike. Errors are measured on
two inputs: i.i.d. random q/k/v (no structure, the worst case for any block selection) and q/k
built from one smooth random field over the patch grid plus noise, so that attention is local as
in a real DiT.

    python benchmarks/sparse_attention.py --out sparse_attention.json
    python benchmarks/sparse_attention.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rapid3.backbones.sparse_attention import (
    NUM_SPARSE_LEVELS,
    BlockLayout,
    attention_flops,
    keep_fraction,
    sparse_attention,
)

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def random_qkv(batch: int, heads: int, n_tokens: int, head_dim: int, gen: torch.Generator) -> Tensors:
    """i.i.d. standard normal q, k, v."""
    shape = (batch, heads, n_tokens, head_dim)
    return tuple(torch.randn(shape, generator=gen) for _ in range(3))  # type: ignore[return-value]


def local_qkv(batch: int, heads: int, n_img: int, n_txt: int, head_dim: int, gen: torch.Generator) -> Tensors:
    """q, k share a smooth field over the image grid (plus noise): nearby tokens attend to each other.

    The field is 8x8 random values per channel, upsampled bicubically to the grid and normalised to
    unit variance, so nearby tokens have q·k/sqrt(D) around sqrt(D) and far ones around 0 ± 1.
    Text tokens (first) stay i.i.d. normal.
    """
    side = math.isqrt(n_img)
    if side * side != n_img:
        raise ValueError(f"local inputs need a square image grid, got n_img={n_img}")
    coarse = torch.randn(batch * heads, head_dim, 8, 8, generator=gen)
    field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    field = (field - field.mean((2, 3), keepdim=True)) / field.std((2, 3), keepdim=True)
    field = field.flatten(2).transpose(1, 2).reshape(batch, heads, n_img, head_dim)

    def with_text(img: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.randn(batch, heads, n_txt, head_dim, generator=gen), img], dim=2)

    def noisy_field() -> torch.Tensor:
        return field + 0.5 * torch.randn(field.shape, generator=gen)

    q, k = with_text(noisy_field()), with_text(noisy_field())
    v = torch.randn(q.shape, generator=gen)
    return q, k, v


def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 and max abs difference of ``out`` from the dense reference."""
    return {
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "max_abs": (out - ref).abs().max().item(),
    }


def median_times(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each function, calls interleaved round by round.

    CPU time (all threads of this process) is reported next to wall-clock because on a shared
    machine wall-clock also measures other processes' load; with one thread the two agree when
    the machine is idle.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
            for name, ts in times.items()}


def run_batch(args: argparse.Namespace, batch: int, gen: torch.Generator) -> list[dict]:
    """All (level, query_groups) rows for one batch size, plus the dense row."""
    n = args.n_txt + args.n_img
    inputs = {
        "random": random_qkv(batch, args.heads, n, args.head_dim, gen),
        "local": local_qkv(batch, args.heads, args.n_img, args.n_txt, args.head_dim, gen),
    }
    dense_ref = {name: F.scaled_dot_product_attention(*qkv) for name, qkv in inputs.items()}
    configs = [(level, g) for level in args.levels for g in args.groups]

    def kernel(level: int, groups: int, qkv: Tensors) -> Callable[[], torch.Tensor]:
        return lambda: sparse_attention(
            *qkv, level=level, n_txt=args.n_txt, txt_first=True, query_groups=groups, backend="gather"
        )

    fns = {"dense": lambda: F.scaled_dot_product_attention(*inputs["random"])}
    fns |= {f"{level}/{g}": kernel(level, g, inputs["random"]) for level, g in configs}
    with torch.inference_mode():
        times = median_times(fns, args.repeats)
        dense_flops = attention_flops(
            batch=batch, heads=args.heads, head_dim=args.head_dim, n_img=args.n_img, n_txt=args.n_txt, level=0
        )
        dense_wall, dense_cpu = times["dense"]
        rows = [{"batch": batch, "level": 0, "keep": 1.0, "query_groups": None, "seconds": dense_wall,
                 "cpu_seconds": dense_cpu, "speedup": 1.0, "cpu_speedup": 1.0, "flops_fraction": 1.0}]
        for level, g in configs:
            flops = attention_flops(batch=batch, heads=args.heads, head_dim=args.head_dim, n_img=args.n_img,
                                    n_txt=args.n_txt, level=level, query_groups=g)
            wall, cpu = times[f"{level}/{g}"]
            row = {"batch": batch, "level": level, "keep": keep_fraction(level), "query_groups": g,
                   "seconds": wall, "cpu_seconds": cpu, "speedup": dense_wall / wall,
                   "cpu_speedup": dense_cpu / cpu, "flops_fraction": flops / dense_flops}
            for name, qkv in inputs.items():
                err = output_error(kernel(level, g, qkv)(), dense_ref[name])
                row |= {f"{name}_{key}": value for key, value in err.items()}
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("batch level keep groups wall_ms speedup cpu_ms speedup flops relL2(rand)  max(rand) relL2(local) "
          "max(local)")
    for r in rows:
        errs = "".join(f" {r.get(k, 0.0):10.4f}" for k in ("random_rel_l2", "random_max_abs", "local_rel_l2",
                                                          "local_max_abs"))
        groups = "-" if r["query_groups"] is None else r["query_groups"]
        print(f"{r['batch']:5d} {r['level']:5d} {r['keep']:4.1f} {groups!s:>6} {1e3 * r['seconds']:7.1f} "
              f"{r['speedup']:6.2f}x {1e3 * r['cpu_seconds']:6.1f} {r['cpu_speedup']:6.2f}x "
              f"{r['flops_fraction']:5.2f}{errs}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-img", type=int, default=4096, help="image tokens (a square grid)")
    p.add_argument("--n-txt", type=int, default=77, help="text tokens")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="query_groups values")
    p.add_argument("--levels", type=int, nargs="+", default=list(range(1, NUM_SPARSE_LEVELS + 1)))
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (median taken)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own); 1 isolates the kernel "
                   "from other processes on a shared machine")
    p.add_argument("--quick", action="store_true", help="1024 image tokens, batch 1, 3 rounds")
    p.add_argument("--out", help="write the rows and settings as JSON here")
    args = p.parse_args()
    if args.quick:
        args.n_img, args.batches, args.repeats = 1024, [1], 3
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = [row for batch in args.batches for row in run_batch(args, batch, gen)]
    print_table(rows)
    if args.out:
        layout = BlockLayout.build(n_txt=args.n_txt, n_img=args.n_img, txt_first=True)
        settings = vars(args) | {"block_size": layout.block_size, "n_blocks": layout.n_blocks,
                                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "machine": platform.processor() or platform.machine()}
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
