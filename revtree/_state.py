"""Which block is running, whether it is being recomputed, and its memo: per thread."""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


_OUTSIDE = (None, False, None)  # (block index, recomputing, memo) outside any block


def is_recomputing() -> bool:
    """Whether the block now running is being recomputed during backward.

    A reversible block runs twice per training step: once in the forward pass and
    once more when its inputs are reconstructed from its outputs. Code inside ``f``
    or ``g`` that must act only once per step (update a running statistic, count calls)
    reads this flag; a value computed in the forward pass and needed again in the
    recomputation is what [`memo`][revtree.memo] keeps.

    Returns:
        ``True`` inside the recomputation of a block, ``False`` otherwise.

    Examples:
        >>> import revtree
        >>> revtree.is_recomputing()
        False
    """
    return getattr(_local, "now", _OUTSIDE)[1]


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
    return getattr(_local, "now", _OUTSIDE)[0]


def enter(block: int, recomputing: bool, memo: Any = None) -> tuple[Any, Any, Any]:
    """Mark ``block`` as running (maybe recomputing, with a memo); return what to ``leave`` to."""
    local = _local
    previous = getattr(local, "now", _OUTSIDE)
    local.now = (block, recomputing, memo)
    return previous


def leave(previous: tuple[Any, Any, Any]) -> None:
    """Undo ``enter``."""
    _local.now = previous


def memo_record() -> Any:
    """The memo of the call now running (``None`` outside a block)."""
    return getattr(_local, "now", _OUTSIDE)[2]
