"""What autograd keeps between a forward and its backward, counted with saved-tensor hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class Counter:
    """A pack hook that adds up the storage autograd would save, each storage once.

    It holds what it counts until it is let go, as autograd would: a storage freed early
    could come back at the same address and be taken for one already counted.
    """

    def __init__(self, exempt: Iterable[torch.Tensor] = ()) -> None:
        self.exempt = {t.untyped_storage().data_ptr() for t in exempt}
        self.held: dict[int, torch.Tensor] = {}
        self.size = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exempt and key not in self.held:
            self.held[key] = t
            self.size += storage.nbytes()
        return t


def saved_bytes(
    fn: Callable[..., Any], /, *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
) -> int:
    """The bytes autograd saves for backward while ``fn(*args, **kwargs)`` runs.

    Each storage counts once. The parameters and buffers of ``fn``, when it is a module,
    are not counted (they live anyway), nor are the tensors in ``exclude``. The forward
    runs with autograd on; its graph is let go unused. On a reversible sequence this is
    what the stack holds between forward and backward: its output streams, not one
    activation per block.

    Args:
        fn: A module or function.
        *args: Its positional arguments.
        exclude: Tensors whose storage is not to be counted.
        **kwargs: Its keyword arguments.

    Returns:
        The bytes.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import revtree
        >>> from revtree.testing import saved_bytes
        >>> blocks = [(nn.Linear(64, 64), nn.Linear(64, 64)) for _ in range(8)]
        >>> x = torch.randn(32, 128, requires_grad=True)
        >>> plain = revtree.ReversibleSequence(blocks, reversible=False)
        >>> saved_bytes(plain, x), saved_bytes(revtree.ReversibleSequence(blocks), x)
        (131072, 16384)
    """
    own = [*fn.parameters(), *fn.buffers()] if isinstance(fn, nn.Module) else []
    counter = Counter([*own, *exclude])
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, _same):
        fn(*args, **kwargs)
    return counter.size


def _same(t: torch.Tensor) -> torch.Tensor:
    return t
