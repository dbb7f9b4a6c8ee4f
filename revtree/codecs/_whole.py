"""The ``Whole`` codec: the whole leaf in one part, none of it in the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._errors import RevtreeError
from ._base import Codec, KeyPath


@dataclass(frozen=True)
class Whole(Codec):
    """Put the whole leaf in part ``part`` and nothing of it in the others.

    Parts made of whole subtrees: ``{"video": Whole(0), "text": Whole(1)}`` makes the video
    one part and the text the other, each updated from the other. A part's tree has ``None``
    where a leaf of the input belongs to another part. With one part in all, ``Whole()``
    is the state of an invertible step that takes the whole input (a normalizing flow).

    Args:
        part: The part the leaf belongs to.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Whole
        >>> Whole(1).targets, Whole(1).encode(torch.ones(2), ())[0].tolist()
        ((1,), [1.0, 1.0])
    """

    parts = 1
    part: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.part, bool) or not isinstance(self.part, int) or self.part < 0:
            raise RevtreeError(f"Whole(part={self.part!r}): the part must be an int >= 0.")

    @property
    def targets(self) -> tuple[int, ...]:
        """``(part,)``."""
        return (self.part,)

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, ...]:
        """Return ``(leaf,)``."""
        return (leaf,)

    def decode(self, *pieces_and_path: Any) -> torch.Tensor:
        """Return the one piece."""
        return pieces_and_path[0]

    def __repr__(self) -> str:
        return f"Whole({self.part})" if self.part else "Whole()"
