"""The ``ZeroVelocity`` codec: the leaf is a position, and its velocity starts at zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Codec, KeyPath


@dataclass(frozen=True)
class ZeroVelocity(Codec):
    """The leaf goes down the first stream, zeros down the second; the output is the first stream.

    The layout of momentum residual networks ([`Momentum`][revtree.couplings.Momentum]):
    the first stream is the position, the second the velocity, which starts at rest and
    is dropped at the end. Not invertible: ``ReversibleSequence.inverse`` refuses it.

    Examples:
        >>> import torch
        >>> from revtree.codecs import ZeroVelocity
        >>> x, v = ZeroVelocity().encode(torch.ones(2), ())
        >>> v.tolist()
        [0.0, 0.0]
    """

    bijective = False

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(leaf, zeros_like(leaf))``."""
        return leaf, torch.zeros_like(leaf)

    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Return the position ``y1``."""
        return y1
