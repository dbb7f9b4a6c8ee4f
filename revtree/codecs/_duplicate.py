"""The ``Duplicate`` codec: every part starts as the whole leaf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._errors import RevtreeError
from ._base import Codec, KeyPath


@dataclass(frozen=True)
class Duplicate(Codec):
    """Send the whole leaf down every part; the output is their mean (or their sum).

    This is the layout of the reversible Reformer and Equiformer: ``f`` and ``g`` see
    every channel, and the stack costs twice the width in the streams.

    Args:
        parts: The number of parts the leaf goes down.
        merge: ``"mean"`` (the default) or ``"sum"``: how the output pieces become one leaf.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Duplicate
        >>> x = torch.tensor([1.0, 2.0])
        >>> Duplicate().decode(*Duplicate().encode(x, ()), ()).tolist()
        [1.0, 2.0]
        >>> Duplicate(merge="sum").decode(x, x, ()).tolist()
        [2.0, 4.0]
    """

    bijective = False
    parts: int = 2  # type: ignore[misc]
    merge: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 1:
            raise RevtreeError(
                f"Duplicate(parts={self.parts!r}): the number of parts must be a positive int."
            )
        if self.merge not in ("mean", "sum"):
            raise RevtreeError(
                f"Duplicate(merge={self.merge!r}) is not 'mean' or 'sum'. Hint: 'sum' adds "
                "the output pieces, 'mean' averages them (equiformer-pytorch, reformer)."
            )

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, ...]:
        """Return the leaf once per part."""
        return (leaf,) * self.parts

    def decode(self, *pieces_and_path: Any) -> torch.Tensor:
        """Return the mean (or sum) of the pieces."""
        pieces = pieces_and_path[:-1]
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total / len(pieces) if self.merge == "mean" else total

    def __repr__(self) -> str:
        args = [f"parts={self.parts}"] if self.parts != 2 else []
        args += [f"merge={self.merge!r}"] if self.merge != "mean" else []
        return f"{type(self).__name__}({', '.join(args)})"
