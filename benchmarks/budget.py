"""The memory budget: step time and memory held as the budget goes from 0 to unlimited.

One ``ReversibleSequence`` of MLP blocks (depth 12) runs as plain autograd
(``reversible=False``) and with ``memory_budget`` set to 0 (fully reversible), to fractions
of plain autograd's activation memory, and to infinity (every block stores, as plain
autograd does). Plain autograd's activation memory is the sum of the blocks' activations as
the plan measures them (``ReversibleSequence.plan``).

1. Memory held between forward and backward, and the peak of a step: process RSS, each
   system in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``depth.py``;
   ``--quick``: the held bytes counted, no peak).
2. Step time (forward + backward): medians, every system interleaved in one process,
   after one untimed step of each (which also makes each budget's plan).
3. The targets: unlimited budget at most 1.05x plain's step; half of plain's activations
   held at most 0.6x plain's memory and a step faster than fully reversible; zero budget
   as fully reversible (``--quick``, a smoke test: the figures without targets).
4. The curve, step time and held memory against the budget: ``DIR/budget.png``
   (``--out DIR``, default ``benchmark-results``; ``budget-quick.png`` for ``--quick``).

Usage:
    python benchmarks/budget.py            # (16, 128, 256) input, about 3 minutes on 1 thread
    python benchmarks/budget.py --quick    # small input, about 30 seconds
    python benchmarks/budget.py --out docs/img    # the figure of the docs
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _measure import (
    MB,
    add_device_arguments,
    add_output_arguments,
    against,
    emit,
    exact_memory,
    interleaved_medians,
    memory_method,
    peak_text,
    plot_path,
    progress,
    run_worker,
    step_memory,
    summary_title,
    tensors_of,
    use_device,
)
from torch import nn

import revtree

DEPTH = 12
FRACTIONS = (0.0, 0.25, 0.5, 0.75, float("inf"))  # of plain autograd's activation bytes
INF_TARGET = 1.05  # unlimited budget / plain step time, at most
HALF_MEMORY_TARGET = 0.6  # half budget / plain held memory, at most


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
    )


def build(shape: tuple[int, ...]) -> tuple[revtree.ReversibleSequence, torch.Tensor]:
    torch.manual_seed(0)
    width = shape[-1] // 2
    seq = revtree.ReversibleSequence([(mlp(width), mlp(width)) for _ in range(DEPTH)])
    return seq, torch.randn(shape, requires_grad=True)


def plain_activation_bytes(seq: revtree.ReversibleSequence, x: torch.Tensor) -> int:
    seq.memory_budget = float("inf")
    return sum(seq.plan(x).activation_bytes)


def configure(seq: revtree.ReversibleSequence, system: str, plain_bytes: int) -> None:
    """``plain``, or a fraction of plain's activation bytes as the budget (``0.5``, ``inf``)."""
    if system == "plain":
        seq.reversible, seq.memory_budget = False, 0
    else:
        seq.reversible, seq.memory_budget = True, float(system) * plain_bytes


def label(system: str) -> str:
    if system == "plain":
        return "plain"
    fraction = float(system)
    return {0.0: "budget 0", float("inf"): "budget inf"}.get(fraction, f"budget {fraction:g}x")


def train_step(seq: nn.Module, x: torch.Tensor) -> None:
    seq(x).sum().backward()
    seq.zero_grad(set_to_none=True)
    x.grad = None


@dataclass
class Memory:
    held: float  # MB, RSS growth over the forward pass
    peak: float | None  # MB, peak RSS growth over the step
    stored: int  # blocks that store their activations


