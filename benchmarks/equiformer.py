"""A real Equiformer: revtree's trunk vs equiformer-pytorch's reversible and plain trunks.

Three systems, one ``equiformer_pytorch.Equiformer`` configuration, the same weights:

- "sequential": ``reversible=False``, the package's plain-autograd trunk (``x + f(x)``, then
  ``x + g(x)``, one stream): the memory baseline, a different function from the other two.
- "package-rev": ``reversible=True``, equiformer-pytorch's own reversible sequence.
- "revtree": ``reversible=True`` built under ``revtree.adapters.equiformer.patch()``, the
  same function as package-rev on the revtree engine.

The package's reversible model is built from a fixed seed and its state dict loaded with
``strict=True`` into the other two (the sequential trunk names its blocks ``blocks.{i}.0``
and ``blocks.{i}.1`` where the reversible ones say ``blocks.{i}.f.net`` and
``blocks.{i}.g.net``: the names are mapped). Measured:

1. Step time (forward + loss + backward), median, the three systems interleaved in one
   process (sequential, package-rev, revtree, sequential, ...).
2. Memory held between forward and backward, and the step's peak: process RSS, a fresh
   subprocess per system with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``depth.py``;
   ``--quick``: the held bytes counted, no peak).
3. The largest difference between the parameter gradients of revtree and package-rev,
   from one step with identical inputs.

A summary against the targets follows (``--quick``, a smoke test: the figures without them).

Usage:
    python benchmarks/equiformer.py            # 32 nodes, depth 8, about 3 minutes on 1 thread
    python benchmarks/equiformer.py --quick    # 16 nodes, depth 4, about 30 seconds
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from typing import Any

import torch
from _measure import (
    MB,
    add_device_arguments,
    against,
    emit,
    exact_memory,
    held_noise,
    interleaved_medians,
    memory_method,
    on_device,
    peak_text,
    progress,
    ratio,
    run_worker,
    step_memory,
    tensors_of,
    use_device,
)
from equiformer_pytorch import Equiformer
from torch import nn

import revtree
from revtree.adapters import equiformer as adapter

SYSTEMS = ("sequential", "package-rev", "revtree")
STEP_TARGET, STEP_GOAL = 1.0, 0.9  # revtree / package-rev step time: at most, and the goal
HELD_TARGET = 1.0  # revtree / package-rev held memory, at most


@dataclass(frozen=True)
class Config:
    """The model and input size."""

    nodes: int
    depth: int
    batch: int = 1
    dim: int = 32  # for every degree
    num_degrees: int = 3
    heads: int = 4
    dim_head: int = 16
    num_tokens: int = 20

    def model_kwargs(self) -> dict[str, Any]:
        """``Equiformer``'s arguments, all but ``reversible``."""
        return dict(
            num_tokens=self.num_tokens,
            dim=self.dim,
            num_degrees=self.num_degrees,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            reduce_dim_out=True,
        )


# ---------------------------------------------------------------- models and step

_REVERSIBLE_NAME = re.compile(r"^layers\.blocks\.(\d+)\.([fg])\.net\.")


def sequential_name(name: str) -> str:
    """The sequential trunk's name for a reversible trunk's parameter or buffer."""
    return _REVERSIBLE_NAME.sub(lambda m: f"layers.blocks.{m[1]}.{'01'[m[2] == 'g']}.", name)


def build(config: Config, systems: Iterable[str]) -> dict[str, nn.Module]:
    """The models of ``systems``, all with the weights of the package's seeded reversible one."""
    systems = list(systems)
    torch.manual_seed(0)
    reference = Equiformer(**config.model_kwargs(), reversible=True)
    state = reference.state_dict()
    models: dict[str, nn.Module] = {}
    for system in systems:
        if system == "package-rev":
            models[system] = reference
        elif system == "revtree":
            with adapter.patch():
                models[system] = Equiformer(**config.model_kwargs(), reversible=True)
            models[system].load_state_dict(state, strict=True)
        elif system == "sequential":
            models[system] = Equiformer(**config.model_kwargs(), reversible=False)
            renamed = {sequential_name(k): v for k, v in state.items()}
            models[system].load_state_dict(renamed, strict=True)
        else:
            raise ValueError(f"unknown system {system!r}")
    return models


