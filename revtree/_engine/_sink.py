"""Where the gradients of one node's backward go: chosen once per backward.

Each source (a tensor the forward read that needs a gradient: a parameter, what
``functional_call`` put in its slot, an external) has a *handle*: the tensor its slot
holds in the recomputation, whose gradient the engine computes.

- **capture** (the default): the handle is the source itself; the engine asks autograd
  for its gradient and returns it through the node, so a parameter's hooks fire once, on
  the total, and ``torch.autograd.grad`` writes no ``.grad``. A source with tensor hooks,
  or one a ``functional_call`` put in a slot for the forward only, gets a detached alias
  instead.
- **accumulate**: where hooks on the modules may ask the engine about the recomputation's
  inputs (``FlopCounterMode`` and other module trackers ask whether their nodes will run,
  which ``torch.autograd.grad`` cannot say of a leaf), every handle is an alias and the
  engine accumulates into their ``.grad``, then returns those.
- **open**: where FSDP manages parameters of a block, the engine accumulates into every
  leaf the recomputation reaches: the aliases, and the parameters FSDP gathered, whose
  gradients it reduce-scatters itself (see ``_fsdp``).

Keyword tensors that need a gradient get detached aliases; their gradients are returned
through the node too.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import torch
from torch.overrides import has_torch_function

from .. import _checks, _torch
from .._replay._autocast import NOTHING
from .._replay._protocol import restoring
from .._replay._rng import Generators

Leaves = list[torch.Tensor]


class Backward:
    """What the recomputations of one node's backward share, and where their gradients go."""

    __slots__ = (
        "accumulate",
        "autocast",
        "context",
        "externals",
        "frozen",
        "generators",
        "handles",
        "identity",
        "kinds",
        "keywords",
        "kw_totals",
        "kw_wanted",
        "kwargs",
        "open",
        "plain",
        "totals",
        "views",
    )

    def __init__(
        self,
        tape: Any,
        keywords_need: Sequence[bool],
        accumulate: bool = False,
        open: bool = False,
    ) -> None:
        shared = tape.shared
        sources = tape.sources
        self.open = open
        self.accumulate = accumulate = accumulate or open
        # externals are read where no slot can swap in an alias: their handle is themselves
        # (in accumulate mode their gradients are asked of autograd apart)
        self.externals: frozenset[int] = tape.externals
        if accumulate:
            aliased = [True] * len(sources)
        else:  # an alias where something else could see the gradient: hooks, a non-leaf
            aliased = list(map(bool, map(_torch.TENSOR_HOOKS, sources)))
            aliased = [a or not t.is_leaf for a, t in zip(aliased, sources)]
        self.handles = [
            t.detach().requires_grad_() if a and p not in self.externals else t
            for p, (t, a) in enumerate(zip(sources, aliased))
        ]
        # sources frozen since the forward (requires_grad_(False)): no gradient, as in plain
        # autograd; the recomputation reads them as they are
        self.frozen = frozenset(p for p, t in enumerate(sources) if not t.requires_grad)
        for p in self.frozen:
            self.handles[p] = sources[p]
        self.totals: list[Any] = [None] * len(sources)
        context = shared.context
        tensors = context.tensors
        self.keywords = [
            t.detach().requires_grad_() if need else t for t, need in zip(tensors, keywords_need)
        ]
        self.kw_wanted = [k for k, need in enumerate(keywords_need) if need]
        self.kw_totals: list[Any] = [None] * len(tensors)
        self.kwargs = context.rebuild(self.keywords)
        self.context = context
        self.views: dict[Any, tuple[dict[str, Any], Leaves, list[int], list[int]]] = {}
        state = shared.autocast
        self.autocast: Any = NOTHING if state is None or state.is_current else state.replay()
        self.kinds = restoring(self.autocast is not NOTHING)  # what recomputations restore
        # whether every handle is its source: the slots then hold what is differentiated
        self.identity = all(map(is_, self.handles, sources))
        self.generators: Generators | None = shared.generators
        wanted = [self.keywords[k] for k in self.kw_wanted]
        self.plain = not (has_torch_function(self.handles) or has_torch_function(wanted))

    def view(self, receives: Any) -> tuple[dict[str, Any], Leaves, list[int], list[int]]:
        """What a function that ``receives`` gets of the keyword arguments.

        Its keyword arguments, their tensors, their positions, and those of them whose
        gradient is wanted.
        """
        if self.context.empty:
            return _NO_KEYWORDS
        view = self.views.get(receives)
        if view is None:
            context = self.context
            receiving = context.receiving(receives)
            view = self.views[receives] = (
                context.select(self.kwargs, receives),
                [self.keywords[k] for k in receiving],
                receiving,
                self.keyword_positions(receiving),
            )
        return view

    def keyword_positions(self, receiving: list[int]) -> list[int]:
        """Of the keyword tensors a function receives, those whose gradient is wanted."""
        wanted = self.kw_wanted
        return [k for k in receiving if k in wanted] if wanted else []

    def vjp(
        self,
        outputs: Leaves,
        grads: Sequence[Any],
        leaves: Leaves,
        positions: list[int],
        keywords: list[int],
        where: tuple[int, str] = (-1, "f"),
    ) -> list[Any]:
        """Back-propagate ``grads`` from ``outputs``; return the gradients of ``leaves``.

        The gradients of the sources at ``positions`` and of the keyword tensors at
        ``keywords`` are kept for the node to return; ``None`` where none flows. ``where``
        (block index, function) locates an error.
        """
        kept, kept_grads = _grad_outputs(outputs, grads)
        if not kept:
            return [None] * len(leaves)
        handles = self.handles
        if self.frozen:
            positions = [p for p in positions if p not in self.frozen]
        n, m = len(leaves), len(positions)
        try:
            if self.open:
                _torch.run_backward(kept, kept_grads, (), True)
                return [t.grad for t in leaves]
            if self.accumulate:
                return self._accumulate(kept, kept_grads, leaves, positions, keywords)
            inputs = (*leaves, *map(handles.__getitem__, positions), *self._keywords(keywords))
            if self.plain:
                out = _torch.run_backward(kept, kept_grads, inputs, False)
            else:
                out = torch.autograd.grad(kept, inputs, kept_grads, allow_unused=True)
        except RuntimeError as e:
            if "use_reentrant=True" in str(e):
                _checks.reentrant_checkpoint(*where)
            raise
        self.add(positions, out[n : n + m])
        if keywords:
            self.add_keywords(keywords, out[n + m :])
        return list(out[:n])

    def _keywords(self, keywords: list[int]) -> list[torch.Tensor]:
        return [self.keywords[k] for k in keywords] if keywords else []

    def _accumulate(
        self,
        kept: Leaves,
        kept_grads: Leaves,
        leaves: Leaves,
        positions: list[int],
        keywords: list[int],
    ) -> list[Any]:
        handles = self.handles
        external = [p for p in positions if p in self.externals]
        if external:  # read where no alias could go: asked apart, the graph kept
            found = torch.autograd.grad(
                kept,
                [handles[p] for p in external],
                kept_grads,
                retain_graph=True,
                allow_unused=True,
            )
            self.add(external, found)
            positions = [p for p in positions if p not in external]
        inputs = (*leaves, *(handles[p] for p in positions), *self._keywords(keywords))
        _torch.run_backward(kept, kept_grads, inputs, True)
        return [t.grad for t in leaves]

    def add(self, positions: Sequence[int], grads: Sequence[Any]) -> None:
        """Add ``grads`` to the totals of the sources at ``positions`` (``None``: nothing)."""
        _accumulate_into(self.totals, positions, grads)

    def add_keywords(self, keywords: Sequence[int], grads: Sequence[Any]) -> None:
        """Add ``grads`` to the totals of the keyword tensors at ``keywords``."""
        _accumulate_into(self.kw_totals, keywords, grads)

    def source_grads(self) -> list[Any]:
        """The gradient of each source (``None`` where none reached it)."""
        if self.accumulate:
            externals, frozen, totals = self.externals, self.frozen, self.totals
            return [
                totals[p] if p in externals or p in frozen else h.grad
                for p, h in enumerate(self.handles)
            ]
        return self.totals

    def keyword_grads(self) -> list[Any]:
        """The gradient of each keyword tensor (``None`` where not wanted or none flowed)."""
        if self.accumulate:
            wanted = set(self.kw_wanted)
            return [kw.grad if k in wanted else None for k, kw in enumerate(self.keywords)]
        return self.kw_totals