def measure_memory(system: str, shape: tuple[int, ...], exact: bool) -> Memory:
    """Run in the subprocess: held and peak RSS of one step (after a warm-up step)."""
    seq, x = build(shape)
    plain_bytes = plain_activation_bytes(seq, x)
    configure(seq, system, plain_bytes)
    stored = DEPTH if system == "plain" else sum(seq.plan(x).stored)
    train_step(seq, x)
    held, peak = step_memory(
        lambda: seq(x), lambda y: y.sum().backward(), exact=exact, exempt=tensors_of(seq, x)
    )
    return Memory(held / MB, None if peak is None else peak / MB, stored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small input, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per system")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = use_device(args)
    shape = (4, 64, 256) if args.quick else (16, 128, 256)
    if args.memory_worker:
        emit(asdict(measure_memory(args.memory_worker, shape, exact_memory(args.quick))))
        return
    repeats = args.repeats or (3 if args.quick else 5)
    systems = ["plain", *map(str, FRACTIONS)]

    print(
        f"revtree {revtree.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
        f"device {args.device}"
    )
    width = shape[-1] // 2
    print(f"input {shape} {args.dtype}, Split(-1); {DEPTH} blocks, f and g: LayerNorm -> ")
    print(f"  Linear({width}, {4 * width}) -> GELU -> Linear({4 * width}, {width})")
    seq, x = build(shape)
    plain_bytes = plain_activation_bytes(seq, x)
    print(f"plain autograd's activations, as the plan measures them: {plain_bytes / MB:.1f} MB\n")

    memory: dict[str, Memory] = {}
    for i, s in enumerate(systems, 1):
        progress(f"memory: {label(s)} ({i}/{len(systems)})")
        argv = ["--threads", str(args.threads), "--memory-worker", s, *device]
        memory[s] = Memory(**run_worker(__file__, argv + (["--quick"] if args.quick else [])))

    progress(f"time: {len(systems)} systems interleaved, {repeats} rounds")
    tasks = {s: (lambda: train_step(seq, x)) for s in systems}
    medians = interleaved_medians(
        tasks,
        repeats,
        warmup=systems,
        prepare=lambda s: configure(seq, s, plain_bytes),
    )
    progress("")

    print("\n".join(memory_method(args.quick)))
    print(f"Time: median of {repeats}, every system interleaved in one process\n")
    print(
        f"{'system':<14} {'budget MB':>10} {'stored':>7} {'held MB':>9} {'x plain':>8} "
        f"{'peak MB':>9} {'step ms':>9} {'x plain':>8}"
    )
    plain_held, plain_step = memory["plain"].held, medians["plain"]
    for s in systems:
        budget = "-" if s == "plain" else f"{float(s) * plain_bytes / MB:.1f}"
        m = memory[s]
        print(
            f"{label(s):<14} {budget:>10} {m.stored:>4}/{DEPTH:<2} {m.held:>9.1f} "
            f"{m.held / plain_held:>8.3f} {peak_text(m.peak, args.quick):>9} "
            f"{medians[s] * 1e3:>9.1f} "
            f"{medians[s] / plain_step:>8.2f}"
        )

    inf, half, zero = str(float("inf")), "0.5", "0.0"
    print(f"\n{summary_title(args.quick)}")
    r = medians[inf] / plain_step
    tail = against(f"<= {INF_TARGET}", r <= INF_TARGET, args.quick)
    print(f"  unlimited budget / plain step: {r:.3f}x{tail}")
    r = memory[half].held / plain_held
    tail = against(f"<= {HALF_MEMORY_TARGET}", r <= HALF_MEMORY_TARGET, args.quick)
    print(f"  half budget / plain held memory: {r:.3f}x{tail}")
    r = medians[half] / medians[zero]
    print(f"  half budget / fully reversible step: {r:.3f}x{against('< 1', r < 1, args.quick)}")
    print(
        f"  zero budget: held {memory[zero].held:.1f} MB, step "
        f"{medians[zero] / plain_step:.2f}x plain (the fully reversible engine)"
    )
    path = plot_path(args, "budget")
    plot(path, systems[1:], memory, medians, plain_step, plain_held)
    print(f"\nplot: {path}")


def plot(
    path: Path,
    systems: list[str],
    memory: dict[str, Memory],
    medians: dict[str, float],
    plain_step: float,
    plain_held: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [min(float(s), 1.25) for s in systems]  # unlimited drawn past 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(fractions, [medians[s] / plain_step for s in systems], "o-", label="step time")
    ax.plot(fractions, [memory[s].held / plain_held for s in systems], "s--", label="held memory")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ticks = [f for f in fractions if f <= 1] + [1.25]
    ax.set_xticks(ticks, [f"{f:g}" for f in ticks[:-1]] + ["inf"])
    ax.set_xlabel("memory budget (fraction of plain autograd's activations)")
    ax.set_ylabel("x plain autograd")
    ax.set_title(f"Budget curve: {DEPTH} MLP blocks, 1 thread, CPU")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
