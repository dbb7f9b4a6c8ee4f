"""se3-transformer-pytorch's reversible sequence, as the revtree engine with a ``Degree`` codec.

se3-transformer-pytorch (0.9.0) runs its trunk through ``se3_transformer_pytorch.reversible``:
a flat dict ``{"0": (batch, nodes, channels, 1), "1": (..., 3), ...}`` keyed by the degree's
*string*, duplicated into two streams, blocks ``(attention, feedforward)`` with the graph
context (``edge_info``, ``rel_dist``, ``basis``, ``global_feats``, ``pos_emb``, ``mask``)
passed to the attention only, and the mean of the two streams at the end. Here that is the
generic engine with [`Degree`][revtree.codecs.Degree] (reading string keys) as codec and
``route="f"``: nothing of it lives in the core.

The package's blocks carry their own residual: its attention block returns
``x + attention(norm(x))``, so a block computes ``y1 = x1 + x2 + attention(norm(x2))``.
That is still an additive coupling, and the engine runs it as it is.

The classes take and return exactly what the package's do, and name their parameters as it
does (``blocks.{i}.f.net.*``, ``blocks.{i}.g.net.*``; ``blocks.{i}.0.*``, ``blocks.{i}.1.*``
for the sequential one), so checkpoints load with ``strict=True``. ``SE3Transformer`` looks
both classes up as globals of ``se3_transformer_pytorch.se3_transformer_pytorch``;
[`patch`][revtree.adapters.se3_transformer.patch] swaps them in.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from revtree.adapters.se3_transformer import ReversibleSequence
    >>> class PerDegree(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(4, 4, bias=False)
    ...     def forward(self, x, **context):
    ...         return {d: self.lin(t.transpose(-1, -2)).transpose(-1, -2) for d, t in x.items()}
    >>> seq = ReversibleSequence([(PerDegree(), PerDegree()) for _ in range(2)])
    >>> x = {"0": torch.randn(1, 5, 4, 1), "1": torch.randn(1, 5, 4, 3)}
    >>> {d: tuple(t.shape) for d, t in seq(x, mask=None).items()}
    {'0': (1, 5, 4, 1), '1': (1, 5, 4, 3)}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .. import _sequence
from .._errors import RevtreeError
from ..codecs import Degree, KeyPath
from ._named import Named
from ._patching import swapped
from ._versions import require

Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class _StringDegree(Degree):
    """``Degree`` for dicts keyed by the degree's decimal string, as this package keys them."""

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Read a key ``"1"`` as the degree ``1``, then check and duplicate as ``Degree``."""
        key = path[-1] if path else None
        if not (isinstance(key, str) and key.isdecimal()):
            raise RevtreeError(
                f"the key {key!r} is not a degree: se3-transformer-pytorch keys its features "
                "by the degree as a string. Hint: pass {'0': ..., '1': ...}."
            )
        return super().encode(leaf, (*path[:-1], int(key)))


class ReversibleSequence(_sequence.ReversibleSequence):
    """``se3_transformer_pytorch.reversible.ReversibleSequence``, on the revtree engine.

    Args:
        blocks: ``(f, g)`` pairs of modules: ``f`` (attention) is called as
            ``f(features, **kwargs)``, ``g`` (feedforward) as ``g(features)``.
    """

    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__(
            [(Named(f), Named(g)) for f, g in blocks], codec=_StringDegree(), route="f"
        )


class SequentialSequence(nn.Module):
    """``se3_transformer_pytorch.reversible.SequentialSequence``: the same blocks in a row.

    ``x = f(x, **kwargs)``, then ``x = g(x)``: the package's blocks add their own residual.
    This is the package's non-reversible trunk, kept here so that both of
    ``SE3Transformer``'s choices can be swapped in together.

    Args:
        blocks: ``(f, g)`` pairs of modules, as for ``ReversibleSequence``.
    """

    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList([f, g]) for f, g in blocks])

    def forward(self, x: Features, **kwargs: Any) -> Features:
        """Run every block's two functions in turn."""
        for pair in self.blocks:
            f, g = cast(nn.ModuleList, pair)
            x = g(f(x, **kwargs))
        return x


@contextmanager
def patch() -> Iterator[None]:
    """Make ``SE3Transformer`` built inside the context use these classes for its trunk.

    Examples:
        >>> from se3_transformer_pytorch import SE3Transformer  # doctest: +SKIP
        >>> with patch():  # doctest: +SKIP
        ...     model = SE3Transformer(dim=16, depth=4, num_degrees=2, reversible=True)
    """
    require("se3-transformer-pytorch", "0.9.0", "se3_transformer")
    import se3_transformer_pytorch.se3_transformer_pytorch as package

    with swapped(
        [package], ReversibleSequence=ReversibleSequence, SequentialSequence=SequentialSequence
    ):
        yield
