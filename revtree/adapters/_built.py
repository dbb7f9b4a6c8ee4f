"""A sequence an adapter builds from its package's modules, rebuilt when they change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

S = TypeVar("S", bound=nn.Module)

# settings compared by value: a number read again is often another object of equal value
_VALUES = (bool, int, float, complex, str, bytes, type(None))


def built(owner: nn.Module, key: Sequence[Any], build: Callable[[], S]) -> S:
    """The module ``build()`` made for ``owner``, made again whenever ``key`` changes.

    An adapter keeps the package's module tree and names (so that state dicts load both
    ways) and runs it through a ``ReversibleSequence`` built from those modules. That
    sequence is kept on ``owner`` outside its module tree (``.to()``, ``state_dict`` and
    ``parameters()`` see the package's modules only, once), rebuilt when anything in
    ``key`` changed since the last build (modules and other objects by identity; numbers,
    strings, ``None`` and tuples of them by value), and put in ``owner``'s training mode.

    Args:
        owner: The adapter's module.
        key: What the built module depends on, compared by identity.
        build: Makes it.

    Returns:
        The module, built now or before.

    Examples:
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.adapters.toolkit import built
        >>> class Pair(nn.Module):  # the package's names: layers.0, layers.1
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        ...     def forward(self, x):
        ...         f, g = self.layers
        ...         return built(self, (f, g), lambda: revtree.ReversibleSequence([(f, g)]))(x)
        >>> pair = Pair()
        >>> sorted(pair.state_dict())
        ['layers.0.bias', 'layers.0.weight', 'layers.1.bias', 'layers.1.weight']
        >>> pair(__import__("torch").zeros(3, 4)).shape
        torch.Size([3, 4])
    """
    found = owner.__dict__.get("_revtree_built")
    key = tuple(key)
    if found is None or not _same(found[0], key):
        found = (key, build())
        owner.__dict__["_revtree_built"] = found  # a plain attribute: not a submodule
    module: S = found[1]
    if module.training != owner.training:
        module.train(owner.training)
    return module


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return len(old) == len(new) and all(
        a is b or (type(a) is type(b) and _value(a) and a == b) for a, b in zip(old, new)
    )


def _value(a: Any) -> bool:
    return isinstance(a, _VALUES) or (isinstance(a, tuple) and all(_value(x) for x in a))
