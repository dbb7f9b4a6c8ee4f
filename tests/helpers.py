"""Shared test helpers: a catalogue of trees, tree comparison, generic blocks, a reference."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Any

import optree
import torch
from hypothesis import strategies as st
from torch import nn

from revtree.codecs import Duplicate, Rearrange, Split

Point = namedtuple("Point", ["pos", "vel"])
DTYPE = torch.float64
TOL = 1e-10
INTERLEAVE = "... (c two) -> two ... c"


def t(
    *shape: int, requires_grad: bool = True, seed: int = 0, dtype: torch.dtype = DTYPE
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def plain(blocks: Any, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The plain coupling on one tensor split in two on its last axis, keywords to f."""
    x1, x2 = x.chunk(2, -1)
    for f, g in blocks:
        x1 = x1 + f(x2, **kwargs)
        x2 = x2 + g(x1)
    return torch.cat((x1, x2), -1)


def grads(loss: torch.Tensor, sources: list[Any], mode: str) -> list[Any]:
    """The gradients of ``sources``, by ``loss.backward()`` or ``torch.autograd.grad``."""
    if mode == "grad":
        return list(torch.autograd.grad(loss, sources, allow_unused=True))
    for s in sources:
        s.grad = None
    loss.backward()
    out = [s.grad for s in sources]
    for s in sources:
        s.grad = None
    return out


def tree_catalogue() -> list[Any]:
    """Edge-case input trees: every leaf has an even last dimension."""
    return [
        t(3, 4),
        (t(3, 4),),
        [t(2, 6), t(4)],
        {"a": t(2, 4), "b": None, "c": ()},
        {"tokens": t(2, 3, 4), "cls": t(2, 4)},
        Point(t(5, 2), t(5, 2)),
        OrderedDict(z=t(2, 2), a=t(2, 8)),
        {"outer": {"inner": [t(2, 4), (t(1, 2), Point(t(2, 4), t(3, 2)))]}},
    ]


def assert_trees_close(actual: Any, expected: Any, tol: float = TOL, what: str = "") -> None:
    """Leaf by leaf, with the key path of the first leaf that differs."""
    paths, a_leaves, a_spec = optree.tree_flatten_with_path(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec, f"{what}: structure {a_spec} != {e_spec}"
    for path, a, e in zip(paths, a_leaves, e_leaves):
        if a is None or e is None:
            assert a is None and e is None, f"{what} at {path}: {a} vs {e}"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} at {path}"
        diff = (a - e).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
        assert diff <= tol * scale, f"{what} at {path}: max difference {diff:.3e}"


class TreeMixer(nn.Module):
    """A block function for any tree: a linear map per leaf, mixed across leaves, optional dropout.

    ``widths`` are the last-dimension sizes of the half-stream's leaves in flattening order.
    Keyword context ``ctx`` (a tensor or a tree of tensors) is folded in when given.
    """

    def __init__(self, widths: list[int], dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linears = nn.ModuleList(nn.Linear(w, w, dtype=DTYPE) for w in widths)
        for lin in self.linears:
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=DTYPE) * 0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=DTYPE) * 0.1)
        self.mix = nn.Parameter(torch.randn(len(widths), generator=g, dtype=DTYPE) * 0.3)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tree: Any, ctx: Any = None, scale: float = 1.0) -> Any:
        leaves, spec = optree.tree_flatten(tree)
        summary = sum(m * leaf.mean() for m, leaf in zip(self.mix, leaves))
        if ctx is not None:
            summary = summary + sum(c.tanh().mean() for c in optree.tree_leaves(ctx))
        out = [
            self.dropout(torch.tanh(lin(leaf) + summary)) * scale
            for lin, leaf in zip(self.linears, leaves)
        ]
        return spec.unflatten(out)


class RichMixer(TreeMixer):
    """A ``TreeMixer`` that does what real models do beside its arithmetic.

    ``counter``: ``"in place"`` or ``"assign"``, a buffer it reads and updates each call
    (the output is scaled by it); ``island``: its linear maps run in a float32 island
    (``torch.autocast(..., enabled=False)``); and always a parameter it never uses.
    """

    def __init__(
        self,
        widths: list[int],
        dropout: float = 0.0,
        seed: int = 0,
        counter: str | None = None,
        island: bool = False,
    ) -> None:
        super().__init__(widths, dropout, seed)
        self.counter, self.island = counter, island
        self.register_buffer("count", torch.zeros((), dtype=DTYPE))
        self.unused = nn.Parameter(torch.ones(2, dtype=DTYPE))

    def forward(self, tree: Any, ctx: Any = None, scale: float = 1.0) -> Any:
        if self.island:
            device = optree.tree_leaves(tree)[0].device.type
            with torch.autocast(device, enabled=False):
                out = super().forward(tree, ctx, scale)
        else:
            out = super().forward(tree, ctx, scale)
        if self.counter == "in place":
            self.count += 1
        elif self.counter == "assign":
            self.count = self.count + 1
        factor = 1 + 0.1 * self.count
        return optree.tree_map(lambda leaf: leaf * factor.to(leaf.dtype), out)


