"""reformer-pytorch's reversible sequence, as the revtree engine with ``Split(2)``.

reformer-pytorch (1.4.4) runs ``ReformerLM``'s trunk through
``reformer_pytorch.reversible.ReversibleSequence``: one tensor ``(batch, tokens, 2 * dim)``
split in two on the feature axis, keyword routing ``arg_route=(to_f, to_g)``, random layer
dropout, plain autograd below a sequence length (``reverse_thres``), and ``send_signal``:
its LSH attention caches hash buckets in the forward pass and reads them back in the
recomputation, keyed by the keyword arguments ``_reverse`` (recomputing?) and ``_depth``
(the block). Here those are the engine's own pieces: ``codec=Split(2)``, keyword routing,
running a subset of the blocks, ``reversible=False``, and
[`is_recomputing`][revtree.is_recomputing].

Models built under [`patch`][revtree.adapters.reformer.patch] also get an LSH attention
whose hash buckets are kept with [`revtree.memo`][revtree.memo]: the recomputation reads
the forward's buckets back without hashing again (the package hashes a second time to keep
its random stream in step) and without the package's per-depth bucket cache, which it keeps
on the module from one step to the next.

Parameter names are the package's (``blocks.{i}.f.net.*``, ``blocks.{i}.g.net.*`` and the
same modules again as ``irrev_blocks.{i}.f.*``, ``irrev_blocks.{i}.g.*``), so checkpoints
load with ``strict=True``. ``ReformerLM`` looks the class up as the global
``reformer_pytorch.reformer_pytorch.ReversibleSequence``; [`patch`][revtree.adapters.reformer.patch]
swaps it in.

One deliberate difference: in training with ``layer_dropout > 0`` and a sequence no longer
than ``reverse_thres``, the package runs its reversible blocks under ``torch.no_grad()`` (no
gradient reaches them); here they run with plain autograd. The blocks dropped are drawn
from the global generator exactly as the package draws them.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from revtree.adapters.reformer import ReversibleSequence
    >>> seq = ReversibleSequence(nn.ModuleList(
    ...     nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]) for _ in range(3)))
    >>> seq(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .. import _sequence
from .._block import Block
from .._replay._memo import memo
from .._state import is_recomputing
from ..codecs import Split
from ._named import Named
from ._patching import swapped
from ._versions import require


class _Signal:
    """The keyword arguments reformer-pytorch's blocks read: ``_reverse`` and ``_depth``."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.on = False  # set by the sequence for each call: only reversible runs signal

    def __call__(self) -> dict[str, Any]:
        if not self.on:
            return {}
        return {"_reverse": is_recomputing(), "_depth": self.depth}


class ReversibleSequence(_sequence.ReversibleSequence):
    """``reformer_pytorch.reversible.ReversibleSequence``, on the revtree engine.

    Args:
        blocks: ``(f, g)`` pairs of modules (the package passes an ``nn.ModuleList`` of
            ``nn.ModuleList([f, g])``).
        layer_dropout: In training, the probability of skipping each block.
        reverse_thres: Sequences of at most this many tokens run with plain autograd.
        send_signal: Pass ``_reverse`` and ``_depth`` to ``f`` and ``g`` in reversible runs.
    """

    def __init__(
        self,
        blocks: Any,
        layer_dropout: float = 0.0,
        reverse_thres: int = 0,
        send_signal: bool = False,
    ) -> None:
        pairs = [tuple(pair) for pair in blocks]
        signals = [_Signal(depth) for depth in range(len(pairs))] if send_signal else []
        extra: list[_Signal | None] = [*signals] or [None] * len(pairs)
        super().__init__(
            [(Named(f, s), Named(g, s)) for (f, g), s in zip(pairs, extra)], codec=Split(2)
        )
        self._signals = signals
        self.layer_dropout = layer_dropout
        self.reverse_thres = reverse_thres
        self.irrev_blocks = nn.ModuleList([Block(f, g) for f, g in pairs])

    def forward(  # type: ignore[override]  # noqa: D417 (the keyword arguments are the blocks')
        self, x: torch.Tensor, arg_route: tuple[bool, bool] = (True, False), **kwargs: Any
    ) -> torch.Tensor:
        """Run the blocks on ``x``; ``arg_route`` says whether ``f`` and ``g`` get ``kwargs``.

        Args:
            x: ``(batch, tokens, 2 * dim)``.
            arg_route: ``(to_f, to_g)``.
        """
        reverse = x.shape[1] > self.reverse_thres
        indices = list(range(len(self.blocks)))
        if self.training and self.layer_dropout > 0:
            # drawn as the package draws it, so the global random stream stays in step
            to_drop = torch.empty(len(self.blocks)).uniform_(0, 1) < self.layer_dropout
            indices = [i for i, drop in zip(indices, to_drop) if not drop] or [0]
        self.reversible = reverse
        for signal in self._signals:
            signal.on = reverse
        route = (bool(arg_route[0]), bool(arg_route[1]))
        return self.run(x, kwargs, route=route, blocks=indices)


def _lsh_attention() -> type:
    """The package's ``LSHAttention`` with its hash buckets kept by the memo (made once)."""
    import reformer_pytorch.reformer_pytorch as package

    global _LSH
    if _LSH is None:

        class LSHAttention(package.LSHAttention):
            """``reformer_pytorch.LSHAttention``, its buckets kept with ``revtree.memo``."""

            def hash_vectors(self, n_buckets: int, vecs: torch.Tensor, **cache: Any) -> Any:
                hash_vectors = super().hash_vectors
                # hashed in the forward call, handed back in the recomputation; the
                # package's own cache (keyword arguments ``fetch``, ``set_cache``) unused
                return memo(lambda: hash_vectors(n_buckets, vecs, fetch=False, set_cache=False))

        LSHAttention.__module__ = __name__
        LSHAttention.__qualname__ = "LSHAttention"
        _LSH = LSHAttention
    return _LSH


_LSH: type | None = None


def __getattr__(name: str) -> Any:
    # the memo's LSHAttention, made on first use (so that pickles of patched models load)
    if name == "LSHAttention":
        return _lsh_attention()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def patch() -> Iterator[None]:
    """Make ``ReformerLM``/``Reformer`` built inside the context use this class for its trunk.

    Examples:
        >>> from reformer_pytorch import ReformerLM  # doctest: +SKIP
        >>> with patch():  # doctest: +SKIP
        ...     model = ReformerLM(num_tokens=256, dim=64, depth=4, max_seq_len=128)
    """
    require("reformer-pytorch", "1.4.4", "reformer")
    import reformer_pytorch.reformer_pytorch as package

    with swapped([package], ReversibleSequence=ReversibleSequence, LSHAttention=_lsh_attention()):
        yield
