"""The coupling protocol: a reversible map of two half-streams, written over pytrees."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import optree
import torch

Tree = Any
"""A pytree of tensors: a half-stream, with the structure of the sequence's input."""

Fn = Callable[[Tree], Any]
"""``f`` or ``g`` with the call's keyword arguments bound: a half-stream pytree in, a pytree out."""


class Coupling(abc.ABC):
    """A reversible map ``(x1, x2) -> (y1, y2)`` of two half-streams, built from ``f`` and ``g``.

    Write ``forward`` and its exact ``inverse`` over pytrees (``optree.tree_map`` does the
    leaf-by-leaf work), and the engine provides the rest: no activations stored, dropout
    and autocast replayed, gradients equal to plain autograd. ``inverse`` must call ``f``
    and ``g`` as many times as ``forward`` does, in the reverse order, so that each call
    can be given the random state of its forward counterpart.

    Backward then costs one run of ``inverse`` and one of ``forward`` with autograd on.
    Couplings of the form ``y1 = combine(x1, f(x2))``, ``y2 = combine(x2, g(y1))`` should
    subclass [`Elementwise`][revtree.couplings.Elementwise] instead: the engine reverses
    those and back-propagates in one pass, one extra forward in all.

    Examples:
        >>> import optree, torch
        >>> from revtree.couplings import Coupling
        >>> class Shear(Coupling):  # y1 = x1 + f(x2), y2 = x2 - g(y1)
        ...     def forward(self, f, g, x1, x2):
        ...         y1 = optree.tree_map(torch.add, x1, f(x2))
        ...         return y1, optree.tree_map(torch.sub, x2, g(y1))
        ...     def inverse(self, f, g, y1, y2):
        ...         x2 = optree.tree_map(torch.add, y2, g(y1))
        ...         return optree.tree_map(torch.sub, y1, f(x2)), x2
        >>> f = g = torch.sin
        >>> x1, x2 = torch.randn(3), torch.randn(3)
        >>> x1_, x2_ = Shear().inverse(f, g, *Shear().forward(f, g, x1, x2))
        >>> bool(torch.allclose(x1_, x1) and torch.allclose(x2_, x2))
        True
    """

    updates_like_input: ClassVar[bool] = False
    """Whether ``f`` and ``g`` return pytrees shaped like their input: the engine then checks
    every call, and names the leaf of a wrong structure or shape."""

    skips_none: ClassVar[bool] = False
    """Whether ``f`` or ``g`` may return ``None`` (for the whole tree) to skip its step: the
    coupling's ``forward`` and ``inverse`` then leave both streams as they are for that
    call. The engine lets ``None`` through only to couplings that say so."""

    @abc.abstractmethod
    def forward(self, f: Fn, g: Fn, x1: Tree, x2: Tree) -> tuple[Tree, Tree]:
        """Map the input half-streams to the output half-streams."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abc.abstractmethod
    def inverse(self, f: Fn, g: Fn, y1: Tree, y2: Tree) -> tuple[Tree, Tree]:
        """Map the output half-streams back to the input half-streams."""


class Elementwise(Coupling):
    """``y1 = combine(x1, *f(x2))``, ``y2 = combine(x2, *g(y1))``, leaf by leaf.

    ``f`` returns ``arity`` pytrees shaped like the half-stream (one tree for ``arity == 1``,
    a tuple of them otherwise); ``combine`` mixes one stream leaf with the matching leaves of
    those trees, and ``uncombine`` undoes it. For these couplings the engine rebuilds each
    block's inputs and back-propagates through it in the same pass.

    Examples:
        >>> import torch
        >>> from revtree.couplings import Elementwise
        >>> class Scaled(Elementwise):  # y = 2 x + u
        ...     def combine(self, x, *update):
        ...         return 2 * x + update[0]
        ...     def uncombine(self, y, *update):
        ...         return (y - update[0]) / 2
        >>> x1, x2, c = torch.randn(3), torch.randn(3), Scaled()
        >>> back = c.inverse(torch.sin, torch.sin, *c.forward(torch.sin, torch.sin, x1, x2))
        >>> bool(torch.allclose(back[0], x1) and torch.allclose(back[1], x2))
        True
    """

    arity: ClassVar[int] = 1

    @abc.abstractmethod
    def combine(self, x: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """One output leaf from one input leaf and the matching leaves of ``f``'s trees."""

    @abc.abstractmethod
    def uncombine(self, y: torch.Tensor, *update: torch.Tensor) -> torch.Tensor:
        """The input leaf back from the output leaf and the same update leaves."""

    def combine_leaves(
        self, x: list[torch.Tensor], update: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``combine`` over a whole half-stream: ``update`` is the ``arity`` update lists, joined.

        The engine calls this on a whole half-stream at once; override it with a batched
        (``torch._foreach_*``) version where one exists, as ``Additive`` does.
        """
        n = len(x)
        return [self.combine(a, *update[i::n]) for i, a in enumerate(x)]

    def uncombine_leaves(
        self, y: list[torch.Tensor], update: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``uncombine`` over matching lists of leaves, as in ``combine_leaves``."""
        n = len(y)
        return [self.uncombine(b, *update[i::n]) for i, b in enumerate(y)]

    def _map(self, fn: Callable[..., torch.Tensor], x: Tree, update: Any) -> Tree:
        updates = (update,) if self.arity == 1 else tuple(update)
        return optree.tree_map(fn, x, *updates)

    def forward(self, f: Fn, g: Fn, x1: Tree, x2: Tree) -> tuple[Tree, Tree]:  # noqa: D102
        y1 = self._map(self.combine, x1, f(x2))
        return y1, self._map(self.combine, x2, g(y1))

    def inverse(self, f: Fn, g: Fn, y1: Tree, y2: Tree) -> tuple[Tree, Tree]:  # noqa: D102
        x2 = self._map(self.uncombine, y2, g(y1))
        return self._map(self.uncombine, y1, f(x2)), x2
