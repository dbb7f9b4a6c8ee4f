"""Keyword context for the blocks: its tensors, and which functions receive which keywords."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from optree import PyTreeSpec

from . import _trees
from ._errors import RevtreeError

Receives = Union[bool, Collection[str]]  # noqa: UP007 (a runtime alias)
"""What one function receives of a call's keyword arguments: all (``True``), none
(``False``), or those named (``("mask",)``)."""

Route = Union[Literal["f", "g", "both"], tuple[Receives, Receives]]  # noqa: UP007
"""Which of ``f`` and ``g`` receive the keyword arguments of a call: ``"f"``, ``"g"``,
``"both"``, or a pair ``(to_f, to_g)``, each ``True``, ``False`` or the names of the
keywords that function takes (``(True, ("context",))``: ``f`` gets every keyword, ``g``
only ``context``)."""

ROUTES: dict[str, tuple[bool, bool]] = {
    "f": (True, False),
    "g": (False, True),
    "both": (True, True),
}

Normal = Union[bool, frozenset]  # noqa: UP007


def parse_receives(value: Any, who: str) -> Normal:
    """``True``, ``False`` or a frozenset of keyword names, or a ``RevtreeError`` naming ``who``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Collection) and not isinstance(value, (str, bytes)):
        names = frozenset(value)
        if all(isinstance(n, str) for n in names):
            return names
    raise RevtreeError(
        f"{who}={value!r} is not True, False or a collection of keyword names. Hint: True "
        "passes every keyword argument of the call, False none, ('mask',) only those named."
    )


def parse_route(route: Any) -> tuple[Normal, Normal]:
    """``(to_f, to_g)`` for a route, or a ``RevtreeError`` naming the ones there are."""
    if isinstance(route, str) and route in ROUTES:
        return ROUTES[route]
    if isinstance(route, tuple) and len(route) == 2:
        try:
            return parse_receives(route[0], "route[0]"), parse_receives(route[1], "route[1]")
        except RevtreeError:
            pass
    raise RevtreeError(
        f"route={route!r} is not one of {sorted(ROUTES)} or a pair (to_f, to_g). "
        "Hint: route='f' sends keyword arguments to f only, 'g' to g only, 'both' to both; "
        "(to_f, to_g) says it per function, each True, False or the keyword names it takes, "
        "e.g. route=(True, ('context',))."
    )


@dataclass(frozen=True)
class Context:
    """The keyword arguments of one call, flattened once.

    Tensor leaves anywhere in the keyword pytree become inputs of the autograd nodes (so
    they get exact gradients through them); every other leaf is kept as it is. ``rebuild``
    puts a set of tensors (copies, detached aliases) back in; ``select`` gives one
    function what it receives of it.
    """

    spec: PyTreeSpec
    leaves: tuple[Any, ...]
    positions: tuple[int, ...]  # where the tensor leaves sit among the leaves
    keys: tuple[Any, ...]  # the top-level keyword of each tensor leaf

    @classmethod
    def build(cls, kwargs: dict[str, Any], namespace: str) -> Context:
        """Flatten ``kwargs`` and note where its tensors are."""
        if not kwargs:
            return _EMPTY
        paths, leaves, spec = _trees.flatten_with_paths(kwargs, namespace)
        positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        keys = tuple(paths[i][0] for i in positions)
        return cls(spec, tuple(leaves), positions, keys)

    def name(self, k: int) -> str:
        """The key path of the ``k``-th tensor leaf, as ``kwargs['edges'][0]``."""
        return self.spec.accessors()[self.positions[k]].codify("kwargs")

    @property
    def empty(self) -> bool:
        """Whether the call had no keyword arguments at all."""
        return self.spec.num_children == 0

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensor leaves of the keyword arguments, in flattening order."""
        return [self.leaves[i] for i in self.positions]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments with ``tensors`` put in."""
        if self.empty:
            return {}
        leaves = list(self.leaves)
        for position, tensor in zip(self.positions, tensors):
            leaves[position] = tensor
        kwargs: dict[str, Any] = self.spec.unflatten(leaves)  # type: ignore[assignment]
        return kwargs

    def select(self, kwargs: dict[str, Any], receives: Normal) -> dict[str, Any]:
        """What a function that ``receives`` gets of ``kwargs``."""
        if receives is True:
            return kwargs
        if receives is False or not kwargs:
            return {}
        return {k: v for k, v in kwargs.items() if k in receives}

    def receiving(self, receives: Normal) -> list[int]:
        """The indices of the tensors a function that ``receives`` gets."""
        if receives is True:
            return list(range(len(self.positions)))
        if receives is False:
            return []
        return [k for k, key in enumerate(self.keys) if key in receives]


_EMPTY = Context(_trees.flatten({}, "")[1], (), (), ())
