"""A block: the modules ``(f, g)`` of one coupling, and how they are called on leaf lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from optree import PyTreeSpec
from torch import nn

from . import _trees
from ._context import Context
from ._errors import RevtreeError
from ._layout import Layout
from .couplings import Coupling, Elementwise


class Block(nn.Module):
    """One reversible block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

    Holds the two modules so that their parameters are named ``blocks.{i}.f.*`` and
    ``blocks.{i}.g.*`` in the sequence's state dict.

    Args:
        f: Maps a half-stream pytree (and keyword context) to a pytree of the same structure.
        g: Likewise, applied to the first output stream.

    Example:
        >>> from torch import nn
        >>> import revtree
        >>> block = revtree.Block(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> sorted(name for name, _ in block.named_parameters())
        ['f.bias', 'f.weight', 'g.bias', 'g.weight']
    """

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not callable on its own: a block runs inside a ``ReversibleSequence``."""
        raise RevtreeError(
            "a revtree Block is run by its ReversibleSequence, not called directly. "
            "Hint: call the sequence, or call block.f / block.g."
        )


def as_block(index: int, block: Any) -> Block:
    """Accept a ``Block`` or an ``(f, g)`` pair of modules."""
    if isinstance(block, Block):
        return block
    if isinstance(block, (tuple, list)) and len(block) == 2:
        f, g = block
        if isinstance(f, nn.Module) and isinstance(g, nn.Module):
            return Block(f, g)
    raise RevtreeError(
        f"block {index} is {type(block).__name__}, not a pair (f, g) of torch modules. "
        "Hint: pass blocks=[(f0, g0), (f1, g1), ...] with nn.Module instances "
        "(wrap a plain function in a small nn.Module)."
    )


class Versions:
    """The version counters of tensors that ``f`` or ``g`` must not modify in place.

    A reversible block calls ``f`` and ``g`` again during backward: a function that
    modified its input stream in place would make the block impossible to reconstruct,
    one that modified a keyword tensor would see (and leave) other values the second time.
    Read before a call, checked after it.
    """

    __slots__ = ("tensors", "versions")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        try:
            self.versions: list[int | None] = [t._version for t in tensors]
        except RuntimeError:  # inference tensors have no version counter (nor change outside it)
            self.versions = [None if t.is_inference() else t._version for t in tensors]

    def changed(self) -> int | None:
        """The position of the first tensor modified since, if any."""
        try:
            if [t._version for t in self.tensors] == self.versions:
                return None
        except RuntimeError:
            pass
        for k, (t, version) in enumerate(zip(self.tensors, self.versions)):
            if version is not None and t._version != version:
                return k
        return None


def check_unchanged(
    which: str,
    index: int,
    streams: Versions,
    stream_names: tuple[str, ...],
    keywords: Versions,
    context: Context | None,
) -> None:
    """Raise if ``f`` or ``g`` modified its input leaves or keyword tensors in place."""
    k = streams.changed()
    if k is not None:
        raise RevtreeError(
            f"block {index}: {which} modified its input leaf {stream_names[k]} "
            f"({_trees.describe(streams.tensors[k])}) in place, so the block's inputs cannot "
            f"be reconstructed from its outputs. Hint: use out-of-place operations on the "
            f"input in {which} (e.g. x = x * 2, not x *= 2)."
        )
    k = keywords.changed()
    if k is not None:
        name = context.name(k) if context is not None else f"keyword tensor {k}"
        raise RevtreeError(
            f"block {index}: {which} modified the keyword tensor {name} "
            f"({_trees.describe(keywords.tensors[k])}) in place; a reversible block runs "
            f"{which} again during backward, which would see and leave other values. "
            f"Hint: compute a new tensor in {which} (e.g. c = c * 2, not c *= 2)."
        )


@dataclass
class StepInputs:
    """What every block of one call shares: layout, coupling and keyword arguments.

    ``f_keywords`` and ``g_keywords`` are the tensors inside ``f_kwargs`` and ``g_kwargs``,
    watched for in-place changes and named through ``context`` in errors.
    """

    layout: Layout
    namespace: str
    coupling: Coupling
    f_kwargs: dict[str, Any]
    g_kwargs: dict[str, Any]
    context: Context | None = None
    f_keywords: list[torch.Tensor] = field(default_factory=list)
    g_keywords: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        layout: Layout,
        namespace: str,
        coupling: Coupling,
        context: Context,
        tensors: list[torch.Tensor],
    ) -> StepInputs:
        """The inputs of one call, with ``tensors`` put into the keyword arguments."""
        f_kwargs, g_kwargs = context.rebuild(tensors)
        return cls(
            layout,
            namespace,
            coupling,
            f_kwargs,
            g_kwargs,
            context,
            list(tensors) if context.to_f else [],
            list(tensors) if context.to_g else [],
        )

    @property
    def update_spec(self) -> PyTreeSpec:
        """The structure ``f`` and ``g`` return for an elementwise coupling."""
        arity = getattr(self.coupling, "arity", 1)
        if arity == 1:
            return self.layout.spec
        return optree.treespec_tuple(
            [self.layout.spec] * arity,
            none_is_leaf=_trees.NONE_IS_LEAF,
            namespace=self.namespace,
        )

    def keywords(self, which: str) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The keyword arguments of ``f`` or ``g``, and the tensors among them."""
        if which == "f":
            return self.f_kwargs, self.f_keywords
        return self.g_kwargs, self.g_keywords


def call(
    module: nn.Module,
    which: str,
    index: int,
    leaves: list[torch.Tensor],
    inputs: StepInputs,
    expected: PyTreeSpec,
) -> list[torch.Tensor]:
    """Call ``f`` or ``g`` on a half-stream given as leaves; return its output's leaves.

    ``expected`` is the structure the coupling needs back: the half-stream's own, or a tuple
    of them (e.g. a log-scale and a shift tree for the affine coupling).
    """
    layout = inputs.layout
    kwargs, keywords = inputs.keywords(which)
    streams, watched = Versions(leaves), Versions(keywords)
    out = module(layout.spec.unflatten(leaves), **kwargs)
    check_unchanged(which, index, streams, layout.names, watched, inputs.context)
    out_leaves, out_spec = _trees.leaves_as(out, expected, inputs.namespace)
    if _trees.differ(out_spec, expected):
        wanted = (
            "a pytree with the structure of its input (same keys, same nesting, one tensor per "
            "leaf)"
            if expected == layout.spec
            else f"{expected}, built from the structure of its input"
        )
        raise RevtreeError(
            f"block {index}: {which} returned a pytree of structure {out_spec}, but its input "
            f"half-stream has structure {layout.spec}. Hint: {which} must return {wanted}."
        )
    return out_leaves


def combine(
    coupling: Elementwise,
    x: list[torch.Tensor],
    update: list[torch.Tensor],
    which: str,
    index: int,
    layout: Layout,
) -> list[torch.Tensor]:
    """``coupling.combine_leaves``, checking that each leaf keeps its shape and dtype."""
    out = None
    if all(isinstance(u, torch.Tensor) for u in update):
        try:
            out = coupling.combine_leaves(x, update)
        except (RuntimeError, TypeError):
            pass
    # same shape and dtype; the device can only change for a 0-dim leaf (a CPU scalar
    # tensor combines with a CUDA one), so it is compared there only
    if out is not None and all(
        y.shape == a.shape and y.dtype is a.dtype and (a.shape or y.device == a.device)
        for y, a in zip(out, x)
    ):
        return out
    raise _combine_error(coupling, x, update, which, index, layout)


def _combine_error(
    coupling: Elementwise,
    x: list[torch.Tensor],
    update: list[torch.Tensor],
    which: str,
    index: int,
    layout: Layout,
) -> RevtreeError:
    """The error for the first leaf that ``combine`` cannot take."""
    n = len(x)
    for i, (name, a) in enumerate(zip(layout.names, x)):
        parts = update[i::n]  # leaf i of each of the coupling's update trees
        for b in parts:
            if not isinstance(b, torch.Tensor):
                return RevtreeError(
                    f"block {index}: {which} returned {_trees.describe(b)} at {name}, where the "
                    f"half-stream holds a tensor of shape {tuple(a.shape)}. "
                    f"Hint: {which} must return a tensor for every leaf."
                )
        try:
            y, error = coupling.combine(a, *parts), None
        except RuntimeError as e:
            y, error = None, e
        if y is None or y.shape != a.shape or y.dtype != a.dtype or y.device != a.device:
            got = ", ".join(f"{_trees.describe(b)} on {b.device}" for b in parts)
            return RevtreeError(
                f"block {index}: {which} returned {got} at {name}, which cannot be combined "
                f"with the half-stream leaf of {_trees.describe(a)} on {a.device} without "
                "changing it"
                + (f" ({error})" if y is None else "")
                + f". Hint: {which} must return, for every leaf, a tensor of its input's shape, "
                "dtype and device (under autocast a lower-precision result is fine)."
            )
    return RevtreeError(
        f"block {index}: {coupling!r}.combine_leaves returned leaves that differ from what "
        "combine gives leaf by leaf. Hint: combine_leaves must return, for every leaf, "
        "combine(x, *update) of that leaf."
    )
