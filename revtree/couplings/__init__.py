"""Couplings: how ``f`` and ``g`` turn a block's two half-streams into its outputs, and back."""

from ._additive import Additive as Additive
from ._affine import Affine as Affine
from ._base import Coupling as Coupling
from ._base import Elementwise as Elementwise
from ._momentum import Momentum as Momentum

__all__ = ["Additive", "Affine", "Coupling", "Elementwise", "Momentum"]
