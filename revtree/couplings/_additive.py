"""The additive coupling of RevNet and the reversible transformers."""

from __future__ import annotations

import torch

from ._base import Elementwise


class Additive(Elementwise):
    """``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``: the default coupling.

    Inverse: ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``. Volume-preserving and exact up to
    rounding.

    Example:
        >>> import torch
        >>> from revtree.couplings import Additive
        >>> y1, y2 = Additive().forward(torch.sin, torch.cos, torch.ones(2), torch.zeros(2))
        >>> y1.tolist(), y2.tolist()
        ([1.0, 1.0], [0.5403023362159729, 0.5403023362159729])
    """

    def combine(self, x: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """``x + update``."""
        return x + update[0]

    def uncombine(self, y: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """``y - update``."""
        return y - update[0]

    def __repr__(self) -> str:
        return "Additive()"