@dataclass
class Inputs:
    """One batch and the fixed weights of the loss."""

    feats: torch.Tensor  # (batch, nodes) token ids
    coors: torch.Tensor  # (batch, nodes, 3)
    mask: torch.Tensor  # (batch, nodes), all True
    w0: torch.Tensor  # (batch, nodes), weights of the type-0 output in the loss
    w1: torch.Tensor  # (batch, nodes, 3), weights of the type-1 output

    @classmethod
    def make(cls, config: Config) -> Inputs:
        """Random but fixed inputs."""
        g = torch.Generator("cpu").manual_seed(1)
        b, n = config.batch, config.nodes
        cpu = {"generator": g, "device": "cpu"}
        return cls(
            feats=on_device(torch.randint(0, config.num_tokens, (b, n), **cpu)),
            coors=on_device(torch.randn(b, n, 3, **cpu)),
            mask=on_device(torch.ones(b, n, dtype=torch.bool, device="cpu")),
            w0=on_device(torch.randn(b, n, **cpu)),
            w1=on_device(torch.randn(b, n, 3, **cpu)),
        )


def forward(model: nn.Module, x: Inputs) -> Any:
    return model(x.feats, x.coors, x.mask)


def loss_of(out: Any, x: Inputs) -> torch.Tensor:
    return (out.type0 * x.w0).sum() + (out.type1 * x.w1).sum()


def train_step(model: nn.Module, x: Inputs) -> None:
    loss_of(forward(model, x), x).backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- memory (one subprocess each)


@dataclass
class Memory:
    held: float  # MB, RSS growth from before forward to after forward
    peak: float | None  # MB, peak RSS growth over forward and backward (None: no clear_refs)
    params: float  # MB, the parameters, hence also their gradients


def measure_memory(system: str, config: Config, exact: bool) -> Memory:
    """Run in the subprocess: held and peak RSS growth of one training step (or held, counted)."""
    model = build(config, [system])[system]
    x = Inputs.make(config)
    train_step(model, x)  # warm-up: allocator pools, lazy initialisation
    held, peak = step_memory(
        lambda: forward(model, x),
        lambda out: loss_of(out, x).backward(),
        exact=exact,
        exempt=tensors_of(model, vars(x)),
    )
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Memory(held / MB, None if peak is None else peak / MB, params / MB)


def memory_in_subprocess(system: str, config: Config, threads: int, flags: list[str]) -> Memory:
    args = ["--threads", str(threads), "--nodes", str(config.nodes), "--depth", str(config.depth)]
    return Memory(**run_worker(__file__, [*args, "--memory-worker", system, *flags]))


# ---------------------------------------------------------------- time and gradients


def measure_time(models: dict[str, nn.Module], x: Inputs, repeats: int) -> dict[str, float]:
    """Median step time of every system, the systems timed in turn."""
    tasks = {s: partial(train_step, models[s], x) for s in SYSTEMS}
    return interleaved_medians(tasks, repeats, warmup=SYSTEMS)