def encode_reference(codec: Any, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent encoding, written from the definitions of the built-in codecs."""
    if isinstance(codec, Split):
        h = leaf.shape[codec.dim] // 2
        return leaf.narrow(codec.dim, 0, h), leaf.narrow(codec.dim, h, h)
    if isinstance(codec, Duplicate):
        return leaf, leaf
    if isinstance(codec, Rearrange) and codec.pattern == INTERLEAVE:
        return leaf[..., 0::2], leaf[..., 1::2]
    raise NotImplementedError(codec)


def decode_reference(codec: Any, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    if isinstance(codec, Split):
        return torch.cat([y1, y2], dim=codec.dim)
    if isinstance(codec, Duplicate):
        return 0.5 * (y1 + y2)
    if isinstance(codec, Rearrange) and codec.pattern == INTERLEAVE:
        return torch.stack([y1, y2], dim=-1).flatten(-2)
    raise NotImplementedError(codec)


def reference(
    x: Any,
    blocks: list[tuple[nn.Module, nn.Module]],
    codecs: list[Any],
    f_kwargs: dict | None = None,
    g_kwargs: dict | None = None,
) -> Any:
    """Plain autograd, written independently of revtree: encode, couple, decode."""
    leaves, spec = optree.tree_flatten(x)
    pairs = [encode_reference(c, leaf) for c, leaf in zip(codecs, leaves)]
    x1 = spec.unflatten([p[0] for p in pairs])
    x2 = spec.unflatten([p[1] for p in pairs])
    for f, g in blocks:
        x1 = optree.tree_map(torch.add, x1, f(x2, **(f_kwargs or {})))
        x2 = optree.tree_map(torch.add, x2, g(x1, **(g_kwargs or {})))
    y1, y2 = optree.tree_leaves(x1), optree.tree_leaves(x2)
    return spec.unflatten([decode_reference(c, a, b) for c, a, b in zip(codecs, y1, y2)])


def make_blocks(
    widths: list[int], depth: int, dropout: float = 0.0, seed: int = 0
) -> list[tuple[nn.Module, nn.Module]]:
    return [
        (
            TreeMixer(widths, dropout, seed=seed + 2 * i),
            TreeMixer(widths, dropout, seed=seed + 2 * i + 1),
        )
        for i in range(depth)
    ]


def half_widths(x: Any, codecs: list[Any]) -> list[int]:
    return [
        encode_reference(c, leaf)[0].shape[-1] for c, leaf in zip(codecs, optree.tree_leaves(x))
    ]


# hypothesis strategies --------------------------------------------------------------------

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).flatmap(
    lambda batch: st.integers(1, 3).map(lambda half: (*batch, 2 * half))
)
"""Leaf shapes: up to two batch dimensions and an even last dimension."""


def trees(leaf: st.SearchStrategy = shapes) -> st.SearchStrategy:
    """Random pytrees of ``leaf``: dicts, tuples, lists, namedtuples, nested, with Nones."""

    def nodes(children: st.SearchStrategy) -> st.SearchStrategy:
        keys = st.sampled_from(["a", "b", "tok", "cls", "z"])
        return st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda p: Point(*p)),
            st.tuples(children, st.none()).map(lambda p: {"x": p[0], "none": p[1]}),
        )

    return st.recursive(leaf, nodes, max_leaves=5)


def materialize(structure: Any, seed: int, requires_grad: list[bool] | None = None) -> Any:
    """Turn a tree of shapes into a tree of float64 tensors."""
    shapes_, spec = optree.tree_flatten(
        structure, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)
    )
    flags = requires_grad or [True] * len(shapes_)
    leaves = [
        t(*shape, requires_grad=flag, seed=seed + i)
        for i, (shape, flag) in enumerate(zip(shapes_, flags))
    ]
    return spec.unflatten(leaves)


def codec_for(leaf: torch.Tensor, choice: int) -> Any:
    """A codec that fits ``leaf``: Split(-1), Duplicate, Split on another dim, Rearrange."""
    if choice == 1:
        return Duplicate()
    if choice == 2:
        for dim in range(leaf.dim() - 1):
            if leaf.shape[dim] % 2 == 0:
                return Split(dim)
    if choice == 3:
        return Rearrange(INTERLEAVE, two=2)
    return Split(-1)


SHARED_CODECS = (Split(-1), Duplicate(), Rearrange(INTERLEAVE, two=2))
"""Codecs that fit every leaf ``shapes`` draws, so any subtree of such leaves can share one."""


@st.composite
def codec_prefixes(draw: st.DrawFn, x: Any) -> tuple[Any, list[Any]]:
    """A prefix tree of codecs for ``x``, and the codec it gives each leaf in flattening order.

    Walks ``x`` one level at a time: a whole subtree sometimes shares one codec (sometimes the
    root, so one codec for everything), otherwise its children get their own prefixes. The
    per-leaf list is built by the same walk, not by broadcasting the prefix, so a reference
    that encodes with it is independent of how revtree matches prefixes to the input.
    """

    def build(node: Any, share: bool) -> tuple[Any, list[Any]]:
        if isinstance(node, torch.Tensor):
            codec = codec_for(node, draw(st.integers(0, 3)))
            return codec, [codec]
        if share:
            codec = draw(st.sampled_from(SHARED_CODECS))
            return codec, [codec] * len(optree.tree_leaves(node))
        children, metadata, _, unflatten = optree.tree_flatten_one_level(node)
        built = [build(child, draw(st.sampled_from([False, True, True]))) for child in children]
        return unflatten(metadata, [b[0] for b in built]), [c for b in built for c in b[1]]

    return build(x, draw(st.sampled_from([False, False, False, True])))


def finish() -> None:
    """End a worker that succeeded: wait for the others, then leave at once.

    Tearing a gloo process group down from Python can deadlock inside torch (the group's
    destructor, holding the GIL, waits for a worker thread that waits for the GIL): a
    worker that is done skips the teardown; the operating system closes its sockets.
    """
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Any, *args: Any, nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn`` of ``worker(rank, port, *args)`` on a free local port.

    Gloo now and then kills a process by a signal on this machine's loopback ("terminate
    called without an active exception"), not by any error of the code under test: such a
    run is tried once more. An exception raised in a worker fails at once.
    """
    import socket

    import torch.multiprocessing as mp

    for attempt in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(worker, args=(port, *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 2 or e.signal_name is None:
                raise


def graph_training_losses(model: nn.Module, type0: Any, steps: int, lr: float) -> list[float]:
    """The losses of ``steps`` Adam steps of a graph model regressing fixed type-0 targets.

    Two graphs of 8 nodes (tokens from a vocabulary of 10, float64 coordinates, no padding),
    the same for every call; ``type0(model, feats, coords, mask)`` gives the model's
    ``(2, 8)`` type-0 output (each package returns it its own way).
    """
    g = torch.Generator().manual_seed(4)
    feats = torch.randint(0, 10, (2, 8), generator=g)
    coords = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    target = torch.randn(2, 8, generator=g, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (type0(model, feats, coords, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class _Wrapped(nn.Module):
    """Holds a block function as ``.net``, so parameter names are the package's."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class _PlainBlock(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f, self.g = _Wrapped(f), _Wrapped(g)


class PlainCoupling(nn.Module):
    """A reference trunk for equiformer-pytorch and se3-transformer-pytorch: their reversible
    coupling over a dict of degrees written out with plain autograd.

    Both streams start as the input; per block and degree ``y1 = x1 + f(x2, **kwargs)``,
    ``y2 = x2 + g(y1)``; the output is ``(y1 + y2) / 2``. Neither revtree nor the package's
    ``reversible.py`` is involved; the parameters are named ``blocks.{i}.f.net.*`` as there.
    """

    def __init__(self, blocks: list[tuple[nn.Module, nn.Module]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_PlainBlock(f, g) for f, g in blocks)

    def forward(self, x: dict, **kwargs: Any) -> dict:
        x1, x2 = x, x
        for block in self.blocks:
            fx = block.f.net(x2, **kwargs)
            x1 = {d: x1[d] + fx[d] for d in x}
            gx = block.g.net(x1)
            x2 = {d: x2[d] + gx[d] for d in x}
        return {d: (x1[d] + x2[d]) / 2 for d in x}
