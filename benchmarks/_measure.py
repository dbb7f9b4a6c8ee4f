"""Measuring machinery shared by the benchmarks: process memory, interleaved timing, output.

Memory is measured as process RSS, Linux only. A benchmark re-runs itself as a worker in a
fresh subprocess per measurement (``run_worker``), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every large buffer by ``mmap`` and
returns it to the OS when freed: the RSS then tracks the live tensors. The worker measures
one training step with ``step_memory`` and prints its result as one
JSON line (``emit``), which the parent parses.

Time is measured in one process, the systems interleaved (A B C A B C ...), so that machine
noise hits all of them alike (``interleaved_medians``).

``--quick`` runs are smoke tests. Their tensors are too small for RSS, whose noise is about
1 MB: on the CPU they count held memory exactly instead (``held_after_forward``, the bytes
of the tensors that the forward leaves alive for backward) and measure no peak. They print
their figures without targets or verdicts (``against``), under "Summary".

``--device cuda`` (``add_device_arguments``, ``use_device``): models and inputs are made on
the GPU (as the default device), memory is ``torch.cuda.memory_allocated`` after the
forward and ``max_memory_allocated`` over the step, less what was allocated before, and
every timed run is synchronised with the device. ``--dtype bfloat16`` makes every model and
input in that dtype (as the default dtype).

Plots go to ``--out DIR`` (``add_output_arguments``, ``plot_path``), by default
``benchmark-results/`` in the current directory.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import optree
import torch
from torch import nn

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
DEVICE = torch.device("cpu")  # set by use_device
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

MEMORY_METHOD = (
    "Memory: process RSS growth, fresh subprocess per row, MALLOC_MMAP_THRESHOLD_=65536",
    "  held = RSS after forward - RSS before forward (what backward will need)",
    "  peak = VmHWM after backward - RSS before forward (VmHWM reset via clear_refs);",
    "         it includes the parameter gradients, which backward allocates (param MB)",
)
"""The lines that describe the memory method, as the benchmarks print them."""

CUDA_MEMORY_METHOD = (
    "Memory: torch.cuda.memory_allocated, a fresh subprocess per row",
    "  held = allocated after forward - allocated before forward (what backward will need)",
    "  peak = max_memory_allocated over the step - allocated before forward;",
    "         it includes the parameter gradients, which backward allocates (param MB)",
)


EXACT_MEMORY_METHOD = (
    "Memory (--quick): bytes held for backward, counted, a fresh subprocess per row",
    "  held = every tensor storage the forward leaves alive, each once: what autograd saved",
    "         (saved-tensor hooks), what custom Functions keep on their ctx, what checkpoint",
    "         and RNG replay keep, the output; parameters, buffers and inputs not counted",
    "  peak: not measured (-); the tensors are too small for process RSS (noise ~1 MB)",
)
HELD_NOISE = 1.0  # MB: RSS differences below this are noise (pages, heap reuse and trimming)


def exact_memory(quick: bool) -> bool:
    """Whether held memory is counted exactly: in ``--quick`` runs, except on CUDA."""
    return quick and DEVICE.type != "cuda"


def memory_method(quick: bool = False) -> tuple[str, ...]:
    """The lines that describe how memory is measured on the device in use."""
    if DEVICE.type == "cuda":
        return CUDA_MEMORY_METHOD
    return EXACT_MEMORY_METHOD if exact_memory(quick) else MEMORY_METHOD


def held_noise(quick: bool) -> float:
    """MB below which a held-memory difference is noise: none when counted exactly."""
    return 0.0 if exact_memory(quick) else HELD_NOISE


# ---------------------------------------------------------------- device


def add_device_arguments(parser: Any) -> None:
    """``--device`` and ``--dtype``, for ``use_device``."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")


def use_device(args: Any) -> list[str]:
    """Make models and inputs on ``args.device`` in ``args.dtype``; return the flags for workers."""
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if DEVICE.type != "cpu":
        torch.set_default_device(DEVICE)
    torch.set_default_dtype(getattr(torch, args.dtype))
    return ["--device", args.device, "--dtype", args.dtype]


