"""Which block is running, and whether it is being recomputed during backward."""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


def is_recomputing() -> bool:
    """Whether the block now running is being recomputed during backward.

    A reversible block runs twice per training step: once in the forward pass and
    once more when its inputs are reconstructed from its outputs. Code inside ``f``
    or ``g`` that must act only once per step (update a running statistic, fill a
    cache, count calls) reads this flag.

    Returns:
        ``True`` inside the recomputation of a block, ``False`` otherwise.

    Examples:
        >>> import revtree
        >>> revtree.is_recomputing()
        False
    """
    return getattr(_local, "recomputing", False)


def current_block() -> int | None:
    """The index of the block whose ``f`` or ``g`` is running, if any.

    Together with [`is_recomputing`][revtree.is_recomputing] this lets a block key a
    cache filled in the forward pass and read back during the recomputation.

    Returns:
        The block's index in its ``ReversibleSequence``, or ``None`` outside a block.

    Examples:
        >>> import revtree
        >>> revtree.current_block() is None
        True
    """
    return getattr(_local, "block", None)


def enter(block: int, recomputing: bool) -> tuple[Any, Any]:
    """Mark ``block`` as running (and maybe recomputing); return what to ``leave`` back to."""
    previous = (getattr(_local, "block", None), getattr(_local, "recomputing", False))
    _local.block, _local.recomputing = block, recomputing
    return previous


def leave(previous: tuple[Any, Any]) -> None:
    """Undo ``enter``."""
    _local.block, _local.recomputing = previous


class running:  # noqa: N801 (used as a context manager, like contextlib's)
    """Mark ``block`` as running (and maybe recomputing) for the duration of the context."""

    __slots__ = ("_entry", "_previous")

    def __init__(self, block: int, *, recomputing: bool) -> None:
        self._entry = (block, recomputing)

    def __enter__(self) -> None:
        self._previous = enter(*self._entry)

    def __exit__(self, *exc: Any) -> None:
        leave(self._previous)
