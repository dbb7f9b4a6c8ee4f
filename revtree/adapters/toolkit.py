"""What revtree's adapters are written with: the same pieces, for an adapter of your own.

An adapter makes a package's reversible model run on the revtree engine without changing
its modules, their names or its call signature. Four pieces recur, each one call:

- [`built`][revtree.adapters.toolkit.built]: the ``ReversibleSequence`` made from the
  package's modules, kept outside their module tree (state dicts keep the package's
  names) and made again when they change;
- [`Named`][revtree.adapters.toolkit.Named]: a block function held as ``.net``, with
  keyword arguments added at call time, as several packages' checkpoints expect;
- [`swapped`][revtree.adapters.toolkit.swapped] and
  [`constructed_as`][revtree.adapters.toolkit.constructed_as]: a ``patch()`` that makes
  models built inside it use the adapter's classes (a package's globals, or a class the
  user's code imported by name);
- [`require`][revtree.adapters.toolkit.require]: the package's version, checked when the
  adapter is used, with a ``RevtreeError`` naming what to install.

The page "Writing an adapter" walks through one, from the package's plain-autograd
reference to its tests.
"""

from ._built import built as built
from ._named import Named as Named
from ._patching import constructed_as as constructed_as
from ._patching import swapped as swapped
from ._versions import require as require

__all__ = ["Named", "built", "constructed_as", "require", "swapped"]
