"""Momentum residual networks (Sander et al., 2021), two momentum steps per block."""

from __future__ import annotations

import numbers

import optree
import torch

from .._errors import RevtreeError
from ._base import Coupling, Fn, Tree


class Momentum(Coupling):
    """Position and velocity streams, two momentum steps per block: one with ``f``, one with ``g``.

    With ``x1`` the position and ``x2`` the velocity (start it at zero with
    [`ZeroVelocity`][revtree.codecs.ZeroVelocity]), a block runs two steps of
    ``v = gamma * v + (1 - gamma) * h(x)``, ``x = x + v``: first ``h = f``, then ``h = g``.
    The inverse divides by ``gamma``, so rounding errors grow by ``1 / gamma`` per step when
    reconstructing: keep ``gamma`` near 1 (``revtree.testing.reconstruction_errors`` measures
    it). See Sander, Ablin, Blondel and Peyré, "Momentum Residual Neural Networks", ICML 2021.

    ``f`` or ``g`` may return ``None`` to skip its step (position and velocity stay as they
    are), so that a stack of an odd number of steps ends in a block whose ``g`` does
    nothing.

    Args:
        gamma: The momentum term, in ``(0, 1]``: a number, or a tensor of one element that
            needs no gradient (a learned ``gamma`` would get none here).

    Examples:
        >>> import torch
        >>> from revtree.couplings import Momentum
        >>> m = Momentum(gamma=0.9)
        >>> x, v = torch.randn(3), torch.zeros(3)
        >>> x_, v_ = m.inverse(torch.tanh, torch.tanh, *m.forward(torch.tanh, torch.tanh, x, v))
        >>> bool(torch.allclose(x_, x, atol=1e-6) and torch.allclose(v_, v, atol=1e-6))
        True
    """

    updates_like_input = True
    skips_none = True

    def __init__(self, gamma: float = 0.9) -> None:
        self.gamma = momentum_term(
            gamma,
            "Momentum",
            "keep it near 1 (e.g. 0.9): the inverse divides by gamma at every step",
        )

    def _step(self, h: Fn, x: Tree, v: Tree) -> tuple[Tree, Tree]:
        gamma, u = self.gamma, h(x)
        if u is None:  # a skipped step
            return x, v
        v = optree.tree_map(lambda v, u: gamma * v + (1 - gamma) * u, v, u)
        return optree.tree_map(torch.add, x, v), v

    def _unstep(self, h: Fn, y: Tree, w: Tree) -> tuple[Tree, Tree]:
        gamma = self.gamma
        x = optree.tree_map(torch.sub, y, w)
        u = h(x)
        if u is None:  # the step was skipped: nothing to undo
            return y, w
        return x, optree.tree_map(lambda w, u: (w - (1 - gamma) * u) / gamma, w, u)

    def forward(self, f: Fn, g: Fn, x1: Tree, x2: Tree) -> tuple[Tree, Tree]:  # noqa: D102
        return self._step(g, *self._step(f, x1, x2))

    def inverse(self, f: Fn, g: Fn, y1: Tree, y2: Tree) -> tuple[Tree, Tree]:  # noqa: D102
        return self._unstep(f, *self._unstep(g, y1, y2))

    def __repr__(self) -> str:
        return f"Momentum(gamma={self.gamma})"


def momentum_term(gamma: object, who: str, hint: str) -> float:
    """``gamma`` as a float in ``(0, 1]``, or a ``RevtreeError`` from ``who(gamma=...)``.

    Any real number is taken (``numpy.float32`` too), and a one-element tensor that needs no
    gradient; one that needs a gradient is refused, since the coupling's arithmetic uses its
    value and no gradient would reach it.
    """
    if isinstance(gamma, torch.Tensor):
        if gamma.requires_grad:
            raise RevtreeError(
                f"{who}(gamma=<a tensor that requires grad>): gamma is a constant of the "
                "coupling and would get no gradient. Hint: pass a number (gamma.item()); "
                "a learned momentum term is not supported."
            )
        if gamma.numel() != 1:
            raise RevtreeError(
                f"{who}(gamma=<a tensor of shape {tuple(gamma.shape)}>): gamma is one number. "
                "Hint: pass a float."
            )
        gamma = gamma.item()
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 < float(gamma) <= 1:
        raise RevtreeError(f"{who}(gamma={gamma!r}): gamma must lie in (0, 1]. Hint: {hint}.")
    return float(gamma)
