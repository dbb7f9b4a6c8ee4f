"""Where the host time of a step goes: cProfile of plain autograd and revtree on tiny tensors.

The tiny workload of ``overhead.py`` (MLP pairs on a ``(1, 4, 16)`` tensor, depth 32, one
thread), where kernels cost next to nothing and a step is host work. Each system runs a few
warm-up steps (the compiled engine compiles at its second), then ``--steps`` steps under
``cProfile``. Printed per system: the step's time under the profiler in microseconds per
block, and the functions that take most of it by own time (``tottime``), grouped by where
they live: torch's C++ (``{built-in ...}``, autograd, dispatch), revtree's own Python, torch's
Python (``torch/`` files, dynamo's guards and wrappers among them), the rest. The profiler
inflates Python calls more than C++ ones: read the shares, not the absolute times.

Usage:
    python benchmarks/host_profile.py                 # plain, revtree, revtree compile=True
    python benchmarks/host_profile.py --top 25
    python benchmarks/host_profile.py --systems "revtree compile=8"
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import warnings
from collections import defaultdict

import torch
from _systems import Plain, cat, mlp, split
from _systems import tree_step as step
from torch import nn

import revtree

DEPTH = 32


def build(system: str) -> nn.Module:
    torch.manual_seed(0)
    pairs = [(mlp(8), mlp(8)) for _ in range(DEPTH)]
    if system == "plain":
        return Plain(pairs, split, cat, ckpt=False)
    if system == "plain compile":
        return torch.compile(Plain(pairs, split, cat, ckpt=False))  # type: ignore[return-value]
    if system.startswith("revtree compile="):  # blocks as one graph: "revtree compile=8"
        return revtree.ReversibleSequence(pairs, compile=int(system.split("=")[1]))
    return revtree.ReversibleSequence(pairs, compile=system == "revtree compile")


def where(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("{"):
        return "torch C++ / builtins"
    if "/revtree/" in filename:
        return "revtree (Python)"
    if "/torch/" in filename:
        return "torch (Python)"
    return "other Python"


def profile(system: str, steps: int, top: int) -> None:
    model = build(system)
    x = torch.randn(1, 4, 16, requires_grad=True)
    for _ in range(3):
        step(model, x)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step(model, x)
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values())
    per_block = total / steps / DEPTH * 1e6
    groups: dict[str, float] = defaultdict(float)
    for (filename, _, _), v in entries.items():
        groups[where(filename)] += v[2]
    print(f"\n{system}: {per_block:.0f} us per block per step under the profiler")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22} {t / total:>6.1%}")
    print(f"  top {top} by own time (us per block per step, calls per block per step):")
    rows = sorted(entries.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, line, name), v in rows:
        place = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        us = v[2] / steps / DEPTH * 1e6
        print(f"    {us:>7.1f} {v[1] / steps / DEPTH:>6.1f}  {name} ({place}:{line})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--systems", nargs="+", default=["plain", "revtree", "revtree compile", "plain compile"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for system in args.systems:
        profile(system, args.steps, args.top)


if __name__ == "__main__":
    main()
