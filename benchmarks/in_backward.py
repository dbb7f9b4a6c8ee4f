"""An optimizer applied in backward: how much a step's backward holds above rest.

torch's documented pattern for a lean step (``register_post_accumulate_grad_hook`` on every
parameter, the hook doing the update and dropping ``.grad``) keeps memory low only if the
gradients arrive while the backward runs, a block's at a time. A system that hands every
block's gradients back together at its end holds all of them at once: the parameters' bytes
again, at the peak.

Workload: 24 blocks of two ``Linear(1024, 1024)`` (``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``;
192 MiB of float32 parameters), input ``(1, 2, 2048)``: the gradients dwarf the activations.
Each system's step in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``): one warm-up step,
then a forward, the peak reset (``/proc/self/clear_refs``) and the backward; printed is
VmHWM after it less the RSS before it, over the parameters' bytes. Linux only.

Usage:
    python benchmarks/in_backward.py            # about 30 seconds
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _measure import MB, emit, peak_rss, progress, reset_peak_rss, rss, run_worker
from _systems import NAMED, PEERS, build_named, peer
from torch import nn

WIDTH, DEPTH = 1024, 24
SYSTEMS = ("plain", "checkpoint", "revtree", *PEERS)


def measure(system: str) -> dict[str, float]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    pairs = [(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)) for _ in range(DEPTH)]
    model = build_named(system, pairs)
    assert model is not None
    params = list(model.parameters())

    def update(p: torch.Tensor) -> None:  # SGD in backward: step, then drop the gradient
        p.data.add_(p.grad, alpha=-1e-3)
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(update)
    x = torch.randn(1, 2, 2 * WIDTH, requires_grad=True)  # 3-D: reformer-pytorch's
    model(x).sum().backward()  # warm-up: allocator pools, first calls
    out = model(x)
    if not reset_peak_rss():
        raise SystemExit("needs a writable /proc/self/clear_refs (Linux)")
    before = rss()
    out.sum().backward()
    growth = peak_rss() - before
    return {"growth": growth / MB, "params": sum(p.nbytes for p in params) / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        emit(measure(args.worker))
        return
    print(f"{DEPTH} blocks of two Linear({WIDTH}, {WIDTH}), input (1, 2, {2 * WIDTH}), float32")
    print("peak = VmHWM during backward - RSS before it, an optimizer step in each hook\n")
    print(f"{'system':<18} {'peak MiB':>9} {'param MiB':>10} {'x params':>9}")
    for system in SYSTEMS:
        if system in PEERS and peer(NAMED[system]) is None:
            print(f"{system:<18} (not installed)")
            continue
        progress(f"{system}")
        found = run_worker(__file__, ["--worker", system])
        growth, params = found["growth"], found["params"]
        print(f"{system:<18} {growth:>9.1f} {params:>10.1f} {growth / params:>9.3f}")


if __name__ == "__main__":
    main()
