"""A block function held as ``.net``, as the peers' checkpoints expect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class Named(nn.Module):
    """Holds a block function as ``.net`` (the peers wrap theirs in a ``Deterministic``).

    Its parameters are then named ``...f.net.*``, as the packages' own reversible
    sequences name them, so their checkpoints load.

    Args:
        net: The block function.
        extra: Called at every call, with no arguments: keyword arguments to add (the
            recomputation signal reformer-pytorch's LSH attention reads).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from revtree.adapters.toolkit import Named
        >>> f = Named(nn.Linear(2, 2))
        >>> sorted(name for name, _ in f.named_parameters())
        ['net.bias', 'net.weight']
    """

    def __init__(self, net: nn.Module, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.net = net
        self._extra = extra

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``net``, with the ``extra`` keyword arguments added."""
        if self._extra is not None:
            kwargs = {**kwargs, **self._extra()}
        return self.net(*args, **kwargs)
