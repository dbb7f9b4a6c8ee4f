"""The ``Split`` codec: cut a leaf in two along one dimension."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import RevtreeError
from ._base import Codec, KeyPath


@dataclass(frozen=True)
class Split(Codec):
    """Cut each leaf into two equal halves along ``dim``; concatenate them back at the end.

    This is the RevNet layout: the channels of a leaf are split between the two streams,
    so ``f`` and ``g`` see half of them each.

    Args:
        dim: The dimension to split; its size must be even.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Split
        >>> x1, x2 = Split(dim=-1).encode(torch.arange(4.0), ())
        >>> x1.tolist(), x2.tolist()
        ([0.0, 1.0], [2.0, 3.0])
    """

    dim: int = -1

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the two halves of ``leaf`` along ``dim`` (views, no copy)."""
        if not -leaf.dim() <= self.dim < leaf.dim():
            raise RevtreeError(
                f"{self} cannot split a tensor with {leaf.dim()} dimension(s). "
                f"Hint: choose a dim in range({-leaf.dim()}, {leaf.dim()}) or another codec."
            )
        size = leaf.shape[self.dim]
        if size % 2:
            raise RevtreeError(
                f"{self} needs an even size along dim {self.dim}, got an odd size {size}. "
                "Hint: pad that dimension to an even size, split another dim, "
                "or give this leaf Duplicate()."
            )
        x1, x2 = leaf.chunk(2, self.dim)
        return x1, x2

    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Concatenate the two halves along ``dim``."""
        return torch.cat((y1, y2), self.dim)
