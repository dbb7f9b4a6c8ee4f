"""A block: the modules ``(f, g)`` of one coupling, and how they are called on leaf lists."""

from __future__ import annotations

from typing import Any

import torch
from optree import PyTreeSpec
from torch import nn

from . import _trees
from ._errors import RevtreeError
from ._layout import Layout
from .couplings import Elementwise


class Block(nn.Module):
    """One reversible block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

    Holds the two modules so that their parameters are named ``blocks.{i}.f.*`` and
    ``blocks.{i}.g.*`` in the sequence's state dict.

    Args:
        f: Maps a half-stream pytree (and keyword context) to a pytree of the same structure.
        g: Likewise, applied to the first output stream.

    Example:
        >>> from torch import nn
        >>> import revtree
        >>> block = revtree.Block(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> sorted(name for name, _ in block.named_parameters())
        ['f.bias', 'f.weight', 'g.bias', 'g.weight']
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable on its own: a block runs inside a ``ReversibleSequence``."""
        raise RevtreeError(
            "a revtree Block is run by its ReversibleSequence, not called directly. "
            "Hint: call the sequence, or call block.f / block.g."
        )


def as_block(index: int, block: Any) -> Block:
    """Accept a ``Block`` or an ``(f, g)`` pair of modules."""
    if isinstance(block, Block):
        return block
    if isinstance(block, (tuple, list)) and len(block) == 2:
        f, g = block
        if isinstance(f, nn.Module) and isinstance(g, nn.Module):
            return Block(f, g)
    raise RevtreeError(
        f"block {index} is {type(block).__name__}, not a pair (f, g) of torch modules. "
        "Hint: pass blocks=[(f0, g0), (f1, g1), ...] with nn.Module instances "
        "(wrap a plain function in a small nn.Module)."
    )


def call(
    module: nn.Module,
    which: str,
    index: int,
    layout: Layout,
    leaves: list[torch.Tensor],
    kwargs: dict[str, Any],
    namespace: str,
    expected: PyTreeSpec,
) -> list[torch.Tensor]:
    """Call ``f`` or ``g`` on a half-stream given as leaves; return its output's leaves.

    ``expected`` is the structure the coupling needs back: the half-stream's own, or a tuple
    of them (e.g. a log-scale and a shift tree for the affine coupling).
    """
    versions = [None if t.is_inference() else t._version for t in leaves]  # no counter there
    out = module(layout.spec.unflatten(leaves), **kwargs)
    for name, t, version in zip(layout.names, leaves, versions):
        if version is not None and t._version != version:
            raise RevtreeError(
                f"block {index}: {which} modified its input leaf {name} ({_trees.describe(t)}) "
                "in place, so the block's inputs cannot be reconstructed from its outputs. "
                f"Hint: use out-of-place operations on the input in {which} "
                "(e.g. x = x * 2, not x *= 2)."
            )
    out_leaves, out_spec = _trees.flatten(out, namespace)
    if out_spec != expected:
        wanted = (
            "a pytree with the structure of its input (same keys, same nesting, one tensor per "
            "leaf)"
            if expected == layout.spec
            else f"{expected}, built from the structure of its input"
        )
        raise RevtreeError(
            f"block {index}: {which} returned a pytree of structure {out_spec}, but its input "
            f"half-stream has structure {layout.spec}. Hint: {which} must return {wanted}."
        )
    return out_leaves


def combine(
    coupling: Elementwise,
    x: list[torch.Tensor],
    update: list[torch.Tensor],
    which: str,
    index: int,
    layout: Layout,
) -> list[torch.Tensor]:
    """``coupling.combine_leaves``, checking that each leaf keeps its shape and dtype."""
    out = None
    if all(isinstance(u, torch.Tensor) for u in update):
        try:
            out = coupling.combine_leaves(x, update)
        except (RuntimeError, TypeError):
            pass
    if out is not None and all(
        y.shape == a.shape and y.dtype == a.dtype and y.device == a.device for y, a in zip(out, x)
    ):
        return out
    raise _combine_error(coupling, x, update, which, index, layout)


def _combine_error(
    coupling: Elementwise,
    x: list[torch.Tensor],
    update: list[torch.Tensor],
    which: str,
    index: int,
    layout: Layout,
) -> RevtreeError:
    """The error for the first leaf that ``combine`` cannot take."""
    n = len(x)
    for i, (name, a) in enumerate(zip(layout.names, x)):
        parts = update[i::n]  # leaf i of each of the coupling's update trees
        for b in parts:
            if not isinstance(b, torch.Tensor):
                return RevtreeError(
                    f"block {index}: {which} returned {_trees.describe(b)} at {name}, where the "
                    f"half-stream holds a tensor of shape {tuple(a.shape)}. "
                    f"Hint: {which} must return a tensor for every leaf."
                )
        try:
            y, error = coupling.combine(a, *parts), None
        except RuntimeError as e:
            y, error = None, e
        if y is None or y.shape != a.shape or y.dtype != a.dtype or y.device != a.device:
            got = ", ".join(f"{_trees.describe(b)} on {b.device}" for b in parts)
            return RevtreeError(
                f"block {index}: {which} returned {got} at {name}, which cannot be combined "
                f"with the half-stream leaf of {_trees.describe(a)} on {a.device} without "
                "changing it"
                + (f" ({error})" if y is None else "")
                + f". Hint: {which} must return, for every leaf, a tensor of its input's shape, "
                "dtype and device (under autocast a lower-precision result is fine)."
            )
    return RevtreeError(
        f"block {index}: {coupling!r}.combine_leaves returned leaves that differ from what "
        "combine gives leaf by leaf. Hint: combine_leaves must return, for every leaf, "
        "combine(x, *update) of that leaf."
    )
