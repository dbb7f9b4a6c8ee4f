"""revtree: reversible networks over arbitrary pytrees.

Activation memory flat in depth, gradients exactly those of plain autograd.
"""

from . import codecs as codecs
from . import couplings as couplings
from ._block import Block as Block
from ._block import Fn as Fn
from ._block import Invertible as Invertible
from ._block import Update as Update
from ._budget import MemoryPlan as MemoryPlan
from ._context import Route as Route
from ._errors import RevtreeError as RevtreeError
from ._errors import RevtreeWarning as RevtreeWarning
from ._replay._memo import memo as memo
from ._sequence import ReversibleSequence as ReversibleSequence
from ._state import current_block as current_block
from ._state import is_recomputing as is_recomputing

__all__ = [
    "Block",
    "Fn",
    "Invertible",
    "MemoryPlan",
    "ReversibleSequence",
    "Route",
    "RevtreeError",
    "RevtreeWarning",
    "Update",
    "codecs",
    "couplings",
    "current_block",
    "is_recomputing",
    "memo",
]

__version__ = "0.2.0"
