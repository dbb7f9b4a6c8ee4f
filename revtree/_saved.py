"""What a forward keeps for its backward: saved tensors (hooks), and all it leaves alive."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


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


def held_after_forward(
    forward: Callable[[], T], exempt: Iterable[torch.Tensor] = ()
) -> tuple[int, T]:
    """The bytes of the tensors that ``out = forward()`` leaves alive, and ``out``.

    Every tensor storage that is new after the forward and alive, each once: what autograd
    saved for backward (saved-tensor hooks hand each saved tensor over, ``save_for_backward``
    too, and keep it where the count finds it), what custom autograd Functions keep on
    their ctx (RevTorch, MemCNN, reformer-pytorch and equiformer-pytorch keep their output
    so, out of the hooks' sight), in closures or on modules (the inputs that
    ``torch.utils.checkpoint`` keeps, RNG states for the replay), and the output. A walk
    of the graph's ctx attributes alone misses the closures: it counts nothing of a
    checkpointed block's dict inputs. Storages of ``exempt`` tensors, and all that existed
    before the forward (parameters, buffers, inputs), are not counted.

    Args:
        forward: Runs the forward pass with autograd on.
        exempt: Tensors whose storage is not to be counted.

    Returns:
        ``(bytes, out)``.
    """
    exempt = list(exempt)
    gc.collect()
    before = _live_tensors()  # held: no storage of theirs is freed and its address reused
    counter = Counter(exempt)  # holds every saved tensor, which autograd alone keeps in C++
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, _same):
        out = forward()
    gc.collect()
    skip = before.keys() | {t.untyped_storage().data_ptr() for t in exempt}
    after = _live_tensors()
    held = sum(t.untyped_storage().nbytes() for key, t in after.items() if key not in skip)
    return held, out


def _live_tensors() -> dict[int, torch.Tensor]:
    """The tensors Python can reach, one per storage, by the storage's address.

    Plain tensors and parameters only: subclasses (the fake tensors compilation leaves
    behind) hold no storage of their own to count.
    """
    found: dict[int, torch.Tensor] = {}
    for t in gc.get_objects():
        if type(t) in _PLAIN and t.layout == torch.strided and not t.is_meta:
            try:
                found[t.untyped_storage().data_ptr()] = t
            except (RuntimeError, NotImplementedError):  # fake and functorch-wrapped tensors
                pass
    return found


_PLAIN = (torch.Tensor, nn.Parameter)