def _accumulate_into(totals: list[Any], positions: Sequence[int], grads: Sequence[Any]) -> None:
    for p, g in zip(positions, grads):
        if g is not None:
            t = totals[p]
            totals[p] = g if t is None else t + g


_NO_KEYWORDS: tuple[dict[str, Any], Leaves, list[int], list[int]] = ({}, [], [], [])


def _grad_outputs(outputs: Leaves, grads: Sequence[Any]) -> tuple[Leaves, Leaves]:
    """Pair each output that requires grad with its gradient, cast and reduced as autograd would."""
    if (
        not any(map(is_, grads, repeat(None)))
        and all(map(_REQUIRES_GRAD, outputs))
        and list(map(_SHAPE, outputs)) == list(map(_SHAPE, grads))
        and list(map(_DTYPE, outputs)) == list(map(_DTYPE, grads))
    ):
        return outputs, list(grads)  # every one as it is (the common case)
    kept, kept_grads = [], []
    for out, grad in zip(outputs, grads):
        if grad is not None and isinstance(out, torch.Tensor) and out.requires_grad:
            if grad.shape != out.shape:  # the output was broadcast when combined
                grad = grad.sum_to_size(out.shape)
            if grad.dtype != out.dtype:  # autocast: combining promoted a lower precision
                grad = grad.to(out.dtype)
            kept.append(out)
            kept_grads.append(grad)
    return kept, kept_grads


_REQUIRES_GRAD, _SHAPE, _DTYPE = (
    attrgetter("requires_grad"),
    attrgetter("shape"),
    attrgetter("dtype"),
)
