"""Host work per block: what a training step costs beyond plain autograd when kernels cost nothing.

With tiny tensors every kernel is almost free, so a step's time is the Python and dispatch
work of the system that runs it, as it is on a GPU whose launches outpace the host. Each
system computes the same function (``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` per block) with
the same weights, timed interleaved in one process (A B C A B C ...), medians.

Workloads:

tiny    MLP pairs ``LayerNorm -> Linear(8, 32) -> GELU -> Linear(32, 8)`` on one ``(1, 4, 16)``
        tensor split on the last axis; depth 32.
small   MLP pairs ``LayerNorm -> Linear(32, 128) -> GELU -> Linear(128, 32)`` on one
        ``(8, 64, 64)`` tensor (8 x 64 tokens, d 64) split on the last axis; depth 16. Here
        the kernels cost something on a CPU: the step is not host work alone.
leaves  8 leaves ``(1, 2, 4, 2l + 1)``, ``tanh(w * x)`` per leaf (the peers benchmark's
        workload c), as a flat dict of degrees and as a nested pytree; depth 16.

Printed per system: microseconds per block per training step (forward + loss + backward),
its excess over plain autograd, and that excess less one no-grad forward of plain (the
recomputation every reversible engine and checkpointing do by design). ``--compile`` adds
revtree's compiled engine (``compile=True``, one graph per block, and ``compile=8``, up to 8
blocks as one graph; ``--groups 4 8 16`` for others) and ``torch.compile`` of the plain
stack, and the compiled engine's step against both (``--cpp-wrapper`` adds ``torch.compile``
of the plain stack with inductor's C++ wrapper, which the compiled engine uses on the CPU;
``--inductor-defaults`` has the compiled engine build its graphs with inductor's defaults).

Usage:
    python benchmarks/overhead.py              # ~2 minutes
    python benchmarks/overhead.py --compile    # ~10 minutes, most of it compiling
    python benchmarks/overhead.py --quick      # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from _measure import add_device_arguments, interleaved_medians, use_device
from _systems import LeafScale, Plain, cat, duplicate, mean, mlp, nest, split
from _systems import tree_step as step
from torch import nn

import revtree
from revtree.codecs import Degree, Duplicate


def systems(
    workload: str, depth: int, compile_: bool, groups: list[int], cpp_wrapper: bool = False
) -> tuple[dict[str, nn.Module], Any]:
    torch.manual_seed(0)
    if workload in ("tiny", "small"):
        d, shape = (8, (1, 4, 16)) if workload == "tiny" else (32, (8, 64, 64))
        pairs = [(mlp(d), mlp(d)) for _ in range(depth)]
        x: Any = torch.randn(*shape, requires_grad=True)
        enc, dec, codec = split, cat, None
    else:
        pairs = [(LeafScale(4, 8), LeafScale(4, 8)) for _ in range(depth)]
        x = {k: torch.randn(1, 2, 4, 2 * k + 1, requires_grad=True) for k in range(8)}
        if workload == "nested":
            x = nest(x)
        enc, dec = duplicate, mean
        codec = Degree() if workload == "leaves" else Duplicate()
    kw = {} if codec is None else {"codec": codec}
    out: dict[str, nn.Module] = {
        "plain": Plain(copy.deepcopy(pairs), enc, dec, ckpt=False),
        "checkpoint": Plain(copy.deepcopy(pairs), enc, dec, ckpt=True),
        "revtree": revtree.ReversibleSequence(copy.deepcopy(pairs), **kw),
    }
    if compile_:
        out["revtree compile"] = revtree.ReversibleSequence(
            copy.deepcopy(pairs), compile=True, **kw
        )
        for n in groups:
            out[f"revtree compile={n}"] = revtree.ReversibleSequence(
                copy.deepcopy(pairs), compile=n, **kw
            )
        plain = Plain(copy.deepcopy(pairs), enc, dec, ckpt=False)
        out["plain compile"] = cast(nn.Module, torch.compile(plain))
        if cpp_wrapper:  # as revtree's compiled engine builds its CPU graphs
            plain = Plain(copy.deepcopy(pairs), enc, dec, ckpt=False)
            options = {"cpp_wrapper": True}
            out["plain compile cpp"] = cast(nn.Module, torch.compile(plain, options=options))
    if workload in ("tiny", "small"):
        try:
            import revtorch
        except ImportError:
            print("skipped: RevTorch is not installed (pip install revtorch)", file=sys.stderr)
        else:
            blocks = [revtorch.ReversibleBlock(f, g, split_along_dim=-1) for f, g in pairs]
            out["RevTorch"] = revtorch.ReversibleSequence(nn.ModuleList(copy.deepcopy(blocks)))
    return out, x


def forward(model: nn.Module, x: Any) -> None:
    with torch.no_grad():
        model(x)


def run(
    workload: str,
    depth: int,
    repeats: int,
    compile_: bool,
    groups: list[int],
    cpp_wrapper: bool = False,
) -> None:
    models, x = systems(workload, depth, compile_, groups, cpp_wrapper)
    tasks: dict[tuple[str, str], Callable[[], object]] = {}
    for name, model in models.items():
        tasks[name, "step"] = lambda m=model: step(m, x)
        tasks[name, "forward"] = lambda m=model: forward(m, x)
    # warm-up: torch.compile compiles at the first step, the compiled engine at its second
    for name, model in models.items():
        took = []
        for _ in range(2):
            start = time.perf_counter()
            step(model, x)
            took.append(time.perf_counter() - start)
        if "compile" in name:
            compiling = took[name.startswith("revtree")]
            print(f"  {name}: the step that compiles took {compiling:.1f} s")
    # what exists now is out of the garbage collector's sight: the gc.collect() before every
    # timed run then takes no time, and evicts nothing from the caches (as in peers.py)
    gc.collect()
    gc.freeze()
    try:
        times = interleaved_medians(tasks, repeats, warmup=list(tasks))
    finally:
        gc.unfreeze()
    us = {k: v / depth * 1e6 for k, v in times.items()}
    plain, plain_fwd = us["plain", "step"], us["plain", "forward"]
    print(
        f"{'system':<16} {'us/block':>9} {'- plain':>8} {'x plain':>8} {'- recompute':>12}"
        f" {'fwd us/block':>13}"
    )
    for name in models:
        s = us[name, "step"]
        print(
            f"{name:<16} {s:>9.0f} {s - plain:>8.0f} {s / plain:>8.2f} "
            f"{s - plain - plain_fwd:>12.0f} {us[name, 'forward']:>13.0f}"
        )
    if "RevTorch" in models:
        ours, theirs = us["revtree", "step"] - plain, us["RevTorch", "step"] - plain
        print(f"  revtree excess / RevTorch excess: {ours / theirs:.2f}")
    for name in models:
        if name.startswith("revtree compile"):
            compiled = us[name, "step"]
            label = name.split("=")[1] if "=" in name else "True"
            cpp = ""
            if "plain compile cpp" in models:
                cpp = f", {compiled / us['plain compile cpp', 'step']:.2f}x with the C++ wrapper"
            print(
                f"  revtree compile={label} step: {compiled / plain:.2f}x plain eager, "
                f"{compiled / us['plain compile', 'step']:.2f}x torch.compile of plain{cpp}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true", help="also the compiled engine")
    parser.add_argument(
        "--groups",
        nargs="*",
        type=int,
        default=[8],
        help="with --compile, revtree compile=N for each N (blocks as one graph)",
    )
    parser.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="with --compile, also torch.compile of plain with inductor's C++ wrapper",
    )
    parser.add_argument(
        "--inductor-defaults",
        action="store_true",
        help="build revtree's CPU graphs with inductor's defaults (its Python wrapper), to compare",
    )
    parser.add_argument(
        "--workloads", nargs="+", default=["tiny", "small", "leaves", "nested"], help="which to run"
    )
    add_device_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_device(args)
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    repeats = args.repeats or (11 if args.quick else 41)
    # every workload's torch.compile of the plain stack compiles graphs of one code object
    # (the plain stack's forward, with and without grad): past dynamo's default limit of 8,
    # the later workloads would time plain eager under that name
    torch._dynamo.config.recompile_limit = 64
    if args.inductor_defaults:
        from revtree._engine import _compiled

        _compiled._HOST_OPTIONS = None  # type: ignore[assignment]
    print(
        f"revtree {revtree.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.device}, {args.dtype}; {repeats} interleaved rounds, medians"
    )
    for workload in args.workloads:
        depth = 32 if workload == "tiny" else 16
        print(f"\n{workload}, depth {depth}")
        run(workload, depth, repeats, args.compile, args.groups, args.cpp_wrapper)


if __name__ == "__main__":
    main()
