"""The affine coupling: scale and shift, with the scale kept positive and bounded."""

from __future__ import annotations

from typing import ClassVar

import torch

from .._errors import RevtreeError
from ._base import Elementwise


class Affine(Elementwise):
    """``y1 = x1 * s(a) + t`` with ``(a, t) = f(x2)``; then the same for ``y2`` with ``g(y1)``.

    ``f`` and ``g`` return a pair ``(log_scale, shift)`` of pytrees shaped like the
    half-stream. The scale ``s(a) = exp(bound * tanh(a / bound))`` is positive and lies in
    ``[exp(-bound), exp(bound)]``, so neither direction can blow up or divide by zero (the
    soft clamp of RealNVP/Glow implementations). Inverse: ``x1 = (y1 - t) / s(a)``.

    Args:
        bound: The largest log-scale magnitude.

    Examples:
        >>> import torch
        >>> from revtree.couplings import Affine
        >>> def f(x):
        ...     return torch.tanh(x), 0.5 * x
        >>> coupling = Affine(bound=2.0)
        >>> x1, x2 = torch.randn(4), torch.randn(4)
        >>> back = coupling.inverse(f, f, *coupling.forward(f, f, x1, x2))
        >>> bool(torch.allclose(back[0], x1) and torch.allclose(back[1], x2))
        True
    """

    arity: ClassVar[int] = 2

    def __init__(self, bound: float = 2.0) -> None:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise RevtreeError(
                f"Affine(bound={bound!r}): the bound must be a positive number. Hint: e.g. "
                "Affine(bound=2.0) keeps every scale within [exp(-2), exp(2)]."
            )
        self.bound = float(bound)

    def scale(self, log_scale: torch.Tensor) -> torch.Tensor:
        """The positive, bounded scale for a raw log-scale."""
        return torch.exp(self.bound * torch.tanh(log_scale / self.bound))

    def combine(self, x: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """``x * scale(log_scale) + shift``."""
        log_scale, shift = update
        return x * self.scale(log_scale) + shift

    def uncombine(self, y: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """``(y - shift) / scale(log_scale)``."""
        log_scale, shift = update
        return (y - shift) / self.scale(log_scale)

    def __repr__(self) -> str:
        return f"Affine(bound={self.bound})"
