"""Where a step's time goes on a GPU: kernel time against wall time, per system.

One training step of each system, under ``torch.profiler`` with CUDA activity: the sum of
the device's kernel times against the step's wall time (synchronised). Where the wall time
exceeds the kernel time, the device waited for the host. bfloat16 transformer blocks as in
``gpu.py`` section 2.

Usage:
    python benchmarks/gpu_profile.py --depth 48
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _systems import build_named as build
from _systems import device_step as step
from _systems import sync, times, transformer_pairs
from torch.profiler import ProfilerActivity, profile

import revtree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    d, heads, batch, tokens = 1024, 16, 8, 1024
    torch.manual_seed(0)
    with torch.device("cuda"):
        pairs = [(f.bfloat16(), g.bfloat16()) for f, g in transformer_pairs(args.depth, d, heads)]
        x = torch.randn(batch, tokens, 2 * d, dtype=torch.bfloat16, requires_grad=True)
    print(f"revtree {revtree.__version__}, torch {torch.__version__}, depth {args.depth}")
    print(f"{'system':18s} {'wall ms':>9} {'kernel ms':>10} {'idle %':>7} {'wall/plain':>11}")
    names = ["plain", "checkpoint", "revtree", "revtree compiled", "RevTorch"]
    models = {n: m for n in names if (m := build(n, pairs)) is not None}
    for m in models.values():
        step(m, x)
        step(m, x)
    walls = times(models, x, args.rounds)  # ms, interleaved, synchronised
    for name, m in models.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(m, x)
            sync()
        kernel = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3  # ms
        wall = walls[name]
        print(
            f"{name:18s} {wall:>9.2f} {kernel:>10.2f} {100 * (1 - kernel / wall):>7.1f}"
            f" {wall / walls['plain']:>11.2f}"
        )


if __name__ == "__main__":
    main()
