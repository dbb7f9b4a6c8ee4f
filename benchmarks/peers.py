"""revtree against its peers: the same (f, g) pairs through every system that can run them.

Systems: plain autograd, ``torch.utils.checkpoint`` (``use_reentrant=False``, one checkpoint
per block), revtree, RevTorch, RevLib, MemCNN, reformer-pytorch's and equiformer-pytorch's
reversible sequences, each driven through its public API (``build`` below). A peer that
is not installed is skipped with a message. Every system computes the same function
(``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` per block) with the same weights: the pairs are
built once from a fixed seed and deep-copied into each system.

Workloads:

a. One tensor ``(batch, tokens, 2d)``, split in two on the last axis; f and g are
   ``LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d)``; several depths.
b. An Equiformer-style dict of degrees ``{l: (batch, nodes, d, 2l + 1)}`` for l = 0, 1, 2,
   duplicated into both streams (the output is the mean of the two); f and g apply one such
   MLP over the ``d`` axis per degree. revtree uses ``codecs.Degree()``.
c. Many small leaves and next to no work in f and g (one ``tanh(w * x)`` per leaf, ``w``
   a parameter per leaf), so that what a step costs beyond plain autograd is the
   system's own per-block overhead, in microseconds per block per training step: 8
   leaves ``(1, 2, 4, 2l + 1)`` as a flat dict of degrees (every system) and as a nested
   pytree of dicts, a tuple and a list (plain autograd and revtree).

Measured:

1. Step time (forward + loss + backward + zero_grad) and forward time under ``no_grad``:
   medians, every system of a workload and depth timed interleaved in one process
   (A B C ... A B C ...) so that machine noise hits all alike.
2. Memory held between forward and backward, and the peak of the step: process RSS, a
   fresh subprocess per (system, workload, depth) with ``MALLOC_MMAP_THRESHOLD_=65536``
   (as ``depth.py``), after one warm-up step (``--quick``: the held bytes counted, no peak).
3. Gradients against plain autograd: one step with identical weights and inputs, in
   float32 and in float64; the largest relative difference over every parameter and the
   input, each tensor's max |difference| divided by its max |plain gradient|.

A summary against the targets follows (``--quick``: the figures without targets), and a
plot of workload a, memory and time against depth: ``DIR/peers.png`` (``--out DIR``,
default ``benchmark-results``; ``peers-quick.png`` for ``--quick``).

Usage:
    python benchmarks/peers.py            # full run, about 12 minutes on 1 thread
    python benchmarks/peers.py --quick    # small sizes, depths 4 8: a smoke test, ~1 minute
    python benchmarks/peers.py --out docs/img    # the figure of the docs
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from itertools import chain, cycle
from pathlib import Path
from typing import Any

import _measure
import optree
import torch
from _measure import (
    MB,
    add_device_arguments,
    add_output_arguments,
    against,
    emit,
    exact_memory,
    held_noise,
    interleaved_medians,
    memory_method,
    peak_text,
    plot_path,
    progress,
    ratio,
    run_worker,
    step_memory,
    summary_title,
    tensors_of,
    use_device,
)
from _systems import SYSTEMS, DegreeMLP, LeafScale, Pairs, available, build, mlp, peer
from torch import nn

import revtree

# ---------------------------------------------------------------- systems and peers

WORKLOAD_SYSTEMS = {
    "a": ("plain", "checkpoint", "revtree", "revtorch", "revlib", "memcnn", "reformer"),
    "b": ("plain", "revtree-plain", "checkpoint", "revtree", "equiformer"),
    "c": (
        "plain",
        "revtree-plain",
        "checkpoint",
        "revtree",
        "equiformer",
        "plain-nested",
        "revtree-nested",
    ),
}
TENSOR_PEERS = ("revtorch", "revlib", "memcnn")  # the target compares revtree to the best
RECOMPUTING = (
    "checkpoint",
    "revtree",
    "revtree-nested",
    "revtorch",
    "revlib",
    "memcnn",
    "reformer",
    "equiformer",
)

STEP_TARGET = 1.30  # (a) revtree / plain step time at depth 16, at most
PEER_TARGET = 0.95  # (a) revtree / best of RevLib, RevTorch, MemCNN step time, at most
EQUIFORMER_TARGET = 0.90  # (b) revtree / equiformer-pytorch step time, at most
OVERHEAD_TARGET = 0.5  # (c) revtree / equiformer-pytorch per-block overhead over plain, at most
HELD_TARGET = 1.25  # (a) revtree held memory, largest / smallest depth, at most
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # relative gradient error: "ok" below


def git_revision() -> str:
    """The commit of the revtree checkout, ``+dirty`` if revtree/ has local changes."""
    root = Path(revtree.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "revtree"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    return f"git {rev}{'+dirty' if dirty else ''}"


def source_digest() -> str:
    """A digest of revtree's source files, to notice them changing during a run."""
    root = Path(revtree.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def peer_version(system: str) -> str:
    dist = SYSTEMS[system][2]
    if dist is None:
        return "-"
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Config:
    """Sizes and repeats of the three workloads."""

    a_batch: int
    a_tokens: int
    a_dim: int  # d: each stream has d channels, the input 2d
    depths: tuple[int, ...]
    a_repeats: tuple[int, ...]  # per depth
    b_batch: int
    b_nodes: int
    b_dim: int
    b_depth: int
    b_repeats: int
    c_depth: int
    c_repeats: int
    c_degrees: int = 8
    c_batch: int = 1
    c_nodes: int = 2
    c_dim: int = 4
    b_degrees: int = 3

    @classmethod
    def make(cls, quick: bool, depths: list[int] | None, repeats: int | None) -> Config:
        if quick:
            depths_ = tuple(sorted(depths or [4, 8]))
            return cls(
                a_batch=4,
                a_tokens=32,
                a_dim=32,
                depths=depths_,
                a_repeats=tuple(repeats or 3 for _ in depths_),
                b_batch=2,
                b_nodes=16,
                b_dim=16,
                b_depth=8,
                b_repeats=repeats or 3,
                c_depth=8,
                c_repeats=repeats or 5,
            )
        depths_ = tuple(sorted(depths or [4, 16, 64]))
        # fewer rounds where a round is long (78 s at depth 64): each of its steps already
        # averages over 64 blocks
        a_repeats = tuple(repeats or (5 if d <= 32 else 3) for d in depths_)
        return cls(
            a_batch=32,
            a_tokens=128,
            a_dim=128,
            depths=depths_,
            a_repeats=a_repeats,
            b_batch=8,
            b_nodes=64,
            b_dim=64,
            b_depth=16,
            b_repeats=repeats or 9,
            c_depth=16,
            c_repeats=repeats or 21,
        )


# ---------------------------------------------------------------- workloads


def make_pairs(workload: str, cfg: Config, depth: int, dtype: torch.dtype) -> Pairs:
    torch.manual_seed(0)
    if workload == "a":
        pairs = [(mlp(cfg.a_dim), mlp(cfg.a_dim)) for _ in range(depth)]
    elif workload == "b":
        d, n = cfg.b_dim, cfg.b_degrees
        pairs = [(DegreeMLP(d, n), DegreeMLP(d, n)) for _ in range(depth)]
    else:
        d, n = cfg.c_dim, cfg.c_degrees
        pairs = [(LeafScale(d, n), LeafScale(d, n)) for _ in range(depth)]
    return [(f.to(dtype), g.to(dtype)) for f, g in pairs]


def depth_of(workload: str, cfg: Config) -> list[int]:
    if workload == "a":
        return list(cfg.depths)
    return [cfg.b_depth if workload == "b" else cfg.c_depth]


def grad_depth(workload: str, cfg: Config) -> int:
    """The depth of the gradient check: a few blocks show a wrong gradient as well as many."""
    return depth_of(workload, cfg)[0] if workload == "c" else min(4, *depth_of(workload, cfg))


def make_input(workload: str, cfg: Config, dtype: torch.dtype) -> tuple[Any, Any]:
    """The input (leaves require grad) and the fixed random weights of the loss."""
    g = torch.Generator("cpu").manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:  # drawn on the CPU, then on the device
        return torch.randn(*shape, generator=g, dtype=dtype, device="cpu").to(_measure.DEVICE)

    if workload == "a":
        shape = (cfg.a_batch, cfg.a_tokens, 2 * cfg.a_dim)
        return randn(*shape).requires_grad_(), randn(*shape)
    b, n, d, degrees = (
        (cfg.b_batch, cfg.b_nodes, cfg.b_dim, cfg.b_degrees)
        if workload == "b"
        else (cfg.c_batch, cfg.c_nodes, cfg.c_dim, cfg.c_degrees)
    )
    x = {k: randn(b, n, d, 2 * k + 1).requires_grad_() for k in range(degrees)}
    w = {k: randn(b, n, d, 2 * k + 1) for k in range(degrees)}
    return x, w


def loss_of(y: Any, w: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return (y * w).sum()
    return torch.stack([(y[k] * w[k]).sum() for k in w]).sum()


def leaves(x: Any) -> list[torch.Tensor]:
    return optree.tree_leaves(x)


def train_step(model: nn.Module, x: Any, w: Any) -> None:
    loss_of(model(x), w).backward()
    model.zero_grad(set_to_none=True)
    for leaf in leaves(x):
        leaf.grad = None


def no_grad_forward(model: nn.Module, x: Any) -> None:
    x = optree.tree_map(torch.Tensor.clone, x)  # MemCNN frees its input under no_grad
    with torch.no_grad():
        model(x)


# ---------------------------------------------------------------- memory (one subprocess each)


@dataclass
class Memory:
    held: float  # MB, RSS growth from before forward to after forward
    peak: float | None  # MB, peak RSS growth over forward and backward (None: no clear_refs)
    params: float  # MB, the parameters, hence also their gradients


def measure_memory(workload: str, system: str, depth: int, cfg: Config, exact: bool) -> Memory:
    """Run in the subprocess: held and peak RSS growth of one training step (or held, counted)."""
    dtype = torch.get_default_dtype()  # float32, or --dtype
    model = build(workload, system, make_pairs(workload, cfg, depth, dtype))
    x, w = make_input(workload, cfg, dtype)
    train_step(model, x, w)  # warm-up: allocator pools, lazy initialisation
    held, peak = step_memory(
        lambda: model(x),
        lambda y: loss_of(y, w).backward(),
        exact=exact,
        exempt=tensors_of(model, x, w),
    )
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return Memory(held / MB, None if peak is None else peak / MB, params / MB)


def memory_in_subprocess(
    workload: str, system: str, depth: int, args: argparse.Namespace
) -> Memory:
    argv = ["--threads", str(args.threads), "--memory-worker", f"{workload}:{system}:{depth}"]
    argv += ["--device", args.device, "--dtype", args.dtype]
    if args.quick:
        argv.append("--quick")
    try:
        return Memory(**run_worker(__file__, argv))
    except subprocess.CalledProcessError as e:
        tail = "\n".join(e.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"memory worker {workload}:{system}:{depth} failed:\n{tail}") from e


# ---------------------------------------------------------------- time (interleaved)


@dataclass
class Timing:
    step: float  # seconds, median
    forward: float  # seconds, median, under torch.no_grad


def measure_time(
    workload: str, systems: list[str], depth: int, cfg: Config, repeats: int, warm: bool = True
) -> dict[str, Timing]:
    """Median times of ``systems``, interleaved; ``warm``: one untimed step of each first."""
    dtype = torch.get_default_dtype()  # float32, or --dtype
    pairs = make_pairs(workload, cfg, depth, dtype)
    models = {s: build(workload, s, copy.deepcopy(pairs)) for s in systems}
    del pairs
    x, w = make_input(workload, cfg, dtype)
    tasks: dict[tuple[str, str], Callable[[], None]] = {}
    for s in systems:  # per round: A step, A forward, B step, B forward, ...
        tasks[s, "step"] = partial(train_step, models[s], x, w)
        tasks[s, "forward"] = partial(no_grad_forward, models[s], x)
    # Freeze what exists (modules, imported libraries) out of the garbage collector's sight:
    # the gc.collect() before every timed run then takes milliseconds, not 0.1-0.2 s.
    gc.collect()
    gc.freeze()
    warmup = [(s, "step") for s in systems] if warm else []  # a step runs the forward too
    try:
        medians = interleaved_medians(tasks, repeats, warmup=warmup)
    finally:
        gc.unfreeze()
    return {s: Timing(medians[s, "step"], medians[s, "forward"]) for s in systems}


# ---------------------------------------------------------------- gradients


@dataclass
class GradDiff:
    rel: float  # max over tensors of max |system - plain| / max |plain|
    missing: int  # tensors with a plain gradient and none here
    error: str | None = None  # the system failed in this dtype

    def ok(self, dtype: torch.dtype) -> bool:
        return self.error is None and self.missing == 0 and self.rel <= GRAD_TOL[dtype]

    def show(self) -> str:
        if self.error is not None:
            return "failed"
        return f"{self.rel:.1e}" + (f" ({self.missing} none)" if self.missing else "")


def gradients(workload: str, system: str, pairs: Pairs, x: Any, w: Any) -> list[Any]:
    """The gradients of the parameters (in ``pairs`` order) and the input, one step."""
    pairs = copy.deepcopy(pairs)
    model = build(workload, system, pairs)
    x = optree.tree_map(lambda t: t.detach().clone().requires_grad_(), x)
    loss_of(model(x), w).backward()
    params = chain.from_iterable(chain(f.parameters(), g.parameters()) for f, g in pairs)
    return [p.grad for p in params] + [leaf.grad for leaf in leaves(x)]


def compare(got: list[Any], ref: list[torch.Tensor]) -> GradDiff:
    rel, missing = 0.0, 0
    for a, b in zip(got, ref, strict=True):
        if a is None:
            missing += 1
            continue
        scale = b.abs().max().item() or 1.0
        rel = max(rel, (a - b).abs().max().item() / scale)
    return GradDiff(rel, missing)


def gradient_check(
    workload: str, systems: list[str], depth: int, cfg: Config, dtype: torch.dtype
) -> dict[str, GradDiff]:
    pairs = make_pairs(workload, cfg, depth, dtype)
    x, w = make_input(workload, cfg, dtype)
    ref = gradients(workload, "plain", pairs, x, w)
    out = {}
    for s in systems:
        try:
            out[s] = compare(gradients(workload, s, pairs, x, w), ref)
        except Exception as e:  # a peer that cannot run this dtype
            out[s] = GradDiff(float("nan"), 0, f"{type(e).__name__}: {e}")
    return out


# ---------------------------------------------------------------- plot


def plot(
    path: Path, depths: list[int], systems: list[str], memory: dict, timing: dict, exact: bool
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    # lines of systems that hold the same bytes lie on each other: hollow markers of
    # decreasing size (they nest), and dash patterns, keep every one visible
    dashes = cycle(["--", ":", "-.", (0, (5, 2, 1, 2)), (0, (1, 3))])
    for i, (s, marker, dash) in enumerate(zip(systems, cycle("osD^vPX*"), dashes)):
        name = SYSTEMS[s][0]
        style = dict(
            marker=marker,
            markersize=12 - 1.1 * i,
            fillstyle="none",
            markeredgewidth=1.5,
            linestyle="-" if s == "revtree" else dash,
            linewidth=2.5 if s == "revtree" else 1.2,
            label=name,
        )
        # RSS can fall a little over a forward that holds almost nothing: such a figure is
        # drawn at 0.1 MB; counted bytes are always above zero, and drawn as they are
        held = [
            memory["a", s, d].held if exact else max(memory["a", s, d].held, 0.1) for d in depths
        ]
        ax_mem.plot(depths, held, **style)
        per_block = [timing["a", d][s].step * 1e3 / d for d in depths]
        ax_time.plot(depths, per_block, **style)
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (blocks)")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_yscale("log")
    ax_time.set_ylim(bottom=0)
    ax_mem.set_ylabel(f"memory held, forward to backward (MB, {'counted' if exact else 'RSS'})")
    ax_time.set_ylabel("training step / depth (ms per block, median)")
    ax_mem.set_title("Memory held between forward and backward")
    ax_time.set_title("Step time (forward + backward) per block")
    ax_time.legend(fontsize=8)
    fig.suptitle("Workload a: one tensor, LayerNorm-Linear-GELU-Linear blocks, 1 thread, CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report


class Progress:
    """``[i/n] what (elapsed)`` on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        progress(f"[{self.done}/{self.total}] {what} ({elapsed:.0f} s elapsed)")


def gradient_table(checks: dict[torch.dtype, dict[str, GradDiff]], systems: list[str]) -> None:
    print(f"  {'system':<19} {'float32':>16} {'float64':>16}  verdict")
    for s in systems:
        f32, f64 = checks[torch.float32][s], checks[torch.float64][s]
        right = f64.ok(torch.float64) if f64.error is None else f32.ok(torch.float32)
        mark = "ok" if right else "WRONG"
        print(f"  {SYSTEMS[s][0]:<19} {f32.show():>16} {f64.show():>16}  {mark}")
        for d in (f32, f64):
            if d.error:
                print(f"      {d.error[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, depths 4 8, few repeats")
    parser.add_argument("--depths", type=int, nargs="+", help="workload a; default 4 16 64")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds, all")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--jobs", type=int, default=2, help="memory workers run side by side")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    use_device(args)
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # MemCNN, each step
    cfg = Config.make(args.quick, args.depths, args.repeats)
    if args.memory_worker:
        workload, system, depth = args.memory_worker.split(":")
        emit(asdict(measure_memory(workload, system, int(depth), cfg, exact_memory(args.quick))))
        return

    started, digest = time.perf_counter(), source_digest()
    print(
        f"revtree {revtree.__version__} ({git_revision()}), torch {torch.__version__}, "
        f"{args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s), {args.dtype} on {args.device} unless said"
    )
    peers = [s for s in SYSTEMS if SYSTEMS[s][1]]
    for s in peers:
        if peer(s) is None:
            print(f"skipped: {SYSTEMS[s][0]} is not installed (pip install {SYSTEMS[s][2]})")
    print("peers: " + ", ".join(f"{SYSTEMS[s][0]} {peer_version(s)}" for s in available(peers)))
    systems = {wl: available(ss) for wl, ss in WORKLOAD_SYSTEMS.items()}

    d, db = cfg.a_dim, cfg.b_dim
    print(
        f"(a) x: ({cfg.a_batch}, {cfg.a_tokens}, {2 * d}), streams split on the last axis; "
        f"f, g: LayerNorm -> Linear({d}, {4 * d}) -> GELU -> Linear({4 * d}, {d}); "
        f"depths {', '.join(map(str, cfg.depths))}"
    )
    print(
        f"(b) x: {{l: ({cfg.b_batch}, {cfg.b_nodes}, {db}, 2l+1)}}, l < {cfg.b_degrees}, "
        f"duplicated into both streams, output the mean; f, g: per degree LayerNorm -> "
        f"Linear({db}, {4 * db}) -> GELU -> Linear({4 * db}, {db}) over the {db} channels; "
        f"depth {cfg.b_depth}"
    )
    print(
        f"(c) {cfg.c_degrees} leaves ({cfg.c_batch}, {cfg.c_nodes}, {cfg.c_dim}, 2l+1), "
        f"l < {cfg.c_degrees}, duplicated streams; f, g: tanh(w * x) per leaf, w a "
        f"({cfg.c_dim}, 1) parameter per leaf; a flat dict of degrees, and (nested) "
        f"{{'atoms': {{0: .., 1: ..}}, 'edges': (..), 'globals': [..]}}; depth {cfg.c_depth}"
    )
    print(
        "revtree: ReversibleSequence(pairs), codec Split(-1) (a), Degree() (b, c) or "
        "Duplicate() (c nested), additive; revtree rev=False: the same with reversible=False"
    )
    print("plain: hand-written y1 = x1 + f(x2), y2 = x2 + g(y1) with ordinary autograd\n")

    n_memory = sum(len(systems[wl]) * len(depth_of(wl, cfg)) for wl in "ab")
    n_time = len(cfg.depths) + 2
    report = Progress(n_memory + n_time + 6)

    # memory: a fresh subprocess per (workload, system, depth)
    # (RSS is per process: workers may run side by side; nothing is timed meanwhile)
    memory: dict[tuple[str, str, int], Memory] = {}
    runs = [(wl, s, depth) for wl in "ab" for depth in depth_of(wl, cfg) for s in systems[wl]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(memory_in_subprocess, *run, args): run for run in runs}
        for future in as_completed(futures):
            wl, s, depth = futures[future]
            memory[wl, s, depth] = future.result()
            report(f"memory: workload {wl}, {SYSTEMS[s][0]}, depth {depth}")

    # gradients: one step against plain autograd, float32 and float64
    grads: dict[str, dict[torch.dtype, dict[str, GradDiff]]] = {}
    for wl in "abc":
        depth = grad_depth(wl, cfg)
        grads[wl] = {}
        for dtype in (torch.float32, torch.float64):
            report(f"gradients: workload {wl}, depth {depth}, {dtype}")
            grads[wl][dtype] = gradient_check(wl, systems[wl], depth, cfg, dtype)

    # time: every system of a (workload, depth) interleaved in one process
    timing: dict[tuple[str, int], dict[str, Timing]] = {}
    for i, (depth, repeats) in enumerate(zip(cfg.depths, cfg.a_repeats)):
        report(f"time: workload a, depth {depth}, {repeats} rounds of {len(systems['a'])} systems")
        # warm-up at the first depth only: the deeper models run the same code, and a step at
        # depth 64 costs 9 s a system
        timing["a", depth] = measure_time("a", systems["a"], depth, cfg, repeats, warm=i == 0)
    report(f"time: workload b, {cfg.b_repeats} rounds")
    timing["b", cfg.b_depth] = measure_time("b", systems["b"], cfg.b_depth, cfg, cfg.b_repeats)
    report(f"time: workload c, {cfg.c_repeats} rounds")
    timing["c", cfg.c_depth] = measure_time("c", systems["c"], cfg.c_depth, cfg, cfg.c_repeats)
    progress("")

    # ------------------------------------------------------------ tables
    noise, exact = held_noise(args.quick), exact_memory(args.quick)
    print("\n".join(memory_method(args.quick)))
    print("Time: medians; per (workload, depth) every system timed in one process, interleaved")
    print("  (A step, A forward, B step, B forward, ...); one untimed step of each first")
    print("  (for workload a at its first depth only: the process is warm after it);")
    print("  step = forward + weighted-sum loss + backward + zero_grad; forward under no_grad")
    print(f"  (on a fresh clone of the input); rounds: workload a {list(cfg.a_repeats)} by depth,")
    print(f"  b {cfg.b_repeats}, c {cfg.c_repeats}. x plain: ratio to plain autograd")
    if noise:
        print(f"  (n/a: base below the {noise} MB RSS noise)")
    print("Gradients: one step, identical weights and inputs; max over all parameters and the")
    print("  input of max |system - plain| / max |plain|; (k none): k tensors without a gradient")

    digits = 3 if exact else 1  # counted bytes of small tensors: tens of kB

    def table(wl: str) -> None:
        head = f"{'system':<19} {'depth':>5} {'step ms':>9} {'x plain':>7} {'fwd ms':>8}"
        print(f"{head} {'x plain':>7} {'held MB':>8} {'x plain':>7} {'peak MB':>8} {'param MB':>8}")
        for depth in depth_of(wl, cfg):
            t = timing[wl, depth]
            for s in systems[wl]:
                m, mp = memory[wl, s, depth], memory[wl, "plain", depth]
                print(
                    f"{SYSTEMS[s][0]:<19} {depth:>5} {t[s].step * 1e3:>9.1f}"
                    f" {t[s].step / t['plain'].step:>7.2f} {t[s].forward * 1e3:>8.1f}"
                    f" {t[s].forward / t['plain'].forward:>7.2f} {m.held:>8.{digits}f}"
                    f" {ratio(m.held, mp.held, floor=noise):>7}"
                    f" {peak_text(m.peak, args.quick):>8}"
                    f" {m.params:>8.1f}"
                )

    print("\nWorkload a: one tensor")
    table("a")
    print(f"gradients, depth {grad_depth('a', cfg)}:")
    gradient_table(grads["a"], systems["a"])

    print("\nWorkload b: dict of degrees 0-2, duplicated streams")
    table("b")
    print(f"gradients, depth {grad_depth('b', cfg)}:")
    gradient_table(grads["b"], systems["b"])

    print(f"\nWorkload c: {cfg.c_degrees} small leaves, next to no work: per-block overhead")
    tc = timing["c", cfg.c_depth]
    per_block = {s: tc[s].step / cfg.c_depth * 1e6 for s in systems["c"]}
    fwd_block = {s: tc[s].forward / cfg.c_depth * 1e6 for s in systems["c"]}

    def base(s: str) -> str:  # the plain autograd run on the same tree
        return "plain-nested" if s.endswith("-nested") else "plain"

    print(
        f"{'system':<19} {'step ms':>9} {'us/block':>9} {'- plain':>8} {'x plain':>7}"
        f" {'- recompute':>11} {'fwd us/block':>13} {'- plain':>8}"
    )
    for s in systems["c"]:
        b = base(s)
        extra = per_block[s] - per_block[b]
        beyond = f"{extra - fwd_block[b]:.0f}" if s in RECOMPUTING else "-"
        print(
            f"{SYSTEMS[s][0]:<19} {tc[s].step * 1e3:>9.2f} {per_block[s]:>9.0f}"
            f" {extra:>8.0f} {per_block[s] / per_block[b]:>7.2f}"
            f" {beyond:>11}"
            f" {fwd_block[s]:>13.0f} {fwd_block[s] - fwd_block[b]:>8.0f}"
        )
    print("  us/block: microseconds per block per training step; - plain: the excess over plain")
    print("  autograd on the same tree (the nested rows: over plain, nested); - recompute: the")
    print("  excess less one no-grad forward of plain (the recomputation that checkpointing and")
    print("  reversible backward do by design); fwd: forward under no_grad")
    print(f"gradients, depth {grad_depth('c', cfg)}:")
    gradient_table(grads["c"], systems["c"])

    # ------------------------------------------------------------ plot
    path = plot_path(args, "peers")
    plot(path, list(cfg.depths), systems["a"], memory, timing, exact)
    print(f"\nplot: {path}")

    # ------------------------------------------------------------ targets
    print(f"\n{summary_title(args.quick)}")
    d16 = 16 if 16 in cfg.depths else cfg.depths[-1]
    ta = timing["a", d16]
    step = ta["revtree"].step / ta["plain"].step
    print(
        f"  (a) revtree / plain step time at depth {d16}: {step:.2f}x"
        + against(f"target <= {STEP_TARGET}", step <= STEP_TARGET, args.quick)
    )
    rivals = [s for s in TENSOR_PEERS if s in ta]
    if rivals:
        best = min(rivals, key=lambda s: ta[s].step)
        vs = ta["revtree"].step / ta[best].step
        print(
            f"  (a) revtree / best of {', '.join(SYSTEMS[s][0] for s in rivals)} "
            f"({SYSTEMS[best][0]}) step time at depth {d16}: {vs:.2f}x"
            + against(f"target <= {PEER_TARGET}", vs <= PEER_TARGET, args.quick)
        )
    else:
        print("  (a) revtree / best of RevLib, RevTorch, MemCNN: none installed, skipped")
    tb = timing["b", cfg.b_depth]
    if "equiformer" in tb:
        vs = tb["revtree"].step / tb["equiformer"].step
        print(
            f"  (b) revtree / equiformer-pytorch step time: {vs:.3f}x, "
            f"{abs(1 - vs) * 100:.1f}% {'faster' if vs <= 1 else 'slower'}"
            + against("target: >= 10% faster", vs <= EQUIFORMER_TARGET, args.quick)
        )
    else:
        print("  (b) equiformer-pytorch not installed, skipped")
    if "equiformer" in systems["c"]:
        over = {s: per_block[s] - per_block["plain"] for s in ("revtree", "equiformer")}
        ok = over["revtree"] <= OVERHEAD_TARGET * over["equiformer"]
        print(
            f"  (c) per-block overhead over plain: revtree {over['revtree']:.0f} us, "
            f"equiformer-pytorch {over['equiformer']:.0f} us, ratio "
            f"{ratio(over['revtree'], over['equiformer'])}"
            + against(f"target <= {OVERHEAD_TARGET}", ok, args.quick)
        )
    else:
        print("  (c) equiformer-pytorch not installed, skipped")
    if "revtree-nested" in systems["c"]:
        nested = per_block["revtree-nested"] - per_block["plain-nested"]
        print(
            f"  (c) revtree's per-block overhead over plain on the nested tree: {nested:.0f} us "
            f"(flat dict: {per_block['revtree'] - per_block['plain']:.0f} us)"
        )
    lo, hi = cfg.depths[0], cfg.depths[-1]
    for s in systems["a"]:
        if s in ("plain", "checkpoint"):
            continue
        held_lo, held_hi = memory["a", s, lo].held, memory["a", s, hi].held
        ok = held_hi <= max(HELD_TARGET * held_lo, held_lo + noise)
        target = f"target <= {HELD_TARGET}x or within {noise} MB"
        print(
            f"  (a) {SYSTEMS[s][0]} held memory, depth {hi} / depth {lo}: "
            f"{ratio(held_hi, held_lo, floor=noise)}, "
            f"{held_hi:.{digits}f} MB vs {held_lo:.{digits}f} MB"
            + (against(target, ok, args.quick) if s == "revtree" else "")
        )
    if source_digest() != digest:
        print("\nWARNING: revtree's source files changed during the run; rows may mix versions")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
