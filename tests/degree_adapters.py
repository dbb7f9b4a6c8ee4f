"""What the degree-dict adapters (equiformer-pytorch, se3-transformer-pytorch) are tested with.

Both packages take a dict of features by degree, ``{degree: (batch, nodes, channels,
2 * degree + 1)}``, and coordinates; their adapters run the trunk with the ``Degree`` codec.
The pieces here are the ones their tests share: an upstream coordinates layer (so gradients
must reach through the coordinates), a random rotation, a weight perturbation, and the
``Degree`` codec's errors, checked the same way for each adapter.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import revtree
from revtree.codecs import Degree


class Coordinates(nn.Module):
    """An upstream layer producing the coordinates, so gradients must reach through them."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.base = nn.Parameter(torch.randn(1, n, 3, generator=g, dtype=torch.float64))
        self.lin = nn.Linear(3, 3, dtype=torch.float64)

    def forward(self) -> torch.Tensor:
        return self.base + 0.1 * self.lin(self.base)


def rotation(seed: int) -> torch.Tensor:
    """A random proper rotation (determinant +1), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def perturb(model: nn.Module, scale: float) -> None:
    """Move every weight off its initial value: some start at zero, which would hide errors."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


class _Zero(nn.Module):
    def forward(self, x: dict, **kwargs: Any) -> dict:
        return {k: torch.zeros_like(v) for k, v in x.items()}


def check_degree_codec_error(adapter: Any, x: dict, match: str) -> None:
    """The adapter's sequence refuses a malformed degree dict with ``match`` in the error."""
    seq = adapter.ReversibleSequence([(_Zero(), _Zero())])
    with pytest.raises(revtree.RevtreeError, match=match):
        seq(x)
    assert isinstance(seq.codec, Degree)
