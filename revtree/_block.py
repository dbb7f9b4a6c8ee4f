"""A block: the two functions ``(f, g)`` of one coupling, held as modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ._errors import RevtreeError


class Block(nn.Module):
    """One reversible block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

    Holds the two modules so that their parameters are named ``blocks.{i}.f.*`` and
    ``blocks.{i}.g.*`` in the sequence's state dict.

    Args:
        f: Maps a half-stream pytree (and keyword context) to a pytree of the same
            structure: a module, or any callable (kept as a [`Fn`][revtree.Fn]).
        g: Likewise, applied to the first output stream.

    Examples:
        >>> from torch import nn
        >>> import revtree
        >>> block = revtree.Block(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> sorted(name for name, _ in block.named_parameters())
        ['f.bias', 'f.weight', 'g.bias', 'g.weight']
    """

    def __init__(
        self, f: nn.Module | Callable[..., Any], g: nn.Module | Callable[..., Any]
    ) -> None:
        super().__init__()
        self.f = as_module(f)
        self.g = as_module(g)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable on its own: a block runs inside a ``ReversibleSequence``.

        The sequence calls a block that is an FSDP unit with the step to run, so that the
        unit's hooks gather and free its parameters around it.
        """
        if args and isinstance(args[0], _Run):
            return args[0](*args[1:])
        raise RevtreeError(
            "a revtree Block is run by its ReversibleSequence, not called directly. "
            "Hint: call the sequence, or call block.f / block.g."
        )


class Fn(nn.Module):
    """A plain function as ``f`` or ``g``: a module with no parameters of its own.

    The function may close over tensors that need no gradient; one that closes over a
    tensor needing a gradient is reported on the first backward (pass such a tensor as a
    keyword argument, or make the function a module holding it as a parameter).

    Args:
        fn: The function, called with the half-stream and the keyword arguments.

    Examples:
        >>> import torch, revtree
        >>> seq = revtree.ReversibleSequence([(torch.tanh, torch.sin)] * 2)
        >>> seq.blocks[0].f
        Fn(tanh)
        >>> seq(torch.zeros(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def as_module(fn: nn.Module | Callable[..., Any]) -> nn.Module:
    """``fn`` as a module: itself, or a plain callable held by an [`Fn`][revtree.Fn]."""
    return fn if isinstance(fn, nn.Module) else Fn(fn)


def as_block(index: int, block: Any) -> Block:
    """Accept a ``Block`` or an ``(f, g)`` pair of modules or callables."""
    if isinstance(block, Block):
        return block
    if isinstance(block, (tuple, list)) and len(block) == 2 and all(map(callable, block)):
        return Block(*block)
    raise RevtreeError(
        f"block {index} is {_describe(block)}, not a pair (f, g) of modules or functions. "
        "Hint: pass blocks=[(f0, g0), (f1, g1), ...], each f and g a torch module or a "
        "callable taking a half-stream pytree."
    )


def _describe(block: Any) -> str:
    if isinstance(block, (tuple, list)):
        kinds = ", ".join(type(b).__name__ for b in block)
        return f"a {type(block).__name__} of {len(block)} ({kinds})"
    return type(block).__name__


class _Run:
    """A step the sequence runs inside a block's own call (see ``Block.forward``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)
