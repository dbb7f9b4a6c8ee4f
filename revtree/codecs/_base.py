"""The leaf codec protocol: how one leaf becomes the parts of the state, and back."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

KeyPath = tuple[Any, ...]
"""An optree key path: the keys from the root of the tree to a leaf, e.g. ``("tokens", 0)``."""


class Codec(abc.ABC):
    """How one leaf of the input becomes pieces of the state's parts, and a leaf again.

    A reversible block works on parts of a state: two half-streams ``x1`` and ``x2`` for
    the classic coupling, ``K`` groups for a sweep. A codec decides, leaf by leaf, where
    they come from: [`Split`][revtree.codecs.Split] cuts a leaf in pieces,
    [`Duplicate`][revtree.codecs.Duplicate] sends the whole leaf down every part,
    [`Whole`][revtree.codecs.Whole] puts it in one part only. ``encode`` returns one piece
    per part it feeds (``parts`` of them, by default two), ``decode`` takes them back in
    the same order. Both receive the leaf's optree key path, so a codec may depend on
    where the leaf sits in the tree. Raise [`RevtreeError`][revtree.RevtreeError] for a
    leaf the codec cannot take; revtree adds the key path and shape.

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

    parts: ClassVar[int] = 2
    """How many pieces ``encode`` returns (and ``decode`` takes)."""

    bijective: ClassVar[bool] = True
    """Whether ``encode`` recovers the pieces from ``decode``'s output: then the sequence can
    be inverted, and its output kept once for backward (the pieces derived from it)."""

    @property
    def targets(self) -> tuple[int, ...]:
        """The part each piece goes to, in order: ``(0, 1, ..., parts - 1)``."""
        return tuple(range(self.parts))

    @abc.abstractmethod
    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, ...]:
        """Turn one leaf into its pieces, one per part it feeds (``(x1, x2)`` for two).

        Args:
            leaf: The input leaf.
            path: The leaf's optree key path.

        Returns:
            The pieces, ``parts`` tensors.
        """

    @abc.abstractmethod
    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Turn the output pieces of one leaf into the output leaf.

        A codec of ``parts`` other than two takes that many pieces, then the path
        (``def decode(self, *pieces_and_path)``).

        Args:
            y1: The first part's output piece of this leaf.
            y2: The second part's output piece of this leaf.
            path: The leaf's optree key path.

        Returns:
            The output leaf.
        """
