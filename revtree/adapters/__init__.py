"""Drop-in replacements for other libraries' reversible sequences, built on the revtree engine.

Each adapter is a submodule, imported on first use (``import revtree`` imports none of them):

- [`revtree.adapters.equiformer`][revtree.adapters.equiformer]: equiformer-pytorch's
  ``ReversibleSequence`` and ``SequentialSequence``.
- [`revtree.adapters.reformer`][revtree.adapters.reformer]: reformer-pytorch's
  ``ReversibleSequence``.
- [`revtree.adapters.se3_transformer`][revtree.adapters.se3_transformer]:
  se3-transformer-pytorch's reversible trunk.
- [`revtree.adapters.momentumnet`][revtree.adapters.momentumnet]: momentumnet's
  ``MomentumNet`` and ``transform_to_momentumnet``.
- [`revtree.adapters.pyg`][revtree.adapters.pyg]: torch_geometric's ``GroupAddRev``.
- [`revtree.adapters.freia`][revtree.adapters.freia]: FrEIA's ``SequenceINN``.
- [`revtree.adapters.toolkit`][revtree.adapters.toolkit]: what the adapters are written
  with, for your own.
"""

import importlib
from types import ModuleType

_ADAPTERS = (
    "equiformer",
    "freia",
    "momentumnet",
    "pyg",
    "reformer",
    "se3_transformer",
    "toolkit",
)


def __getattr__(name: str) -> ModuleType:
    if name in _ADAPTERS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
