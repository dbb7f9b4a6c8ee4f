"""torch_geometric's ``GroupAddRev`` (RevGNN), on the revtree engine.

PyG (2.8) implements the grouped reversible GNN of "Graph Neural Networks with 1000 Layers"
(Li et al., ICML 2021) as ``torch_geometric.nn.GroupAddRev``: the node features cut in
``C`` groups, and a sweep ``y_0 = x_0 + f_0(x_1 + ... + x_{C-1})``, then
``y_i = x_i + f_i(y_{i-1})``. Here that sweep is one block of ``C``
[`Update`][revtree.Update] steps over the parts of ``Split(split_dim, parts=C)``: nothing of
it lives in the core. What changes against the package:

- dropout inside the convolution is replayed in the recomputation (the package draws new
  masks: its gradients are then wrong);
- the caller's input is never freed: the package empties its storage
  (``untyped_storage().resize_(0)``) to keep memory flat across layers, so reading it after
  the call, or a skip connection ``conv(h) + h``, crashes the process. Here layers called
  one after the other (``h = layer(h, edge_index)``) hold one output in all, the engine
  taking over each output as the next layer's input (see the engine's notes on chaining);
  a caller who keeps ``h`` keeps it alive, exactly;
- ``torch.autograd.grad`` writes no ``.grad``, hooks fire once.

The class takes the package's arguments and names its parameters as it does
(``convs.{i}.*``), so state dicts load both ways. ``disable=True`` runs plain autograd,
``inverse`` undoes the layer. [`patch`][revtree.adapters.pyg.patch] makes every
``GroupAddRev`` built inside it this one.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from revtree.adapters.pyg import GroupAddRev
    >>> class Conv(nn.Module):  # any module called as conv(x, edge_index, *args)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(4, 4)
    ...     def forward(self, x, edge_index):
    ...         return self.lin(x).tanh()
    >>> layer = GroupAddRev(Conv(), num_groups=2)
    >>> x, edge_index = torch.randn(5, 8), torch.tensor([[0, 1], [1, 2]])
    >>> torch.allclose(layer.inverse(layer(x, edge_index), edge_index), x, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .._block import Block, Update
from .._errors import RevtreeError
from .._sequence import ReversibleSequence
from ..codecs import Split
from ._built import built
from ._patching import constructed_as, swapped
from ._versions import require

TESTED = "2.8.1"


class _Group(nn.Module):
    """One group's update: the package's ``conv``, called on the sum of what it reads."""

    def __init__(self, conv: nn.Module, index: int) -> None:
        super().__init__()
        self.conv = conv
        self.index = index

    def forward(self, *parts: torch.Tensor, edge_index: Any, args: Any) -> torch.Tensor:
        # the package's arithmetic: y_in = sum(xs[1:]) for the first group (0 + x_1 + ...)
        y_in = sum(parts) if len(parts) > 1 else parts[0]
        return self.conv(y_in, edge_index, *args[self.index])


class GroupAddRev(nn.Module):
    """``torch_geometric.nn.GroupAddRev``, on the revtree engine.

    Args:
        conv: A seed GNN whose input and output widths match a group's (copied for every
            group, each copy reset), or an ``nn.ModuleList`` of one per group.
        split_dim: The dimension the groups are cut along.
        num_groups: The number of groups ``C`` (with one ``conv``).
        disable: Run plain autograd (the package's memory-hungry path), for A/B checks.
        num_bwd_passes: Accepted for compatibility: backward may run as often as the graph
            is retained (``retain_graph=True``).
    """

    def __init__(
        self,
        conv: nn.Module | nn.ModuleList,
        split_dim: int = -1,
        num_groups: int | None = None,
        disable: bool = False,
        num_bwd_passes: int = 1,
    ) -> None:
        super().__init__()
        self.disable = disable
        self.num_bwd_passes = num_bwd_passes
        self.split_dim = split_dim
        if isinstance(conv, nn.ModuleList):
            self.convs = conv
        else:
            if num_groups is None:
                raise RevtreeError(
                    "GroupAddRev(conv) with one conv needs num_groups, the number of groups "
                    "the features are cut in. Hint: GroupAddRev(conv, num_groups=2), or pass "
                    "an nn.ModuleList of one conv per group."
                )
            self.convs = nn.ModuleList([conv])
            for _ in range(num_groups - 1):
                twin = copy.deepcopy(conv)
                reset = getattr(twin, "reset_parameters", None)
                if callable(reset):
                    reset()
                self.convs.append(twin)
        if len(self.convs) < 2:
            raise RevtreeError(
                f"GroupAddRev needs at least 2 groups, got {len(self.convs)}. Hint: "
                "num_groups=2 or more (each group updates its part from the others)."
            )

    @property
    def num_groups(self) -> int:
        """The number of groups ``C``."""
        return len(self.convs)

    def reset_parameters(self) -> None:
        """Reset every group's convolution."""
        for conv in self.convs:
            conv.reset_parameters()  # type: ignore[operator]

    @property
    def sequence(self) -> ReversibleSequence:
        """The one-block sequence that runs the groups as they are now."""
        convs = list(self.convs)
        key = (*convs, self.split_dim, self.disable)
        return built(self, key, lambda: self._build(convs))

    def _build(self, convs: list[nn.Module]) -> ReversibleSequence:
        c = len(convs)
        steps = [Update(_Group(convs[0], 0), writes=0, reads=tuple(range(1, c)))]
        steps += [Update(_Group(convs[i], i), writes=i, reads=i - 1) for i in range(1, c)]
        return ReversibleSequence(
            [Block(*steps)],
            codec=Split(self.split_dim, parts=c),
            reversible=not self.disable,
        )

    def _kwargs(self, x: torch.Tensor, edge_index: Any, args: tuple[Any, ...]) -> dict[str, Any]:
        """The keyword arguments of the groups: the package's chunking of ``args``."""
        channels = x.size(self.split_dim)
        chunked = list(zip(*[self._chunk(arg, channels) for arg in args]))
        if not chunked:
            chunked = [()] * self.num_groups
        return {"edge_index": edge_index, "args": tuple(tuple(a) for a in chunked)}

    def _chunk(self, x: Any, channels: int) -> list[Any]:
        """An argument cut per group where its size matches the features', else shared."""
        if not isinstance(x, torch.Tensor):
            return [x] * self.num_groups
        try:
            if x.size(self.split_dim) != channels:
                return [x] * self.num_groups
        except IndexError:
            return [x] * self.num_groups
        return list(torch.chunk(x, self.num_groups, dim=self.split_dim))

    def forward(self, x: torch.Tensor, edge_index: Any, *args: Any) -> torch.Tensor:
        """The layer's output; ``args`` reach every group's conv after ``edge_index``."""
        return self.sequence(x, **self._kwargs(x, edge_index, args))

    def inverse(self, y: torch.Tensor, edge_index: Any, *args: Any) -> torch.Tensor:
        """The input that gives the output ``y`` (differentiable, plain autograd)."""
        return self.sequence.inverse(y, **self._kwargs(y, edge_index, args))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.convs[0]}, num_groups={self.num_groups})"


@contextmanager
def patch() -> Iterator[None]:
    """Make every ``torch_geometric.nn.GroupAddRev`` built inside the context this one.

    Examples:
        >>> from torch_geometric.nn import GroupAddRev, SAGEConv  # doctest: +SKIP
        >>> with patch():  # doctest: +SKIP
        ...     layer = GroupAddRev(SAGEConv(16, 16), num_groups=2)
    """
    require("torch-geometric", TESTED, "pyg")
    import torch_geometric.nn as pyg_nn
    import torch_geometric.nn.models as models
    import torch_geometric.nn.models.rev_gnn as rev_gnn

    with (
        constructed_as(rev_gnn.GroupAddRev, GroupAddRev),
        swapped([pyg_nn, models, rev_gnn], GroupAddRev=GroupAddRev),
    ):
        yield
