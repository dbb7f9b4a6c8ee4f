"""The ``Rearrange`` codec: an einops pattern that puts the two streams on a leading axis."""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch

from .._errors import RevtreeError
from ._base import Codec, KeyPath


@dataclass(frozen=True, init=False)
class Rearrange(Codec):
    """Lay a leaf out with an einops pattern whose output starts with the stream axis.

    ``encode`` applies ``pattern``; the first axis of its result must have length 2 and
    is unbound into the two streams. ``decode`` stacks the streams and applies the
    reversed pattern.

    Args:
        pattern: An einops ``rearrange`` pattern ``"left -> two right"``.
        **axes_lengths: Axis lengths einops cannot infer, as in ``einops.rearrange``.

    Examples:
        >>> import torch
        >>> from revtree.codecs import Rearrange
        >>> codec = Rearrange("b (c two) -> two b c", two=2)  # interleaved channels
        >>> x1, x2 = codec.encode(torch.arange(4.0)[None], ())
        >>> x1.tolist(), x2.tolist()
        ([[0.0, 2.0]], [[1.0, 3.0]])
    """

    pattern: str
    axes_lengths: tuple[tuple[str, int], ...] = field(default=())

    def __init__(self, pattern: str, **axes_lengths: int) -> None:
        left, arrow, right = pattern.partition("->")
        if not arrow or not right.split():
            raise RevtreeError(
                f"Rearrange({pattern!r}) is not of the form 'left -> two right'. "
                "Hint: put the axis of length 2 that separates the streams first on the right."
            )
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "axes_lengths", tuple(sorted(axes_lengths.items())))

    @property
    def _inverse(self) -> str:
        left, _, right = self.pattern.partition("->")
        return f"{right.strip()} -> {left.strip()}"

    def encode(self, leaf: torch.Tensor, path: KeyPath) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the pattern and unbind the leading stream axis."""
        try:
            laid_out = einops.rearrange(leaf, self.pattern, **dict(self.axes_lengths))
        except einops.EinopsError as e:
            raise RevtreeError(f"{self} does not fit this leaf: {e}") from None
        if laid_out.shape[0] != 2:
            raise RevtreeError(
                f"{self} gave a leading axis of length {laid_out.shape[0]}, not 2. "
                "Hint: the first axis on the right of the pattern holds the two streams."
            )
        return laid_out[0], laid_out[1]

    def decode(self, y1: torch.Tensor, y2: torch.Tensor, path: KeyPath) -> torch.Tensor:
        """Stack the streams and apply the reversed pattern."""
        return einops.rearrange(torch.stack((y1, y2)), self._inverse, **dict(self.axes_lengths))
