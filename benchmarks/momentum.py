"""momentumnet (0.10) against its revtree adapter: gradients, memory kept, step time.

Three systems on the same weights: the package's ``use_backprop=True`` network (plain
autograd, the reference), the package's memory-saving path (``use_backprop=False``, its
own backward with a fixed-point velocity), and ``revtree.adapters.momentumnet``
(``use_backprop=False``: the reversible engine with the Momentum coupling).

1. Gradients in float64, relative to the reference (max over the output and every
   gradient of max |difference| / the largest value), with and without dropout.
2. Memory: the bytes autograd keeps for backward after the forward (saved-tensor hooks,
   ``revtree.testing.saved_bytes``), by depth.
3. Step time (forward + backward), medians of the systems interleaved in one process.
4. Reconstruction error of the revtree path in float32 by gamma and depth.

Usage:
    python benchmarks/momentum.py            # about a minute
    python benchmarks/momentum.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import copy
from importlib.metadata import version

import momentumnet
import torch
from _measure import interleaved_medians
from torch import nn

from revtree.adapters import momentumnet as adapter
from revtree.testing import reconstruction_errors, saved_bytes

SYSTEMS = ("package backprop", "package memory", "revtree")


def functions(n: int, d: int, dropout: float) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.Tanh(), nn.Linear(d, d))
        for _ in range(n)
    ]


def build(n: int, d: int, dropout: float = 0.0) -> dict[str, nn.Module]:
    fns = functions(n, d, dropout)
    return {
        "package backprop": momentumnet.MomentumNet(copy.deepcopy(fns), 0.9, use_backprop=True),
        "package memory": momentumnet.MomentumNet(copy.deepcopy(fns), 0.9, use_backprop=False),
        "revtree": adapter.MomentumNet(copy.deepcopy(fns), 0.9, use_backprop=False),
    }


def step(model: nn.Module, x: torch.Tensor, w: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    y = model(x)
    (y * w).sum().backward()
    out = [y.detach(), x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    x.grad = None
    model.zero_grad(set_to_none=True)
    return out


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(t.abs().max() for t in a)
    return max(((u - v).abs().max() / scale).item() for u, v in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d, batch = (16, 8) if args.quick else (64, 64)
    depths = (8, 32) if args.quick else (8, 32, 128)
    repeats = 3 if args.quick else 9
    print(
        f"momentumnet {version('momentumnet')}, torch {torch.__version__}, 1 thread; "
        f"f: Linear({d}, {d}) -> Dropout -> Tanh -> "
        f"Linear({d}, {d}), gamma 0.9, batch {batch}\n"
    )

    print("Gradients in float64, relative to the package's use_backprop=True (plain autograd)")
    print(f"{'dropout':>8} {'depth':>6} {'package memory':>15} {'revtree':>10}")
    for dropout in (0.0, 0.2):
        for n in depths[:2]:
            models = {k: m.double().train() for k, m in build(n, d, dropout).items()}
            x = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)
            w = torch.randn(batch, d, dtype=torch.float64)
            ref = step(models["package backprop"], x, w)
            errs = [relative(ref, step(models[s], x, w)) for s in SYSTEMS[1:]]
            print(f"{dropout:>8} {n:>6} {errs[0]:>15.1e} {errs[1]:>10.1e}")

    print("\nMemory kept for backward after the forward (saved-tensor hooks), float32, MiB")
    print(f"{'depth':>6} " + " ".join(f"{s:>17}" for s in SYSTEMS))
    for n in depths:
        models = build(n, d)
        x = torch.randn(batch, d, requires_grad=True)
        kept = [saved_bytes(models[s], x) / 2**20 for s in SYSTEMS]
        print(f"{n:>6} " + " ".join(f"{k:>17.3f}" for k in kept))

    n = depths[1]
    models = build(n, d)
    x = torch.randn(batch, d, requires_grad=True)
    w = torch.randn(batch, d)
    tasks = {s: (lambda m=models[s]: step(m, x, w)) for s in SYSTEMS}
    times = interleaved_medians(tasks, repeats, warmup=SYSTEMS)
    base = times["package backprop"]
    print(f"\nStep time at depth {n}, float32, medians of {repeats} interleaved rounds")
    for s in SYSTEMS:
        print(f"  {s:<17} {times[s] * 1e3:8.2f} ms  {times[s] / base:5.2f}x backprop")

    print("\nrevtree's reconstruction error in float32 (reconstruction_errors, accumulated)")
    for gamma in (0.9, 0.5):
        row = []
        for n in depths[:2]:
            torch.manual_seed(0)
            fns = [nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)]
            net = adapter.MomentumNet(fns, gamma, use_backprop=False)
            errs = reconstruction_errors(net.network.sequence, torch.randn(batch, d))
            row.append(f"depth {n}: {max(e.accumulated for e in errs):.1e}")
        print(f"  gamma {gamma}: " + ", ".join(row))


if __name__ == "__main__":
    main()
