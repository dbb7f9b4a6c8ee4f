"""Reversible vs plain autograd: memory and time as a function of depth.

The same ``ReversibleSequence`` of MLP blocks is run two ways: "plain" (``reversible=False``,
ordinary autograd, every block stores its activations) and "revtree" (``reversible=True``,
activations are recomputed in backward). Three measurements:

1. Memory held between forward and backward, and the peak of one training step. Each
   (system, depth) runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``, so
   that large freed buffers go back to the OS and the process RSS tracks live tensors
   (``--quick``: the held bytes counted, no peak).
2. Step time (forward + backward) and no-grad forward time, timed interleaved in one
   process (plain, revtree, plain, revtree, ...) so that machine noise hits both alike.
3. A summary against the targets: revtree's held memory flat in depth, far below plain's
   (``--quick``, a smoke test: the figures without targets).

Usage:
    python benchmarks/depth.py            # depths 4 8 16 32, 3-4 minutes on 1 thread
    python benchmarks/depth.py --quick    # small input, depths 4 and 16, about 25 seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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
    tensors_of,
    use_device,
)
from torch import nn

import revtree

KEYS = ("a", "b")
SYSTEMS = ("plain", "revtree")
HELD_TARGET = 1.25  # revtree held memory, max depth / min depth, at most
PLAIN_TARGET = 1 / 8  # revtree / plain held memory at max depth, below


class PerLeafMLP(nn.Module):
    """Maps a dict half-stream to a dict of the same keys, one MLP per leaf."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleDict(
            {
                k: nn.Sequential(
                    nn.LayerNorm(width),
                    nn.Linear(width, hidden),
                    nn.GELU(),
                    nn.Linear(hidden, width),
                )
                for k in KEYS
            }
        )

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.mlps[k](v) for k, v in x.items()}


def build(
    depth: int, shape: tuple[int, ...], reversible: bool
) -> tuple[revtree.ReversibleSequence, dict[str, torch.Tensor]]:
    """The model (``Split(-1)`` codec, so each half-stream leaf has half the channels) and input."""
    torch.manual_seed(0)
    width = shape[-1] // 2
    blocks = [(PerLeafMLP(width, 4 * width), PerLeafMLP(width, 4 * width)) for _ in range(depth)]
    seq = revtree.ReversibleSequence(blocks, codec=revtree.codecs.Split(-1), reversible=reversible)
    x = {k: torch.randn(shape, requires_grad=True) for k in KEYS}
    return seq, x


def loss_of(y: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.sum() for v in y.values()]).sum()


def train_step(seq: nn.Module, x: dict[str, torch.Tensor]) -> None:
    loss_of(seq(x)).backward()
    seq.zero_grad(set_to_none=True)
    for v in x.values():
        v.grad = None


