"""The leaf codec protocol: how one leaf becomes two half-streams and back."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

KeyPath = tuple[Any, ...]
"""An optree key path: the keys from the root of the tree to a leaf, e.g. ``("tokens", 0)``."""


class Codec(abc.ABC):
    """How one leaf of the input becomes the two half-streams, and how they become a leaf again.

    A reversible block works on two streams ``x1`` and ``x2``. A codec decides, leaf by
    leaf, where they come from: [`Split`][revtree.codecs.Split] cuts a leaf in two,
    [`Duplicate`][revtree.codecs.Duplicate] sends the whole leaf down both streams.
    Subclasses implement [`encode`][revtree.codecs.Codec.encode] and
    [`decode`][revtree.codecs.Codec.decode] with differentiable torch (or einops)
    operations; both receive the leaf's optree key path, so a codec may depend on
    where the leaf sits in the tree. Raise [`RevtreeError`][revtree.RevtreeError]
    for a leaf the codec cannot take; revtree adds the key path and shape.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Codec
        >>> class Halves(Codec):
        ...     def encode(self, leaf, path):
        ...         return leaf[..., ::2], leaf[..., 1::2]
        ...     def decode(self, y1, y2, path):
        ...         return torch.stack((y1, y2), -1).flatten(-2)
        >>> x = torch.arange(6.0)
        >>> codec = Halves()
        >>> bool((codec.decode(*codec.encode(x, ()), ()) == x).all())
        True
    """

    bijective: ClassVar[bool] = True
    """Whether ``encode`` recovers the streams from ``decode``'s output (needed by ``inverse``)."""

    @abc.abstractmethod
    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn one leaf into the pair ``(x1, x2)`` of half-stream tensors.

        Args:
            leaf: The input leaf.
            path: The leaf's optree key path.

        Returns:
            The two half-stream tensors.
        """

    @abc.abstractmethod
    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Turn the two output half-streams of one leaf into the output leaf.

        Args:
            y1: The first stream's output for this leaf.
            y2: The second stream's output for this leaf.
            path: The leaf's optree key path.

        Returns:
            The output leaf.
        """
