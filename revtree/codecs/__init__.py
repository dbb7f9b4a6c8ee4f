"""Leaf codecs: how each leaf of the input becomes pieces of the state's parts, and back."""

from ._base import Codec as Codec
from ._base import KeyPath as KeyPath
from ._degree import Degree as Degree
from ._duplicate import Duplicate as Duplicate
from ._rearrange import Rearrange as Rearrange
from ._split import Split as Split
from ._whole import Whole as Whole
from ._zero_velocity import ZeroVelocity as ZeroVelocity

__all__ = ["Codec", "Degree", "Duplicate", "KeyPath", "Rearrange", "Split", "Whole", "ZeroVelocity"]
