"""The additive coupling of RevNet and the reversible transformers."""

from __future__ import annotations

import torch

from .._torch import functorch_active as batched  # no foreach ops under vmap
from ._base import Elementwise


class Additive(Elementwise):
    """``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``: the default coupling.

    Inverse: ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``. Volume-preserving and exact up to
    rounding.

    Examples:
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

    # One dispatch for a whole half-stream instead of one per leaf: on trees of many small
    # leaves the per-op overhead, not the arithmetic, is the cost. Only without autograd
    # (the reversible forward and backward run so): with it, the foreach ops save their
    # inputs for backward where a plain add saves nothing. A subclass that redefines
    # combine or uncombine gets the leaf-by-leaf loop, which calls its own.
    def combine_leaves(  # noqa: D102
        self, x: list[torch.Tensor], update: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if torch.is_grad_enabled() or type(self).combine is not Additive.combine or batched():
            return super().combine_leaves(x, update)
        return list(torch._foreach_add(x, update))

    def uncombine_leaves(  # noqa: D102
        self, y: list[torch.Tensor], update: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if torch.is_grad_enabled() or type(self).uncombine is not Additive.uncombine or batched():
            return super().uncombine_leaves(y, update)
        return list(torch._foreach_sub(y, update))

    def __repr__(self) -> str:
        return "Additive()"
