"""The memo: a value computed in the forward pass, handed back in the recomputation.

A decision made inside ``f`` (LSH buckets, k-means routing, top-k experts) must be the
same when the block is recomputed, where reconstruction rounding in float32 or bfloat16
can flip an ``argmax``. ``memo(fn)`` computes ``fn()`` in the forward call and returns that
same value in the recomputation without running ``fn``, and sets the random generators to
where ``fn`` left them in the forward pass, so that every later draw of the call (dropout)
is the forward's too. Values are kept from forward to backward: keep them small (indices,
not activations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import optree
import torch

from .. import _state
from .._errors import RevtreeError
from ._rng import Generators, State, same

T = TypeVar("T")


class MemoRecord:
    """The memo of one call of ``f`` or ``g``: its values, in order, and where randomness stood."""

    __slots__ = ("generators", "k", "replaying", "values")

    def __init__(self, generators: Generators | None) -> None:
        self.generators = generators
        self.values: list[tuple[Any, State | None]] = []
        self.replaying = False
        self.k = 0

    def replay(self) -> MemoRecord:
        """This record, read from its start (for a recomputation)."""
        self.replaying, self.k = True, 0
        return self


def memo(fn: Callable[[], T], /) -> T:
    """``fn()`` in the forward pass; the same value, without running ``fn``, when recomputed.

    Inside ``f`` or ``g`` of a reversible block, the value ``fn`` returns in the forward
    call is kept and returned again in the block's recomputation, and the random generators
    are set to the state ``fn`` left them in: a computation that draws random numbers (LSH's
    random rotations) is skipped without shifting the draws after it (dropout masks). Calls
    are matched by their order within the call of ``f`` or ``g``. Outside a reversible block
    (plain autograd, ``reversible=False``, no sequence at all) it simply returns ``fn()``.

    For values that carry no gradient (indices, masks, decisions): a value that needs a
    gradient is a [`RevtreeError`][revtree.RevtreeError], since the recomputation could not
    give it one.

    Args:
        fn: Computes the value, with no arguments (close over what it reads).

    Returns:
        What ``fn`` returned in the forward call.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> class Hashed(nn.Module):  # buckets from random rotations, then dropout
        ...     def forward(self, x):
        ...         buckets = revtree.memo(lambda: (x @ torch.randn(x.shape[-1], 4)).argmax(-1))
        ...         return nn.functional.dropout(x * buckets[..., None], 0.1)
        >>> seq = revtree.ReversibleSequence([(Hashed(), nn.Linear(2, 2))])
        >>> seq(torch.randn(3, 4, requires_grad=True)).sum().backward()
    """
    holder = _state.memo_record()
    if holder is None:
        return fn()
    if type(holder) is not MemoRecord:  # a forward call's record: its memo, made on first use
        if holder.memo is None:
            holder.memo = MemoRecord(holder.generators)
        holder = holder.memo
    record: MemoRecord = holder
    if record.replaying:
        if record.k >= len(record.values):
            raise RevtreeError(
                f"revtree.memo was called more often in the recomputation of block "
                f"{_state.current_block()} than in its forward call ({len(record.values)}). "
                "Hint: call memo the same number of times, in the same order, on every call."
            )
        value, state = record.values[record.k]
        record.k += 1
        if state is not None and record.generators is not None:
            record.generators.set(state)
        return value
    generators = record.generators
    before = generators.capture() if generators is not None else None
    value = fn()
    leaves: list[Any] = optree.tree_leaves(cast(Any, value))
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in leaves):
        raise RevtreeError(
            f"revtree.memo in block {_state.current_block()} returned a tensor that requires "
            "grad; the recomputation hands back the forward's value, which could not pass a "
            "gradient on. Hint: memo is for decisions (indices, masks); compute values that "
            "need a gradient outside it, or memo their detached decision only."
        )
    state = None
    if generators is not None and before is not None:
        after = generators.capture()
        state = None if same(after, before) else after
    record.values.append((value, state))
    return value
