"""Drop-in replacements for other libraries' reversible sequences, built on the revtree engine.

Each adapter is a submodule, imported on first use (``import revtree`` imports none of them):

- [`revtree.adapters.equiformer`][revtree.adapters.equiformer]: equiformer-pytorch's
  ``ReversibleSequence`` and ``SequentialSequence``.
- [`revtree.adapters.reformer`][revtree.adapters.reformer]: reformer-pytorch's
  ``ReversibleSequence``.
"""

import importlib
from types import ModuleType

_ADAPTERS = ("equiformer", "reformer")


def __getattr__(name: str) -> ModuleType:
    if name in _ADAPTERS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
