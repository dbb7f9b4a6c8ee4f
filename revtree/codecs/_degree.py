"""The ``Degree`` codec: equivariant features of one degree, duplicated into both streams."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import RevtreeError
from ._base import KeyPath
from ._duplicate import Duplicate


@dataclass(frozen=True)
class Degree(Duplicate):
    """Duplicate each leaf of degree-``l`` features, checking its last axis is ``2l + 1`` long.

    The layout of the reversible Equiformer: the input is a dict ``{degree: tensor}`` with
    tensors shaped ``(..., channels, 2 * degree + 1)``. The degree is read from the leaf's
    key (the last entry of its key path); each leaf goes down both streams, and the output
    is the mean of the two.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Degree
        >>> x1, x2 = Degree().encode(torch.zeros(2, 8, 4, 3), (1,))
        >>> x1.shape
        torch.Size([2, 8, 4, 3])
    """

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the degree's order against the last axis, then return ``(leaf, leaf)``."""
        degree = path[-1] if path else None
        if not isinstance(degree, int) or isinstance(degree, bool) or degree < 0:
            raise RevtreeError(
                f"Degree() reads the degree from the leaf's key, and the key {degree!r} is not "
                "a non-negative int. Hint: key the input dict by degree, {0: ..., 1: ...}, "
                "or give this leaf another codec."
            )
        if leaf.dim() < 2 or leaf.shape[-1] != 2 * degree + 1:
            raise RevtreeError(
                f"Degree() expects features of degree {degree} shaped (..., channels, "
                f"{2 * degree + 1}), a last axis of 2 * degree + 1. "
                "Hint: check which degree this tensor was stored under."
            )
        return leaf, leaf
