"""equiformer-pytorch's reversible sequence, as the revtree engine with the ``Degree`` codec.

equiformer-pytorch (0.5.4) runs its trunk through ``equiformer_pytorch.reversible``: a flat
dict ``{degree: (batch, nodes, channels, 2 * degree + 1)}`` duplicated into two streams,
blocks ``(attention, feedforward)`` with the graph context passed to the attention only, and
the mean of the two streams at the end. Here that is the generic engine with
[`Degree`][revtree.codecs.Degree] as codec and ``route="f"``: nothing of it lives in the core.

The classes take and return exactly what the package's do, and name their parameters as it
does (``blocks.{i}.f.net.*``, ``blocks.{i}.g.net.*``; ``blocks.{i}.0.*``, ``blocks.{i}.1.*``
for the sequential one), so checkpoints load with ``strict=True``. ``Equiformer`` looks both
classes up as globals of ``equiformer_pytorch.equiformer_pytorch``;
[`patch`][revtree.adapters.equiformer.patch] swaps them in.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from revtree.adapters.equiformer import ReversibleSequence
    >>> class PerDegree(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(4, 4, bias=False)
    ...     def forward(self, x, **context):
    ...         return {d: self.lin(t.transpose(-1, -2)).transpose(-1, -2) for d, t in x.items()}
    >>> seq = ReversibleSequence([(PerDegree(), PerDegree()) for _ in range(2)])
    >>> x = {0: torch.randn(1, 5, 4, 1), 1: torch.randn(1, 5, 4, 3)}
    >>> {d: tuple(t.shape) for d, t in seq(x, mask=None).items()}
    {0: (1, 5, 4, 1), 1: (1, 5, 4, 3)}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from .. import _sequence
from ..codecs import Degree
from ._named import Named
from ._patching import swapped
from ._versions import require

Features = dict[int, torch.Tensor]


class ReversibleSequence(_sequence.ReversibleSequence):
    """``equiformer_pytorch.reversible.ReversibleSequence``, on the revtree engine.

    Args:
        blocks: ``(f, g)`` pairs of modules: ``f`` (attention) is called as
            ``f(features, **kwargs)``, ``g`` (feedforward) as ``g(features)``.
    """

    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__([(Named(f), Named(g)) for f, g in blocks], codec=Degree(), route="f")


class SequentialSequence(nn.Module):
    """``equiformer_pytorch.reversible.SequentialSequence``: the same blocks as plain residuals.

    ``x = x + f(x, **kwargs)``, then ``x = x + g(x)``, degree by degree (a degree that ``f`` or
    ``g`` adds is kept as it is). This is the package's non-reversible trunk, kept here so
    that both of ``Equiformer``'s choices can be swapped in together.

    Args:
        blocks: ``(f, g)`` pairs of modules, as for ``ReversibleSequence``.
    """

    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList([f, g]) for f, g in blocks])

    def forward(self, x: Features, **kwargs: Any) -> Features:
        """Run every block as two residual updates."""
        for pair in self.blocks:
            f, g = cast(nn.ModuleList, pair)
            x = _residual(f(x, **kwargs), x)
            x = _residual(g(x), x)
        return x


def _residual(update: Features, x: Features) -> Features:
    return {d: t + x[d] if d in x else t for d, t in update.items()}


@contextmanager
def patch() -> Iterator[None]:
    """Make ``Equiformer`` built inside the context use these classes for its trunk.

    Examples:
        >>> from equiformer_pytorch import Equiformer  # doctest: +SKIP
        >>> with patch():  # doctest: +SKIP
        ...     model = Equiformer(dim=16, depth=4, reversible=True)
    """
    require("equiformer-pytorch", "0.5.4", "equiformer")
    import equiformer_pytorch.equiformer_pytorch as package

    with swapped(
        [package], ReversibleSequence=ReversibleSequence, SequentialSequence=SequentialSequence
    ):
        yield