def sync() -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` (made on the CPU, say by a seeded generator) on the device, in the default dtype."""
    dtype = torch.get_default_dtype() if t.is_floating_point() else t.dtype
    return t.to(DEVICE, dtype).requires_grad_(t.requires_grad)


# ---------------------------------------------------------------- process memory


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark VmHWM to the current RSS (Linux >= 4.0).

    Returns:
        Whether the reset worked (``/proc/self/clear_refs`` is writable).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """VmHWM, the peak resident set size since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        (kb,) = re.findall(r"VmHWM:\s+(\d+) kB", f.read())
    return int(kb) * 1024


def tensors_of(*things: Any) -> list[torch.Tensor]:
    """The parameters and buffers of the modules and the tensor leaves of the other trees."""
    out: list[torch.Tensor] = []
    for thing in things:
        if isinstance(thing, nn.Module):
            out += [*thing.parameters(), *thing.buffers()]
        else:
            out += [t for t in optree.tree_leaves(thing) if isinstance(t, torch.Tensor)]
    return out


def held_after_forward(
    forward: Callable[[], T], exempt: Iterable[torch.Tensor] = ()
) -> tuple[int, T]:
    """The bytes ``out = forward()`` leaves alive, and ``out``: ``revtree._saved``'s count.

    Imported here, not at the top: the scripts also time revtree versions without it.
    """
    from revtree._saved import held_after_forward as count

    return count(forward, exempt)


def step_memory(
    forward: Callable[[], T],
    backward: Callable[[T], object],
    *,
    exact: bool = False,
    exempt: Iterable[torch.Tensor] = (),
) -> tuple[int, int | None]:
    """Memory of one training step: held between forward and backward, and the peak.

    Collects garbage, resets the peak, then runs ``out = forward()`` and ``backward(out)``
    (``out`` stays alive through the backward, as in a training loop). Warm up first
    (one step) so that allocator pools and lazy initialisation are not counted.

    Args:
        forward: Runs the forward pass and returns what ``backward`` needs.
        backward: Runs the loss and the backward pass on the forward's result.
        exact: Count held memory with ``held_after_forward`` instead (``exact_memory``);
            no peak then.
        exempt: With ``exact``: the tensors that live anyway (``tensors_of(model, x)``).

    Returns:
        ``(held, peak)`` in bytes: RSS after forward minus RSS before it, and VmHWM after
        backward minus RSS before forward (``None`` if VmHWM cannot be reset, or ``exact``).
        On CUDA, the same from ``torch.cuda.memory_allocated``.
    """
    gc.collect()
    if exact:
        held, out = held_after_forward(forward, exempt)
        backward(out)
        return held, None
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = forward()
        sync()
        held = torch.cuda.memory_allocated() - before
        backward(out)
        sync()
        return held, torch.cuda.max_memory_allocated() - before
    can_peak = reset_peak_rss()
    before = rss()
    out = forward()
    held = rss() - before
    backward(out)
    peak = peak_rss() - before if can_peak else None
    return held, peak


def run_worker(script: str, args: Sequence[str]) -> Any:
    """Run ``python script *args`` in a fresh subprocess with ``WORKER_ENV``; parse its result.

    Args:
        script: The benchmark script (its ``__file__``), which acts as the worker.
        args: Its command line; the worker prints its result with ``emit``.

    Returns:
        The JSON value of the last line the worker printed to stdout.

    Raises:
        subprocess.CalledProcessError: The worker failed (its stderr is in the exception).
    """
    env = {**os.environ, **WORKER_ENV}
    cmd = [sys.executable, script, *args]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def emit(result: Any) -> None:
    """Print a worker's result as one JSON line, for ``run_worker``."""
    print(json.dumps(result))


# ---------------------------------------------------------------- time


def timed(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()`` takes, garbage collected beforehand."""
    gc.collect()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved_medians(
    tasks: Mapping[K, Callable[[], object]],
    repeats: int,
    *,
    warmup: Iterable[K] = (),
    prepare: Callable[[K], object] | None = None,
) -> dict[K, float]:
    """Median time of each task, the tasks run round-robin in their order, ``repeats`` rounds.

    Args:
        tasks: What to time, by key; one round runs each once, in insertion order.
        repeats: How many rounds.
        warmup: Keys of tasks to run once each before the rounds, their times discarded.
        prepare: Called with a task's key before each run of it, outside the timed region
            (e.g. to switch a shared model to that system).

    Returns:
        The median seconds of each task.
    """

    def run(key: K) -> float:
        if prepare is not None:
            prepare(key)
        return timed(tasks[key])

    for key in warmup:
        run(key)
    times: dict[K, list[float]] = {key: [] for key in tasks}
    for _ in range(repeats):
        for key in tasks:
            times[key].append(run(key))
    return {key: statistics.median(t) for key, t in times.items()}


# ---------------------------------------------------------------- output


def progress(message: str) -> None:
    """One overwritten status line on a terminal, plain lines otherwise; ``""`` clears it."""
    if sys.stderr.isatty():
        print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
    elif message:
        print(message, file=sys.stderr, flush=True)


def fmt(value: float | None) -> str:
    """A value in MB with one decimal, ``n/a`` for ``None``."""
    return "n/a" if value is None else f"{value:.1f}"


def peak_text(peak: float | None, quick: bool) -> str:
    """A peak in MB for a table: ``-`` where held memory is counted exactly (no peak)."""
    return "-" if exact_memory(quick) else fmt(peak)


def ratio(value: float, base: float, digits: int = 2, floor: float = 0.0) -> str:
    """``value / base`` with ``digits`` decimals, ``n/a`` when ``base`` is at most ``floor``.

    A held-memory figure of a few hundred kB is noise, and can be zero or negative: RSS
    moves by whole pages, small tensors reuse heap pages that an earlier step left
    resident, and glibc may trim the heap during the forward.
    """
    return f"{value / base:.{digits}f}" if base > floor else "n/a"


def verdict(ok: bool) -> str:
    """``ok`` or ``MISSED``, for a summary line against a target."""
    return "ok" if ok else "MISSED"


def against(target: str, ok: bool, quick: bool, *, goal: bool | None = None) -> str:
    """`` (target) ok`` or `` (target) MISSED`` after a figure; ``""`` in a ``--quick`` run.

    A quick run is a smoke test at sizes the targets are not set for: it prints the figures
    and judges none of them.

    Args:
        target: The target as the line shows it, e.g. ``"target <= 1.25"``.
        ok: Whether the figure meets it.
        quick: Whether this is a ``--quick`` run.
        goal: Whether a further goal (named in ``target``) is met, if there is one:
            ``, goal met`` or ``, goal missed`` follows the verdict.
    """
    if quick:
        return ""
    extra = "" if goal is None else f", goal {'met' if goal else 'missed'}"
    return f" ({target}) {verdict(ok)}{extra}"


def summary_title(quick: bool) -> str:
    """The heading of the lines that ``against`` ends: no targets in a ``--quick`` run."""
    return "Summary" if quick else "Targets"


# ---------------------------------------------------------------- plots


def add_output_arguments(parser: Any) -> None:
    """``--out DIR`` and ``--plot PATH``, for ``plot_path``."""
    parser.add_argument(
        "--out", default="benchmark-results", help="folder for plots (default: benchmark-results)"
    )
    parser.add_argument("--plot", default=None, help="PNG path, instead of one in --out")


def plot_path(args: Any, name: str) -> Path:
    """``args.plot``, else ``args.out/name.png`` (``name-quick.png`` for a ``--quick`` run)."""
    if args.plot:
        return Path(args.plot)
    return Path(args.out) / f"{name}{'-quick' if args.quick else ''}.png"
