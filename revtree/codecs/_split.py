"""The ``Split`` codec: cut a leaf in equal pieces along one dimension."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._errors import RevtreeError
from ._base import Codec, KeyPath


@dataclass(frozen=True)
class Split(Codec):
    """Cut each leaf into ``parts`` equal pieces along ``dim``; concatenate them at the end.

    This is the RevNet layout: the channels of a leaf are split between the two streams,
    so ``f`` and ``g`` see half of them each. With ``parts=K`` it is RevGNN's layout of
    ``K`` groups of channels.

    Args:
        dim: The dimension to split; its size must be a multiple of ``parts``. For images
            (``N, C, H, W``) that is ``1``, the channels.
        parts: The number of pieces.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Split
        >>> x1, x2 = Split(dim=-1).encode(torch.arange(4.0), ())
        >>> x1.tolist(), x2.tolist()
        ([0.0, 1.0], [2.0, 3.0])
        >>> [p.tolist() for p in Split(0, parts=3).encode(torch.arange(3.0), ())]
        [[0.0], [1.0], [2.0]]
    """

    dim: int = -1
    parts: int = 2  # type: ignore[misc]  # a field here, a class attribute on Codec

    def __post_init__(self) -> None:
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 1:
            raise RevtreeError(
                f"Split(parts={self.parts!r}): the number of pieces must be a positive int."
            )

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, ...]:
        """Return the pieces of ``leaf`` along ``dim`` (views, no copy)."""
        if not -leaf.dim() <= self.dim < leaf.dim():
            raise RevtreeError(
                f"{self} cannot split a tensor with {leaf.dim()} dimension(s). "
                f"Hint: choose a dim in range({-leaf.dim()}, {leaf.dim()}) or another codec."
            )
        size = leaf.shape[self.dim]
        if size % self.parts:
            what = "an even size" if self.parts == 2 else f"a size divisible by {self.parts}"
            odd = "an odd size " if self.parts == 2 else ""
            raise RevtreeError(
                f"{self} needs {what} along dim {self.dim}, got {odd}{size}. "
                "Hint: pad that dimension, split another dim, "
                "or give this leaf Duplicate()."
            )
        return tuple(leaf.chunk(self.parts, self.dim))

    def decode(self, *pieces_and_path: Any) -> torch.Tensor:
        """Concatenate the pieces along ``dim``."""
        return torch.cat(pieces_and_path[:-1], self.dim)

    def __repr__(self) -> str:
        parts = f", parts={self.parts}" if self.parts != 2 else ""
        return f"Split(dim={self.dim}{parts})"