def no_grad_forward(seq: nn.Module, x: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        seq(x)


# ---------------------------------------------------------------- memory (one subprocess each)


@dataclass
class Memory:
    held: float  # MB, RSS growth from before forward to after forward
    peak: float | None  # MB, peak RSS growth over forward and backward (None: no clear_refs)
    params: float  # MB, the parameters, hence also their gradients


def measure_memory(system: str, depth: int, shape: tuple[int, ...], exact: bool) -> Memory:
    """Run in the subprocess: held and peak RSS growth of one training step (or held, counted)."""
    seq, x = build(depth, shape, reversible=system == "revtree")
    train_step(seq, x)  # warm-up: allocator pools, lazy initialisation
    held, peak = step_memory(
        lambda: seq(x), lambda y: loss_of(y).backward(), exact=exact, exempt=tensors_of(seq, x)
    )
    params = sum(p.numel() * p.element_size() for p in seq.parameters())
    return Memory(held / MB, None if peak is None else peak / MB, params / MB)


def memory_in_subprocess(
    system: str, depth: int, shape: tuple[int, ...], threads: int, flags: list[str]
) -> Memory:
    shape_arg = ",".join(map(str, shape))
    args = ["--threads", str(threads), "--shape", shape_arg, "--memory-worker", f"{system}:{depth}"]
    return Memory(**run_worker(__file__, [*args, *flags]))


# ---------------------------------------------------------------- time (interleaved, one process)


@dataclass
class Timing:
    step: float  # seconds, median
    forward: float  # seconds, median, under torch.no_grad


def measure_time(depth: int, shape: tuple[int, ...], repeats: int) -> dict[str, Timing]:
    """Median step and no-grad forward times of both systems, timed alternately."""
    seq, x = build(depth, shape, reversible=True)
    flags = {"plain": False, "revtree": True}  # one model, so both systems share weights
    tasks: dict[tuple[str, str], Callable[[], None]] = {}
    for s in SYSTEMS:  # per round: plain step, plain forward, revtree step, revtree forward
        tasks[s, "step"] = lambda: train_step(seq, x)
        tasks[s, "forward"] = lambda: no_grad_forward(seq, x)

    def switch(key: tuple[str, str]) -> None:
        seq.reversible = flags[key[0]]

    warmup = [(s, "step") for s in SYSTEMS]
    medians = interleaved_medians(tasks, repeats, warmup=warmup, prepare=switch)
    return {s: Timing(medians[s, "step"], medians[s, "forward"]) for s in SYSTEMS}


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", help="default: 4 8 16 32")
    parser.add_argument("--quick", action="store_true", help="small input, depths 4 16, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per system")
    parser.add_argument("--shape", default=None, help="input leaf shape, e.g. 16,128,256")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = use_device(args)
    shape = (4, 64, 256) if args.quick else (16, 128, 256)
    if args.shape:
        shape = tuple(int(n) for n in args.shape.split(","))
    if args.memory_worker:
        system, depth = args.memory_worker.split(":")
        emit(asdict(measure_memory(system, int(depth), shape, exact_memory(args.quick))))
        return
    depths = sorted(args.depths or ([4, 16] if args.quick else [4, 8, 16, 32]))
    repeats = args.repeats or (3 if args.quick else 5)

    print(
        f"revtree {revtree.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
        f"device {args.device}"
    )
    print(f"input {{'a', 'b'}}: {shape} {args.dtype} each, codec Split(-1)")
    print("block: f and g map each half-stream leaf through LayerNorm -> Linear -> GELU -> Linear")
    width = shape[-1] // 2
    print(f"  ({width} -> {4 * width} -> {width} channels)\n")

    memory: dict[tuple[str, int], Memory] = {}
    runs = [(s, d) for d in depths for s in SYSTEMS]
    for i, (s, d) in enumerate(runs, 1):
        progress(f"memory: {s} depth {d} ({i}/{len(runs)})")
        flags = [*device, *(["--quick"] if args.quick else [])]
        memory[s, d] = memory_in_subprocess(s, d, shape, args.threads, flags)
    timing: dict[int, dict[str, Timing]] = {}
    for i, d in enumerate(depths, 1):
        progress(f"time: depth {d} ({i}/{len(depths)}), {repeats} interleaved repeats")
        timing[d] = measure_time(d, shape, repeats)
    progress("")

    print("\n".join(memory_method(args.quick)))
    header = f"{'system':<8} {'depth':>5} {'held MB':>9} {'x plain':>8}"
    print(f"{header} {'peak MB':>9} {'param MB':>9}")
    for d in depths:
        for s in SYSTEMS:
            m = memory[s, d]
            row = f"{s:<8} {d:>5} {m.held:>9.1f} {m.held / memory['plain', d].held:>8.3f}"
            print(f"{row} {peak_text(m.peak, args.quick):>9} {m.params:>9.1f}")

    print(f"\nTime: median of {repeats}, plain and revtree interleaved in one process")
    if args.quick:
        print("  (a --quick run: small tensors, 3 repeats; its timings mean nothing)")
    print("  step = forward + backward; forward = under torch.no_grad")
    header = f"{'system':<8} {'depth':>5} {'step ms':>9} {'x plain':>8}"
    print(f"{header} {'forward ms':>11} {'x plain':>8}")
    for d in depths:
        for s in SYSTEMS:
            t, p = timing[d][s], timing[d]["plain"]
            row = f"{s:<8} {d:>5} {t.step * 1e3:>9.1f} {t.step / p.step:>8.2f}"
            print(f"{row} {t.forward * 1e3:>11.1f} {t.forward / p.forward:>8.2f}")

    lo, hi = depths[0], depths[-1]
    flat = memory["revtree", hi].held / memory["revtree", lo].held
    vs_plain = memory["revtree", hi].held / memory["plain", hi].held
    step_ratios = [timing[d]["revtree"].step / timing[d]["plain"].step for d in depths]

    print("\nSummary")
    print(
        f"  revtree held memory, depth {hi} / depth {lo}: {flat:.2f}x"
        + against(f"target <= {HELD_TARGET}", flat <= HELD_TARGET, args.quick)
    )
    print(
        f"  revtree / plain held memory at depth {hi}: {vs_plain:.3f}"
        + against(f"target < 1/{round(1 / PLAIN_TARGET)}", vs_plain < PLAIN_TARGET, args.quick)
    )
    print(
        f"  revtree / plain step time: {step_ratios[-1]:.2f}x at depth {hi} "
        f"(from {min(step_ratios):.2f}x to {max(step_ratios):.2f}x over depths)"
    )
    plot(depths, memory, timing, plot_path(args, "depth"))


def plot(
    depths: list[int],
    memory: dict[tuple[str, int], Memory],
    timing: dict[int, dict[str, Timing]],
    path: Path,
) -> None:
    """Held memory and step time against depth, both systems."""
    try:
        import matplotlib
    except ImportError:
        print("\n(no plot: pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (held, step) = plt.subplots(1, 2, figsize=(10, 4))
    for system, color, marker in (("plain", "C3", "s"), ("revtree", "C0", "o")):
        held.plot(
            depths,
            [memory[system, d].held for d in depths],
            color=color,
            marker=marker,
            label=system,
        )
        step.plot(
            depths,
            [timing[d][system].step * 1e3 for d in depths],
            color=color,
            marker=marker,
            label=system,
        )
    held.set_ylabel("MB held between forward and backward")
    held.set_yscale("log")
    step.set_ylabel("step time (ms)")
    for ax in (held, step):
        ax.set_xlabel("depth (blocks)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
