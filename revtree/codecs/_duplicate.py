"""The ``Duplicate`` codec: both streams start as the whole leaf."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Codec, KeyPath


@dataclass(frozen=True)
class Duplicate(Codec):
    """Send the whole leaf down both streams; the output is the mean of the two.

    This is the layout of the reversible Reformer and Equiformer: ``f`` and ``g`` see
    every channel, and the stack costs twice the width in the streams.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Duplicate
        >>> x = torch.tensor([1.0, 2.0])
        >>> Duplicate().decode(*Duplicate().encode(x, ()), ()).tolist()
        [1.0, 2.0]
    """

    bijective = False

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(leaf, leaf)``."""
        return leaf, leaf

    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Return the mean ``(y1 + y2) / 2``."""
        return (y1 + y2) / 2
