"""What a forward keeps for its backward: all it leaves alive, counted by storage."""

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
        return t.detach()  # not t: a node saving its own output would never be freed


def held_bytes(
    fn: Callable[..., Any], /, *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
) -> int:
    """The bytes a forward call leaves alive for backward, its output included.

    Every tensor storage that is new after ``fn(*args, **kwargs)`` ran with autograd on and
    is still alive, each once: what autograd saved, what custom autograd Functions keep on
    their ``ctx`` (the way most reversible libraries keep their output), what closures and
    modules keep, and the output. The parameters and buffers of ``fn``, when it is a
    module, and the tensors in ``exclude`` are not counted; neither is anything that
    existed before the call (the inputs). This is the memory a training step holds between
    its forward and its backward.

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
        >>> from revtree.testing import held_bytes
        >>> blocks = [(nn.Linear(64, 64), nn.Linear(64, 64)) for _ in range(8)]
        >>> x = torch.randn(32, 128, requires_grad=True)
        >>> plain = revtree.ReversibleSequence(blocks, reversible=False)
        >>> held_bytes(plain, x), held_bytes(revtree.ReversibleSequence(blocks), x)
        (147456, 16384)
    """
    own = [*fn.parameters(), *fn.buffers()] if isinstance(fn, nn.Module) else []
    with torch.enable_grad():
        held, _ = held_after_forward(lambda: fn(*args, **kwargs), [*own, *exclude])
    return held


def saved_bytes(
    fn: Callable[..., Any], /, *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
) -> int:
    """The bytes a forward call keeps alive for backward beyond its output.

    As [`held_bytes`][revtree.testing.held_bytes], less the output's own storage: the
    activations plain autograd stores, what a reversible stack keeps besides its output
    (nothing, for a stack whose codecs rebuild the pieces from the output, such as
    ``Split``). The output itself is what the caller holds anyway.

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
        (131072, 0)
    """
    own = [*fn.parameters(), *fn.buffers()] if isinstance(fn, nn.Module) else []
    with torch.enable_grad():
        storages, out = _new_storages(lambda: fn(*args, **kwargs), [*own, *exclude])
    outputs = {
        t.untyped_storage().data_ptr()
        for t in _tensor_leaves(out)
        if t.layout == torch.strided and not t.is_meta
    }
    return sum(t.untyped_storage().nbytes() for key, t in storages.items() if key not in outputs)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _tensor_leaves(out: Any) -> list[torch.Tensor]:
    import optree

    return [t for t in optree.tree_leaves(out) if isinstance(t, torch.Tensor)]


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
    storages, out = _new_storages(forward, exempt)
    return sum(t.untyped_storage().nbytes() for t in storages.values()), out


def _new_storages(
    forward: Callable[[], T], exempt: Iterable[torch.Tensor]
) -> tuple[dict[int, torch.Tensor], T]:
    """The storages new after ``out = forward()`` and alive (by address), and ``out``."""
    exempt = list(exempt)
    gc.collect()
    before = _live_tensors()  # held: no storage of theirs is freed and its address reused
    counter = Counter(exempt)  # holds every saved tensor, which autograd alone keeps in C++
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, _same):
        out = forward()
    gc.collect()
    skip = before.keys() | {t.untyped_storage().data_ptr() for t in exempt}
    after = _live_tensors()
    return {key: t for key, t in after.items() if key not in skip}, out


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
