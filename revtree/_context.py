"""Keyword context for the blocks: its tensors, and which of ``f`` and ``g`` receive it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from optree import PyTreeSpec

from . import _trees
from ._errors import RevtreeError

Route = Union[Literal["f", "g", "both"], tuple[bool, bool]]  # noqa: UP007 (a runtime alias)
"""Which of ``f`` and ``g`` receive the keyword arguments of a call: ``"f"``, ``"g"``,
``"both"``, or a pair of booleans ``(to_f, to_g)`` (reformer-pytorch's ``arg_route``)."""

ROUTES: dict[str, tuple[bool, bool]] = {
    "f": (True, False),
    "g": (False, True),
    "both": (True, True),
}


def parse_route(route: Any) -> tuple[bool, bool]:
    """``(to_f, to_g)`` for a route, or a ``RevtreeError`` naming the ones there are."""
    if isinstance(route, tuple) and len(route) == 2 and all(isinstance(r, bool) for r in route):
        return route
    if isinstance(route, str) and route in ROUTES:
        return ROUTES[route]
    raise RevtreeError(
        f"route={route!r} is not one of {sorted(ROUTES)} or a pair of booleans. "
        "Hint: route='f' sends keyword arguments to f only, 'g' to g only, 'both' to both; "
        "(to_f, to_g) says it per function."
    )


@dataclass(frozen=True)
class Context:
    """The keyword arguments of one call, flattened once.

    Tensor leaves anywhere in the keyword pytree become inputs of the autograd
    Function (so they get exact gradients through it); every other leaf is kept as
    it is. ``rebuild`` puts a new set of tensors (copies, detached aliases) back in.
    """

    spec: PyTreeSpec
    leaves: tuple[Any, ...]
    positions: tuple[int, ...]
    to_f: bool
    to_g: bool

    @classmethod
    def build(cls, kwargs: dict[str, Any], route: Route, namespace: str) -> Context:
        """Flatten ``kwargs`` and note where its tensors are."""
        to_f, to_g = parse_route(route)
        leaves, spec = _trees.flatten(kwargs, namespace)
        positions = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        return cls(spec, tuple(leaves), positions, to_f, to_g)

    def name(self, k: int) -> str:
        """The key path of the ``k``-th tensor leaf, as ``kwargs['edges'][0]``."""
        return self.spec.accessors()[self.positions[k]].codify("kwargs")

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensor leaves of the keyword arguments, in flattening order."""
        return [self.leaves[i] for i in self.positions]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The keyword arguments for ``f`` and for ``g``, with ``tensors`` put in."""
        if not self.leaves:
            return {}, {}
        leaves = list(self.leaves)
        for position, tensor in zip(self.positions, tensors):
            leaves[position] = tensor
        kwargs: dict[str, Any] = self.spec.unflatten(leaves)  # type: ignore[assignment]
        return (kwargs if self.to_f else {}), (kwargs if self.to_g else {})
