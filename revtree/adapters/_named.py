"""What the adapters share: a block function held as ``.net``, as the peers' checkpoints expect."""

from __future__ import annotations

from typing import Any

from torch import nn


class Named(nn.Module):
    """Holds a block function as ``.net`` (the peers wrap theirs in a ``Deterministic``).

    Optionally adds keyword arguments computed at call time (``extra``), e.g. the
    recomputation signal reformer-pytorch's LSH attention reads.
    """

    def __init__(self, net: nn.Module, extra: Any = None) -> None:
        super().__init__()
        self.net = net
        self._extra = extra

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._extra is not None:
            kwargs = {**kwargs, **self._extra()}
        return self.net(*args, **kwargs)
