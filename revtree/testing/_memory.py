"""One call that answers "how much memory does the reversible stack save?"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._saved import held_bytes
from .._sequence import ReversibleSequence


@dataclass(frozen=True)
class MemoryReport:
    """What a forward call keeps for backward, with plain autograd and reversibly.

    Attributes:
        plain: Bytes kept with plain autograd (every block storing its activations).
        reversible: Bytes kept by the sequence as it is configured.
    """

    plain: int
    reversible: int

    @property
    def ratio(self) -> float:
        """``reversible / plain``."""
        return self.reversible / self.plain if self.plain else float("nan")

    def __str__(self) -> str:
        return (
            f"kept for backward: plain autograd {self.plain / 2**20:.2f} MiB, reversible "
            f"{self.reversible / 2**20:.2f} MiB ({self.ratio:.3f}x)"
        )


def memory_report(seq: ReversibleSequence, /, *args: Any, **kwargs: Any) -> MemoryReport:
    """Memory kept between forward and backward by ``seq(*args, **kwargs)``, and by plain autograd.

    Both are counted exactly, tensor by tensor
    ([`held_bytes`][revtree.testing.held_bytes]: saved activations, the output, anything a
    call leaves alive; parameters and inputs aside). The plain figure runs the same
    sequence with every block storing its activations (``reversible=False``, set for the
    call and put back), so no twin model needs building. Both calls run the forward with
    autograd on: in training mode, they draw from the random generators as a step would.

    Args:
        seq: The sequence.
        *args: Its input.
        **kwargs: Its keyword arguments.

    Returns:
        The report; ``print`` it, or read ``plain``, ``reversible`` and ``ratio``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.testing import memory_report
        >>> seq = revtree.ReversibleSequence.from_factory(lambda: nn.Linear(64, 64), 16)
        >>> print(memory_report(seq, torch.randn(32, 128)))
        kept for backward: plain autograd 0.27 MiB, reversible 0.02 MiB (0.059x)
    """
    reversible = held_bytes(seq, *args, **kwargs)
    flags, budget = seq.reversible, seq.memory_budget
    try:
        seq.reversible, seq.memory_budget = False, 0
        plain = held_bytes(seq, *args, **kwargs)
    finally:
        seq.reversible, seq.memory_budget = list(flags), budget
    return MemoryReport(plain=plain, reversible=reversible)
