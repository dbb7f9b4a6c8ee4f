"""The memory budget: which blocks store their activations, and which are recomputed.

A reversible block saves memory and pays for it with a recomputation; a block that stores
its activations, as in plain autograd, pays in memory instead. Given a budget of bytes, the
plan stores the blocks that save the most recomputation per byte, as long as what they
store fits. A block's activations are measured by running it once with autograd on and a
saved-tensors hook that counts the bytes autograd would keep (parameters, buffers and the
keyword tensors, which live anyway, not counted), and its recomputation is the time that
run takes. The plan is made on the first call for each input signature (leaf shapes and
dtypes, keyword tensor shapes) and kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from torch import nn

from ._engine import _pass
from ._engine._run import Call
from ._replay import _buffers, _rng
from ._saved import Counter


@dataclass(frozen=True)
class MemoryPlan:
    """Which blocks store their activations under a memory budget, and why.

    The bytes count what a training step holds between forward and backward beyond the
    fully reversible stack, which holds the output streams of each run of reversible
    blocks (``stream_bytes`` a run).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> blocks = [(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(4)]
        >>> seq = revtree.ReversibleSequence(blocks, memory_budget=2**20)
        >>> plan = seq.plan(torch.randn(16, 8, requires_grad=True))
        >>> plan.stored
        (True, True, True, True)
        >>> plan.used_bytes <= plan.budget
        True
    """

    budget: float
    """The budget in bytes (``memory_budget``)."""
    stream_bytes: int
    """The bytes of both half-streams: what each run of reversible blocks saves."""
    activation_bytes: tuple[int, ...]
    """For each block, the bytes of activations plain autograd would store for it."""
    recompute_seconds: tuple[float, ...]
    """For each block, the time of one forward pass (what its recomputation costs)."""
    stored: tuple[bool, ...]
    """For each block, whether it stores its activations (``False``: recomputed)."""

    @property
    def used_bytes(self) -> int:
        """The bytes the stored blocks hold beyond the fully reversible stack."""
        return _cost(self.stored, self.activation_bytes, self.stream_bytes)

    def __str__(self) -> str:
        rows = [f"{'block':>5}  {'activations':>12}  {'forward':>9}  choice"]
        for i, (size, seconds, stored) in enumerate(
            zip(self.activation_bytes, self.recompute_seconds, self.stored)
        ):
            choice = "store" if stored else "recompute"
            rows.append(f"{i:>5}  {_mb(size):>12}  {seconds * 1e3:>7.2f}ms  {choice}")
        rows.append(
            f"used {_mb(self.used_bytes)} of a budget of {_mb(self.budget)} "
            f"(beyond the reversible stack's {_mb(self.stream_bytes)} per run of blocks)"
        )
        return "\n".join(rows)


def _mb(size: float) -> str:
    return "unlimited" if size == float("inf") else f"{size / 2**20:.2f} MiB"


def _cost(stored: Sequence[bool], sizes: Sequence[int], stream_bytes: int) -> int:
    """Bytes held beyond the fully reversible stack.

    The stored blocks' activations, and one set of output streams for each run of
    reversible blocks past the first (one set fewer if every block stores).
    """
    runs = sum(1 for recomputed, _ in groupby(stored) if not recomputed)
    return sum(s for s, keep in zip(sizes, stored) if keep) + (runs - 1) * stream_bytes


def choose(
    sizes: Sequence[int],
    seconds: Sequence[float],
    stream_bytes: int,
    budget: float,
    fixed: Sequence[bool],
) -> tuple[bool, ...]:
    """Store the blocks that save the most recomputation per byte, while they fit the budget.

    Greedy on the margin: each step stores the block whose recomputation time is largest
    for the bytes it adds, counting the set of streams a block in the middle of a
    reversible run adds by splitting it (or saves by joining two), so stored blocks
    gather. ``fixed`` marks blocks that store in any case (built with ``reversible=False``);
    they count against nothing. Ties go to the later block.
    """
    stored = list(fixed)
    baseline = _cost(fixed, [0] * len(sizes), stream_bytes)
    used = 0
    while True:
        best, best_key = None, None
        for i in range(len(sizes)):
            if stored[i]:
                continue
            stored[i] = True
            cost = _cost(stored, sizes, stream_bytes) - baseline
            stored[i] = False
            if cost > budget:
                continue
            key = (seconds[i] / max(cost - used, 1), i)
            if best_key is None or key > best_key:
                best, best_key = i, key
        if best is None:
            return tuple(stored)
        stored[best] = True
        used = _cost(stored, sizes, stream_bytes) - baseline


def measure(
    call: Call,
    planned: Sequence[Any],
    state: list[list[torch.Tensor]],
    held: Iterable[torch.Tensor],
    owner: nn.Module,
) -> tuple[list[int], list[float]]:
    """Run every block once with autograd on; return its activation bytes and its time.

    Nothing is kept: the saved-tensors hook counts each tensor autograd would save and lets
    it go with the block; the random generators and the buffers of ``owner`` are put back
    afterwards. A second, warm run of each block gives its time.
    """
    held = list(held)
    sizes: list[int] = []
    seconds: list[float] = []
    state = [[t.detach().requires_grad_() for t in part] for part in state]
    generators = _rng.generators_for(t for part in state for t in part)
    with _rng.preserved(generators), _buffers.kept(owner), torch.enable_grad():
        for planned_block in planned:
            counter = Counter(held)
            before = [list(part) for part in state]
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
                _pass.forward_plain(call, [planned_block], state)
            sizes.append(counter.size)
            del counter
            # timed again, warm: the first run pays for lazy initialisation and allocation
            again = [list(part) for part in before]
            with torch.autograd.graph.saved_tensors_hooks(_drop, _unpack):
                start = time.perf_counter()
                _pass.forward_plain(call, [planned_block], again)
                seconds.append(time.perf_counter() - start)
            state = [[t.detach().requires_grad_() for t in part] for part in state]
    return sizes, seconds


def _drop(_: torch.Tensor) -> None:
    return None


def _unpack(_: Any) -> torch.Tensor:  # pragma: no cover (the graph is dropped unused)
    raise RuntimeError("revtree: a measuring pass's graph cannot be back-propagated")