def gradients(model: nn.Module, x: Inputs) -> dict[str, torch.Tensor]:
    """The parameter gradients of one step, by parameter name."""
    model.zero_grad(set_to_none=True)
    loss_of(forward(model, x), x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@dataclass
class GradientCheck:
    max_diff: float  # max |revtree - package-rev| over all parameter gradients
    max_grad: float  # max |package-rev gradient|, for scale
    tensors: int  # parameter tensors with a gradient in both
    unmatched: int  # parameters with a gradient in one system only


def compare_gradients(a: nn.Module, b: nn.Module, x: Inputs) -> GradientCheck:
    ga, gb = gradients(a, x), gradients(b, x)
    common = ga.keys() & gb.keys()
    diff = max((ga[n] - gb[n]).abs().max().item() for n in common)
    scale = max(gb[n].abs().max().item() for n in common)
    return GradientCheck(diff, scale, len(common), len(ga.keys() ^ gb.keys()))


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 nodes, depth 4, 5 repeats")
    parser.add_argument("--nodes", type=int, default=None, help="default: 32 (--quick: 16)")
    parser.add_argument("--depth", type=int, default=None, help="default: 8 (--quick: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per system")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = use_device(args)
    nodes = args.nodes or (16 if args.quick else 32)
    depth = args.depth or (4 if args.quick else 8)
    config = Config(nodes=nodes, depth=depth)
    if args.memory_worker:
        emit(asdict(measure_memory(args.memory_worker, config, exact_memory(args.quick))))
        return
    repeats = args.repeats or (5 if args.quick else 11)

    c = config
    print(
        f"revtree {revtree.__version__}, equiformer-pytorch {version('equiformer-pytorch')}, "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"Equiformer: {c.nodes} nodes (all neighbours), batch {c.batch}, depth {c.depth}, "
        f"dim {c.dim} x {c.num_degrees} degrees,"
    )
    print(
        f"  heads {c.heads}, dim_head {c.dim_head}, num_tokens {c.num_tokens}, "
        f"reduce_dim_out=True, {args.dtype}, {args.device}, training mode"
    )
    print("loss: type-0 and type-1 outputs, weighted by fixed random tensors, summed")
    print("systems, same weights (package-rev seeded, state dict loaded strict=True into others):")
    print("  sequential   reversible=False: the package's plain-autograd trunk (another function)")
    print("  package-rev  reversible=True: equiformer-pytorch's own reversible sequence")
    print("  revtree      reversible=True, built under revtree.adapters.equiformer.patch()\n")

    memory: dict[str, Memory] = {}
    for i, s in enumerate(SYSTEMS, 1):
        progress(f"memory: {s} ({i}/{len(SYSTEMS)})")
        flags = [*device, *(["--quick"] if args.quick else [])]
        memory[s] = memory_in_subprocess(s, config, args.threads, flags)
    progress("building the models")
    models = build(config, SYSTEMS)
    x = Inputs.make(config)
    progress("gradients: revtree vs package-rev, one step each")
    check = compare_gradients(models["revtree"], models["package-rev"], x)
    progress(f"time: {repeats} interleaved repeats of {len(SYSTEMS)} systems, after a warm-up")
    timing = measure_time(models, x, repeats)
    progress("")

    n_params = sum(p.numel() for p in models["package-rev"].parameters())
    print(f"{n_params:,} parameters ({memory['package-rev'].params:.1f} MB)\n")
    noise = held_noise(args.quick)
    print("\n".join(memory_method(args.quick)))
    print(f"Time: median of {repeats}, the three systems interleaved in one process")
    print("  step = forward + loss + backward (+ zero_grad)")
    below = f" (n/a: base below {noise} MB)" if noise else ""
    print(f"x pkg, x seq: ratio to package-rev, to sequential{below}\n")

    pkg, seq = "package-rev", "sequential"
    print(
        f"{'system':<12} {'step ms':>9} {'x pkg':>6} {'x seq':>6}"
        f" {'held MB':>9} {'x pkg':>6} {'x seq':>6} {'peak MB':>9} {'param MB':>9}"
    )
    digits = 3 if args.quick else 2
    for s in SYSTEMS:
        t, m = timing[s], memory[s]
        print(
            f"{s:<12} {t * 1e3:>9.1f} {t / timing[pkg]:>6.2f} {t / timing[seq]:>6.2f}"
            f" {m.held:>9.{digits}f} {ratio(m.held, memory[pkg].held, floor=noise):>6}"
            f" {ratio(m.held, memory[seq].held, floor=noise):>6}"
            f" {peak_text(m.peak, args.quick):>9} {m.params:>9.1f}"
        )

    print(
        f"\nGradients, revtree vs package-rev, one step, identical inputs: max |difference| "
        f"{check.max_diff:.2e} over {check.tensors} parameter tensors"
    )
    print(
        f"  (max |gradient| {check.max_grad:.2e}, relative {check.max_diff / check.max_grad:.1e};"
        f" gradient in one system only: {check.unmatched})"
    )

    step = timing["revtree"] / timing[pkg]
    held, held_pkg = memory["revtree"].held, memory[pkg].held
    print("\nSummary")
    target = f"target <= {STEP_TARGET}, goal {STEP_GOAL}"
    tail = against(target, step <= STEP_TARGET, args.quick, goal=step <= STEP_GOAL)
    print(f"  revtree / package-rev step time: {step:.2f}x{tail}")
    held_ok = held <= max(HELD_TARGET * held_pkg, held_pkg + noise)
    held_ratio = ratio(held, held_pkg, floor=noise)
    target = f"target <= {HELD_TARGET}x, or within the {noise} MB RSS noise"
    print(
        f"  revtree / package-rev held memory: {held_ratio}{'' if held_ratio == 'n/a' else 'x'}, "
        f"{held:.{digits}f} MB vs {held_pkg:.{digits}f} MB{against(target, held_ok, args.quick)}"
    )
    print(
        f"  revtree / sequential: held memory {ratio(held, memory[seq].held, 3)}x, "
        f"step time {timing['revtree'] / timing[seq]:.2f}x"
    )


if __name__ == "__main__":
    main()
